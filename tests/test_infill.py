"""Story infilling: the reward is the base model's log p(Z Y | X) read from the plain story
at every prefix, the exact posterior is the normalised joint over the world's candidates,
the metrics (TV, ESS, BLEU, distinct-2) are the textbook ones, and bad data lines are
reported by number and field."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from pydantic import ValidationError

from adapters.models import load_causal_lm, load_tokenizer
from adapters.store import AdapterStore
from trainer.jsonl import DataError, load_jsonl
from trainer.metrics import bleu4, distinct_n, effective_sample_size, total_variation
from trainer.rollout import Rollout
from trainer.scoring import Scorer
from trainer.tasks.base import Prompt
from trainer.tasks.infill import OFF_SUPPORT, InfillConfig, InfillRecord, InfillTask, candidate_index, sample_metrics
from world import stories

FRAME = stories.Frame(person=0, place=0, habit=0, obj=0)  # Anna, an old key


@pytest.fixture(scope="module")
def setup(demo_model):
    tokenizer, model = load_tokenizer(demo_model), load_causal_lm(demo_model)
    task = InfillTask(InfillConfig(demo_stories=20, eval_prompts=2, eval_samples=4), tokenizer)
    return task, Scorer(model, tokenizer.eos_token_id)


def record(event: int) -> InfillRecord:
    return InfillRecord(prefix=FRAME.beginning, suffix=FRAME.ending(event), middle=FRAME.events()[event],
                        candidates=FRAME.events())


def rollout_of(task: InfillTask, rec: InfillRecord, middles: list[str]) -> Rollout:
    latents = [task.ids(" " + m) for m in middles]
    tokens = torch.full((len(latents), max(map(len, latents))), task.tokenizer.eos_token_id)
    for row, z in enumerate(latents):
        tokens[row, : len(z)] = torch.tensor(z)
    prompt = task.prompt(rec).ids
    return Rollout([prompt] * len(latents), tokens, torch.tensor([len(z) for z in latents]),
                   torch.zeros_like(tokens, dtype=torch.bool))


def test_reward_is_the_plain_story_log_likelihood_at_every_prefix(setup):
    task, scorer = setup
    rec = record(0)  # "Anna was very happy that day."
    middles = [FRAME.events()[0], FRAME.events()[3]]  # showed it to friends / lost it in the river
    rollout = rollout_of(task, rec, middles)
    log_r = task.log_rewards(scorer, [task.prompt(rec)] * 2, rollout)
    context, ending = task.ids(rec.prefix), task.ids(" " + rec.suffix)
    for row, n in enumerate(rollout.lengths.tolist()):
        latent = rollout.tokens[row, :n].tolist()
        naive = scorer.continuation([context] * (n + 1), [latent[:i] + ending for i in range(n + 1)])
        assert torch.allclose(log_r[row, : n + 1], naive, atol=1e-3)
        assert torch.isinf(log_r[row, n + 1:]).all()
    compatible, incompatible = log_r[0, rollout.lengths[0]], log_r[1, rollout.lengths[1]]
    assert compatible > incompatible + 3  # the ending decides the middle: e^3, 20 times likelier


def test_rewards_do_not_depend_on_how_rows_are_batched(setup):
    task, scorer = setup
    rec = record(0)
    rollout = rollout_of(task, rec, FRAME.events()[:5])
    prompts = [task.prompt(rec)] * 5
    one_pass = task.log_rewards(scorer, prompts, rollout)
    row_by_row = task.log_rewards(Scorer(scorer.model, scorer.pad_id, chunk=9), prompts, rollout)
    assert torch.allclose(one_pass, row_by_row, atol=1e-4)


def test_exact_posterior_on_a_frame(setup):
    task, scorer = setup
    rec = record(5)  # "The police thanked Anna for the help."
    posterior = task.exact_posterior(scorer, rec)
    assert len(posterior) == len(FRAME.events()) and math.isclose(sum(posterior), 1.0, abs_tol=1e-9)
    joint = [scorer.continuation([task.ids(rec.prefix)], [task.ids(f" {event} {rec.suffix}")]).item()
             for event in FRAME.events()]
    expected = torch.softmax(torch.tensor(joint, dtype=torch.float64), 0)
    assert torch.allclose(torch.tensor(posterior, dtype=torch.float64), expected, atol=1e-4)
    police = [i for i, (_, outcome) in enumerate(stories.EVENTS) if outcome == stories.EVENTS[5][1]]
    assert sum(posterior[i] for i in police) > 0.9


def test_tv_maps_samples_to_candidates_with_one_off_support_bucket():
    rec = record(0)
    events = FRAME.events()
    assert candidate_index("  " + events[2] + " ", events) == 2
    assert candidate_index("She flew away.", events) == OFF_SUPPORT
    posterior = [0.5, 0.5] + [0.0] * (len(events) - 2)
    texts = [events[0], events[0], events[1], "nonsense"]
    metrics = sample_metrics([rec], [texts], [posterior])
    # empirical (0.5, 0.25, off 0.25) vs (0.5, 0.5): TV = (0 + 0.25 + 0.25) / 2
    assert metrics["tv"] == pytest.approx(0.25) and metrics["off_support"] == pytest.approx(0.25)
    weighted = sample_metrics([rec], [texts], [posterior], weights=[[1, 1, 2, 0]])
    assert weighted["tv"] == pytest.approx(0.0)
    assert total_variation(["a", "b"], {"a": 1.0}) == pytest.approx(0.5)


def test_effective_sample_size():
    assert effective_sample_size(torch.zeros(10)) == pytest.approx(10)
    assert effective_sample_size(torch.tensor([0.0] + [-math.inf] * 9)) == pytest.approx(1)
    assert effective_sample_size(torch.full((3,), -math.inf)) == 0.0
    w = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert effective_sample_size(w.log()) == pytest.approx((w.sum() ** 2 / (w**2).sum()).item(), rel=1e-6)
    # weights far below float range are handled in log space
    assert effective_sample_size(w.log() - 2000) == pytest.approx((w.sum() ** 2 / (w**2).sum()).item(), rel=1e-6)


def test_bleu4_and_distinct2():
    assert bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert bleu4(["a b c d"], ["w x y z"]) == 0.0
    # 5 of 6 unigrams, 3/5 bigrams, 2/4 trigrams, 1/3 4-grams match; equal lengths
    assert bleu4(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(
        (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert bleu4(["the cat"], ["the cat sat on the mat"]) < bleu4(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert distinct_n([], 2) == 0.0


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad, message", [
    ('{"prefix": "A.", "suffix": "B."', "line 3: not valid JSON"),
    ('{"prefix": "A."}', "line 3: field 'suffix': Field required"),
    ('{"prefix": "A.", "suffix": ""}', "line 3: field 'suffix'"),
    ('{"prefix": " \\n ", "suffix": "B."}', "line 3: field 'prefix': Value error, must hold text"),
    ('{"prefix": "A.", "suffix": "B.", "midle": "C."}', "line 3: field 'midle': Extra inputs"),
    ('["A.", "B."]', "line 3: expected a JSON object"),
    ('{"prefix": "A.", "suffix": "B.", "middle": "C.", "middle": "D."}', "line 3: field 'middle' appears twice"),
    ('{"prefix": "A.", "suffix": "B.", "candidates": ["C.", "C. ", "D."]}',  # would halve one middle's mass
     "line 3: field 'candidates': Value error, 'C.' is listed twice"),
])
def test_jsonl_errors_name_the_line_and_field(tmp_path, bad, message):
    good = json.dumps({"prefix": "A.", "suffix": "B.", "middle": "C."})
    path = write_lines(tmp_path / "data.jsonl", [good, "", bad, good])
    with pytest.raises(DataError, match=message):
        load_jsonl(path, InfillRecord)
    with pytest.raises(ValidationError, match=message):  # a config naming the file fails at load
        InfillConfig(data=str(path))


def test_jsonl_data_loads_splits_and_prompts(tmp_path, setup, monkeypatch):
    task, _ = setup
    lines = [json.dumps({"prefix": f"Story {i} begins.", "suffix": "It ends.", "middle": "Something happens."})
             for i in range(30)]
    config = InfillConfig(data=str(write_lines(tmp_path / "data.jsonl", lines)), eval_prompts=5)
    custom = InfillTask(config, task.tokenizer)
    assert custom.records and custom.eval_records and len(custom.eval_records) <= 5
    assert not {r.prefix for r in custom.records} & {r.prefix for r in custom.eval_records}
    prompt = custom.train_prompts()[0]
    assert task.tokenizer.decode(prompt.ids) == f"Beginning: {prompt.fields['prefix']}\nEnding: It ends.\nMiddle:"
    assert custom.sft_pairs()[0][1] == task.ids(" Something happens.")
    with pytest.raises(DataError, match="no such data file"):
        load_jsonl(tmp_path / "missing.jsonl", InfillRecord)
    monkeypatch.chdir(tmp_path)  # a relative path is stored absolute: `gfn eval` finds it from anywhere
    assert InfillConfig(data="data.jsonl").data == str((tmp_path / "data.jsonl").resolve())


@pytest.mark.parametrize("candidate, config, why", [
    ("She walked " + "very " * 20 + "far.", {}, "tokens, outside task.min_len..task.max_len (0..12)"),
    ("She walked far", {"stop_after": ["."]}, "does not end with one of task.stop_after ['.']"),
])
def test_a_candidate_the_policy_cannot_write_is_refused_naming_it(tmp_path, setup, candidate, config, why):
    """The exact posterior is over the candidates: one no sample can be would put a floor under the TV
    and report a perfect sampler as a poor one."""
    task, _ = setup
    line = json.dumps({"prefix": "Story begins.", "suffix": "It ends.", "candidates": ["She ran.", candidate]})
    train = write_lines(tmp_path / "train.jsonl", [json.dumps({"prefix": "A.", "suffix": "B.", "middle": "C."})])
    held = write_lines(tmp_path / "held.jsonl", [line])
    with pytest.raises(DataError, match=f"'Story begins.' has the candidate .*, which .*{re.escape(why)}"):
        InfillTask(InfillConfig(data=str(train), eval_data=str(held), **config), task.tokenizer)
    fitting = write_lines(tmp_path / "fits.jsonl", [line.replace(candidate, "She walked far.")])
    assert InfillTask(InfillConfig(data=str(train), eval_data=str(fitting), **config), task.tokenizer).eval_records


def test_demo_split_keeps_heldout_frames_out_of_training(setup):
    task, _ = setup
    assert task.prompt_template.format(prefix="X", suffix="Y") == stories.infill_prompt("X", "Y")
    train = {r.prefix for r in task.records}
    assert all(r.prefix not in train and r.middle in r.candidates for r in task.eval_records)


def test_sft_stores_an_adapter_with_the_task_manifest(tmp_path, demo_model):
    from trainer.sft import SFTConfig, train_sft

    config = SFTConfig(name="infill-sft", base_model=str(demo_model), steps=2, batch_size=4, evaluate=False,
                       task=InfillConfig(demo_stories=8))
    manifest = train_sft(config, AdapterStore(tmp_path))
    task = InfillTask(config.task, load_tokenizer(demo_model))
    fields = task.manifest_fields()
    assert manifest.task == "infill" and manifest.prompt_template == fields["prompt_template"]
    assert manifest.terminator_id == fields["terminator_id"] and manifest.max_len == fields["max_len"]
    assert manifest.training["method"] == "sft" and manifest.training["pairs"] == 8
    with pytest.raises(ValueError, match="pair 0"):
        train_sft(config, AdapterStore(tmp_path), pairs=[(Prompt("p", [1, 2]), [5] * 50)])


def test_evaluating_an_adapter_whose_data_changed_is_refused(tmp_path, demo_model):
    """`gfn eval` read the edited file and reported metrics of other records, saying nothing."""
    from trainer.config import load_config
    from trainer.evaluate import evaluate_adapter
    from trainer.loop import Trainer

    lines = [json.dumps({"prefix": f"Story {i} begins.", "suffix": "It ends.", "middle": "Something happens."})
             for i in range(30)]
    data = write_lines(tmp_path / "data.jsonl", lines)
    store = AdapterStore(tmp_path / "store")
    config = load_config("infill", ["steps=1", "evaluate=false", "samples_per_prompt=4", f"base_model={demo_model}",
                                    f"task.data={data}"])
    Trainer(config, tmp_path / "run", store, quiet=True).run()
    write_lines(data, lines[:20])
    with pytest.raises(ValueError, match="infill@v1: its data files .* changed since it was trained"):
        evaluate_adapter(store, "infill")
