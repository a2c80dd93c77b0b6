"""The reasoning task on the demo base model: the calculator inside rollouts, replay keeping
tool outputs, the reward on hand-made rationales, reading and combining answers the way
inference does, and the JSONL data format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from adapters.calculator import tool_output
from adapters.models import load_causal_lm, load_tokenizer
from adapters.reasoning import aggregate, answer_log_probs, final_value, parse_answer, read_answers
from adapters.store import AdapterStore
from trainer.config import load_config
from trainer.jsonl import DataError, load_jsonl
from trainer.loop import Trainer
from trainer.rollout import Rollout, sample
from trainer.scoring import Scorer
from trainer.tasks.base import Prompt
from trainer.tasks.reasoning import ReasoningConfig, ReasoningRecord, ReasoningTask

SMALL = {"demo_questions": 40, "demo_labelled": 5, "eval_questions": 3, "reward_shots": 2}


@pytest.fixture(scope="module")
def world(demo_model: Path):
    tokenizer = load_tokenizer(demo_model)
    model = load_causal_lm(demo_model)
    return tokenizer, model, Scorer(model, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def task(world) -> ReasoningTask:
    return ReasoningTask(ReasoningConfig(**SMALL), world[0])


def check_tool_positions(task: ReasoningTask, tokens: list[int], forced: list[bool]) -> int:
    """Forced tokens are exactly the calculator's outputs, right where a policy token
    completed a step's "="; returns how many tool calls the sample had."""
    decode = task.tokenizer.decode
    calls, k = 0, 0
    while k < len(tokens):
        if forced[k]:
            k += 1
            continue
        written = tool_output(decode(tokens[: k + 1]))
        if written is None:
            assert k + 1 == len(tokens) or not forced[k + 1], decode(tokens[: k + 2])
            k += 1
            continue
        run = task.ids(written)
        end = min(len(tokens), k + 1 + len(run))
        assert tokens[k + 1:end] == run[: end - k - 1], decode(tokens)
        assert all(forced[k + 1:end]), decode(tokens)
        calls, k = calls + 1, end
    return calls


def test_mask_allows_rationale_tokens_only(task: ReasoningTask) -> None:
    allowed = {task.tokenizer.decode([i]) for i in task.mask().token_ids}
    assert {str(d) for d in range(10)} | {" ", " -", " +", " =", ","} <= allowed
    assert all(set(text) <= set("0123456789+-=, ") for text in allowed)
    assert task.tokenizer.decode([task.terminator_id]) == "."
    assert task.terminator_id not in task.mask().token_ids  # the terminator is never masked anyway


def test_calculator_fills_values_in_rollouts(task: ReasoningTask, world) -> None:
    tokenizer, model, _ = world
    prompts = [p.ids for p in task.train_prompts()[:4] for _ in range(8)]
    rollout = sample(model, task.spec(), prompts, tokenizer.pad_token_id, 1.0, torch.Generator().manual_seed(0),
                     task.tool())
    calls = sum(check_tool_positions(task, rollout.tokens[b, :n].tolist(), rollout.forced[b, :n].tolist())
                for b, n in enumerate(rollout.lengths.tolist()))
    assert calls >= len(prompts)  # the base model writes steps, so the tool is called
    assert not rollout.forced[torch.arange(rollout.tokens.shape[1])[None, :] >= rollout.lengths[:, None]].any()
    for z in rollout.latents():  # the terminator "." never occurs inside a rationale
        assert task.terminator_id not in z


def test_replay_keeps_tool_outputs(demo_model: Path, tmp_path: Path) -> None:
    config = load_config("reasoning", [f"base_model={demo_model}", "samples_per_prompt=8", "evaluate=false",
                                       "behaviour.on_policy=0.5", "behaviour.tempered=0", "behaviour.replay=0.5",
                                       *(f"task.{k}={v}" for k, v in SMALL.items())])
    trainer = Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)
    prompt = trainer.prompts[0]
    trainer.behaviour_batch([prompt])
    stored = {entry.tokens: entry.forced for entry in trainer.replay.entries(prompt.key)}
    assert any(any(forced) for forced in stored.values())
    batch, _, fresh = trainer.behaviour_batch([prompt])
    assert fresh.tolist() == [True] * 4 + [False] * 4  # new samples first, then the buffer's
    replayed = (~fresh).nonzero().flatten().tolist()
    for b in replayed:
        n = int(batch.lengths[b])
        tokens, forced = tuple(batch.tokens[b, :n].tolist()), batch.forced[b, :n].tolist()
        assert tokens in stored and tuple(forced) == stored[tokens]
        check_tool_positions(trainer.task, list(tokens), forced)


