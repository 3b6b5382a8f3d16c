"""Incremental sequential greedy over cached member objective values, O(q N K).

``botorch.optim.optimize_acqf_discrete(acqf, q, choices, unique=True)`` builds a batch by
sequential conditioning: at step ``t`` it evaluates the joint acquisition value of
``S_t ∪ {i}`` (``S_t`` = pending points + picks so far) for every remaining choice ``i``
and takes the first argmax.  Re-evaluating the full joint value costs ``O(|S| K)`` per
candidate.  For the MC acquisition functions of ``acquisition.registry`` over a
``CachedEnsembleModel`` with ``MemberSampler`` the joint value decomposes per member:

* ``qUCB``, ``qEI``, ``mean`` (qSimpleRegret), ``qPosteriorStandardDeviation``::

      a(S) = mean_k max_{i in S} u_ki
      u_ki = mu_i + sqrt(beta pi / 2) |y_ki - mu_i|     (qUCB, mu_i = mean_k y_ki)
           = max(y_ki - best_f, 0)                      (qEI)
           = y_ki                                       (mean)
           = sqrt(pi / 2) |y_ki - mu_i|                 (qPosteriorStandardDeviation)

  so keeping a running per-member max ``r_k`` the values of all ``N`` candidates are
  ``mean_k max(r_k, u_ki)`` — one vectorised ``K x N`` op per pick.  The per-element
  arithmetic repeats BoTorch's and the member mean is reduced in BoTorch's block layout,
  so values and picks are *identical* (ties -> first of the remaining choices, as
  ``torch.argmax`` in BoTorch).  One caveat, after saturation only (see below): for
  ``qUCB`` / ``qPosteriorStandardDeviation`` BoTorch computes the per-point member mean
  ``mu_i`` inside its ``K x b x (1 + p)`` evaluation tensor, where torch's vectorised
  reduction rounds the last few entries of a block differently (last bit).  Candidates
  that tie exactly in exact arithmetic can then differ by one ulp in BoTorch, which
  picks e.g. the last candidate of the block, where we pick the lowest index.  Picks
  are identical while the joint value still grows; values always agree to ~1e-15.
  ``qEI`` and ``mean`` do not use ``mu`` and agree bitwise throughout.

* ``qLogEI``: ``a(S) = logmeanexp_k fatmax_{i in S}(l_ki; tau_max)`` with
  ``l = log_fatplus(y - best_f; tau_relu)``.  The fat-tailed smooth max is
  ``M + tau log sum_j pareto((M - l_j) / tau)`` with ``M`` the set max; we keep ``M_k``
  and the sum ``P_k`` per member and recompute the sum explicitly only for candidates
  that would become the new member max.  Summation order differs from BoTorch's, so
  values agree to ~1e-12 relative, not bitwise; picks agree unless two candidates tie
  to that precision (tests check picks and values with tolerance).

* ``thompson``: pick ``t`` follows member ``m_t`` (members in a seeded random order,
  a fresh permutation every ``K`` picks) and takes its argmax among remaining
  candidates — exactly ``optimize_acqf_discrete(EnsembleThompsonSampling(member=m_t),
  q=1, choices=remaining)`` per pick.

Pending points (plates in flight) are handled as BoTorch's ``X_pending``: they enter the
running max from the start and are never picked.

Note: with ``K`` members ``max_{i in S} u_ki`` saturates after about ``K`` well-chosen
picks; afterwards every candidate has the same joint value and both BoTorch and this
function fall back to lowest-index picks.  ``acquisition.diversity`` /
``acquisition.select`` handle that regime.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from botorch.utils.safe_math import log_fatplus, logmeanexp
from torch import Tensor

__all__ = [
    "GREEDY_ACQUISITIONS",
    "MAX_TYPE_ACQUISITIONS",
    "as_bool_mask",
    "as_index_array",
    "as_member_values",
    "eligible_mask",
    "greedy_select",
    "member_utilities",
    "thompson_members",
]

logger = logging.getLogger(__name__)

MAX_TYPE_ACQUISITIONS = ("qUCB", "qEI", "mean", "qPosteriorStandardDeviation")
GREEDY_ACQUISITIONS = MAX_TYPE_ACQUISITIONS + ("qLogEI", "thompson")


def as_member_values(values: Tensor | np.ndarray) -> Tensor:
    """Validate per-member objective values, ``K x N`` floating point, finite."""
    values = torch.as_tensor(values)
    if values.ndim != 2:
        raise ValueError(f"values must be K x N (members x candidates), got shape {tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if values.shape[0] < 1 or values.shape[1] < 1:
        raise ValueError(f"values must be non-empty, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("values contain NaN or inf")
    return values


def as_index_array(indices: Sequence[int] | np.ndarray | Tensor | None, n: int, name: str) -> np.ndarray:
    """Validated sorted unique ``int64`` indices into ``n`` candidates (None or empty: none)."""
    if indices is None:
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-d integer index array, got {array.dtype} {array.shape}")
    if array.min() < 0 or array.max() >= n:
        raise ValueError(f"{name} indices must be in [0, {n}), got min {array.min()} max {array.max()}")
    return np.unique(array.astype(np.int64))


def check_q(q: int) -> int:
    """A batch size: a positive integer (not a bool)."""
    if isinstance(q, bool) or int(q) != q or q <= 0:
        raise ValueError(f"q must be a positive integer, got {q!r}")
    return int(q)


def as_bool_mask(mask: np.ndarray | Tensor | None, n: int, name: str) -> np.ndarray:
    """Validated boolean mask of shape ``(n,)`` (None: all False)."""
    if mask is None:
        return np.zeros(n, dtype=bool)
    mask = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask)
    if mask.shape != (n,) or mask.dtype != bool:
        raise ValueError(f"{name} must be a boolean mask of shape ({n},), got {mask.dtype} {mask.shape}")
    return mask


def eligible_mask(n: int, exclude: np.ndarray | Tensor | None, pending: np.ndarray,
                  device: torch.device | None = None) -> Tensor:
    """Boolean ``N`` mask: not excluded (measured) and not pending."""
    eligible = torch.ones(n, dtype=torch.bool, device=device)
    if exclude is not None:
        exclude = torch.as_tensor(np.asarray(exclude.cpu() if isinstance(exclude, Tensor) else exclude))
        if exclude.shape != (n,) or exclude.dtype != torch.bool:
            raise ValueError(f"exclude must be a boolean mask of shape ({n},), got "
                             f"{exclude.dtype} {tuple(exclude.shape)}")
        eligible &= ~exclude.to(device)
    if len(pending):
        eligible[torch.as_tensor(pending, device=device)] = False
    return eligible


def member_utilities(values: Tensor, acqf: str, params: Mapping[str, Any]) -> Tensor:
    """Per-member MC utility ``u: K x N`` of a max-type acquisition (see module doc).

    Arithmetic mirrors BoTorch's ``_sample_forward`` so values are bitwise identical.
    """
    if acqf == "qUCB":
        beta_prime = math.sqrt(float(params["beta"]) * math.pi / 2)
        mean = values.mean(dim=0)
        return mean + beta_prime * (values - mean).abs()
    if acqf == "qEI":
        best_f = torch.as_tensor(params["best_f"])
        return (values - best_f.unsqueeze(-1).to(values)).clamp_min(0)
    if acqf == "mean":
        return values
    if acqf == "qPosteriorStandardDeviation":
        mean = values.mean(dim=0)
        return (values - mean).abs() * math.sqrt(math.pi / 2)
    raise ValueError(f"{acqf!r} is not a max-type acquisition; valid: {MAX_TYPE_ACQUISITIONS}")


def thompson_members(q: int, n_members: int, seed: int) -> list[int]:
    """Member followed by each of ``q`` Thompson picks: a fresh seeded permutation every K."""
    rng = np.random.default_rng(seed)
    n_cycles = -(-q // n_members)
    return np.concatenate([rng.permutation(n_members) for _ in range(n_cycles)])[:q].tolist()


def _check_params(acqf: str, params: Mapping[str, Any]) -> None:
    required = {"qUCB": ("beta",), "qEI": ("best_f",), "qLogEI": ("best_f",)}.get(acqf, ())
    missing = [name for name in required if name not in params]
    if missing:
        raise ValueError(f"acquisition {acqf!r} needs parameters {missing}")


def greedy_select(
    values: Tensor | np.ndarray,
    q: int,
    acqf: str = "qUCB",
    params: Mapping[str, Any] | None = None,
    exclude: np.ndarray | Tensor | None = None,
    pending: Sequence[int] | np.ndarray | Tensor | None = None,
    max_batch_size: int = 2048,
) -> tuple[Tensor, Tensor]:
    """Sequential greedy batch, same picks as ``optimize_acqf_discrete(unique=True)``.

    Args:
        values: ``K x N`` per-member objective values (``member_objective_values``).
            Use float64 for bitwise agreement with a float64 BoTorch model.
        q: batch size.
        acqf: one of ``GREEDY_ACQUISITIONS``.
        params: ``beta`` (qUCB), ``best_f`` (qEI, qLogEI; optional ``tau_max``=1e-2,
            ``tau_relu``=1e-6), ``seed`` (thompson, default 0).
        exclude: ``N`` boolean mask of candidates never to pick (already measured).
        pending: indices of candidates in flight (conditioned on, never picked).
        max_batch_size: candidates per evaluation block, as in ``optimize_acqf_discrete``.
            Joint values are reduced over members in the same ``K x b`` layout as BoTorch
            (remaining candidates, ascending, in blocks of this size) because torch's
            reduction rounding depends on the position in the block: tied candidates
            (after saturation) then differ by the same last-bit amounts as in BoTorch.

    Returns:
        ``(indices, acq_values)``: ``q`` picks (int64) in pick order and the joint
        acquisition value after each pick (as ``optimize_acqf_discrete`` returns them).
        Fewer than ``q`` (with a warning) if fewer candidates are eligible.
    """
    values = as_member_values(values)
    params = dict(params or {})
    if acqf not in GREEDY_ACQUISITIONS:
        raise ValueError(f"unknown acquisition {acqf!r}; valid names: {list(GREEDY_ACQUISITIONS)}")
    q = check_q(q)
    _check_params(acqf, params)
    n_members, n = values.shape
    pending_idx = as_index_array(pending, n, "pending")
    eligible = eligible_mask(n, exclude, pending_idx, values.device)
    n_pick = min(int(q), int(eligible.sum()))
    if n_pick < q:
        warnings.warn(f"requested q={q} but only {n_pick} candidates are eligible", stacklevel=2)
    if acqf == "thompson":
        return _thompson_select(values, n_pick, eligible, int(params.get("seed", 0)))
    if acqf == "qLogEI":
        state = _LogEIState(values, params, pending_idx)
    else:
        state = _MaxState(member_utilities(values, acqf, params), pending_idx)
    picks, acq_values = [], []
    for _ in range(n_pick):
        choices = eligible.nonzero().squeeze(-1)  # remaining, ascending (as BoTorch's list)
        if len(choices) <= max_batch_size:
            joint = state.joint_values(choices)
        else:
            joint = torch.cat([state.joint_values(chunk) for chunk in choices.split(max_batch_size)])
        position = int(torch.argmax(joint))
        best = int(choices[position])
        picks.append(best)
        acq_values.append(joint[position])
        eligible[best] = False
        state.add(best)
    return _as_result(picks, acq_values, values)


def _as_result(picks: list[int], acq_values: list[Tensor], values: Tensor) -> tuple[Tensor, Tensor]:
    indices = torch.tensor(picks, dtype=torch.int64, device=values.device)
    if acq_values:
        return indices, torch.stack(acq_values)
    return indices, values.new_zeros(0)


class _MaxState:
    """Running per-member max ``r_k`` of utilities over pending points and picks."""

    def __init__(self, utilities: Tensor, pending: np.ndarray) -> None:
        self.utilities = utilities  # K x N
        n_members = utilities.shape[0]
        if len(pending):
            self.running = utilities[:, torch.as_tensor(pending)].amax(dim=1)  # K
        else:
            self.running = utilities.new_full((n_members,), -math.inf)

    def joint_values(self, choices: Tensor) -> Tensor:
        """``a(S ∪ {i})`` for ``i`` in ``choices`` (one block): ``b``."""
        block = torch.index_select(self.utilities, 1, choices)  # K x b
        return torch.mean(torch.maximum(self.running.unsqueeze(-1), block), dim=(0,))

    def add(self, index: int) -> None:
        self.running = torch.maximum(self.running, self.utilities[:, index])


def _pareto(x: Tensor, alpha: float = 2.0) -> Tensor:
    """BoTorch's fat-tailed kernel (``botorch.utils.safe_math._pareto``), same arithmetic."""
    alpha = alpha / 2
    beta_1 = 2 * alpha
    beta_0 = alpha * beta_1
    return (beta_0 / (beta_0 + beta_1 * x + x.square())).pow(alpha)


