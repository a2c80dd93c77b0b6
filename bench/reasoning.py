"""Arithmetic with a calculator: accuracy by operand count on held-out questions of the
demo world (3 and 4 operands as in training, 5 out of distribution).

    .venv/bin/python bench/reasoning.py [--fresh] [--questions 30] [--rationales 10] [--sft-steps 150] [--set key=value]

Methods, each reading N rationales per question and taking the majority vote
(adapters.reasoning, as the service does):
  gfn      the GFlowNet adapter (configs/reasoning.yaml; reused from the bench cache)
  sft      a LoRA fine-tuned on the labelled rationales (trainer/sft.py)
  rl       RLOO on the same reward with a KL penalty to the base model (trainer/rl.py)
  fewshot  the base model under the same masks and calculator, three labelled rationales
           placed before the question as worked examples
  direct   the base model's one greedy answer after "Question: ... Answer: The answer is"
Diagnostics say what the base model's posterior can reward: `base_reads_answer`, how often
it states the right answer after the correct rationale; `posterior_prefers_full`, how often
log R of the correct rationale exceeds that of its own first step; `operand_log_prob`, the
mean log-probability it gives each operand it writes in the correct rationale (copied from
the question or from the previous step), against `chance_log_prob` = log(1/10).

Last stdout line: {"train_seconds", "accuracy": {method: {"3", "4", "5"}},
"accuracy_weighted", "rationale_accuracy", "diagnostics", "goals"}. Goals: gfn beats sft by
at least 0.15 at 4 and 5 operands and beats direct and fewshot at every count.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adapters.models import load_causal_lm  # noqa: E402
from adapters.reasoning import parse_answer, parse_question  # noqa: E402
from bench.adapter_cache import bench_parser, bench_store, cached_adapter, gfn_adapter, log  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.evaluate import LoadedPolicy  # noqa: E402
from trainer.rl import load_rl_config, train_rl  # noqa: E402
from trainer.rollout import sample  # noqa: E402
from trainer.scoring import Scorer  # noqa: E402
from trainer.sft import SFTConfig, train_sft  # noqa: E402
from trainer.tasks.reasoning import ReasoningTask  # noqa: E402
from world import corpus  # noqa: E402

SHOTS = 3


def direct_answers(task: ReasoningTask, scorer: Scorer) -> list[int | None]:
    """One greedy answer per held-out question, in the corpus's answer-only format."""
    contexts = [task.context_ids(r.question + " The answer is") for r in task.eval_records]
    completions = [task.tokenizer.decode(ids, skip_special_tokens=True) for ids in scorer.greedy(contexts, 6)]
    return [parse_answer("The answer is" + c) for c in completions]


def diagnostics(task: ReasoningTask, scorer: Scorer) -> dict[str, float]:
    """Whether the base model can reward right rationales at all (module docstring)."""
    records = task.eval_records
    worked = [worked_rationale(r.question) for r in records]
    contexts = [task.context_ids(task.format.context(r.question, z) + task.format.answer_prompt)
                for r, z in zip(records, worked)]
    read = [parse_answer(task.format.answer_prompt + task.tokenizer.decode(ids, skip_special_tokens=True)) == r.answer
            for r, ids in zip(records, scorer.greedy(contexts, 6))]
    prompts = [task.prompt(r) for r in records]
    rollout = task.teacher_rollout(prompts, worked)
    log_r = task.log_rewards(scorer, prompts, rollout)
    token_lp, _ = scorer.latent(task.as_read(prompts, rollout), task.terminator_id)
    digits = torch.tensor([[task.tokenizer.decode([t]).strip().isdigit() for t in row] for row in rollout.tokens.tolist()])
    prefers = []
    for b, n in enumerate(rollout.lengths.tolist()):
        forced = rollout.forced[b, :n].tolist()
        first_value_end = next(k for k in range(1, n) if forced[k - 1] and not forced[k])
        prefers.append(bool(log_r[b, n] > log_r[b, first_value_end]))
    return {"base_reads_answer": sum(read) / len(read), "posterior_prefers_full": sum(prefers) / len(prefers),
            "operand_log_prob": token_lp[rollout.written() & digits].mean().item(), "chance_log_prob": -math.log(10)}


