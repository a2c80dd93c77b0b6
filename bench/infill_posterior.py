"""Story infilling against the exact posterior: on held-out frames of the demo world, how
close each method's middles are to p(s4 | s1 s2 s3, s5) and how many effective samples
per second each gives.

    .venv/bin/python bench/infill_posterior.py [--fresh] [--prompts 24] [--samples 128]

Methods, on the same records with the same number of samples each:
  gfn         the GFlowNet adapter (configs/infill.yaml; reused from the bench cache)
  prior       the base model continuing the beginning alone, up to the sentence end
  prompted    the base model given the Beginning/Ending/Middle prompt
  importance  prior samples weighted by p(Y | X Z), drawn for as long as gfn took
  sft         a LoRA fine-tuned on (beginning, ending) -> middle pairs (trainer/sft.py)
Importance weights are w = p(X Z Y) / q(Z) (for prior proposals w ∝ p(Y | X Z)); ESS =
(Σw)²/Σw² per record, summed, over the seconds spent sampling and weighting. Adapters are
merged into their base weights for sampling, as a server would run them.

Last stdout line: {"train_seconds", "exact_sample_tv", "methods": {name: {tv,
ess_per_second, bleu4, distinct2, off_support, seconds}}, "goals": {...}}; exact_sample_tv
is the TV that n draws from the exact posterior itself score (sampling noise alone).
Goals: gfn.tv <= 0.15 while prior.tv >= 0.5; gfn.ess_per_second >= 10 x
importance.ess_per_second.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adapters.manifest import VocabMask  # noqa: E402
from adapters.models import load_causal_lm  # noqa: E402
from bench.adapter_cache import bench_parser, bench_store, cached_adapter, gfn_adapter, log  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.evaluate import LoadedPolicy  # noqa: E402
from trainer.metrics import effective_sample_size, total_variation  # noqa: E402
from trainer.policy import PolicySpec  # noqa: E402
from trainer.rollout import sample  # noqa: E402
from trainer.scoring import Scorer  # noqa: E402
from trainer.sft import SFTConfig, train_sft  # noqa: E402
from trainer.tasks.infill import InfillRecord, InfillTask, sample_metrics  # noqa: E402

# A method draws n middles for a record: their texts and importance log-weights.
Method = Callable[[InfillRecord, int], tuple[list[str], torch.Tensor]]


def policy_method(model: torch.nn.Module, task: InfillTask, scorer: Scorer, generator: torch.Generator) -> Method:
    """Middles from a policy reading the task's prompt, w = p(Z Y | X) / q(Z ⊤ | prompt)."""
    spec, pad = task.spec(), task.pad_id

    def draw(record: InfillRecord, n: int) -> tuple[list[str], torch.Tensor]:
        rollout = sample(model, spec, [task.prompt(record).ids] * n, pad, 1.0, generator)
        latents = rollout.latents()
        log_w = task.log_joint(scorer, record, latents) - rollout.log_q
        return [task.tokenizer.decode(z) for z in latents], log_w
    return draw


def prior_method(model: torch.nn.Module, task: InfillTask, scorer: Scorer, generator: torch.Generator) -> Method:
    """Middles from the base model continuing the beginning up to a full stop,
    w ∝ p(Y | X Z)."""
    stop = task.tokenizer.convert_tokens_to_ids(".")
    spec, pad = PolicySpec(stop, 1, task.config.max_len, VocabMask()), task.pad_id

    def draw(record: InfillRecord, n: int) -> tuple[list[str], torch.Tensor]:
        context, ending = task.context_ids(record.prefix), task.ids(" " + record.suffix)
        middles = [z + [stop] for z in sample(model, spec, [context] * n, pad, 1.0, generator).latents()]
        log_w = scorer.continuation([context + z for z in middles], [ending] * n)
        return [task.tokenizer.decode(z) for z in middles], log_w
    return draw


IMPORTANCE_CHUNK = 32  # small enough not to overrun gfn's time by much, large enough to batch well


