"""The continuation task on the demo base model: its mask, the reward on hand-made
sentences, the diversity metrics, the baseline decoders and the JSONL data format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from adapters.models import load_causal_lm, load_tokenizer
from trainer.decoding import beam_search, nucleus
from trainer.jsonl import DataError, load_jsonl
from trainer.metrics import pairwise_diversity
from trainer.policy import policy_log_probs
from trainer.rollout import Rollout, sequence_log_prob
from trainer.scoring import Scorer
from trainer.tasks.continuation import ContinuationConfig, ContinuationRecord, ContinuationTask


@pytest.fixture(scope="module")
def world(demo_model: Path):
    tokenizer = load_tokenizer(demo_model)
    model = load_causal_lm(demo_model)
    task = ContinuationTask(ContinuationConfig(demo_prompts=20, eval_prompts=4, max_len=12), tokenizer)
    return task, model, Scorer(model, tokenizer.pad_token_id)


def test_prompts_are_one_to_three_sentences(world) -> None:
    task, _, _ = world
    for record in task.records + task.eval_records:
        assert record.text.endswith(".") and 1 <= record.text.count(".") <= 3
    assert task.prompt(task.records[0]).ids == task.tokenizer(task.records[0].text)["input_ids"]
    bundled = ContinuationTask(ContinuationConfig(), task.tokenizer)  # held-out prompts are not trained on
    assert len(bundled.eval_records) == 32 and not {r.text for r in bundled.eval_records} & {r.text for r in bundled.records}


def test_mask_bans_other_sentence_ends(world) -> None:
    task, _, _ = world
    bias = task.spec().bias(len(task.tokenizer))[3]
    banned = {task.tokenizer.decode([i]) for i in range(len(task.tokenizer)) if bias[i] < 0}
    assert {"!", "?", "\n", task.tokenizer.eos_token} <= banned
    assert bias[task.terminator_id] == 0 and task.tokenizer.decode([task.terminator_id]) == "."
    assert not {" The", " dog", " park"} & banned


def test_reward_is_log_p_of_the_sentence_and_its_end(world) -> None:
    task, _, scorer = world
    prompt = task.prompt(ContinuationRecord(text="The dog ran in the park."))
    z = task.tokenizer(" The cat sat in the garden")["input_ids"]
    rollout = Rollout([prompt.ids], torch.tensor([z]), torch.tensor([len(z)]), torch.zeros(1, len(z), dtype=torch.bool))
    log_r = task.log_rewards(scorer, [prompt], rollout)[0]
    for i in range(len(z) + 1):
        expected = scorer.continuation([prompt.ids], [z[:i] + [task.terminator_id]]).item()
        assert log_r[i].item() == pytest.approx(expected, abs=1e-4)
    assert log_r[len(z)] > log_r[2]  # a whole sentence ends better than " The cat."


def test_pairwise_diversity() -> None:
    assert pairwise_diversity([[1, 2, 3], [3, 2, 1]]) == pytest.approx(0.0)
    assert pairwise_diversity([[1, 1], [2, 2], [3]]) == pytest.approx(1.0)
    assert pairwise_diversity([[1, 2], [2, 3]]) == pytest.approx(0.5)
    assert pairwise_diversity([[1]]) == 0.0


def test_sample_metrics(world) -> None:
    task, _, scorer = world
    prompt = task.prompt(task.eval_records[0]).ids
    same = [task.tokenizer(" The cat sat in the garden")["input_ids"]] * 3
    metrics = task.sample_metrics(scorer, [prompt], [same])
    assert metrics["diversity"] == pytest.approx(0.0) and metrics["distinct2"] == pytest.approx(5 / 15)
    assert metrics["mean_loglik"] == pytest.approx(metrics["max_loglik"], abs=1e-4)


def test_beam_search_finds_likelier_sentences_and_diverse_beams_differ(world) -> None:
    task, model, scorer = world
    spec, pad = task.spec(), task.tokenizer.pad_token_id
    prompt = task.prompt(task.eval_records[0]).ids
    beams = beam_search(model, spec, prompt, pad, beams=4)
    assert len(beams) == 4 and len({tuple(b) for b in beams}) == 4
    rollout = Rollout.teacher_forced([prompt] * 4, beams, pad)
    with torch.no_grad():
        masked = sequence_log_prob(*policy_log_probs(model, spec, rollout.prompts, rollout.tokens, pad), rollout)
    assert (masked[:-1] >= masked[1:] - 1e-4).all()  # best first, by the masked policy's log-probability
    loglik = scorer.continuation([prompt] * 4, [b + [task.terminator_id] for b in beams])
    sampled = nucleus(model, spec, [prompt] * 8, pad, top_p=0.95, seed=0)
    assert all(len(z) <= spec.max_len and task.terminator_id not in z for z in sampled)
    assert sampled == nucleus(model, spec, [prompt] * 8, pad, top_p=0.95, seed=0)
    sampled_ll = scorer.continuation([prompt] * 8, [z + [task.terminator_id] for z in sampled])
    assert loglik.mean() > sampled_ll.mean()  # likelier than samples on average (4 beams can miss the best)
    diverse = beam_search(model, spec, prompt, pad, beams=4, groups=4, diversity=100.0)
    firsts = [z[0] for z in diverse]
    assert len(set(firsts)) == 4  # each group had to open with a token the earlier ones did not
    with pytest.raises(ValueError, match="multiple of groups"):
        beam_search(model, spec, prompt, pad, beams=4, groups=3)


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": ""}', "line 2: field 'text'"),
    ('{"text": "   "}', "line 2: field 'text': Value error, must hold text"),
    ('{"prompt": "The dog ran."}', "line 2: field"),
    ('["The dog ran."]', "line 2: expected a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "The cat sat."}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_jsonl(path, ContinuationRecord)
    with pytest.raises(ValidationError, match="line 2"):
        ContinuationConfig(data=str(path))


def test_jsonl_files_read_as_json_lines_and_name_what_is_not(tmp_path: Path) -> None:
    """A BOM and a line separator inside a string (U+2028, valid JSON) are read; bytes that are not
    UTF-8 and a directory are named, with the line."""
    kept = tmp_path / "kept.jsonl"
    kept.write_bytes('\ufeff{"text": "The dog ran."}\r\n{"text": "A line\u2028sep."}'.encode())
    assert [r.text for r in load_jsonl(kept, ContinuationRecord)] == ["The dog ran.", "A line\u2028sep."]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "The dog ran."}\n{"text": "caf\xe9."}\n')
    with pytest.raises(DataError, match=f"{latin} line 2: not UTF-8 text"):
        load_jsonl(latin, ContinuationRecord)
    with pytest.raises(DataError, match="a directory, not a data file"):
        load_jsonl(tmp_path, ContinuationRecord)