def hand_made(task: ReasoningTask, question: str, answer: int, rationale: str) -> tuple[Prompt, Rollout]:
    """A one-sample rollout of `rationale` whose values (the text after each "=") are forced."""
    tokens, forced = [], []
    for k, part in enumerate(rationale.split(",")):
        before, _, value = part.partition("=")
        tokens += task.ids(("," if k else "") + before + "=")
        forced += [False] * (len(tokens) - len(forced))
        tokens += task.ids(value)
        forced += [True] * (len(tokens) - len(forced))
    prompt = Prompt(question, task.ids(question), {"question": question, "answer": answer})
    return prompt, Rollout([prompt.ids], torch.tensor([tokens]), torch.tensor([len(tokens)]), torch.tensor([forced]))


def test_reward_is_log_p_of_written_tokens_and_answer(task: ReasoningTask, world) -> None:
    _, _, scorer = world
    question, rationale = "Question: 6 - 0 - 4 - 8 = ? Answer:", " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"
    prompt, rollout = hand_made(task, question, -6, rationale)
    assert task.tokenizer.decode(rollout.tokens[0]) == rationale
    assert torch.equal(task.teacher_rollout([prompt], [rationale]).forced, rollout.forced)
    log_r = task.log_rewards(scorer, [prompt], rollout)[0]
    context = task.ids(task.format.reward_prefix + question)
    tokens, forced = rollout.tokens[0].tolist(), rollout.forced[0].tolist()
    token_lp = scorer.continuation([context + tokens[:k] for k in range(len(tokens))], [[t] for t in tokens])
    answer = task.ids(". The answer is -6.")
    for i in (0, 3, 9, len(tokens)):  # also prefixes cut mid-step
        written = sum(lp for lp, f in zip(token_lp[:i].tolist(), forced[:i]) if not f)
        expected = written + scorer.continuation([context + tokens[:i]], [answer]).item()
        assert log_r[i].item() == pytest.approx(expected, abs=1e-3)
    # the answer Y is the true one: another answer changes exactly log p(Y | X Z)
    other, _ = hand_made(task, question, 7, rationale)
    delta = log_r[-1] - task.log_rewards(scorer, [other], rollout)[0, -1]
    y = scorer.continuation([context + tokens] * 2, [answer, task.ids(". The answer is 7.")])
    assert delta.item() == pytest.approx((y[0] - y[1]).item(), abs=1e-3)


