"""Constrained generation: violations are counted on whole words, the reward is the base
model's log p(Z ⊤ | keywords prompt) minus the configured penalty per violation at every
prefix, held-out keyword sets stay out of training, and bad data lines are reported by
number and field, and templates with placeholders the task does not fill are refused."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from adapters.manifest import WordBias, word_bias
from adapters.models import load_causal_lm, load_tokenizer
from jobs.configs import ConfigError
from jobs.validate import load as jobs_load
from trainer.config import config_errors, load_config
from trainer.jsonl import DataError, load_jsonl
from trainer.policy import policy_log_probs
from trainer.rollout import Rollout, sample
from trainer.scoring import Scorer
from trainer.tasks.base import check_template
from trainer.tasks.constrained import (
    ConstrainedConfig,
    ConstrainedRecord,
    ConstrainedTask,
    is_heldout,
    violations,
)
from trainer.tasks.continuation import ContinuationTask
from trainer.tasks.infill import InfillTask
from trainer.tasks.reasoning import ReasoningTask
from world.corpus import keywords_prompt


@pytest.fixture(scope="module")
def setup(demo_model):
    tokenizer, model = load_tokenizer(demo_model), load_causal_lm(demo_model)
    task = ConstrainedTask(ConstrainedConfig(demo_sets=50, eval_prompts=4, penalty=5.0), tokenizer)
    return task, Scorer(model, tokenizer.eos_token_id)


def test_violations_count_whole_words_case_insensitively():
    text = "The Dog ran in the park."
    assert violations(text, ["dog", "park"], []) == 0
    assert violations(text, ["dog", "garden"], []) == 1
    assert violations(text, ["cat", "garden"], ["ran"]) == 3
    assert violations("The doghouse stood in the parks.", ["dog", "park"], []) == 2
    assert violations(text, ["in the park"], ["the dog sat"]) == 0  # phrases are word sequences


def test_word_bias_marks_each_words_token_and_its_capitalised_one_where_that_is_one_token(setup):
    task, _ = setup
    tokenizer, eos = task.tokenizer, task.tokenizer.eos_token_id
    first = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    rules = [WordBias(field="keywords", bias=4.0), WordBias(field="avoid", bias=-99.0)]
    bias = word_bias(rules, {"keywords": ["dog", "the"], "avoid": ["ran"], "other": ["cat"]}, tokenizer, eos)
    assert len(tokenizer(" Dog", add_special_tokens=False)["input_ids"]) > 1  # so only " dog" is biased
    assert bias == {first(" dog"): 4.0, first(" the"): 4.0, first(" The"): 4.0, first(" ran"): -99.0}
    assert word_bias(rules, {"keywords": [tokenizer.eos_token]}, tokenizer, eos).get(eos) is None


def test_the_policy_applies_each_prompts_word_bias_in_sampling_and_in_the_loss(setup, demo_model):
    """The base model says "ran" in a fair share of its sentences; under the policy's word
    bias it never does, and the keywords come far more often than without it."""
    task, _ = setup
    model, eos = load_causal_lm(demo_model), task.tokenizer.eos_token_id
    record = ConstrainedRecord(keywords=["horse", "kitchen"], avoid=["ran"])
    prompt, spec, n = task.prompt(record), task.spec(), 64
    assert task.manifest_fields()["word_biases"] == [{"field": "keywords", "bias": 8.0}, {"field": "avoid", "bias": -99.0}]
    context = task.context(record.keywords)
    draws = {with_bias: sample(model, spec, [context] * n, eos, 1.0, torch.Generator().manual_seed(0),
                               bias=[prompt.bias] * n if with_bias else None) for with_bias in (False, True)}
    texts = {k: [task.tokenizer.decode(z) for z in rollout.latents()] for k, rollout in draws.items()}
    uses = {k: sum(violations(t, record.keywords, []) == 0 for t in v) / n for k, v in texts.items()}
    assert any(" ran" in t for t in texts[False]) and not any(" ran" in t for t in texts[True])
    assert uses[True] >= uses[False] + 0.3, uses

    rollout = rollout_of(task, context, ["The horse ran in the kitchen."])
    plain, _ = policy_log_probs(model, spec, rollout.prompts, rollout.tokens, eos)
    biased, _ = policy_log_probs(model, spec, rollout.prompts, rollout.tokens, eos, [prompt.bias])
    ran = rollout.tokens[0].tolist().index(task.tokenizer(" ran", add_special_tokens=False)["input_ids"][0])
    assert biased[0, ran] < plain[0, ran] - 90 and biased[0, 1] > plain[0, 1]  # " horse" is token 1


def rollout_of(task: ConstrainedTask, prompt_ids: list[int], sentences: list[str]) -> Rollout:
    latents = [task.tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in sentences]
    tokens = torch.full((len(latents), max(map(len, latents))), task.tokenizer.eos_token_id)
    for row, z in enumerate(latents):
        tokens[row, : len(z)] = torch.tensor(z)
    return Rollout([prompt_ids] * len(latents), tokens, torch.tensor([len(z) for z in latents]),
                   torch.zeros_like(tokens, dtype=torch.bool))


def test_reward_is_base_log_likelihood_minus_penalties_at_every_prefix(setup):
    task, scorer = setup
    record = ConstrainedRecord(keywords=["dog", "park"], avoid=["ran"])
    prompt = task.prompt(record)
    assert task.tokenizer.decode(prompt.ids) == "Keywords: dog, park. Avoid: ran. Sentence:"
    sentences = ["The dog sat in the park.", "The dog ran in the park.", "The cat ran in the house."]
    rollout = rollout_of(task, prompt.ids, sentences)
    log_r = task.log_rewards(scorer, [prompt] * 3, rollout)

    # the base model reads the keywords prompt it was trained on, without the avoid list
    context = task.tokenizer(keywords_prompt(["dog", "park"]), add_special_tokens=False)["input_ids"]
    eos = task.tokenizer.eos_token_id
    for row, n in enumerate(rollout.lengths.tolist()):
        latent = rollout.tokens[row, :n].tolist()
        for i in range(n + 1):
            fluency = scorer.continuation([context], [latent[:i] + [eos]]).item()
            bad = violations(task.tokenizer.decode(latent[:i]), ["dog", "park"], ["ran"])
            assert log_r[row, i].item() == pytest.approx(fluency - 5.0 * bad, abs=1e-3)
    final = log_r[torch.arange(3), rollout.lengths]
    loglik = task.base_log_likelihood(scorer, [["dog", "park"]] * 3, rollout)
    assert torch.allclose(final, loglik - 5.0 * torch.tensor([0.0, 1.0, 3.0]), atol=1e-3)


def test_demo_keyword_sets_hold_out_pairs(setup):
    task, _ = setup
    assert all(not is_heldout(r.keywords) for r in task.records)
    assert all(is_heldout(r.keywords) for r in task.eval_records)
    for r in task.records + task.eval_records:
        assert violations(r.sentence, r.keywords, []) == 0 and len(r.avoid) == 1


@pytest.mark.parametrize("bad, message", [
    ('{"keywords": []}', "line 2: field 'keywords'"),
    ('{"keywords": "dog"}', "line 2: field 'keywords'"),
    ('{"keywords": ["dog"], "avoid": ["Dog"]}', "line 2: .*both required and avoided"),
    ('{"keywords": ["dog", "!!"]}', "line 2: field 'keywords'.*no letters"),
    ('{"keyword": ["dog"]}', "line 2: field 'keywords': Field required"),
    ("not json", "line 2: not valid JSON"),
])
def test_jsonl_errors_name_the_line_and_field(tmp_path, bad, message):
    path = tmp_path / "sets.jsonl"
    path.write_text(json.dumps({"keywords": ["dog", "park"], "avoid": ["ran"]}) + "\n" + bad + "\n")
    with pytest.raises(DataError, match=message):
        load_jsonl(path, ConstrainedRecord)
    with pytest.raises(ValidationError, match=message):
        ConstrainedConfig(data=str(path))


def test_template_must_show_avoided_words_when_the_data_has_them(setup, tmp_path):
    task, _ = setup
    with pytest.raises(ValueError, match="prompt_template must contain {avoid}"):
        ConstrainedTask(ConstrainedConfig(demo_sets=5, prompt_template="Keywords: {keywords}. Sentence:"),
                        task.tokenizer)
    path, held = tmp_path / "sets.jsonl", tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"keywords": [w, "park"]}) + "\n" for w in ["dog", "cat", "bird"]))
    held.write_text(json.dumps({"keywords": ["horse", "field"]}) + "\n")
    with pytest.raises(DataError, match="none to evaluate on"):  # three records: the tenth held out is none
        ConstrainedTask(ConstrainedConfig(data=str(path), prompt_template="Keywords: {keywords}. Sentence:"),
                        task.tokenizer)
    plain = ConstrainedTask(ConstrainedConfig(data=str(path), eval_data=str(held),
                                              prompt_template="Keywords: {keywords}. Sentence:"), task.tokenizer)
    assert len(plain.records) == 3 and len(plain.eval_records) == 1
    with pytest.raises(ValidationError, match="task.prompt_template|must contain {keywords}"):
        ConstrainedConfig(prompt_template="Sentence:")


@pytest.mark.parametrize("field, template, said", [
    ("prompt_template", "Keywords: {keywords} {foo}. Avoid: {avoid}. Sentence:", "placeholder {foo} is not one"),
    ("prompt_template", "Keywords: {keywords} {0}. Avoid: {avoid}.", "placeholder {0} is not one"),
    ("prompt_template", "Keywords: {keywords} {}. Avoid: {avoid}.", "placeholder {} is not one"),
    ("prompt_template", "Keywords: {keywords}. Avoid: {avoid}. {", "Single '{'"),
    ("prompt_template", "Keywords: {keywords} {. Avoid: {avoid}.", "unmatched '{'"),
    ("prompt_template", "Keywords: {keywords}}. Avoid: {avoid}.", "Single '}'"),
    ("prompt_template", "Keywords: {keywords:d}. Avoid: {avoid}.", "placeholder {keywords:d} is not one"),
    ("prompt_template", "Avoid: {avoid}. Keywords: {{keywords}}.", "must contain {keywords}"),  # a literal
    ("reward_template", "Keywords: {keywords}. Sentence: {x}", "placeholder {x} is not one"),
    ("reward_template", "Keywords: {keywords}. Avoid: {avoid}.", "placeholder {avoid} is not one"),  # it fills keywords only
])
def test_templates_take_only_the_placeholders_the_task_fills(field, template, said):
    """Refused when the config is read (so `gfn train`, `gfn jobs submit` and POST /jobs refuse it), not
    with a KeyError or IndexError once the model has loaded; the message names the field."""
    with pytest.raises(ValidationError) as refused:
        load_config("constrained", {f"task.{field}": template})
    lines = config_errors(refused.value)
    assert any(line.startswith(f"task.{field}: ") and said in line for line in lines), lines
    if "must contain" not in said:  # the schema names the field; only pydantic checks what must be there
        with pytest.raises(ConfigError) as schema:
            jobs_load("constrained", {f"task.{field}": template})
        assert any(line.startswith(f"task.{field}: ") for line in schema.value.errors), schema.value.errors


def test_escaped_braces_in_templates_are_text(setup):
    task, _ = setup
    config = ConstrainedConfig(demo_sets=5, eval_prompts=1, prompt_template="{{set}} {keywords}. Avoid: {avoid}.",
                               reward_template="{{set}} {keywords}.")
    braced = ConstrainedTask(config, task.tokenizer)
    record = ConstrainedRecord(keywords=["dog", "park"], avoid=["cat"])
    assert braced.prompt(record).key == "{set} dog, park. Avoid: cat."
    assert braced.context(record.keywords) == braced.context_ids("{set} dog, park.")


@pytest.mark.parametrize("task_type, fields", [(InfillTask, ["prefix", "suffix"]), (ReasoningTask, ["question"]),
                                               (ContinuationTask, ["text"])])
def test_the_fixed_templates_of_the_other_tasks_name_only_what_they_fill(task_type, fields):
    assert check_template(task_type.prompt_template, fields, required=fields) == task_type.prompt_template
