"""Decoders the benchmarks compare the GFlowNet with: nucleus sampling and (diverse) beam
search, under a policy's masks, terminator and length limits (PolicySpec), so that every
method draws from the same space of latents. They take no word bias and no stop_after rule:
the continuation bench, their user, has neither.

transformers 5 moved group (diverse) beam search out of the library into a hub repository,
which these machines cannot reach; beam search here is small and handles both.
"""

from __future__ import annotations

from collections import Counter

import torch
from transformers import LogitsProcessor

from trainer.policy import PolicySpec, pack, state_logits


class _PolicyBias(LogitsProcessor):
    """Adds PolicySpec.bias of the current state to the next-token scores."""

    def __init__(self, bias: torch.Tensor, prompt_width: int):
        self.bias, self.prompt_width = bias, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.bias[input_ids.shape[1] - self.prompt_width, : scores.shape[-1]]


@torch.no_grad()
def nucleus(model: torch.nn.Module, spec: PolicySpec, prompts: list[list[int]], pad_id: int, top_p: float = 0.95,
            seed: int = 0) -> list[list[int]]:
    """One latent per prompt by nucleus sampling (top-p, temperature 1) of the masked model."""
    inputs = pack(prompts, torch.zeros((len(prompts), 0), dtype=torch.long), pad_id, model.device)
    width = inputs["input_ids"].shape[1]
    bias = spec.bias(model.config.vocab_size, model.device)
    torch.manual_seed(seed)  # generate draws from the global generator
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], do_sample=True,
                         top_p=top_p, top_k=0, temperature=1.0, max_new_tokens=spec.max_len + 1,
                         eos_token_id=spec.terminator_id, pad_token_id=pad_id,
                         logits_processor=[_PolicyBias(bias, width)])
    latents = []
    for row in out[:, width:].tolist():
        latents.append(row[: row.index(spec.terminator_id)] if spec.terminator_id in row else row)
    return latents


@torch.no_grad()
def beam_search(model: torch.nn.Module, spec: PolicySpec, prompt: list[int], pad_id: int, beams: int,
                groups: int = 1, diversity: float = 0.0) -> list[list[int]]:
    """`beams` latents for one prompt, the best finished hypotheses of each group.

    Diverse beam search (Vijayakumar et al., 2018): the beams are split into `groups` of
    beams // groups, and at each step a group chooses after the earlier ones, its scores
    lowered by `diversity` for every beam of an earlier group that chose the same token at
    this step. groups = 1 is plain beam search. Hypotheses are ranked by their masked
    log-probability; one ends when it takes the terminator.
    """
    if beams % groups:
        raise ValueError(f"beams ({beams}) must be a multiple of groups ({groups})")
    width = beams // groups
    live: list[list[tuple[list[int], float]]] = [[([], 0.0)] for _ in range(groups)]
    done: list[list[tuple[list[int], float]]] = [[] for _ in range(groups)]
    for step in range(spec.max_len + 1):
        rows = [(g, tokens, score) for g in range(groups) for tokens, score in live[g]]
        if not rows:
            break
        tokens = torch.tensor([t for _, t, _ in rows], dtype=torch.long).view(len(rows), step)
        logits = state_logits(model, [prompt] * len(rows), tokens, pad_id)[:, -1]
        scores = torch.log_softmax(logits + spec.bias(logits.shape[-1], logits.device)[step], -1)  # masked, renormalised
        scores += torch.tensor([s for _, _, s in rows], device=logits.device)[:, None]
        chosen: Counter[int] = Counter()
        for g in range(groups):
            mine = [k for k, row in enumerate(rows) if row[0] == g]
            if not mine:
                continue
            penalty = torch.zeros(scores.shape[-1], device=scores.device)
            for token, count in chosen.items():
                penalty[token] = diversity * count
            ranked = (scores[mine] - penalty).flatten().argsort(descending=True)
            live[g] = []
            for index in ranked.tolist():
                k, token = mine[index // scores.shape[-1]], index % scores.shape[-1]
                hypothesis = (rows[k][1] + [token], scores[k, token].item())
                if token == spec.terminator_id:
                    done[g].append((rows[k][1], hypothesis[1]))
                else:
                    live[g].append(hypothesis)
                    chosen[token] += 1
                if len(live[g]) == width:
                    break
            done[g] = sorted(done[g], key=lambda h: h[1], reverse=True)[:width]
            if len(done[g]) == width and max((s for _, s in live[g]), default=-torch.inf) <= done[g][-1][1]:
                live[g] = []  # scores only fall: no live hypothesis can still enter the top
    return [tokens for group in done for tokens, _ in group]
