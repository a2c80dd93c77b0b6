"""Rollouts obey the task's masks and length limits, and the teacher-forced log-probs
are those of the distribution that was sampled."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from adapters.manifest import VocabMask
from adapters.models import load_causal_lm, load_tokenizer
from trainer.policy import PolicySpec, masked_log_probs, policy_log_probs, state_logits
from trainer.rollout import sample
from world.corpus import RNG_PROMPT



@pytest.fixture(scope="module")
def lm(demo_model):
    return load_causal_lm(demo_model), load_tokenizer(demo_model)


def draw(lm, spec, n=200, seed=0, tool=None, prompt=RNG_PROMPT):
    model, tok = lm
    ids = tok(prompt)["input_ids"]
    return sample(model, spec, [ids] * n, tok.eos_token_id, 1.0, torch.Generator().manual_seed(seed), tool)


def test_vocabulary_mask_and_lengths_are_obeyed(lm):
    _, tok = lm
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    spec = PolicySpec(tok.eos_token_id, min_len=2, max_len=3, mask=VocabMask(mode="allow", token_ids=digits))
    rollout = draw(lm, spec)
    assert rollout.lengths.min() >= 2 and rollout.lengths.max() <= 3
    for latent in rollout.latents():
        assert set(latent) <= set(digits)


def test_every_sample_stops_at_max_len(lm):
    """A story goes on for many tokens; the policy must stop at max_len all the same."""
    _, tok = lm
    spec = PolicySpec(tok.eos_token_id, 0, 4, VocabMask())
    rollout = draw(lm, spec, n=32, prompt="Anna lived in a big city.")
    assert (rollout.lengths == 4).all()
    assert (rollout.tokens != tok.eos_token_id).all()


def test_deny_mask_bans_tokens(lm):
    _, tok = lm
    seven = tok.convert_tokens_to_ids("7")
    spec = PolicySpec(tok.eos_token_id, 1, 3, VocabMask(mode="deny", token_ids=[seven]))
    assert all(seven not in latent for latent in draw(lm, spec).latents())


def test_padding_past_a_sample_does_not_change_its_log_probs(lm):
    model, tok = lm
    spec = PolicySpec(tok.eos_token_id, 1, 4, VocabMask())
    rollout = draw(lm, spec, n=8)
    log_pf, log_pterm = policy_log_probs(model, spec, rollout.prompts, rollout.tokens, tok.eos_token_id)
    garbage = rollout.tokens.clone()
    for b, n in enumerate(rollout.lengths):
        garbage[b, n:] = 5
    log_pf2, log_pterm2 = policy_log_probs(model, spec, rollout.prompts, garbage, tok.eos_token_id)
    for b, n in enumerate(rollout.lengths.tolist()):
        assert torch.allclose(log_pf[b, :n], log_pf2[b, :n], atol=1e-5)
        assert torch.allclose(log_pterm[b, : n + 1], log_pterm2[b, : n + 1], atol=1e-5)


def test_left_padding_gives_the_same_log_probs_as_a_lone_prompt(lm):
    model, tok = lm
    short, long = tok("Keywords: dog, park. Sentence:")["input_ids"], tok(RNG_PROMPT)["input_ids"]
    tokens = torch.tensor([[tok.convert_tokens_to_ids("4")] * 3])
    together = state_logits(model, [short, long], tokens.repeat(2, 1), tok.eos_token_id)
    alone = state_logits(model, [short], tokens, tok.eos_token_id)
    assert torch.allclose(together[0], alone[0], atol=1e-4)


def test_sampling_frequencies_match_teacher_forced_probabilities(lm):
    """The first token's empirical distribution matches exp(log q) of the masked policy."""
    model, tok = lm
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    spec = PolicySpec(tok.eos_token_id, 1, 1, VocabMask(mode="allow", token_ids=digits))
    rollout = draw(lm, spec, n=4000, seed=1)
    logits = state_logits(model, rollout.prompts[:1], rollout.tokens[:1], tok.eos_token_id)
    probs = masked_log_probs(logits, spec.bias(logits.shape[-1]))[0, 0].exp()
    counts = torch.bincount(rollout.tokens[:, 0], minlength=probs.shape[0]).float() / 4000
    assert 0.5 * (counts - probs).abs().sum() < 0.04


