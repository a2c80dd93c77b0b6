"""SubTB with every state terminable: exactness on a tabular tree, agreement with the
definition pair by pair, and robustness to padding."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from trainer.objective import subtb_loss

VOCAB = 2  # tokens 0..VOCAB-1; the terminator is token VOCAB
MAX_LEN = 3


class Tree:
    """Every sequence over the vocabulary of length <= MAX_LEN, a state and a trajectory each."""

    def __init__(self, log_reward: Tensor) -> None:
        self.seqs = [
            s for n in range(MAX_LEN + 1) for s in itertools.product(range(VOCAB), repeat=n)
        ]
        self.index = {s: i for i, s in enumerate(self.seqs)}
        self.log_reward = log_reward  # [num_seqs]: log R(s ⊤)
        num = len(self.seqs)
        self.lengths = torch.tensor([len(s) for s in self.seqs])
        # state index and next token at every position of every trajectory (0 = padding)
        self.state = torch.zeros(num, MAX_LEN + 1, dtype=torch.long)
        self.token = torch.zeros(num, MAX_LEN, dtype=torch.long)
        self.log_r = torch.zeros(num, MAX_LEN + 1, dtype=torch.float64)
        for b, s in enumerate(self.seqs):
            for i in range(len(s) + 1):
                self.state[b, i] = self.index[s[:i]]
                self.log_r[b, i] = log_reward[self.index[s[:i]]]
            for i, z in enumerate(s):
                self.token[b, i] = z
        # states at the maximal length must stop
        self.allowed = torch.ones(num, VOCAB + 1, dtype=torch.bool)
        self.allowed[self.lengths == MAX_LEN, :VOCAB] = False

    def log_policy(self, logits: Tensor) -> Tensor:
        """[num_states, VOCAB+1] log q(· | s) from free logits, masking tokens past MAX_LEN."""
        return logits.masked_fill(~self.allowed, float("-inf")).log_softmax(dim=-1)

    def exact_log_policy(self) -> Tensor:
        """log q from the exact flows F(s) = Σ R over terminated sequences extending s."""
        reward = self.log_reward.exp()
        flow = torch.stack(
            [sum(reward[self.index[t]] for t in self.seqs if t[: len(s)] == s) for s in self.seqs]
        )
        log_q = torch.full((len(self.seqs), VOCAB + 1), float("-inf"), dtype=torch.float64)
        for i, s in enumerate(self.seqs):
            log_q[i, VOCAB] = (reward[i] / flow[i]).log()
            if len(s) < MAX_LEN:
                for z in range(VOCAB):
                    log_q[i, z] = (flow[self.index[s + (z,)]] / flow[i]).log()
        return log_q

    def trajectories(self, log_q: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        per_position = log_q[self.state]  # [num, MAX_LEN+1, VOCAB+1]
        log_pterm = per_position[..., VOCAB]
        log_pf = per_position[:, :-1].gather(-1, self.token[..., None]).squeeze(-1)
        # padding positions gather -inf from masked tokens; the loss must select them away
        return self.log_r, log_pf, log_pterm, self.lengths

    def sequence_log_prob(self, log_q: Tensor) -> Tensor:
        log_r, log_pf, log_pterm, lengths = self.trajectories(log_q)
        valid = torch.arange(MAX_LEN)[None, :] < lengths[:, None]
        log_stop = log_pterm.gather(1, lengths[:, None]).squeeze(1)
        return torch.where(valid, log_pf, 0.0).sum(1) + log_stop


@pytest.fixture
def tree() -> Tree:
    torch.manual_seed(0)
    num = sum(VOCAB**n for n in range(MAX_LEN + 1))
    return Tree(torch.randn(num, dtype=torch.float64))


@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_zero_at_exact_policy(tree: Tree, lam: float) -> None:
    logits = tree.exact_log_policy().nan_to_num(neginf=0.0).requires_grad_()
    loss = subtb_loss(*tree.trajectories(tree.log_policy(logits)), lam=lam)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert logits.grad.abs().max().item() < 1e-6


def test_positive_away_from_exact_policy(tree: Tree) -> None:
    logits = tree.exact_log_policy().nan_to_num(neginf=0.0)
    logits = logits + 0.1 * torch.randn_like(logits)
    assert subtb_loss(*tree.trajectories(tree.log_policy(logits))).item() > 1e-4


def test_training_matches_target(tree: Tree) -> None:
    logits = torch.zeros(len(tree.seqs), VOCAB + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        subtb_loss(*tree.trajectories(tree.log_policy(logits))).backward()
        opt.step()
    with torch.no_grad():
        learned = tree.sequence_log_prob(tree.log_policy(logits)).exp()
    target = tree.log_reward.softmax(0)
    assert learned.sum().item() == pytest.approx(1.0)
    assert 0.5 * (learned - target).abs().sum().item() < 0.02


def brute_force(log_r, log_pf, log_pterm, lengths, lam, forced=None) -> Tensor:
    """The definition: a double loop over the pairs of endpoints that may stop."""
    losses = []
    for b, n in enumerate(lengths.tolist()):
        is_forced = [bool(forced[b, k]) if forced is not None else False for k in range(n)]
        ends = [i for i in range(n + 1) if i == n or not is_forced[i]]
        num = den = 0.0
        for i, j in itertools.combinations(ends, 2):
            pf = sum(log_pf[b, k] for k in range(i, j) if not is_forced[k])
            r = log_r[b, i] + pf + log_pterm[b, j] - log_r[b, j] - log_pterm[b, i]
            num = num + lam ** (j - i - 1) * r**2
            den = den + lam ** (j - i - 1)
        if den:
            losses.append(num / den)
    return torch.stack(losses).mean()


def random_batch(lengths: list[int], max_len: int, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    shape = (batch, max_len + 1)
    return (
        torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(batch, max_len, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(),
        torch.tensor(lengths),
        torch.rand(batch, max_len, generator=g) < 0.3,
    )


@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("use_forced", [False, True])
def test_matches_brute_force(lam: float, use_forced: bool) -> None:
    log_r, log_pf, log_pterm, lengths, forced = random_batch([0, 6, 3, 1, 6, 2, 5], 6, seed=1)
    forced = forced if use_forced else None
    fast = subtb_loss(log_r, log_pf, log_pterm, lengths, lam=lam, forced=forced)
    fast_grads = torch.autograd.grad(fast, (log_r, log_pf, log_pterm))
    slow = brute_force(log_r, log_pf, log_pterm, lengths, lam, forced)
    slow_grads = torch.autograd.grad(slow, (log_r, log_pf, log_pterm), allow_unused=True)
    torch.testing.assert_close(fast, slow)
    for f, s in zip(fast_grads, slow_grads):
        torch.testing.assert_close(f, torch.zeros_like(f) if s is None else s)


@pytest.mark.parametrize("lam, max_len", [(16.0, 48), (4.0, 80), (0.05, 48)])
def test_long_samples_at_a_large_or_small_lambda_stay_finite(lam: float, max_len: int) -> None:
    """lam ** (j - i - 1) overflowed float32 past 32 tokens at lam = 16 (a config the checks
    accept): the loss was NaN at the first long sample. Float64 stands in for the definition."""
    log_r, log_pf, log_pterm, lengths, _ = random_batch([max_len, 3, 0, max_len // 2], max_len, seed=3)
    as32 = [t.detach().float().requires_grad_() for t in (log_r, log_pf, log_pterm)]
    loss = subtb_loss(*as32, lengths, lam=lam)
    grads = torch.autograd.grad(loss, as32)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    exact = subtb_loss(log_r, log_pf, log_pterm, lengths, lam=lam)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=1e-4)


def test_padding_and_ignored_entries_do_not_matter() -> None:
    clean = random_batch([0, 6, 3, 1, 4], 6, seed=2)
    lengths, forced = clean[3], clean[4]
    pos = torch.arange(7)
    past_end = pos[None, :] > lengths[:, None]
    forced_pos = forced & (pos[None, :-1] < lengths[:, None])
    before_forced = torch.cat([forced_pos, torch.zeros(5, 1, dtype=torch.bool)], dim=1)
    dirty = (
        clean[0].detach().masked_fill(past_end | before_forced, float("nan")).requires_grad_(),
        clean[1].detach().masked_fill(past_end[:, 1:] | forced_pos, float("inf")).requires_grad_(),
        clean[2]
        .detach()
        .masked_fill(past_end, float("-inf"))
        .masked_fill(before_forced, float("nan"))
        .requires_grad_(),
    )
    losses = [subtb_loss(*t[:3], lengths, forced=forced) for t in (clean, dirty)]
    grads = [torch.autograd.grad(loss, t[:3]) for loss, t in zip(losses, (clean, dirty))]
    torch.testing.assert_close(losses[0], losses[1])
    for g_clean, g_dirty in zip(*grads):
        assert torch.isfinite(g_dirty).all()
        torch.testing.assert_close(g_clean, g_dirty)


def test_no_pairs_gives_connected_zero() -> None:
    log_r, log_pf, log_pterm, _, _ = random_batch([0, 0], 3, seed=3)
    loss = subtb_loss(log_r, log_pf, log_pterm, torch.tensor([0, 0]))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    (grad,) = torch.autograd.grad(loss, log_r)
    assert (grad == 0).all()


def test_low_precision_inputs_are_accumulated_in_float32() -> None:
    log_r, log_pf, log_pterm, lengths, _ = random_batch([2, 5], 5, seed=4)
    low = [x.bfloat16() for x in (log_r, log_pf, log_pterm)]
    loss = subtb_loss(*low, lengths)
    exact = subtb_loss(*(x.double() for x in low), lengths)  # the same rounded inputs, summed in float64
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(exact.item(), rel=1e-5)
