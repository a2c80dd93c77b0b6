"""Replay buffer: top-k per prompt, near-duplicate merging, tool masks, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from trainer.replay import ReplayBuffer, levenshtein


def log_r_for(tokens: tuple[int, ...], score: float) -> torch.Tensor:
    """Per-prefix log-rewards ending in score."""
    return torch.cat([torch.full((len(tokens),), -99.0), torch.tensor([score])])


def test_levenshtein() -> None:
    assert levenshtein((1, 2, 3), (1, 2, 3), bound=1) == 0
    assert levenshtein((1, 2, 3), (1, 9, 3), bound=1) == 1
    assert levenshtein((1, 2, 3), (1, 3), bound=1) == 1
    assert levenshtein((), (4,), bound=1) == 1
    assert levenshtein((1, 2, 3, 4), (2, 1, 4, 3), bound=5) == 3  # 1234 -> 234 -> 214 -> 2143
    assert levenshtein((1, 2, 3, 4), (5, 6, 7, 8), bound=5) == 4
    assert levenshtein((1, 2, 3, 4), (5, 6, 7, 8), bound=1) == 2  # capped at bound + 1
    assert levenshtein((1,), (1, 2, 3, 4), bound=2) == 3  # length difference alone exceeds


def test_keeps_top_k_per_prompt() -> None:
    buf = ReplayBuffer(capacity_per_prompt=3, dedup_distance=0)
    for score in [0.0, 5.0, 1.0, 4.0, 2.0]:
        tokens = (int(score), 7)
        buf.add("p", tokens, log_r_for(tokens, score))
    buf.add("q", (1,), log_r_for((1,), -3.0))
    assert [e.score for e in buf.entries("p")] == [5.0, 4.0, 2.0]
    assert [e.score for e in buf.entries("q")] == [-3.0]
    assert len(buf) == 4
    assert not buf.add("p", (9, 9), log_r_for((9, 9), -1.0))  # worse than all three
    assert buf.add("p", (8, 8), log_r_for((8, 8), 3.0))
    assert [e.score for e in buf.entries("p")] == [5.0, 4.0, 3.0]


def test_merges_near_duplicates_keeping_the_better() -> None:
    buf = ReplayBuffer(capacity_per_prompt=8, dedup_distance=1)
    buf.add("p", (1, 2, 3), log_r_for((1, 2, 3), 1.0))
    assert not buf.add("p", (1, 2, 4), log_r_for((1, 2, 4), 0.5))  # one substitution, worse
    assert buf.add("p", (1, 2), log_r_for((1, 2), 2.0))  # one deletion, better: replaces
    assert [e.tokens for e in buf.entries("p")] == [(1, 2)]
    assert not buf.add("p", (1, 2), log_r_for((1, 2), 2.0))  # exact duplicate
    assert buf.add("p", (5, 6, 7), log_r_for((5, 6, 7), 0.0))  # distinct
    assert [e.tokens for e in buf.entries("p")] == [(1, 2), (5, 6, 7)]
    # a sample near two stored ones merges the whole group into the best of the three
    buf.add("p", (5, 6, 7, 8), log_r_for((5, 6, 7, 8), 1.5))
    buf.add("p", (5, 6, 8), log_r_for((5, 6, 8), 3.0))
    assert [e.tokens for e in buf.entries("p")] == [(5, 6, 8), (1, 2)]


def test_stores_forced_masks_and_cpu_float32_copies() -> None:
    buf = ReplayBuffer()
    log_r = log_r_for((4, 5, 6), 1.0).double().requires_grad_()
    buf.add("p", [4, 5, 6], log_r, forced=[False, True, False])
    (entry,) = buf.entries("p")
    assert entry.tokens == (4, 5, 6) and entry.forced == (False, True, False)
    assert entry.log_r.dtype == torch.float32 and not entry.log_r.requires_grad
    assert entry.score == 1.0
    with pytest.raises(ValueError):
        buf.add("p", (1, 2), log_r_for((1, 2), 0.0), forced=[True])
    with pytest.raises(ValueError):
        buf.add("p", (1, 2), log_r_for((1,), 0.0))


def filled_buffer() -> ReplayBuffer:
    buf = ReplayBuffer(capacity_per_prompt=4, dedup_distance=1)
    for i in range(6):
        tokens = (i, i + 10, i + 20)
        buf.add("p", tokens, log_r_for(tokens, float(i)), forced=[False, i % 2 == 0, False])
    buf.add("q", (3,), log_r_for((3,), 0.25))
    return buf


def test_sampling_is_deterministic_with_a_seeded_generator() -> None:
    buf = filled_buffer()

    def draw(seed: int, k: int) -> list[tuple[int, ...]]:
        return [e.tokens for e in buf.sample("p", k, torch.Generator().manual_seed(seed))]

    assert draw(0, 3) == draw(0, 3)
    assert len(set(draw(0, 4))) == 4  # without replacement when enough are stored
    assert len(draw(1, 10)) == 10  # with replacement otherwise
    assert buf.sample("q", 2, torch.Generator().manual_seed(0))[0].tokens == (3,)
    assert buf.sample("missing", 2, torch.Generator().manual_seed(0)) == []


def test_state_dict_round_trip() -> None:
    buf = filled_buffer()
    saved = io.BytesIO()
    torch.save(buf.state_dict(), saved)
    saved.seek(0)
    restored = ReplayBuffer(capacity_per_prompt=4, dedup_distance=1)
    restored.load_state_dict(torch.load(saved))  # weights_only by default
    for key in ("p", "q"):
        before, after = buf.entries(key), restored.entries(key)
        assert [(e.tokens, e.forced, e.score) for e in before] == [
            (e.tokens, e.forced, e.score) for e in after
        ]
        for a, b in zip(before, after):
            assert torch.equal(a.log_r, b.log_r)
    samples = [
        [e.tokens for e in b.sample("p", 3, torch.Generator().manual_seed(7))]
        for b in (buf, restored)
    ]
    assert samples[0] == samples[1]
    with pytest.raises(ValueError):
        ReplayBuffer(capacity_per_prompt=8).load_state_dict(buf.state_dict())
