"""Random-number fidelity: train the rng adapter from scratch with the default config and
compare its samples (and the base model's) with the target distribution.

    .venv/bin/python bench/rng_fidelity.py [--target '{kind: binomial, n: 99, p: 0.3}'] [--samples 10000]

Last stdout line: {"train_seconds", "samples", "adapter": {tv, kl, valid_fraction}, "base": {...},
"rl": {...}, "exact_sample": {tv, kl}} -- `exact_sample`: 10000 draws from the target itself score this
(sampling noise: a perfect sampler gets it, not 0); `rl` is the same LoRA trained by RLOO to maximise the same reward with a KL
penalty to the base (`--no-rl` skips it).
Goals: adapter tv <= 0.06, valid_fraction >= 0.995, train_seconds <= 300 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from adapters.manifest import VocabMask
from adapters.store import AdapterStore
from trainer.config import load_config
from trainer.evaluate import LoadedPolicy
from trainer.loop import Trainer
from trainer.policy import PolicySpec
from trainer.rl import load_rl_config, train_rl
from trainer.rollout import sample
from trainer.tasks.rng import distribution_metrics, draw_numbers

HEADLINE = ("tv", "kl", "valid_fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="YAML of the target, e.g. '{kind: poisson, rate: 30}'")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--set", action="append", default=[], help="extra config overrides key=value")
    parser.add_argument("--no-rl", action="store_true", help="skip the reward-maximising baseline")
    args = parser.parse_args()

    overrides = [f"task.target={args.target}"] if args.target else []
    config = load_config("rng", overrides + ["evaluate=false"] + args.set)
    work = Path(tempfile.mkdtemp(prefix="bench-rng-"))
    store = AdapterStore(work / "adapters")
    start = time.time()
    manifest = Trainer(config, work / "run", store, quiet=False).run()
    train_seconds = time.time() - start

    generator = torch.Generator().manual_seed(1234)
    policy = LoadedPolicy(store, manifest.name, manifest.version)
    task = policy.task
    adapter = distribution_metrics(draw_numbers(task, policy.sampler(generator), args.samples), task.pmf)
    # The base model as it is: no vocabulary mask, stopping at eos (or after 6 tokens).
    raw = PolicySpec(policy.tokenizer.eos_token_id, 0, 6, VocabMask())
    with policy.model.disable_adapter():
        base = distribution_metrics(draw_numbers(
            task, lambda prompts: sample(policy.model, raw, prompts, policy.pad_id, 1.0, generator), args.samples,
        ), task.pmf)
    # What a perfect sampler scores at this many samples: the figures above are this much noise.
    support = list(task.pmf)
    exact_draws = torch.multinomial(torch.tensor([task.pmf[k] for k in support], dtype=torch.float64), args.samples,
                                    replacement=True, generator=generator)
    exact = distribution_metrics([support[i] for i in exact_draws.tolist()], task.pmf)
    if not args.no_rl:
        rl_manifest = train_rl(load_rl_config("rng", overrides + ["name=rng-rl", "evaluate=false"] + args.set), store)
        rl_policy = LoadedPolicy(store, rl_manifest.name, rl_manifest.version)
        rl = distribution_metrics(draw_numbers(task, rl_policy.sampler(generator), args.samples), task.pmf)
    result = {
        "train_seconds": round(train_seconds, 1),
        "samples": args.samples,
        "target": config.task.target.model_dump(),
        "adapter": {k: round(adapter[k], 4) for k in HEADLINE},
        "base": {k: round(base[k], 4) for k in HEADLINE},
        "exact_sample": {k: round(exact[k], 4) for k in ("tv", "kl")},
    }
    if not args.no_rl:
        result["rl"] = {k: round(rl[k], 4) for k in HEADLINE}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
