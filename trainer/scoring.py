"""Scoring with the frozen base model: the same weights with the adapter switched off,
no gradients. Rewards are computed here once per sampled batch, for all its prefixes in
batched passes, never once per generation step."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from trainer.policy import state_logits, transition_log_probs
from trainer.rollout import Rollout


class Scorer:
    def __init__(self, model: torch.nn.Module, pad_id: int, chunk: int = 512):
        self.model, self.pad_id, self.chunk = model, pad_id, chunk

    def _base(self):
        disable = getattr(self.model, "disable_adapter", None)
        return disable() if disable is not None else nullcontext()

    @torch.no_grad()
    def latent(self, rollout: Rollout, terminator_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Base log p(z_{i+1} | prompt, z≤i) [B, L] and log p(⊤ | prompt, z≤i) [B, L+1]."""
        with self._base():
            logits = state_logits(self.model, rollout.prompts, rollout.tokens, self.pad_id)
        return transition_log_probs(torch.log_softmax(logits, -1), rollout.tokens, terminator_id)

    @torch.no_grad()
    def continuation(self, contexts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        """log p(continuation | context) for each pair: [B]."""
        return torch.cat([
            self._continuation(contexts[i:i + self.chunk], continuations[i:i + self.chunk])
            for i in range(0, len(contexts), self.chunk)
        ])

    def _continuation(self, contexts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        width = max(len(c) for c in continuations)
        tokens = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(contexts), width), dtype=torch.bool)
        for row, continuation in enumerate(continuations):
            tokens[row, : len(continuation)] = torch.tensor(continuation, dtype=torch.long)
            valid[row, : len(continuation)] = True
        with self._base():
            logits = state_logits(self.model, contexts, tokens, self.pad_id)[:, :-1]
        token_lp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return torch.where(valid, token_lp, 0.0).sum(-1)

    def suffix_at_prefixes(self, rollout: Rollout, suffixes: list[list[int]]) -> torch.Tensor:
        """log p(suffix_b | prompt_b, z1..zi) for every prefix i ≤ n_b: [B, L+1]
        (-inf past a row's length). One batched pass over all (row, prefix) pairs."""
        rows = [(b, i) for b, n in enumerate(rollout.lengths.tolist()) for i in range(n + 1)]
        contexts = [rollout.prompts[b] + rollout.tokens[b, :i].tolist() for b, i in rows]
        scores = self.continuation(contexts, [suffixes[b] for b, _ in rows])
        out = torch.full((len(rollout.prompts), rollout.tokens.shape[1] + 1), float("-inf"))
        out[[b for b, _ in rows], [i for _, i in rows]] = scores
        return out


def prefix_log_likelihood(log_pf: torch.Tensor) -> torch.Tensor:
    """log p(z1..zi | prompt) for i = 0..L from per-token log-probs [B, L]: [B, L+1]."""
    return torch.cat([torch.zeros_like(log_pf[:, :1]), log_pf.cumsum(-1)], dim=-1)