def run(method: Method, records: list[InfillRecord], n: int, posteriors: list[list[float]],
        budgets: list[float] | None = None, generator: torch.Generator | None = None) -> tuple[dict, list[float]]:
    """Metrics of a method and its seconds per record. With `budgets` (importance sampling
    at equal compute) it draws chunks for each record while the next one, at the pace so far,
    still fits that record's budget; TV then uses the self-normalised weights, BLEU and
    distinct-2 n middles resampled by weight."""
    texts, weights, seconds, ess = [], [], [], 0.0
    size = n if budgets is None else min(n, IMPORTANCE_CHUNK)
    for i, record in enumerate(records):
        tick, drawn, log_w = time.perf_counter(), [], []
        while True:
            batch_texts, batch_w = method(record, size)
            drawn, log_w = drawn + batch_texts, log_w + [batch_w]
            spent = time.perf_counter() - tick
            if budgets is None or spent + spent / len(log_w) > budgets[i]:
                break
        seconds.append(time.perf_counter() - tick)
        log_w = torch.cat(log_w)
        ess += effective_sample_size(log_w)
        texts.append(drawn)
        weights.append(torch.softmax(log_w.double(), 0))
    if budgets is None:
        metrics = sample_metrics(records, texts, posteriors)
    else:
        metrics = sample_metrics(records, texts, posteriors, [w.tolist() for w in weights])
        resampled = [[t[k] for k in torch.multinomial(w, n, replacement=True, generator=generator).tolist()]
                     for t, w in zip(texts, weights)]
        resampled_metrics = sample_metrics(records, resampled, [None] * len(records))
        metrics.update(bleu4=resampled_metrics["bleu4"], distinct2=resampled_metrics["distinct2"],
                       samples_per_prompt=sum(len(t) for t in texts) / len(texts))
    metrics.update(ess_per_second=ess / sum(seconds), seconds=sum(seconds))
    return metrics, seconds


def exact_sample_tv(posteriors: list[list[float]], n: int, generator: torch.Generator, repeats: int = 20) -> float:
    """The mean TV of n draws from the exact posterior itself: the part of any method's TV
    that is sampling noise at this n (a perfect sampler scores this, not 0)."""
    tvs = [total_variation(torch.multinomial(torch.tensor(p), n, replacement=True, generator=generator).tolist(),
                           dict(enumerate(p)))
           for p in posteriors for _ in range(repeats)]
    return sum(tvs) / len(tvs)


def main() -> None:
    parser = bench_parser(__doc__, prompts="records", samples="samples per record")
    parser.add_argument("--sft-steps", type=int, default=300, help="steps of the SFT baseline")
    args = parser.parse_args()

    config = load_config("infill", ["evaluate=false"] + args.set)
    store = bench_store()
    gfn, gfn_cached = gfn_adapter(store, config, args.fresh)
    sft_config = SFTConfig(name="infill-sft", base_model=config.base_model, task=config.task, lora=config.lora,
                           steps=args.sft_steps, batch_size=32, lr=1e-3, seed=config.seed, evaluate=False)
    sft, sft_cached = cached_adapter(store, sft_config, lambda: train_sft(sft_config, store), args.fresh)
    log(f"sft adapter {sft.ref} ({'cached' if sft_cached else 'trained'}, {sft.metrics['train_seconds']} s)")

    policy, sft_policy = LoadedPolicy(store, gfn.name, gfn.version), LoadedPolicy(store, sft.name, sft.version)
    task: InfillTask = policy.task
    base = load_causal_lm(gfn.base_model.path)
    scorer = Scorer(base, policy.pad_id)
    records = task.eval_records[: args.prompts or task.config.eval_prompts]
    n = args.samples or task.config.eval_samples
    posteriors = [task.exact_posterior(scorer, r) for r in records]
    generator = torch.Generator().manual_seed(1234)
    methods: dict[str, Method] = {
        "gfn": policy_method(policy.model.merge_and_unload(), task, scorer, generator),
        "prior": prior_method(base, task, scorer, generator),
        "prompted": policy_method(base, task, scorer, generator),
        "sft": policy_method(sft_policy.model.merge_and_unload(), task, scorer, generator),
    }
    for method in methods.values():  # warm up allocators and kernels before timing
        method(records[0], 2)
    results, seconds = {}, {}
    for name, method in methods.items():
        results[name], seconds[name] = run(method, records, n, posteriors)
        log(f"{name}: {json.dumps(results[name])}")
    results["importance"], _ = run(methods["prior"], records, n, posteriors, budgets=seconds["gfn"],
                                   generator=generator)
    log(f"importance: {json.dumps(results['importance'])}")

    keys = ("tv", "ess_per_second", "bleu4", "distinct2", "off_support", "samples_per_prompt", "seconds")
    methods_out = {name: {k: round(m[k], 4) for k in keys} for name, m in results.items()}
    gfn_m, prior_m, is_m = methods_out["gfn"], methods_out["prior"], methods_out["importance"]
    print(json.dumps({
        "train_seconds": gfn.metrics["train_seconds"],
        "sft_train_seconds": sft.metrics["train_seconds"],
        "cached": gfn_cached,
        "prompts": len(records),
        "samples": n,
        "exact_sample_tv": round(exact_sample_tv(posteriors, n, generator), 4),
        "torch_threads": torch.get_num_threads(),
        "methods": methods_out,
        "goals": {
            "gfn_tv_at_most_0.15": gfn_m["tv"] <= 0.15,
            "prior_tv_at_least_0.5": prior_m["tv"] >= 0.5,
            "gfn_ess_per_second_10x_importance": gfn_m["ess_per_second"] >= 10 * is_m["ess_per_second"],
        },
    }))


if __name__ == "__main__":
    main()
