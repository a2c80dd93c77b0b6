"""PNG plots written next to an adapter: the loss curve and a task's evaluation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(path: Path, steps: list[int], losses: list[float], log_rewards: list[float]) -> None:
    fig, left = plt.subplots(figsize=(7, 3.5))
    left.plot(steps, losses, color="tab:blue", lw=1)
    left.set(xlabel="step", ylabel="loss", yscale="log" if min(losses) > 0 else "symlog")  # RLOO losses go negative
    right = left.twinx()
    right.plot(steps, log_rewards, color="tab:orange", lw=1)
    right.set_ylabel("mean log-reward", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bar_chart(path: Path, labels: list, sampled: list[float], target: list[float], title: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 3.5))
    xs = range(len(labels))
    ax.bar(xs, sampled, color="tab:blue", alpha=0.7, label="sampled")
    ax.step(xs, target, where="mid", color="black", lw=1, label="target")
    step = max(1, len(labels) // 20)
    ax.set_xticks(list(xs)[::step], [str(x) for x in labels][::step])
    ax.set(title=title, ylabel="probability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grouped_bars(path: Path, labels: list, series: dict[str, list[float]], title: str, ylabel: str) -> None:
    """One group of bars per label, one bar per series (e.g. accuracy by operand count)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([x + k * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], [str(label) for label in labels])
    ax.set(title=title, ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
