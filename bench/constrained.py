"""Constrained generation on held-out keyword sets of the demo world: how often each
method's sentences use every keyword and avoid the banned word, how fluent they are under
the base model, how diverse, and how fast.

    .venv/bin/python bench/constrained.py [--fresh] [--prompts 24] [--samples 32]

Methods (each returns `samples` sentences per keyword set):
  gfn        the GFlowNet adapter (configs/constrained.yaml; reused from the bench cache), with
             its policy's word bias (keywords up, avoided words banned)
  bias       the base model on the keywords prompt with that word bias alone: what the
             adapter adds to it
  rejection  the base model on the keywords prompt, drawn in batches until enough satisfy
             the constraints (or --max-batches); only accepted sentences are returned
  mask       the base model on the keywords prompt with the banned words' tokens masked
loglik is the base model's log p(Z ⊤ | keywords prompt); samples_per_second counts the
sentences a method returns over its sampling time.

Last stdout line: {"train_seconds", "methods": {name: {satisfaction, loglik, distinct2,
samples_per_second, ...}}, "goals": {...}}. Goals: gfn.satisfaction >= 0.95 at a loglik
at most 2 nats below rejection's, and more samples per second than rejection.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adapters.manifest import VocabMask  # noqa: E402
from adapters.models import load_causal_lm  # noqa: E402
from bench.adapter_cache import bench_parser, bench_store, gfn_adapter, log  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.evaluate import LoadedPolicy  # noqa: E402
from trainer.metrics import distinct_n  # noqa: E402
from trainer.rollout import Rollout, sample  # noqa: E402
from trainer.scoring import Scorer  # noqa: E402
from trainer.tasks.constrained import ConstrainedRecord, ConstrainedTask, violations, words_of  # noqa: E402


def banned_tokens(task: ConstrainedTask, words: list[str]) -> list[int]:
    """Every token that spells a banned word (with or without its leading space), and the
    first token of a banned word that takes several."""
    banned = {" ".join(words_of(w)) for w in words}
    vocab = [(i, " ".join(words_of(task.tokenizer.decode([i])))) for i in range(len(task.tokenizer))]
    ids = {i for i, text in vocab if text and text in banned}
    for word in words:
        ids |= {task.ids(f" {word}")[0], task.ids(word)[0]}
    return sorted(ids)


def keep(rollout: Rollout, rows: list[int]) -> Rollout:
    return Rollout([rollout.prompts[r] for r in rows], rollout.tokens[rows], rollout.lengths[rows],
                   rollout.forced[rows])


def evaluate(name: str, draw, task: ConstrainedTask, scorer: Scorer, records: list[ConstrainedRecord], n: int,
             reject: bool = False, max_batches: int = 1) -> dict:
    """n sentences per record; with `reject`, batches of n are drawn (up to max_batches)
    and only satisfying sentences kept until there are n. The clock runs while drawing,
    decoding and checking, not while measuring log-likelihoods."""
    texts, satisfied, loglik, seconds, drawn, accepted = [], [], [], 0.0, 0, 0
    for record in records:
        kept_texts, kept_loglik = [], []
        for _ in range(max_batches):
            tick = time.perf_counter()
            rollout = draw(record, n)
            batch = [task.tokenizer.decode(z) for z in rollout.latents()]
            ok = [b for b, t in enumerate(batch) if not reject or violations(t, record.keywords, record.avoid) == 0]
            seconds += time.perf_counter() - tick
            drawn, accepted = drawn + n, accepted + len(ok)
            if ok:
                kept = keep(rollout, ok)
                kept_loglik += task.base_log_likelihood(scorer, [record.keywords] * len(ok), kept).tolist()
                kept_texts += [batch[b] for b in ok]
            if len(kept_texts) >= n:
                break
        if kept_texts:
            texts.append(kept_texts[:n])
            loglik += kept_loglik[:n]
            satisfied += [violations(t, record.keywords, record.avoid) == 0 for t in kept_texts[:n]]
    returned = len(satisfied)
    metrics = {  # None, not 0, when nothing came back: 0 would read as the best log-likelihood
        "satisfaction": sum(satisfied) / returned if returned else None,
        "loglik": sum(loglik) / returned if returned else None,
        "distinct2": sum(distinct_n(t, 2) for t in texts) / len(texts) if texts else None,
        "samples_per_second": returned / seconds,
        "returned": returned,
        "drawn": drawn,
    }
    if reject:
        metrics.update(acceptance_rate=accepted / drawn, seconds_per_accepted=seconds / max(1, returned))
    log(f"{name}: {json.dumps(metrics)}")
    return metrics


def main() -> None:
    parser = bench_parser(__doc__, prompts="keyword sets", samples="sentences per set")
    parser.add_argument("--max-batches", type=int, default=20, help="rejection sampling's batches per set")
    args = parser.parse_args()

    config = load_config("constrained", ["evaluate=false"] + args.set)
    store = bench_store()
    gfn, cached = gfn_adapter(store, config, args.fresh)

    policy = LoadedPolicy(store, gfn.name, gfn.version)
    task: ConstrainedTask = policy.task
    adapted = policy.model.merge_and_unload()  # sampled as a server would run it
    base = load_causal_lm(gfn.base_model.path)
    scorer, pad, spec = Scorer(base, policy.pad_id), policy.pad_id, task.spec()
    records = task.eval_records[: args.prompts or task.config.eval_prompts]
    n = args.samples or task.config.eval_samples
    generator = torch.Generator().manual_seed(1234)

    def gfn_draw(record: ConstrainedRecord, k: int) -> Rollout:
        prompt = task.prompt(record)
        return sample(adapted, spec, [prompt.ids] * k, pad, 1.0, generator, bias=[prompt.bias] * k)

    def bias_draw(record: ConstrainedRecord, k: int) -> Rollout:
        bias = [task.prompt(record).bias] * k
        return sample(base, spec, [task.context(record.keywords)] * k, pad, 1.0, generator, bias=bias)

    def base_draw(record: ConstrainedRecord, k: int) -> Rollout:
        return sample(base, spec, [task.context(record.keywords)] * k, pad, 1.0, generator)

    masks = {tuple(r.avoid): VocabMask(mode="deny", token_ids=banned_tokens(task, r.avoid)) for r in records}

    def mask_draw(record: ConstrainedRecord, k: int) -> Rollout:  # the task's policy rules, its own mask
        masked = dataclasses.replace(spec, mask=masks[tuple(record.avoid)])
        return sample(base, masked, [task.context(record.keywords)] * k, pad, 1.0, generator)

    for draw in (gfn_draw, bias_draw, base_draw, mask_draw):  # warm up before timing
        draw(records[0], 2)
    methods = {
        "gfn": evaluate("gfn", gfn_draw, task, scorer, records, n),
        "bias": evaluate("bias", bias_draw, task, scorer, records, n),
        "rejection": evaluate("rejection", base_draw, task, scorer, records, n, True, args.max_batches),
        "mask": evaluate("mask", mask_draw, task, scorer, records, n),
    }
    rounded = {name: {k: v if v is None else round(v, 4) for k, v in m.items()} for name, m in methods.items()}
    gfn_m, rejection = methods["gfn"], methods["rejection"]
    print(json.dumps({
        "train_seconds": gfn.metrics["train_seconds"],
        "cached": cached,
        "prompts": len(records),
        "samples": n,
        "torch_threads": torch.get_num_threads(),
        "methods": rounded,
        "goals": {
            "gfn_satisfaction_at_least_0.95": gfn_m["satisfaction"] >= 0.95,
            "gfn_loglik_within_2_nats_of_rejection":  # None: rejection accepted nothing to compare with
                None if rejection["loglik"] is None else gfn_m["loglik"] >= rejection["loglik"] - 2,
            "gfn_faster_than_rejection": gfn_m["samples_per_second"] > rejection["samples_per_second"],
        },
    }))


if __name__ == "__main__":
    main()
