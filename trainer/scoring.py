"""Scoring with the frozen base model: the same weights with the adapter switched off,
no gradients. Rewards are computed here once per sampled batch, for all its prefixes in
batched passes, never once per generation step. The model runs on its device; what comes
back is on the host, where the tasks build their rewards."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from trainer.policy import pack, state_logits, transition_log_probs
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
        log_pf, log_pterm = transition_log_probs(torch.log_softmax(logits, -1), rollout.tokens.to(logits.device),
                                                 terminator_id)
        return log_pf.cpu(), log_pterm.cpu()

    def stop_log_likelihood(self, rollout: Rollout, terminator_id: int) -> torch.Tensor:
        """log p(z1..zi ⊤ | prompt) under the base model for every prefix i: [B, L+1]."""
        log_pf, log_pterm = self.latent(rollout, terminator_id)
        return prefix_log_likelihood(log_pf) + log_pterm

    @torch.no_grad()
    def continuation(self, contexts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        """log p(continuation | context) for each pair: [B]."""
        return torch.cat([
            self._continuation(contexts[i:i + self.chunk], continuations[i:i + self.chunk])
            for i in range(0, len(contexts), self.chunk)
        ])

    @torch.no_grad()
    def greedy(self, contexts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The base model's greedy continuation of each context, max_new_tokens long (eos
        pads the rest), e.g. to read the answer it states after a rationale."""
        out: list[list[int]] = []
        for i in range(0, len(contexts), self.chunk):
            chunk = contexts[i:i + self.chunk]
            inputs = pack(chunk, torch.zeros((len(chunk), 0), dtype=torch.long), self.pad_id, self.model.device)
            with self._base():
                ids = self.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id)
            out += ids[:, inputs["input_ids"].shape[1]:].tolist()
        return out

    def _continuation(self, contexts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        width = max(len(c) for c in continuations)
        tokens = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(contexts), width), dtype=torch.bool)
        for row, continuation in enumerate(continuations):
            tokens[row, : len(continuation)] = torch.tensor(continuation, dtype=torch.long)
            valid[row, : len(continuation)] = True
        with self._base():
            logits = state_logits(self.model, contexts, tokens, self.pad_id)[:, :-1]
        tokens, valid = tokens.to(logits.device), valid.to(logits.device)
        token_lp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return torch.where(valid, token_lp, 0.0).sum(-1).cpu()

    @torch.no_grad()
    def prefixes_and_suffix(self, rollout: Rollout, suffixes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(z1..zi | prompt_b) and log p(suffix_b | prompt_b, z1..zi) for every prefix
        i ≤ n_b: [B, L+1] each (-inf past a row's length).

        One pass per row, not one per prefix: a row holds its prompt, its latent and n+1
        copies of the suffix, and a block mask lets copy i see only the prompt, z1..zi and
        itself, so the keys and values of the shared beginning are computed once."""
        prefix = torch.full((len(rollout.prompts), rollout.tokens.shape[1] + 1), float("-inf"))
        suffix = prefix.clone()
        for part in _by_length(rollout.lengths.tolist(), self.chunk):
            width, lengths = int(rollout.lengths[part].max()), rollout.lengths[part]
            with self._base():
                p, s = _packed_prefixes(self.model, [rollout.prompts[b] for b in part], rollout.tokens[part, :width],
                                        [suffixes[b] for b in part], self.pad_id)
            valid = torch.arange(width + 1)[None, :] <= lengths[:, None]
            prefix[part, : width + 1] = torch.where(valid, p, float("-inf"))
            suffix[part, : width + 1] = torch.where(valid, s, float("-inf"))
        return prefix, suffix


def _by_length(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices in groups of similar length, each group holding at most `budget`
    (row, prefix) pairs (or one row), so that short rows are not padded to long ones."""
    groups: list[list[int]] = [[]]
    for row in sorted(range(len(lengths)), key=lambda b: lengths[b]):
        if groups[-1] and (len(groups[-1]) + 1) * (lengths[row] + 1) > budget:
            groups.append([])
        groups[-1].append(row)
    return [g for g in groups if g]


def _packed_prefixes(model: torch.nn.Module, prompts: list[list[int]], tokens: torch.Tensor,
                     suffixes: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass behind Scorer.prefixes_and_suffix for rows of at most W = tokens.shape[1]
    latent tokens: [B, W+1] each, meaningless past a row's length.

    Columns: left-padded prompt (P) | z1..zW | W+1 copies of the suffix (Y each). Copy i
    sits at positions len(prompt)+i onwards, as if it followed z1..zi."""
    batch, width = tokens.shape
    plen = torch.tensor([len(p) for p in prompts])
    slen = torch.tensor([len(s) for s in suffixes])
    P, Y, copies = int(plen.max()), max(1, int(slen.max())), width + 1
    ids = torch.full((batch, P + width + copies * Y), pad_id, dtype=torch.long)
    suffix_ids = torch.full((batch, Y), pad_id, dtype=torch.long)
    for b, (prompt, suffix) in enumerate(zip(prompts, suffixes)):
        ids[b, P - len(prompt): P] = torch.tensor(prompt, dtype=torch.long)
        suffix_ids[b, : len(suffix)] = torch.tensor(suffix, dtype=torch.long)
    ids[:, P: P + width] = tokens
    ids[:, P + width:] = suffix_ids.repeat(1, copies)

    # per column: which copy it belongs to (-1: prompt or latent), its index in that part
    col = torch.arange(ids.shape[1])
    in_copy = col >= P + width
    copy = torch.where(in_copy, (col - P - width) // Y, -1)
    k = torch.where(in_copy, (col - P - width) % Y, 0)
    z = torch.where((col >= P) & ~in_copy, col - P + 1, 0)  # z index 1..W of latent columns
    real_prompt = (col[None, :] < P) & (col[None, :] >= P - plen[:, None])  # [B, S]
    main = ~in_copy
    causal_main = main[:, None] & main[None, :] & (col[None, :] <= col[:, None])  # [S, S]
    sees_latent = in_copy[:, None] & (z[None, :] >= 1) & (z[None, :] <= copy[:, None])
    same_copy = in_copy[:, None] & (copy[None, :] == copy[:, None]) & (k[None, :] <= k[:, None])
    allowed = ((causal_main & ((col[None, :] >= P) | real_prompt[:, None, :]))
               | (in_copy[:, None] & real_prompt[:, None, :])
               | sees_latent | same_copy | torch.eye(len(col), dtype=torch.bool))
    mask = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill(~allowed, torch.finfo(model.dtype).min)
    positions = torch.where(in_copy, plen[:, None] + copy + k, torch.where(col < P, col - (P - plen[:, None]),
                                                                           plen[:, None] + z - 1)).clamp(min=0)
    device = model.device
    logits = model(input_ids=ids.to(device), attention_mask=mask[:, None].to(device), position_ids=positions.to(device),
                   use_cache=False).logits
    log_probs = torch.log_softmax(logits.float(), -1)
    tokens, suffix_ids, slen = tokens.to(device), suffix_ids.to(device), slen.to(device)

    # prefix: z_(j+1) is predicted at column P-1+j
    token_lp = log_probs[:, P - 1: P - 1 + width].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    prefix = torch.cat([token_lp.new_zeros(batch, 1), token_lp.cumsum(-1)], dim=1)
    # suffix: copy i's first token is predicted at column P-1+i, its k-th at the copy's column k-1
    first = log_probs[:, P - 1: P + width].gather(-1, suffix_ids[:, :1, None].expand(-1, copies, 1)).squeeze(-1)
    rest = log_probs[:, P + width:].view(batch, copies, Y, -1)[:, :, :-1]
    rest = rest.gather(-1, suffix_ids[:, None, 1:, None].expand(-1, copies, -1, 1)).squeeze(-1)
    rest = torch.where(torch.arange(1, Y, device=device)[None, None, :] < slen[:, None, None], rest, 0.0).sum(-1)
    return prefix.cpu(), torch.where(slen[:, None] > 0, first + rest, 0.0).cpu()


def prefix_log_likelihood(log_pf: torch.Tensor) -> torch.Tensor:
    """log p(z1..zi | prompt) for i = 0..L from per-token log-probs [B, L]: [B, L+1]."""
    return torch.cat([torch.zeros_like(log_pf[:, :1]), log_pf.cumsum(-1)], dim=-1)