class _LogEIState:
    """Per-member fat max ``M_k + tau log P_k`` of log-improvements over the set."""

    def __init__(self, values: Tensor, params: Mapping[str, Any], pending: np.ndarray,
                 max_block: int = 2**22) -> None:
        best_f = torch.as_tensor(params["best_f"])
        self.tau = float(params.get("tau_max", 1e-2))
        tau_relu = float(params.get("tau_relu", 1e-6))
        self.log_improvement = log_fatplus(values - best_f.unsqueeze(-1).to(values), tau=tau_relu)
        n_members = values.shape[0]
        self.members: list[int] = []
        self.set_max = values.new_full((n_members,), -math.inf)  # M_k
        self.set_sum = values.new_zeros(n_members)  # P_k
        self.max_block = max_block
        for index in pending:
            self.add(int(index))

    def _sum_over_set(self, member: Tensor, reference: Tensor) -> Tensor:
        """``sum_{j in S} pareto((reference - l_{member, j}) / tau)`` per entry, chunked."""
        set_values = self.log_improvement[:, self.members]  # K x |S|
        out = []
        block = max(1, self.max_block // max(1, len(self.members)))
        for start in range(0, len(member), block):
            m, ref = member[start:start + block], reference[start:start + block]
            out.append(_pareto((ref.unsqueeze(-1) - set_values[m]) / self.tau).sum(dim=-1))
        return torch.cat(out) if out else reference.new_zeros(0)

    def joint_values(self, choices: Tensor) -> Tensor:
        """Smoothed ``log qEI(S ∪ {i})`` for ``i`` in ``choices``: ``b``."""
        li = torch.index_select(self.log_improvement, 1, choices)  # K x b
        if not self.members:
            return logmeanexp(li, dim=0)
        set_max = self.set_max.unsqueeze(-1)
        new_max = li > set_max  # K x N
        total = self.set_sum.unsqueeze(-1) + _pareto((set_max - li) / self.tau)
        member, cand = new_max.nonzero(as_tuple=True)
        if len(member):
            ref = li[member, cand]
            total[member, cand] = 1.0 + self._sum_over_set(member, ref)
        fat_max = torch.maximum(set_max, li) + self.tau * total.log()
        return logmeanexp(fat_max, dim=0)

    def add(self, index: int) -> None:
        column = self.log_improvement[:, index]
        self.members.append(index)
        rising = column > self.set_max
        self.set_max = torch.maximum(self.set_max, column)
        self.set_sum = torch.where(
            rising,
            self._sum_over_set(torch.arange(len(column)), self.set_max),
            self.set_sum + _pareto((self.set_max - column) / self.tau),
        )


def _thompson_select(values: Tensor, n_pick: int, eligible: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    members = thompson_members(max(n_pick, 1), values.shape[0], seed)
    picks, acq_values = [], []
    for t in range(n_pick):
        member_values = values[members[t]].masked_fill(~eligible, -math.inf)
        best = int(torch.argmax(member_values))
        picks.append(best)
        acq_values.append(member_values[best])
        eligible[best] = False
    return _as_result(picks, acq_values, values)