def test_sft_learns_only_what_the_policy_writes(task: ReasoningTask, world) -> None:
    """The SFT baseline's loss leaves out the calculator's tokens (probability one under the
    policy), as the objective does: the mean over written tokens and the stop."""
    from trainer.policy import policy_log_probs
    from trainer.sft import sft_loss

    _, model, _ = world
    pairs = task.sft_pairs()[:3]
    rollout = task.teacher_rollout([p for p, _ in pairs], [task.text(z) for _, z in pairs])
    assert rollout.forced.any()
    with torch.no_grad():
        loss = sft_loss(model, task, pairs)
        log_pf, log_pterm = policy_log_probs(model, task.spec(), rollout.prompts, rollout.tokens,
                                             task.tokenizer.pad_token_id)
    written = rollout.written()
    expected = -(log_pf[written].sum() + log_pterm[torch.arange(3), rollout.lengths].sum()) / (written.sum() + 3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_final_value_reads_the_calculators_last_value() -> None:
    assert final_value(" 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6") == -6
    assert final_value(" 9 + 9 = 18") == 18
    for unfinished in ["", " 6 - 0", " 6 - 0 =", " 6 - 0 = 6,", " 6 - 0 = 6, 6 - 4", " 1 + 0 = 18", " 6 * 0 = 0",
                       " 6 - 0 = 6 - 4 = 2"]:
        assert final_value(unfinished) is None, unfinished


def test_read_answers_and_aggregate_as_inference_does(task: ReasoningTask, world) -> None:
    _, _, scorer = world
    question = "Question: 3 + 4 - 2 = ? Answer:"
    rationales = [" 3 + 4 = 7, 7 - 2 = 5", " 3 + 4 = 7, 7 - 2 = 5", " 3 + 4 = 7, 7 + 2 = 9", " 3 + 4 = 7, 7 -"]
    complete = task.completer(scorer)
    answers = read_answers([question] * 4, rationales, task.format, complete)
    assert answers[:3] == [5, 5, 9]
    # the unfinished rationale is read by the base model: its greedy completion after the answer prompt
    context = task.format.context(question, rationales[3]) + task.format.answer_prompt
    completion = task.tokenizer.decode(scorer.greedy([task.ids(context)], 6)[0], skip_special_tokens=True)
    assert answers[3] == parse_answer(task.format.answer_prompt + completion)
    assert aggregate(answers[:3]).answer == 5
    weights = answer_log_probs([question] * 4, rationales, answers, task.format, task.log_prob_scorer(scorer))
    expected = scorer.continuation([task.ids(task.format.context(question, rationales[0]))],
                                   [task.ids(". The answer is 5.")]).item()
    assert weights[0] == pytest.approx(expected, abs=1e-4)
    assert all(w < 0 for w in weights[:3])
    weighted = aggregate(answers[:3], weights[:3], method="weighted")  # 5's two weights summed against 9's one
    assert weighted.answer == (5 if math.log(math.exp(weights[0]) + math.exp(weights[1])) > weights[2] else 9)
    assert weighted.distribution[9] == pytest.approx(
        math.exp(weights[2]) / (math.exp(weights[0]) + math.exp(weights[1]) + math.exp(weights[2])), rel=1e-6)


def test_accuracy_by_operand_count(task: ReasoningTask) -> None:
    truth = [r.answer for r in task.eval_records]
    answers = [a for t in truth for a in (t, t, t + 1)]  # 2 of 3 rationales right: the vote is right
    metrics = task.accuracy(answers, None, 3)
    assert set(metrics["accuracy"]) == {"3", "4", "5"}
    assert all(v == 1.0 for v in metrics["accuracy"].values())
    assert all(v == pytest.approx(2 / 3) for v in metrics["rationale_accuracy"].values())


def test_demo_evaluation_questions_are_new_to_the_base_model() -> None:
    """Held out from the base model's corpus too, not only from the adapter's training questions:
    three-operand questions fill most of what the corpus can hold (about 3500 of 4000)."""
    from trainer.tasks.reasoning import demo_records
    from world.corpus import questions

    train, held = demo_records(ReasoningConfig(eval_questions=30))
    assert len({r.question for r in held}) == 90 and not {r.question for r in held} & questions()
    assert not {r.question for r in held} & {r.question for r in train}
    fewer, fewer_held = demo_records(ReasoningConfig(eval_questions=10))  # evaluating fewer trains on the same
    assert fewer == train and len(fewer_held) == 30


def test_manifest_carries_what_the_service_reads(task: ReasoningTask) -> None:
    fields = task.manifest_fields()
    config = fields["task_config"]
    assert config["tool"] == "calculator" and config["answer_prompt"] == ". The answer is"
    assert config["reward_prefix"] == task.format.reward_prefix and config["reward_prefix"].count("\n") == 2
    assert fields["prompt_template"] == "{question}" and fields["terminator"] == "."
    assert fields["mask"]["mode"] == "allow"
    assert task.sft_pairs() and all(task.tokenizer.decode(z).startswith(" ") for _, z in task.sft_pairs())


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "Question: 1 + 2 = ? Answer:"}', "line 2: field 'answer'"),
    ('{"question": "What is 1 + 2?", "answer": 3}', "line 2: field 'question'"),
    ('{"question": "1 + 2", "answer": 4}', "field 'answer': .* 4 is not the value"),
    ('{"question": "1 + 2 + 3", "answer": 6, "rationale": "1 + 2 = 3, 3 + 3 = 7"}',
     "field 'rationale': .* does not state its value 6"),
    ('{"question": "1 + 2 + 3", "answer": 6, "rationale": "1 + 2 = 3"}', "field 'rationale': .* not the answer 6"),
    ('{"question": "1 + 2", "answer": 3, "rationale": "1 * 2 = 3"}', r"field 'rationale': .* is not 'a \+ b = v'"),
    ('{"question": "1 + 2", "answer": 3, "hint": "add"}', "line 2: field 'hint'"),
    ("{not json", "line 2: not valid JSON"),
])
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "data.jsonl", ['{"question": "2 + 2", "answer": 4}', line])
    with pytest.raises(DataError, match=message):
        load_jsonl(path, ReasoningRecord)
    with pytest.raises(ValidationError, match="line 2"):
        ReasoningConfig(data=str(path))


def test_jsonl_data_loads_splits_and_prompts(tmp_path: Path, world) -> None:
    records = [{"question": f"{a} + {b} - 1", "answer": a + b - 1} for a in range(10) for b in range(10)]
    records[0]["rationale"] = "0 + 0 = 0, 0 - 1 = -1"
    data = write_lines(tmp_path / "data.jsonl", [json.dumps(r) for r in records])
    held = write_lines(tmp_path / "eval.jsonl", ['{"question": "1 + 2 + 3 + 4", "answer": 10}',
                                                 '{"question": "1 + 2 + 3", "answer": 6}'])
    with pytest.raises(DataError, match="task.eval_operands: the evaluation records have no question of 5 operands"):
        ReasoningTask(ReasoningConfig(data=str(data), eval_data=str(held)), world[0])  # the default [3, 4, 5]
    task = ReasoningTask(ReasoningConfig(data=str(data), eval_data=str(held), reward_shots=1, eval_operands=[4]),
                         world[0])  # the counts evaluated, not every count the file has
    assert len(task.records) == 100 and task.labelled == [ReasoningRecord(**records[0])]
    assert task.format.reward_prefix == "Question: 0 + 0 - 1 = ? Answer: 0 + 0 = 0, 0 - 1 = -1. The answer is -1.\n"
    assert [r.question for r in task.eval_records] == ["Question: 1 + 2 + 3 + 4 = ? Answer:"]
    assert task.train_prompts()[5].fields == {"question": "Question: 0 + 5 - 1 = ? Answer:", "answer": 4}
