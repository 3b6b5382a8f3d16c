"""Representative subsets for a cold start: greedy facility location on Tanimoto similarity.

MaxMin (``acquisition.diversity.maxmin_select``) pushes picks to the edges of chemical
space. Its picks are the library's outliers, singletons whose measurement tells a model
little about any other compound. A cold start (no model yet) wants picks that together
*represent* the library, so that the first model has seen every populated region of it.
Facility location measures that as coverage:

    f(S) = sum_{j in R} max(c_j, max_{i in S} Tanimoto(i, j))

over a reference set ``R`` (the library, or a seeded sample of it), where ``c_j`` is how
well ``j`` is already covered by compounds measured or in flight. ``f`` is monotone
submodular, so the greedy, which adds the candidate with the largest gain
``f(S ∪ {i}) - f(S)`` at each step, is within ``1 - 1/e`` of the best subset (Nemhauser,
Wolsey & Fisher 1978). Gains only shrink as ``S`` grows, so the lazy greedy (Minoux 1978)
re-scores only the head of a priority queue and returns exactly the greedy's picks.

Conditions that share a fingerprint (one compound at several doses) have equal gains;
``priority`` (``log10 dose``) breaks the tie, so a compound is first looked at at its
highest dose. Cost: one ``C x M`` similarity matrix, ``C`` candidates and ``M``
references, both at most ``max_pool`` (a seeded sample of the eligible library when it is
larger).
"""

from __future__ import annotations

import heapq

import numpy as np

from acquisition.diversity import check_fingerprints, check_priority, tanimoto_matrix, tanimoto_to_set
from acquisition.greedy import as_bool_mask, as_index_array, check_q

__all__ = ["DEFAULT_MAX_POOL", "coverage_select"]

DEFAULT_MAX_POOL = 4096  # a 4096 x 4096 float32 similarity matrix: 64 MiB


def coverage_select(
    fps_packed: np.ndarray,
    q: int,
    seed: int,
    exclude: np.ndarray | None = None,
    priority: np.ndarray | None = None,
    covered: np.ndarray | None = None,
    max_pool: int = DEFAULT_MAX_POOL,
) -> np.ndarray:
    """Greedy facility-location subset of ``q`` candidates.

    Args:
        fps_packed: ``uint8 N x B`` packed fingerprints.
        q: number of picks.
        seed: seeds the pool sample (libraries larger than ``max_pool``).
        exclude: ``N`` boolean mask of candidates never to pick.
        priority: ``N`` finite tie-breakers between equal gains, highest first
            (``log10 dose`` for (compound, dose) conditions).
        covered: indices already measured or in flight; the library near them counts as
            covered, so picks go to the regions they leave open.
        max_pool: most candidates and references; above it both are one seeded sample of
            the eligible candidates.

    Returns:
        ``int64 (min(q, n_eligible),)`` indices in pick order (ties -> highest
        ``priority``, then lowest index).
    """
    fps = check_fingerprints(fps_packed)
    n = len(fps)
    q = check_q(q)
    if max_pool < 1:
        raise ValueError(f"max_pool must be >= 1, got {max_pool}")
    eligible = ~as_bool_mask(exclude, n, "exclude")
    covered = as_index_array(covered, n, "covered")
    priority = check_priority(priority, n)
    if priority is None:
        priority = np.zeros(n)
    candidates = np.flatnonzero(eligible)
    if len(candidates) > max_pool:
        candidates = np.sort(np.random.default_rng(seed).choice(candidates, size=max_pool, replace=False))
        references = candidates
    else:
        references = np.arange(n) if n <= max_pool else candidates
    n_pick = min(q, len(candidates))
    if n_pick == 0:
        return np.zeros(0, dtype=np.int64)

    similarity = tanimoto_matrix(fps[candidates], fps[references])  # C x M
    cover = tanimoto_to_set(fps[references], fps[covered]) if len(covered) else np.zeros(len(references),
                                                                                           np.float32)
    gains = np.maximum(similarity - cover[None, :], 0.0).sum(axis=1, dtype=np.float64)  # C
    # heap of (-gain upper bound, -priority, position): pops the greedy's argmax with its ties
    heap = [(-g, -priority[c], k) for k, (g, c) in enumerate(zip(gains, candidates))]
    heapq.heapify(heap)
    picks: list[int] = []
    while len(picks) < n_pick:
        _, neg_priority, k = heapq.heappop(heap)
        gain = float(np.maximum(similarity[k] - cover, 0.0).sum(dtype=np.float64))
        entry = (-gain, neg_priority, k)
        if heap and entry > heap[0]:  # a stale bound: another candidate may gain more now
            heapq.heappush(heap, entry)
            continue
        picks.append(int(candidates[k]))
        np.maximum(cover, similarity[k], out=cover)
    return np.asarray(picks, dtype=np.int64)