def worked_rationale(question: str) -> str:
    parsed = parse_question(question)
    return corpus.rationale(list(parsed.operands), list(parsed.operators))[0]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--questions", type=int, help="held-out questions per operand count (default: the config's)")
    parser.add_argument("--rationales", type=int, help="rationales per question, N (default: the config's)")
    parser.add_argument("--sft-steps", type=int, default=150, help="steps of the SFT baseline")
    args = parser.parse_args()

    overrides = ["evaluate=false"] + [f"task.eval_questions={args.questions}"] * bool(args.questions) + args.set
    config = load_config("reasoning", overrides)
    store = bench_store()
    gfn, gfn_cached = gfn_adapter(store, config, args.fresh)
    rl_config = load_rl_config("reasoning", overrides + ["name=reasoning-rl"])
    rl, _ = cached_adapter(store, rl_config, lambda: train_rl(rl_config, store), args.fresh)
    log(f"rl adapter {rl.ref} ({rl.metrics['train_seconds']} s)")
    sft_config = SFTConfig(name="reasoning-sft", base_model=config.base_model, task=config.task, lora=config.lora,
                           steps=args.sft_steps, batch_size=16, lr=1e-3, seed=config.seed, dtype=config.dtype,
                           evaluate=False)
    sft, _ = cached_adapter(store, sft_config, lambda: train_sft(sft_config, store), args.fresh)
    log(f"sft adapter {sft.ref} ({sft.metrics['train_seconds']} s)")

    base = load_causal_lm(gfn.base_model.path, config.dtype)
    policies = {name: LoadedPolicy(store, m.name, m.version) for name, m in (("gfn", gfn), ("sft", sft), ("rl", rl))}
    task: ReasoningTask = policies["gfn"].task
    scorer = Scorer(base, task.pad_id)
    generator = torch.Generator().manual_seed(1234)
    shots, start = task.context_ids(task.few_shot(SHOTS)), len(task.document_prefix)

    def fewshot(prompts: list[list[int]]):
        return sample(base, task.spec(), [shots + p[start:] for p in prompts], scorer.pad_id, 1.0, generator,
                      task.tool())

    samplers = {name: policy.sampler(generator) for name, policy in policies.items()} | {"fewshot": fewshot}
    results, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-reasoning-eval-") as out:
        for name, sampler in samplers.items():
            tick = time.perf_counter()
            results[name] = task.evaluate(sampler, scorer, Path(out), samples=args.rationales)
            seconds[name] = time.perf_counter() - tick
            log(f"{name}: {json.dumps(results[name])}")
    results["direct"] = task.accuracy(direct_answers(task, scorer), None, 1)
    found = diagnostics(task, scorer)
    log(f"diagnostics: {json.dumps(found)}")

    sampled = ("gfn", "sft", "fewshot", "rl")
    def table(key: str, methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
        return {m: {c: round(v, 3) for c, v in results[m][key].items()} for m in methods}

    accuracy = table("accuracy", ("gfn", "sft", "fewshot", "direct", "rl"))
    gfn_acc = accuracy["gfn"]
    print(json.dumps({
        "train_seconds": gfn.metrics["train_seconds"],
        "sft_train_seconds": sft.metrics["train_seconds"],
        "rl_train_seconds": rl.metrics["train_seconds"],
        "cached": gfn_cached,
        "questions": results["gfn"]["questions"],
        "rationales": results["gfn"]["rationales"],
        "accuracy": accuracy,
        "accuracy_weighted": table("accuracy_weighted", sampled),
        "rationale_accuracy": table("rationale_accuracy", sampled),
        "eval_seconds": {m: round(s, 1) for m, s in seconds.items()},
        "diagnostics": {k: round(v, 3) for k, v in found.items()},
        "torch_threads": torch.get_num_threads(),
        "goals": {
            "gfn_beats_sft_by_0.15_at_4_and_5": all(gfn_acc[c] >= accuracy["sft"][c] + 0.15 for c in ("4", "5")),
            "gfn_beats_direct_and_fewshot": all(gfn_acc[c] > accuracy[m][c] for m in ("direct", "fewshot")
                                                for c in gfn_acc),
        },
    }))


if __name__ == "__main__":
    main()
