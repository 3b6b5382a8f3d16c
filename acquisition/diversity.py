"""Structural diversity for batch selection: Tanimoto, MaxMin, penalised greedy.

Why: with ``K`` ensemble members the joint MC acquisition value
``a(S) = mean_k max_{i in S} u_ki`` saturates once every member's best candidate is in
the batch (after about ``K`` picks); afterwards all candidates tie and the exact
sequential greedy (``acquisition.greedy``) degenerates to lowest-index picks.  This
module builds large batches that stay good and structurally diverse:

``penalized_greedy_select`` — at each pick the score of candidate ``i`` is::

    score_i = gain_i * max(0, 1 - lambda * s_i)

with ``s_i = max_{j in S ∪ pending} Tanimoto(i, j)`` and ``lambda = diversity_penalty`` in
``[0, 1]`` (``lambda = 1``: an exact structural duplicate scores 0; ``lambda = 0``: no
penalty).  The gain has two phases:

1. joint phase — ``gain_i = a(S ∪ {i}) - a(S) >= 0``, the marginal joint MC
   acquisition gain of ``acquisition.greedy`` (running per-member max started at the
   members' minimum utility over eligible candidates, raised by pending points, so
   gains are finite and the first pick is the acquisition's argmax).  With
   ``lambda = 0`` these picks are exactly ``greedy_select``'s (= BoTorch's).
2. single-point phase — once no eligible candidate has a positive joint gain
   (saturation, after about ``K`` picks), ``gain_i = alpha_i - min_eligible alpha``
   with ``alpha_i = mean_k u_ki`` the BoTorch ``q = 1`` acquisition value.  Joint gains
   would be zero for everything here, so the penalty could not trade quality against
   structure; the single-point value can (a penalised top-k, "local penalisation").
   For ``qEI`` ``alpha_i`` is BoTorch's smoothed single-point improvement
   ``exp(qLogEI({i})) = mean_k fatplus(y_ki - best_f; tau_relu = 1e-6)``: equal to EI up to
   ``tau_relu`` where EI is positive, and still ordering (by how far below ``best_f`` the
   members put them) the candidates whose EI is 0 under every member, which plain EI
   would leave tied at 0 (then the penalty could not act, and the batch would be filled in
   library order).

A joint gain within rounding of 0 (``JOINT_GAIN_ULPS`` units in the last place of the
utilities' largest magnitude, in their dtype) counts as 0: ties in exact arithmetic that differ
in the last bit end the joint phase instead of deciding picks by rounding noise.

Phenotype penalty (optional): with predicted profiles ``p_i`` (``N x F``, member mean, in
control-normalised units) the score is further multiplied by ``max(0, 1 - mu * c_i)``, with
``c_i = max(0, max_{j in S ∪ pending} cos(p_i, p_j))`` and ``mu = phenotype_penalty`` in
``[0, 1]``: once a batch holds candidates predicted to shift cells one way, candidates
predicted to shift them the same way yield to those predicted to do something else, so a
batch spreads over predicted phenotypes as well as over chemotypes.

``thompson``: ``gain_i`` = pick ``t``'s member value minus its eligible minimum.
The penalty factors are at most 1, so at each pick only the top candidates by gain need
similarities: scoring stops once the best score reaches the largest gain not
yet scored (lazy evaluation, exact for the stated score).

``maxmin_select`` — cold start without a model: seeded random first pick, then
repeatedly the candidate farthest (max of min Tanimoto distance) from the picks.

Per-scaffold cap: with ``scaffold_ids`` (ints, e.g. Murcko scaffold codes computed by
the caller) no scaffold gets more than ``max_per_scaffold`` picks; pending compounds
count towards the cap.

Tanimoto on packed fingerprints (``uint8 N x 256``, ``np.packbits`` order): popcount
of ``a & b`` via ``np.bitwise_count`` on a ``uint64`` view when available, else a
256-entry lookup table; ``|a | b| = |a| + |b| - |a & b|``.  Two empty fingerprints have
similarity 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from botorch.utils.safe_math import log_fatplus, logmeanexp
from torch import Tensor

from acquisition.greedy import (MAX_TYPE_ACQUISITIONS, as_bool_mask, as_index_array, member_utilities,
                                thompson_members)

__all__ = [
    "PenalizedSelection",
    "ScaffoldCaps",
    "check_priority",
    "maxmin_select",
    "penalized_greedy_select",
    "popcount_rows",
    "tanimoto_matrix",
    "tanimoto_to_set",
]

logger = logging.getLogger(__name__)

_POPCOUNT_TABLE = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)
_CHUNK_BYTES = 1 << 25  # temporary memory per chunk (32 MiB)


def check_fingerprints(fingerprints: np.ndarray, n: int | None = None) -> np.ndarray:
    """Validate packed fingerprints: ``uint8 N x B`` (B = 256 for 2048 bits)."""
    fingerprints = np.asarray(fingerprints)
    if fingerprints.ndim != 2 or fingerprints.dtype != np.uint8:
        raise ValueError(
            f"fingerprints must be packed uint8 N x B (np.packbits), got {fingerprints.dtype} "
            f"{fingerprints.shape}"
        )
    if n is not None and fingerprints.shape[0] != n:
        raise ValueError(f"fingerprints have {fingerprints.shape[0]} rows, expected {n}")
    return np.ascontiguousarray(fingerprints)


def _popcount_bytes(packed: np.ndarray, use_table: bool = False) -> np.ndarray:
    if not use_table and hasattr(np, "bitwise_count") and packed.shape[-1] % 8 == 0:
        words = np.ascontiguousarray(packed).view(np.uint64)
        return np.bitwise_count(words).sum(axis=-1, dtype=np.int32)
    return _POPCOUNT_TABLE[packed].sum(axis=-1, dtype=np.int32)


def popcount_rows(packed: np.ndarray, *, use_table: bool = False) -> np.ndarray:
    """Number of set bits per row of a packed ``uint8 N x B`` array -> ``int32 N``."""
    packed = np.asarray(packed, dtype=np.uint8)
    rows = max(1, _CHUNK_BYTES // max(1, packed.shape[-1] * 8))
    return np.concatenate(
        [_popcount_bytes(packed[s:s + rows], use_table) for s in range(0, len(packed), rows)]
    ) if len(packed) else np.zeros(0, dtype=np.int32)


def _similarity(inter: np.ndarray, count_a: np.ndarray, count_b: np.ndarray) -> np.ndarray:
    union = count_a + count_b - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)


def tanimoto_matrix(a_packed: np.ndarray, b_packed: np.ndarray, *, use_table: bool = False) -> np.ndarray:
    """Tanimoto similarity of packed fingerprints: ``Na x B``, ``Nb x B`` -> ``float32 Na x Nb``."""
    a = check_fingerprints(a_packed)
    b = check_fingerprints(b_packed)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fingerprint widths differ: {a.shape[1]} vs {b.shape[1]} bytes")
    count_a, count_b = popcount_rows(a, use_table=use_table), popcount_rows(b, use_table=use_table)
    out = np.empty((len(a), len(b)), dtype=np.float32)
    rows = max(1, _CHUNK_BYTES // max(1, len(b) * a.shape[1] * 8))
    for s in range(0, len(a), rows):
        inter = _popcount_bytes(a[s:s + rows, None, :] & b[None, :, :], use_table)
        out[s:s + rows] = _similarity(inter, count_a[s:s + rows, None], count_b[None, :])
    return out


def tanimoto_to_set(
    fingerprints: np.ndarray,
    set_fingerprints: np.ndarray,
    *,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Max Tanimoto similarity of each fingerprint to a set: ``N x B``, ``S x B`` -> ``float32 N``.

    Zero for an empty set.  ``counts`` (popcounts of ``fingerprints``) may be passed to
    save recomputing them.
    """
    fingerprints = check_fingerprints(fingerprints)
    set_fingerprints = check_fingerprints(set_fingerprints)
    if len(set_fingerprints) == 0 or len(fingerprints) == 0:
        return np.zeros(len(fingerprints), dtype=np.float32)
    if counts is None:
        counts = popcount_rows(fingerprints)
    set_counts = popcount_rows(set_fingerprints)
    out = np.empty(len(fingerprints), dtype=np.float32)
    width = fingerprints.shape[1]
    rows = max(1, _CHUNK_BYTES // max(1, len(set_fingerprints) * width * 8))
    for s in range(0, len(fingerprints), rows):
        inter = _popcount_bytes(fingerprints[s:s + rows, None, :] & set_fingerprints[None], False)
        out[s:s + rows] = _similarity(inter, counts[s:s + rows, None], set_counts[None]).max(axis=1)
    return out


def check_priority(priority: np.ndarray | None, n: int) -> np.ndarray | None:
    """Tie-breakers between equal scores: ``N`` finite floats (None stays None)."""
    if priority is None:
        return None
    priority = np.asarray(priority, dtype=np.float64)
    if priority.shape != (n,) or not np.isfinite(priority).all():
        raise ValueError(f"priority must be {n} finite numbers, got shape {priority.shape}")
    return priority


def _eligible_numpy(n: int, exclude: np.ndarray | None) -> np.ndarray:
    return ~as_bool_mask(exclude, n, "exclude")


def maxmin_select(
    fps_packed: np.ndarray,
    q: int,
    seed: int,
    exclude: np.ndarray | None = None,
    priority: np.ndarray | None = None,
    anchors: np.ndarray | None = None,
) -> np.ndarray:
    """MaxMin diverse subset (cold start, or exploration around a batch), O(q N).

    Args:
        fps_packed: ``uint8 N x B`` packed fingerprints.
        q: number of picks.
        seed: seeds the first pick (uniform among eligible).
        exclude: ``N`` boolean mask of candidates never to pick.
        priority: ``N`` floats breaking ties between equally distant candidates, highest
            first (e.g. ``log10 dose``: of a compound offered at several doses, whose
            fingerprints are identical, MaxMin then takes the highest dose). The random
            first pick is likewise moved to the highest-priority candidate with the same
            fingerprint.
        anchors: indices already chosen (earlier picks of the batch, compounds in flight):
            distances start from them, so the first pick is the eligible candidate farthest
            from them (no random first pick) and no pick sits next to one.

    Returns:
        ``int64 (min(q, n_eligible),)`` indices in pick order; pick ``t > 0`` maximises
        the minimum Tanimoto distance to picks ``0..t-1`` (ties -> highest priority,
        then lowest index).
    """
    fps = check_fingerprints(fps_packed)
    n = len(fps)
    eligible = _eligible_numpy(n, exclude)
    priority = check_priority(priority, n)
    n_pick = min(int(q), int(eligible.sum()))
    if n_pick == 0:
        return np.zeros(0, dtype=np.int64)
    counts = popcount_rows(fps)
    min_distance = np.full(n, np.inf, dtype=np.float32)
    anchors = np.zeros(0, dtype=np.int64) if anchors is None else np.unique(np.asarray(anchors, dtype=np.int64))
    for start in range(0, len(anchors), 4096):
        block = fps[anchors[start:start + 4096]]
        distance = 1.0 - tanimoto_to_set(fps, block, counts=counts)
        np.minimum(min_distance, distance, out=min_distance)
    if len(anchors):
        first = _best_of(np.where(eligible, min_distance, -np.inf), priority)
    else:
        first = int(np.random.default_rng(seed).choice(np.flatnonzero(eligible)))
    if priority is not None and not len(anchors):
        same = eligible & (1.0 - tanimoto_to_set(fps, fps[first:first + 1], counts=counts) <= 0.0)
        same[first] = True  # an empty fingerprint has Tanimoto 0 even to itself: never an empty choice
        first = _best_of(np.where(same, 0.0, -np.inf), priority)
    picks = [first]
    for _ in range(n_pick - 1):
        last = picks[-1]
        eligible[last] = False
        distance = 1.0 - tanimoto_to_set(fps, fps[last:last + 1], counts=counts)
        np.minimum(min_distance, distance, out=min_distance)
        picks.append(_best_of(np.where(eligible, min_distance, -np.inf), priority))
    return np.asarray(picks, dtype=np.int64)


def _best_of(score: np.ndarray, priority: np.ndarray | None) -> int:
    """Index of the largest ``score``; ties -> largest ``priority``, then lowest index."""
    if priority is None:
        return int(np.argmax(score))
    tied = np.flatnonzero(score == score.max())
    return int(tied[np.argmax(priority[tied])])


@dataclass
class PenalizedSelection:
    """Result of ``penalized_greedy_select``."""

    indices: np.ndarray  # int64 (q',)
    scores: np.ndarray  # float64 (q',) penalised gain at pick time
    gains: np.ndarray  # float64 (q',) unpenalised marginal gain at pick time
    max_similarity: np.ndarray  # float32 (q',) max Tanimoto to earlier picks + pending
    n_joint: int = 0  # picks made in the joint phase (before saturation)
    stopped_early: bool = False
    info: dict[str, Any] = field(default_factory=dict)


JOINT_GAIN_ULPS = 8  # joint gains below this many ulps of max |u| (in u's dtype) are rounding, not gain


def _single_point_values(values: Tensor, utilities: Tensor, acqf: str, params: Mapping[str, Any]) -> Tensor:
    """``alpha_i``, ``N``: the single-point acquisition value after saturation (module doc): the
    member mean of the utilities, for ``qEI`` of the smoothed improvement (``tau_relu = 1e-6``,
    BoTorch's ``qLogEI`` default), so that candidates with no improvement under any member are
    still ordered."""
    if acqf != "qEI":
        return utilities.mean(dim=0)
    best_f = torch.as_tensor(params["best_f"]).to(values).double()
    log_improvement = log_fatplus(values.double() - best_f.unsqueeze(-1), tau=float(params.get("tau_relu", 1e-6)))
    return logmeanexp(log_improvement, dim=0).exp()  # float64: far below best_f it is ~1e-20


class _Scorer:
    """Candidate gains for the penalised greedy: joint phase, then single-point phase.

    Joint phase: ``gain_i = a(S ∪ {i}) - a(S)`` over an *active set* — a candidate whose
    gain is 0 (``u_ki <= r_k`` for all members) stays 0 because ``r_k`` only grows, so it
    is dropped and later steps touch only candidates that can still raise some member's
    max.  Single-point phase (after saturation): ``alpha_i - alpha_floor`` with
    ``alpha_i = mean_k u_ki``, walked in a precomputed descending order.  ``thompson``:
    member ``m_t``'s value minus its eligible minimum.

    ``top(size, eligible)`` returns up to ``size`` eligible candidates with the largest
    gains (descending) and whether no other candidate has a positive gain left.
    """

    def __init__(self, values: Tensor, acqf: str, params: Mapping[str, Any],
                 pending: np.ndarray, seed: int, q: int, eligible: Tensor) -> None:
        self.acqf = acqf
        self.step = 0
        self.saturated = False
        if acqf == "thompson":
            self.values = values
            self.members = thompson_members(max(q, 1), values.shape[0], seed)
            return
        self.utilities = member_utilities(values, acqf, params)  # K x N
        floor = self.utilities.masked_fill(~eligible, math.inf).amin(dim=1)  # K
        if len(pending):
            floor = torch.maximum(floor, self.utilities[:, torch.as_tensor(pending)].amax(dim=1))
        self.running = floor  # r_k
        self.active = eligible.nonzero().squeeze(-1)
        self.tolerance = (JOINT_GAIN_ULPS * torch.finfo(self.utilities.dtype).eps * float(self.utilities.abs().max())
                          if self.utilities.numel() else 0.0)
        self.single = _single_point_values(values, self.utilities, acqf, params)  # alpha_i, N
        self.single_floor = float(self.single[eligible].min()) if bool(eligible.any()) else 0.0
        self.order: np.ndarray | None = None
        self.cursor = 0

    def top(self, size: int, eligible: Tensor) -> tuple[np.ndarray, np.ndarray, float]:
        """``(indices, gains, bound)``: top candidates and an upper bound on the rest's gains."""
        if self.acqf == "thompson":
            candidates = eligible.nonzero().squeeze(-1)
            member_values = self.values[self.members[self.step % len(self.members)], candidates]
            return self._topk(candidates, member_values - member_values.min(), size)
        if not self.saturated:
            candidates = self.active[eligible[self.active]]
            gains = (self.utilities[:, candidates] - self.running.unsqueeze(-1)).clamp_min(0).mean(dim=0)
            gains = torch.where(gains > self.tolerance, gains, torch.zeros_like(gains))
            self.active = candidates[gains > 0]
            if len(self.active):
                return self._topk(candidates, gains, size)
            self.saturated = True
            logger.debug("joint acquisition saturated after %d picks", self.step)
            self.order = torch.argsort(self.single, descending=True, stable=True).cpu().numpy()
        return self._walk(size, eligible.cpu().numpy())

    @staticmethod
    def _topk(candidates: Tensor, gains: Tensor, size: int) -> tuple[np.ndarray, np.ndarray, float]:
        size = min(size, len(candidates))
        top_gains, top_pos = torch.topk(gains, size)  # descending
        top_gains = top_gains.double().cpu().numpy()
        bound = float(top_gains[-1]) if size < len(candidates) else -math.inf
        return candidates[top_pos].cpu().numpy(), top_gains, bound

    def _walk(self, size: int, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        while self.cursor < len(self.order) and not eligible[self.order[self.cursor]]:
            self.cursor += 1
        picked, n_picked, position = [], 0, self.cursor
        block = max(2 * size, 256)
        while position < len(self.order) and n_picked < size:
            chunk = self.order[position:position + block]
            chunk = chunk[eligible[chunk]][:size - n_picked]
            picked.append(chunk)
            n_picked += len(chunk)
            position += block
        indices = np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, np.int64)
        picked = indices
        gains = self.single[torch.as_tensor(indices)].double().cpu().numpy() - self.single_floor
        exhausted = len(picked) < size  # walked to the end of the order
        bound = -math.inf if exhausted else float(gains[-1])
        return indices, gains, bound

    def add(self, index: int) -> None:
        self.step += 1
        if self.acqf != "thompson" and not self.saturated:
            self.running = torch.maximum(self.running, self.utilities[:, index])


def penalized_greedy_select(
    values: Tensor,
    fingerprints: np.ndarray,
    q: int,
    acqf: str = "qUCB",
    params: Mapping[str, Any] | None = None,
    *,
    diversity_penalty: float = 0.5,
    eligible: np.ndarray | None = None,
    pending: np.ndarray | None = None,
    selected: Sequence[int] = (),
    scaffold_ids: np.ndarray | None = None,
    max_per_scaffold: int | None = None,
    seed: int = 0,
    shortlist: int = 64,
    profiles: np.ndarray | None = None,
    phenotype_penalty: float = 0.0,
) -> PenalizedSelection:
    """Greedy batch maximising ``gain * (1 - lambda * max Tanimoto to picks)``.

    Args:
        values: ``K x N`` per-member objective values.
        fingerprints: ``uint8 N x B`` packed fingerprints.
        q: picks to add.
        acqf: ``qUCB``, ``qEI``, ``mean``, ``qPosteriorStandardDeviation`` or ``thompson``.
        params: acquisition parameters (``beta``, ``best_f``).
        diversity_penalty: ``lambda`` in ``[0, 1]``.
        eligible: ``N`` boolean mask of pickable candidates (default all).
        pending: indices in flight: condition the gains, count in penalty and caps.
        selected: indices already chosen for this batch (earlier phase): count in the
            penalty and scaffold caps, never picked again, do not enter the gains.
        scaffold_ids: ``N`` integer scaffold ids (with ``max_per_scaffold``).
        max_per_scaffold: cap on picks (+ pending + selected) per scaffold.
        seed: member order for ``thompson``.
        shortlist: initial number of top-gain candidates scored per pick.
        profiles: ``N x F`` predicted profiles (member mean), for ``phenotype_penalty``.
        phenotype_penalty: ``mu`` in ``[0, 1]``; needs ``profiles`` when > 0.

    Returns:
        ``PenalizedSelection`` (indices in pick order, scores, gains, similarities,
        ``info['n_joint']`` = picks made before the joint acquisition saturated).
    """
    if acqf not in MAX_TYPE_ACQUISITIONS + ("thompson",):
        raise ValueError(f"penalized greedy supports {MAX_TYPE_ACQUISITIONS + ('thompson',)}, got {acqf!r}")
    if not 0.0 <= diversity_penalty <= 1.0:
        raise ValueError(f"diversity_penalty must be in [0, 1], got {diversity_penalty}")
    if not 0.0 <= phenotype_penalty <= 1.0:
        raise ValueError(f"phenotype_penalty must be in [0, 1], got {phenotype_penalty}")
    n = values.shape[1]
    fps = check_fingerprints(fingerprints, n)
    if phenotype_penalty > 0 and profiles is None:
        raise ValueError("phenotype_penalty > 0 needs predicted profiles (N x F)")
    if profiles is not None and len(profiles) != n:
        raise ValueError(f"profiles have {len(profiles)} rows, expected {n}")
    pending = as_index_array(pending, n, "pending")
    selected = as_index_array(np.asarray(list(selected), dtype=np.int64), n, "selected").tolist()
    eligible_np = np.ones(n, dtype=bool) if eligible is None else np.array(eligible, dtype=bool)
    eligible_np[pending] = False
    eligible_np[selected] = False
    caps = ScaffoldCaps(scaffold_ids, max_per_scaffold, n, np.concatenate([pending, selected]).astype(np.int64))
    eligible_np &= caps.open_mask()
    eligible_t = torch.as_tensor(eligible_np, device=values.device)
    n_left = int(eligible_np.sum())
    scorer = _Scorer(values, acqf, params or {}, pending, seed, q, eligible_t)
    anchors = [*pending.tolist(), *selected]  # penalty reference set
    penalties = [(_SimilarityCache(fps, anchors), diversity_penalty)]
    if phenotype_penalty > 0:
        penalties.append((_CosineCache(profiles, anchors), phenotype_penalty))
    picks, scores, gains_out, sims_out = [], [], [], []
    n_joint = 0
    while len(picks) < q and n_left > 0:
        best, score, gain, sim = _best_penalized(scorer, eligible_t, penalties, shortlist)
        n_joint += int(acqf != "thompson" and not scorer.saturated)
        picks.append(best)
        scores.append(score)
        gains_out.append(gain)
        sims_out.append(sim)
        for cache, _ in penalties:
            cache.add_anchor(best)
        scorer.add(best)
        eligible_t[best] = False
        n_left -= 1
        closed = caps.add(best)
        if closed is not None:
            eligible_t &= torch.as_tensor(closed, device=values.device)
            n_left = int(eligible_t.sum())
    return PenalizedSelection(
        indices=np.asarray(picks, dtype=np.int64),
        scores=np.asarray(scores, dtype=np.float64),
        gains=np.asarray(gains_out, dtype=np.float64),
        max_similarity=np.asarray(sims_out, dtype=np.float32),
        n_joint=n_joint,
        stopped_early=len(picks) < q,
    )


class _AnchorCache:
    """Max similarity of candidates to a growing anchor list, updated incrementally.

    ``max_sim[i]`` covers ``anchors[:n_seen[i]]``; a candidate is only compared with
    anchors added since it was last scored, so each (candidate, anchor) pair costs once.
    Subclasses define ``_to_set(group, anchor_idx)``: max similarity of each of ``group``
    to the anchors ``anchor_idx``.
    """

    def __init__(self, n: int, anchors: list[int]) -> None:
        self.anchors = list(anchors)
        self.max_sim = np.zeros(n, dtype=np.float32)
        self.n_seen = np.zeros(n, dtype=np.int64)

    def add_anchor(self, index: int) -> None:
        self.anchors.append(index)

    def similarity(self, indices: np.ndarray) -> np.ndarray:
        """``float32 len(indices)``: max similarity of each candidate to all anchors."""
        n_anchors = len(self.anchors)
        stale = indices[self.n_seen[indices] < n_anchors]
        for start in np.unique(self.n_seen[stale]):
            group = stale[self.n_seen[stale] == start]
            sims = self._to_set(group, np.asarray(self.anchors[start:], dtype=np.int64))
            self.max_sim[group] = np.maximum(self.max_sim[group], sims)
            self.n_seen[group] = n_anchors
        return self.max_sim[indices]

    def _to_set(self, group: np.ndarray, anchor_idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _SimilarityCache(_AnchorCache):
    """Max Tanimoto of fingerprints to the anchors."""

    def __init__(self, fps: np.ndarray, anchors: list[int]) -> None:
        super().__init__(len(fps), anchors)
        self.fps = fps
        self.counts = popcount_rows(fps)

    def _to_set(self, group: np.ndarray, anchor_idx: np.ndarray) -> np.ndarray:
        return tanimoto_to_set(self.fps[group], self.fps[anchor_idx], counts=self.counts[group])


class _CosineCache(_AnchorCache):
    """Max cosine similarity (clipped at 0) of predicted profiles to the anchors'."""

    def __init__(self, profiles: np.ndarray, anchors: list[int]) -> None:
        profiles = np.asarray(profiles, dtype=np.float32)
        if profiles.ndim != 2 or not np.isfinite(profiles).all():
            raise ValueError(f"profiles must be a finite N x F array, got shape {profiles.shape}")
        super().__init__(len(profiles), anchors)
        self.unit = profiles / np.maximum(np.linalg.norm(profiles, axis=1, keepdims=True), 1e-12)

    def _to_set(self, group: np.ndarray, anchor_idx: np.ndarray) -> np.ndarray:
        return np.clip((self.unit[group] @ self.unit[anchor_idx].T).max(axis=1), 0.0, 1.0)


def _best_penalized(scorer: _Scorer, eligible: Tensor, penalties: list[tuple[_AnchorCache, float]],
                    shortlist: int) -> tuple[int, float, float, float]:
    """Lazy evaluation: score top-gain candidates until no unscored one can win.

    Unscored candidates have gain <= the smallest scored gain (``bound``) and penalty
    factors <= 1, so once the best score exceeds ``bound`` the winner is final (at equality an
    unscored candidate could tie it with a lower index, so the shortlist grows). Returns the
    winner, its score, gain and max Tanimoto to the anchors (``penalties[0]``'s cache, reported
    whether or not its penalty is on).
    """
    size = shortlist
    while True:
        top_idx, top_gains, bound = scorer.top(size, eligible)
        factor = np.ones(len(top_idx))
        for cache, penalty in penalties:
            if penalty > 0:
                factor = factor * np.clip(1.0 - penalty * cache.similarity(top_idx), 0.0, None)
        scores = top_gains * factor
        best_score = scores.max()
        winner = int(np.min(top_idx[scores == best_score]))  # ties -> lowest index
        pos = int(np.flatnonzero(top_idx == winner)[0])
        if best_score > bound or bound == -math.inf:
            tanimoto = float(penalties[0][0].similarity(np.array([winner]))[0])
            return winner, float(best_score), float(top_gains[pos]), tanimoto
        size *= 4


class ScaffoldCaps:
    """Counts picks per scaffold id and closes scaffolds that reach the cap.

    ``scaffold_ids``: ``N`` integer ids; ``cap``: most picks per id; ``counted``: indices already
    counted (pending compounds, earlier picks). Inactive (every mask open) when either is None."""

    def __init__(self, scaffold_ids: np.ndarray | None, cap: int | None, n: int,
                 counted: np.ndarray) -> None:
        self.active = scaffold_ids is not None and cap is not None
        if not self.active:
            return
        self.ids = np.asarray(scaffold_ids)
        if self.ids.shape != (n,) or not np.issubdtype(self.ids.dtype, np.integer):
            raise ValueError(f"scaffold_ids must be an integer array of shape ({n},), "
                             f"got {self.ids.dtype} {self.ids.shape}")
        if int(cap) < 1:
            raise ValueError(f"max_per_scaffold must be >= 1, got {cap}")
        self.cap = int(cap)
        self.counts: dict[int, int] = {}
        for index in counted:
            key = int(self.ids[index])
            self.counts[key] = self.counts.get(key, 0) + 1

    def open_mask(self) -> np.ndarray:
        if not self.active:
            return np.ones(1, dtype=bool)
        full = [key for key, count in self.counts.items() if count >= self.cap]
        return ~np.isin(self.ids, np.asarray(full, dtype=self.ids.dtype))

    def add(self, index: int) -> np.ndarray | None:
        """Count a pick; returns the still-open mask when its scaffold just closed."""
        if not self.active:
            return None
        key = int(self.ids[index])
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] == self.cap:
            return self.ids != key
        return None
