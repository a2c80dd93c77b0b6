"""Per-prompt replay buffer of the best distinct samples.

Off-policy replay is what keeps high-reward modes from being forgotten: SubTB is valid for
any behaviour policy, so stored samples are replayed with teacher forcing to get fresh
log-probs. Each entry keeps its untempered per-prefix log-rewards (the loop divides by the
current temperature) and, for tool-use rollouts, exactly which tokens the tool wrote, so a
replayed trajectory is scored the way it was sampled and never re-scored without the tool
outputs. Near-duplicates (small token edit distance) are merged so that the buffer holds
distinct modes rather than many copies of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Entry:
    """One stored sample: z1..zn, its untempered log R(z1..zi ⊤) for i = 0..n, tool mask."""

    tokens: tuple[int, ...]
    log_r: Tensor  # [n+1], float32, CPU
    forced: tuple[bool, ...] | None  # [n], True where the tool wrote the token
    score: float  # log_r[n]: the untempered log-reward of the whole sample


def levenshtein(a: Sequence[int], b: Sequence[int], bound: int) -> int:
    """Token edit distance of a and b, or bound + 1 as soon as it is known to exceed bound."""
    if abs(len(a) - len(b)) > bound:
        return bound + 1
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        if min(cur) > bound:  # row minima never decrease
            return bound + 1
        prev = cur
    return min(prev[-1], bound + 1)


class ReplayBuffer:
    """For each prompt key, the capacity_per_prompt best samples by final untempered log-reward.

    A new sample within dedup_distance edits of stored ones is merged with them: of that group
    only the highest-scoring sample is kept (an earlier one wins ties). Entries are kept
    sorted best first, so sampling with a seeded generator is deterministic.
    """

    def __init__(self, capacity_per_prompt: int = 32, dedup_distance: int = 1) -> None:
        if capacity_per_prompt < 1:
            raise ValueError(f"capacity_per_prompt must be >= 1, got {capacity_per_prompt}")
        if dedup_distance < 0:
            raise ValueError(f"dedup_distance must be >= 0, got {dedup_distance}")
        self.capacity_per_prompt = capacity_per_prompt
        self.dedup_distance = dedup_distance
        self._entries: dict[str, list[Entry]] = {}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def entries(self, key: str) -> list[Entry]:
        """The entries stored for key, best first (a copy of the list)."""
        return list(self._entries.get(key, []))

    def add(
        self,
        key: str,
        tokens: Sequence[int],
        log_r: Tensor,
        forced: Sequence[bool] | None = None,
    ) -> bool:
        """Offer a sample; returns whether it is in the buffer afterwards."""
        tokens = tuple(int(t) for t in tokens)
        if log_r.shape != (len(tokens) + 1,):
            raise ValueError(
                f"log_r must have shape [n+1] = [{len(tokens) + 1}], got {tuple(log_r.shape)}"
            )
        if forced is not None:
            forced = tuple(bool(f) for f in forced)
            if len(forced) != len(tokens):
                raise ValueError(f"forced must have length n = {len(tokens)}, got {len(forced)}")
        log_r = log_r.detach().to(device="cpu", dtype=torch.float32).clone()
        score = float(log_r[-1])
        if score != score:
            raise ValueError("the final log-reward is NaN")
        new = Entry(tokens=tokens, log_r=log_r, forced=forced, score=score)

        stored = self._entries.get(key, [])
        bound = self.dedup_distance
        near = [e for e in stored if levenshtein(tokens, e.tokens, bound) <= bound]
        best = max(near, key=lambda e: e.score, default=None)
        if best is not None and best.score >= new.score:
            keep = [e for e in stored if e not in near or e is best]
        else:
            keep = [e for e in stored if e not in near] + [new]
        keep.sort(key=lambda e: e.score, reverse=True)  # stable: earlier entries win ties
        self._entries[key] = keep[: self.capacity_per_prompt]
        return any(e is new for e in self._entries[key])

    def sample(self, key: str, k: int, generator: torch.Generator) -> list[Entry]:
        """k entries for key drawn uniformly, without replacement unless fewer than k are stored."""
        stored = self._entries.get(key, [])
        if not stored or k <= 0:
            return []
        if len(stored) >= k:
            idx = torch.randperm(len(stored), generator=generator)[:k]
        else:
            idx = torch.randint(len(stored), (k,), generator=generator)
        return [stored[i] for i in idx.tolist()]

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, floats and CPU tensors: torch.save-able and loadable with weights_only."""
        return {
            "capacity_per_prompt": self.capacity_per_prompt,
            "dedup_distance": self.dedup_distance,
            "entries": {
                key: [
                    {
                        "tokens": list(e.tokens),
                        "log_r": e.log_r.clone(),
                        "forced": None if e.forced is None else list(e.forced),
                        "score": e.score,
                    }
                    for e in entries
                ]
                for key, entries in self._entries.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore entries exactly; the buffer's settings must match the saved ones."""
        saved = (state["capacity_per_prompt"], state["dedup_distance"])
        if saved != (self.capacity_per_prompt, self.dedup_distance):
            raise ValueError(
                f"checkpoint buffer has (capacity_per_prompt, dedup_distance) = {saved}, this "
                f"one {(self.capacity_per_prompt, self.dedup_distance)}: construct it with the "
                "saved settings to resume"
            )
        self._entries = {
            key: [
                Entry(
                    tokens=tuple(e["tokens"]),
                    log_r=e["log_r"].clone(),
                    forced=None if e["forced"] is None else tuple(e["forced"]),
                    score=e["score"],
                )
                for e in entries
            ]
            for key, entries in state["entries"].items()
        }
