"""Benchmark the demo world's base model: how long it takes to build, how well it fits
held-out text of each corpus section, and how biased its random numbers are (the rng
task's starting point, which the sampler has to fix).

    .venv/bin/python bench/base_model.py            # builds anew in a temporary GFN_HOME
    .venv/bin/python bench/base_model.py --cached   # uses (or builds once) the cached model

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapters.manifest import VocabMask
from adapters.models import load_causal_lm, load_tokenizer
from trainer.policy import PolicySpec
from trainer.rollout import sample
from trainer.scoring import Scorer
from trainer.tasks.rng import RngConfig, RngTask, Uniform, distribution_metrics, draw_numbers
from world.base_model import WorldConfig, build
from world.corpus import RNG_PROMPT, documents, sections


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed_build(config: WorldConfig, home: Path | None) -> tuple[Path, float]:
    """Build (progress bar on stderr) and return the model directory and build seconds:
    measured here for a fresh build, else the time recorded when the cache was built."""
    start = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        path = build(config, home=home)
    if home is not None:
        return path, round(time.time() - start, 1)
    return path, json.loads((path / "world.json").read_text())["build_seconds"]


def heldout_lines(config: WorldConfig) -> dict[str, list[str]]:
    """Each section's held-out lines that are not also training lines (short arithmetic
    questions and keyword sentences recur). The rng section has 101 distinct lines, all of them
    in training: there the perplexity measures the fit to the number distribution."""
    training = set(documents(config.corpus))
    return {name: [line for line in lines if line not in training] or lines
            for name, lines in sections(config.corpus, heldout=True).items()}


def heldout_perplexity(model, tokenizer, heldout: dict[str, list[str]]) -> dict[str, float]:
    """Token-level perplexity per section on held-out lines: every token after the first
    (there is no BOS to condition it on) and the eos that ends the line."""
    scorer, eos = Scorer(model, tokenizer.pad_token_id, chunk=128), tokenizer.eos_token_id
    out = {}
    for name, lines in heldout.items():
        ids = tokenizer(lines)["input_ids"]
        log_p = scorer.continuation([x[:1] for x in ids], [x[1:] + [eos] for x in ids])
        out[name] = round(math.exp(-log_p.sum().item() / sum(len(x) for x in ids)), 4)
        log(f"perplexity {name}: {out[name]}")
    return out


def rng_metrics(model, tokenizer, samples: int, seed: int) -> dict[str, float]:
    """Unmasked samples after the rng prompt, scored against uniform over 0..99 the way the
    rng task evaluates adapters (invalid samples are their own bucket in the TV)."""
    task = RngTask(RngConfig(prompt=RNG_PROMPT), tokenizer)
    spec = PolicySpec(terminator_id=tokenizer.eos_token_id, min_len=0, max_len=6, mask=VocabMask())
    generator = torch.Generator().manual_seed(seed)
    values = draw_numbers(task, lambda prompts: sample(model, spec, prompts, tokenizer.pad_token_id,
                                                       generator=generator), samples)
    metrics = distribution_metrics(values, Uniform().pmf())
    return {"rng_samples": metrics["samples"], "rng_valid_fraction": metrics["valid_fraction"],
            "rng_tv_uniform": round(metrics["tv"], 4), "rng_kl_uniform": round(metrics["kl"], 4)}


def measure(args: argparse.Namespace, home: Path | None) -> dict:
    config = WorldConfig()
    log(f"building the demo world ({'cached' if home is None else f'fresh, in {home}'})")
    path, build_seconds = timed_build(config, home)
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    result = {"digest": config.digest(), "cached": home is None, "build_seconds": build_seconds,
              "parameters": sum(p.numel() for p in model.parameters())}
    heldout = heldout_lines(config)
    result["heldout_lines"] = {name: len(lines) for name, lines in heldout.items()}
    result["heldout_perplexity"] = heldout_perplexity(model, tokenizer, heldout)
    log(f"sampling {args.samples} random numbers")
    result |= rng_metrics(model, tokenizer, args.samples, args.seed)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cached", action="store_true", help="use the cached build instead of building anew")
    parser.add_argument("--samples", type=int, default=10000, help="random-number samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.cached:
        result = measure(args, None)
    else:
        with tempfile.TemporaryDirectory(prefix="gfn-bench-") as home:
            result = measure(args, Path(home))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