def test_tool_tokens_are_written_and_flagged(lm):
    """A tool that answers every sampled token with a fixed token: it appears right after,
    flagged forced, and sampled tokens are not."""
    model, tok = lm
    marker = tok.convert_tokens_to_ids("=")
    spec = PolicySpec(tok.eos_token_id, 0, 6, VocabMask())
    rollout = draw(lm, spec, n=16, tool=lambda so_far: [marker] if so_far[-1] != marker else None)
    for b, n in enumerate(rollout.lengths.tolist()):
        for i in range(n):
            assert bool(rollout.forced[b, i]) == (i % 2 == 1)
            if i % 2 == 1:
                assert rollout.tokens[b, i] == marker


def test_a_sample_carries_its_log_q(lm):
    """The log q a rollout reports is the teacher-forced policy's: its tokens' log-probs and its stop
    (at max_len too), with tool tokens free. Prompts of two lengths, each drawn many times and
    interleaved: a repeated prompt is read once and its cache copied to each of its rows. The
    terminator is the token this model samples most there (whichever it is on this machine's build), so
    that some rows stop early and others run to max_len."""
    from trainer.scoring import prefix_log_likelihood

    model, tok = lm
    marker = tok.convert_tokens_to_ids("=")
    prompts = [tok(p)["input_ids"] for p in (RNG_PROMPT, "Anna lived in a big city.")] * 16

    def draw(terminator: int):
        return sample(model, PolicySpec(terminator, 1, 5, VocabMask()), prompts, tok.eos_token_id, 1.0,
                      torch.Generator().manual_seed(0), lambda so_far: [marker] if so_far[-1] != marker else None)

    sampled = Counter(t for z in draw(tok.eos_token_id).latents() for t in z if t != marker)
    spec = PolicySpec(sampled.most_common(1)[0][0], 1, 5, VocabMask())
    rollout = draw(spec.terminator_id)
    log_pf, log_pterm = policy_log_probs(model, spec, rollout.prompts, rollout.tokens, tok.eos_token_id)
    log_pf = log_pf.masked_fill(rollout.forced, 0.0)
    rows = torch.arange(32)
    expected = prefix_log_likelihood(log_pf)[rows, rollout.lengths] + log_pterm[rows, rollout.lengths]
    assert (rollout.lengths == 5).any() and (rollout.lengths < 5).any()
    assert rollout.log_q.tolist() == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-4)


def test_stop_after_bars_every_other_state_from_min_len_to_max_len():
    spec = PolicySpec(terminator_id=0, min_len=1, max_len=4, mask=VocabMask(), stop_after=frozenset({7}))
    tokens = torch.tensor([[5, 7, 5, 7], [7, 7, 5, 5]])
    # state 0 is before min_len (barred by the length rule instead); state 4 must stop
    assert spec.barred(tokens).tolist() == [[False, True, False, True, False], [False, False, False, True, False]]
    assert not PolicySpec(0, 1, 4, VocabMask()).barred(tokens).any()


def test_a_policy_that_may_stop_only_after_given_tokens(lm):
    """After the random-number prompt the base model would stop after any number; allowed to stop
    only after a 7, samples end in 7 (or at max_len), and their log q is the teacher-forced
    policy's under the same rule: sampling and the loss agree."""
    from trainer.scoring import prefix_log_likelihood

    model, tok = lm
    seven = tok.convert_tokens_to_ids("7")
    spec = PolicySpec(tok.eos_token_id, 0, 6, VocabMask(), frozenset({seven}))
    rollout = draw(lm, spec, n=128)
    latents = rollout.latents()
    assert all(len(z) == 6 or z[-1] == seven for z in latents)
    assert sum(len(z) < 6 for z in latents) > 16
    log_pf, log_pterm = policy_log_probs(model, spec, rollout.prompts, rollout.tokens, tok.eos_token_id)
    rows = torch.arange(128)
    expected = prefix_log_likelihood(log_pf)[rows, rollout.lengths] + log_pterm[rows, rollout.lengths]
    assert rollout.log_q.tolist() == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-4)
