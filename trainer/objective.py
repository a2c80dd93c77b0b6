"""Sub-trajectory balance (SubTB) for generation in which every state may stop.

A sample is z1..zn followed by the terminator. Because every state s may stop, its flow is
known up to the policy, F(s) = R(s⊤) / q(⊤|s), so there is no learned log Z and no flow
network. For 0 <= i < j <= n the sub-trajectory residual is

    r(i, j) = logR_i + logPF_i + ... + logPF_(j-1) + logT_j - logR_j - logT_i

and the loss of a sample is the λ-weighted mean of r(i, j)² over all pairs. The residuals are
differences of one prefix sum, r(i, j) = C_j - C_i with C = [0, cumsum(δ)] and
δ_k = logR_k + logPF_k + logT_(k+1) - logR_(k+1) - logT_k, so all pairs of all samples are a
few [B, L+1, L+1] tensor operations and no Python loop.

Tool-written ("forced") tokens: when a calculator writes z_(k+1), the transition k -> k+1 is
deterministic, so the policy's log-probability there is not part of the trajectory (taken as
0) and state k cannot stop (the tool, not the policy, decides what follows it). Such states
are not sub-trajectory endpoints: every pair (i, j) with i or j such a state is excluded.
Their logR and logT cancel from the residuals of the remaining pairs, so they are ignored too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def subtb_loss(
    log_r: Tensor,
    log_pf: Tensor,
    log_pterm: Tensor,
    lengths: Tensor,
    lam: float = 1.0,
    forced: Tensor | None = None,
) -> Tensor:
    """Modified SubTB loss, averaged over the samples that have at least one pair.

    Args:
        log_r: [B, L+1] tempered log R(z1..zi ⊤) for i = 0..L.
        log_pf: [B, L] log q(z(i+1) | z1..zi).
        log_pterm: [B, L+1] log q(⊤ | z1..zi).
        lengths: [B] long, n_b = number of generated non-terminator tokens, 0 <= n_b <= L.
        lam: pair weight base; pair (i, j) weighs lam ** (j - i - 1).
        forced: optional [B, L] bool, True where z(k+1) was written by a tool.

    Entries past a sample's length (and the log_pf / stop terms that forced tokens make
    irrelevant) are selected away with torch.where, so -inf or NaN there changes neither the
    loss nor the gradients. A sample with no pair (n = 0) contributes nothing; if no sample
    has a pair the result is a zero that is still connected to the graph.
    """
    batch, max_len = log_pf.shape
    if log_r.shape != (batch, max_len + 1) or log_pterm.shape != (batch, max_len + 1):
        raise ValueError(
            f"log_r {tuple(log_r.shape)} and log_pterm {tuple(log_pterm.shape)} must be "
            f"[B, L+1] = [{batch}, {max_len + 1}] for log_pf [B, L] = {tuple(log_pf.shape)}"
        )
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [B] = [{batch}], got {tuple(lengths.shape)}")
    if forced is not None and forced.shape != (batch, max_len):
        raise ValueError(f"forced must be [B, L] = [{batch}, {max_len}], got {tuple(forced.shape)}")
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")

    device = log_pf.device
    # Cumulative sums of long trajectories need at least float32, whatever the model ran in.
    dtype = torch.promote_types(log_pf.dtype, torch.float32)
    pos = torch.arange(max_len + 1, device=device)
    n = lengths.to(device)[:, None]
    stoppable = pos[None, :] <= n  # [B, L+1]: states 0..n exist (and may stop)
    sampled = pos[None, :-1] < n  # [B, L]: transitions k -> k+1 exist
    if forced is not None:
        forced = forced.to(device) & sampled
        sampled = sampled & ~forced
        stoppable = stoppable & ~torch.cat([forced, forced.new_zeros(batch, 1)], dim=1)

    # Select, never multiply: 0 * inf would put NaN into the loss and 0 * NaN into gradients.
    log_r = torch.where(stoppable, log_r.to(device=device, dtype=dtype), 0.0)  # rewards are scored on the host
    log_pterm = torch.where(stoppable, log_pterm.to(dtype), 0.0)
    log_pf = torch.where(sampled, log_pf.to(dtype), 0.0)

    delta = log_r[:, :-1] + log_pf + log_pterm[:, 1:] - log_r[:, 1:] - log_pterm[:, :-1]
    cum = torch.cat([delta.new_zeros(batch, 1), delta.cumsum(dim=1)], dim=1)  # [B, L+1]
    resid = cum[:, None, :] - cum[:, :, None]  # [B, i, j] = C_j - C_i

    span = pos[None, :] - pos[:, None]  # [i, j] = j - i
    pairs = (span > 0) & stoppable[:, :, None] & stoppable[:, None, :]  # i < j, both endpoints
    # lam ** (j - i - 1), each sample's scaled by its largest: a sample's loss is a ratio of
    # weighted sums, so the scale cancels, and unscaled, 16 ** 32 overflows float32 (NaN losses).
    log_w = torch.where(pairs, (span - 1).clamp(min=0).to(dtype) * math.log(lam), -torch.inf)
    top = log_w.amax(dim=(1, 2), keepdim=True)
    weight = torch.where(pairs, (log_w - torch.where(top.isfinite(), top, 0.0)).exp(), 0.0)

    weight_sum = weight.sum(dim=(1, 2))
    per_sample = (weight * resid.square()).sum(dim=(1, 2)) / weight_sum.clamp(
        min=torch.finfo(dtype).tiny
    )
    return per_sample.sum() / (weight_sum > 0).sum().clamp(min=1)
