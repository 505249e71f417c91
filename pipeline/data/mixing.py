"""How well a stream of batches mixes cases, against a uniform shuffle of the same samples.

Two slices of one case (patient) in a batch are strongly correlated, so a stream that puts them
together more often than a global shuffle (``DataLoader(shuffle=True)``, as the SAM-Med2D
authors train) gives noisier, less diverse steps. Two figures, each with its exact expectation
under a uniform random permutation of the same samples cut into batches of the same size:

* same-case pairs per batch: pairs (i < j) of images of one case in a batch, averaged;
* distinct cases in the first ``n`` batches: how fast the stream moves through the corpus.

Used by ``bench/mixing.py`` and the tests; pure functions of the case ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = [
    "case_of",
    "distinct_cases",
    "same_case_pairs",
    "uniform_distinct_cases",
    "uniform_same_case_pairs",
]


def case_of(meta: dict) -> str:
    """The case of a sample, from its ``meta`` (dataset and case id: ids repeat across
    datasets)."""
    return f"{meta['dataset']}/{meta['case_id']}"


def same_case_pairs(batches: Iterable[Sequence[str]]) -> float:
    """Mean number of same-case pairs per batch.

    Arguments:
      batches: the case of each sample, per batch.

    Returns:
      Sum over batches of sum over cases of C(k, 2) (k = the case's images in the batch),
      divided by the number of batches (0 for none).
    """
    total, n = 0, 0
    for cases in batches:
        total += sum(k * (k - 1) // 2 for k in Counter(cases).values())
        n += 1
    return total / n if n else 0.0


def distinct_cases(batches: Iterable[Sequence[str]], first: int) -> int:
    """Distinct cases among the samples of the first ``first`` batches."""
    seen: set[str] = set()
    for i, cases in enumerate(batches):
        if i >= first:
            break
        seen.update(cases)
    return len(seen)


def uniform_same_case_pairs(case_sizes: Sequence[int], batch_size: int) -> float:
    """Expected same-case pairs per batch of ``batch_size`` drawn without replacement.

    Arguments:
      case_sizes: samples per case over the whole pool (the samples the stream yields).
      batch_size: samples per batch.

    Returns:
      C(b, 2) * sum n_c (n_c - 1) / (N (N - 1)), N = sum n_c.
    """
    total = sum(case_sizes)
    if total < 2:
        return 0.0
    same = sum(n * (n - 1) for n in case_sizes) / (total * (total - 1))
    return batch_size * (batch_size - 1) / 2 * same


def uniform_distinct_cases(case_sizes: Sequence[int], samples: int) -> float:
    """Expected distinct cases among the first ``samples`` of a uniform permutation.

    Arguments:
      case_sizes: samples per case over the whole pool.
      samples: how many are drawn (without replacement).

    Returns:
      sum over cases of 1 - P(none of its n_c samples drawn), with
      P = prod_{i < samples} (N - n_c - i) / (N - i) (hypergeometric).
    """
    total = sum(case_sizes)
    samples = min(samples, total)
    expected = 0.0
    for size, cases in Counter(case_sizes).items():  # the same for every case of that size
        absent = 1.0
        for i in range(samples):
            if total - size - i <= 0:
                absent = 0.0
                break
            absent *= (total - size - i) / (total - i)
        expected += cases * (1.0 - absent)
    return expected
