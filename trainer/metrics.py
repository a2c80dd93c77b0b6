"""Sample-quality metrics shared by the tasks' evaluations and the benchmarks: BLEU-4
against references, distinct-n and pairwise diversity, total variation to a known
distribution and the effective sample size of importance weights."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import torch


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (one reference each, whitespace tokens, uniform weights, brevity
    penalty), in [0, 1]; 0 when some n-gram order has no match."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        hyp, ref = hypothesis.split(), reference.split()
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, 5):
            grams, ref_grams = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, ref_grams[g]) for g, c in grams.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = min(0.0, 1 - ref_len / hyp_len)
    return math.exp(log_precision + brevity)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of a set of samples (whitespace tokens)."""
    grams = [g for text in texts for g in _ngrams(text.split(), n).elements()]
    return len(set(grams)) / len(grams) if grams else 0.0


def pairwise_diversity(samples: Sequence[Sequence[Hashable]]) -> float:
    """1 - the mean cosine similarity of the samples' count vectors (e.g. of token ids),
    over all pairs; 0 for fewer than two samples."""
    counts = [Counter(sample) for sample in samples]
    norms = [math.sqrt(sum(c * c for c in count.values())) for count in counts]
    similarities = [
        sum(c * counts[j][k] for k, c in counts[i].items()) / (norms[i] * norms[j]) if norms[i] and norms[j] else 0.0
        for i in range(len(counts)) for j in range(i + 1, len(counts))
    ]
    return 1 - sum(similarities) / len(similarities) if similarities else 0.0


def total_variation(samples: Sequence[Hashable], target: dict[Hashable, float],
                    weights: Sequence[float] | None = None) -> float:
    """TV between the (optionally weighted) empirical distribution of samples and a target
    pmf; samples outside the target's support count as one more outcome the target gives
    no mass."""
    weights = [1.0] * len(samples) if weights is None else list(weights)
    mass: dict[Hashable, float] = {}
    for sample, weight in zip(samples, weights, strict=True):
        mass[sample] = mass.get(sample, 0.0) + weight
    total = sum(weights)
    inside = sum(abs(mass.get(k, 0.0) / total - p) for k, p in target.items())
    outside = sum(m for k, m in mass.items() if k not in target) / total
    return 0.5 * (inside + outside)


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """(Σw)² / Σw² from log-weights, in log space: exp(2·logsumexp(l) - logsumexp(2l)).
    Weights of -inf count as zero; all zero gives 0."""
    log_weights = log_weights.double()
    if not torch.isfinite(log_weights).any():
        return 0.0
    return math.exp(2 * torch.logsumexp(log_weights, 0).item() - torch.logsumexp(2 * log_weights, 0).item())
