"""Continuation at low temperature: base-model log-likelihood against diversity of the next
sentence drawn by each method, with the same number of samples per prompt, on held-out
prompts of the demo world.

    .venv/bin/python bench/continuation.py [--fresh] [--prompts 32] [--samples 8] [--set key=value]

Methods (the task's masks, terminator "." and length limits for all):
  gfn           the GFlowNet adapter for p(Z. | X)^(1/T) (configs/continuation.yaml)
  temperature   the base model sampled token by token at the same final T
  nucleus       the base model, top-p 0.95
  beam          beam search with as many beams as samples
  diverse_beam  diverse beam search: one group per beam pair, Hamming diversity penalty 1.0
Metrics: mean_loglik (log p(Z. | X) over all samples), max_loglik (mean over prompts of the
best sample), distinct2 (distinct word bigrams within a prompt's samples), diversity
(1 - mean pairwise cosine similarity of token counts). `gfn_minus_temperature` pairs the two
by prompt: the mean over prompts of the difference of their mean log-likelihoods, with its
standard error, says whether gfn's margin is more than sampling noise.

Last stdout line: {"train_seconds", "temperature", "methods": {name: {mean_loglik, max_loglik,
distinct2, diversity, seconds}}, "gfn_minus_temperature": {mean, stderr}, "goals"}. Goals: gfn
mean_loglik above temperature's, gfn distinct2 above beam's.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adapters.models import load_causal_lm  # noqa: E402
from bench.adapter_cache import bench_parser, bench_store, gfn_adapter, log  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.decoding import beam_search, nucleus  # noqa: E402
from trainer.evaluate import LoadedPolicy  # noqa: E402
from trainer.rollout import sample  # noqa: E402
from trainer.scoring import Scorer  # noqa: E402
from trainer.tasks.continuation import ContinuationTask  # noqa: E402

# A method draws n latents for each prompt.
Method = Callable[[list[list[int]], int], list[list[list[int]]]]


def sampling(model: torch.nn.Module, task: ContinuationTask, temperature: float, generator: torch.Generator) -> Method:
    def draw(prompts: list[list[int]], n: int) -> list[list[list[int]]]:
        latents = sample(model, task.spec(), [p for p in prompts for _ in range(n)], task.pad_id,
                         temperature, generator).latents()
        return [latents[k * n:(k + 1) * n] for k in range(len(prompts))]
    return draw


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b over prompts and its standard error: prompts differ far more than methods."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return {"mean": round(mean, 4), "stderr": round(math.sqrt(variance / len(diffs)), 4)}


def main() -> None:
    parser = bench_parser(__doc__, prompts="prompts", samples="samples per prompt")
    args = parser.parse_args()

    config = load_config("continuation", ["evaluate=false"] + args.set)
    store = bench_store()
    gfn, cached = gfn_adapter(store, config, args.fresh)

    policy = LoadedPolicy(store, gfn.name, gfn.version)
    task: ContinuationTask = policy.task
    base = load_causal_lm(gfn.base_model.path)
    scorer = Scorer(base, policy.pad_id)
    spec, pad = task.spec(), policy.pad_id
    prompts = [task.prompt(r).ids for r in task.eval_records[: args.prompts or task.config.eval_prompts]]
    n = args.samples or task.config.eval_samples
    temperature = config.reward_temperature.end
    generator = torch.Generator().manual_seed(1234)
    methods: dict[str, Method] = {
        "gfn": sampling(policy.model, task, 1.0, generator),
        "temperature": sampling(base, task, temperature, generator),
        "nucleus": lambda ps, k: [nucleus(base, spec, [p] * k, pad, top_p=0.95, seed=i) for i, p in enumerate(ps)],
        "beam": lambda ps, k: [beam_search(base, spec, p, pad, beams=k) for p in ps],
        "diverse_beam": lambda ps, k: [beam_search(base, spec, p, pad, beams=k, groups=max(1, k // 2), diversity=1.0)
                                       for p in ps],
    }
    results, per_prompt = {}, {}
    for name, method in methods.items():
        tick = time.perf_counter()
        latents = method(prompts, n)
        seconds = time.perf_counter() - tick
        metrics = task.sample_metrics(scorer, prompts, latents)
        per_prompt[name] = metrics.pop("per_prompt")["mean"]
        results[name] = {**{k: round(v, 4) for k, v in metrics.items()}, "seconds": round(seconds, 2)}
        log(f"{name}: {json.dumps(results[name])}")

    print(json.dumps({
        "train_seconds": gfn.metrics["train_seconds"],
        "cached": cached,
        "temperature": temperature,
        "prompts": len(prompts),
        "samples": n,
        "torch_threads": torch.get_num_threads(),
        "methods": results,
        "gfn_minus_temperature": paired_difference(per_prompt["gfn"], per_prompt["temperature"]),
        "goals": {
            "gfn_mean_loglik_above_temperature": results["gfn"]["mean_loglik"] > results["temperature"]["mean_loglik"],
            "gfn_distinct2_above_beam": results["gfn"]["distinct2"] > results["beam"]["distinct2"],
        },
    }))


if __name__ == "__main__":
    main()
