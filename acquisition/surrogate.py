"""Cheap surrogate of the virtual assay for prescreening 10^6 candidates.

``H`` small MLP heads on the 2048 Morgan bits, trained jointly (one optimiser step updates
every head) on the virtual assay's own per-member activities for a random sample of the
library, plus measured activities when given. Head ``h`` fits member ``h mod K`` (or the
member mean, ``target='mean'``) on its own bootstrap resample from its own initialisation, so
the spread across heads reflects both the members' disagreement and the surrogate's own
uncertainty. The bootstrap draws fingerprints, not rows: rows with the same packed fingerprint
(a compound listed twice, stereoisomers, a measured compound also simulated) are in or out of a
head's bag together, so the out-of-bag Spearman scores each head on fingerprints it never saw.

Each head::

    z_1 = relu(E_h^T bits + b_1)        E_h: 2048 x hidden (an EmbeddingBag over the on-bits)
    z_2 = relu(W_h z_1 + b_2)           hidden x hidden
    y   = w_h . z_2 + b_3

The first layer sums the rows of the ~30-60 set bits instead of multiplying by the dense
2048-vector, so inference on 10^6 fingerprints is a few seconds per 10^5 on one core.
``prescreen`` ranks by ``UCB = mean + beta * sd`` over heads.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.virtual_assay import FINGERPRINT_N_BITS, check_fingerprints

log = logging.getLogger(__name__)

__all__ = ["FingerprintSurrogate", "SurrogateConfig", "fingerprint_bags", "fingerprint_groups", "prescreen",
           "train_surrogate"]

_TARGETS = ("members", "mean")
MIN_OUT_OF_BAG = 10  # fewer out-of-bag fingerprints give no out-of-bag Spearman (NaN): 3 ranks agree by chance
_TINY_SCALE = 1e-12  # the target scale of all-zero constant targets


@dataclass(frozen=True)
class SurrogateConfig:
    """Options of the surrogate (saved in the funnel's diagnostics).

    Attributes:
        n_heads: H independent heads (>= 2 for a spread).
        hidden_dim: width of both hidden layers of every head.
        n_epochs: passes over the training rows (capped by ``max_steps``).
        max_steps: cap on optimiser steps (bounds training time for large samples).
        batch_size: rows per step.
        learning_rate, weight_decay: AdamW.
        bootstrap: each head trains on its own bootstrap resample of the distinct fingerprints
            (multiplicity weights; every row of a fingerprint carries its draw count).
        target: ``'members'`` (head h fits member h mod K) or ``'mean'`` (member mean).
        measured_weight: weight of a measured row relative to a simulated one.
        inference_batch_size: fingerprints per inference batch.
    """

    n_heads: int = 6
    hidden_dim: int = 64
    n_epochs: int = 30
    max_steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    bootstrap: bool = True
    target: str = "members"
    measured_weight: float = 1.0
    inference_batch_size: int = 16384

    def __post_init__(self) -> None:
        for name in ("n_heads", "hidden_dim", "n_epochs", "max_steps", "batch_size", "inference_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.measured_weight < 0:
            raise ValueError("learning_rate must be > 0, weight_decay and measured_weight >= 0")
        if self.target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {self.target!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint_bags(packed: np.ndarray) -> tuple[Tensor, Tensor]:
    """EmbeddingBag inputs of ``uint8 b x 256`` packed fingerprints: on-bit indices and row offsets."""
    bits = np.unpackbits(packed, axis=1)  # b x 2048 (RDKit bit order, as lab_io.chem packs)
    rows, cols = np.nonzero(bits)
    counts = np.bincount(rows, minlength=len(packed))
    offsets = np.zeros(len(packed), dtype=np.int64)
    np.cumsum(counts[:-1], out=offsets[1:])
    return torch.from_numpy(cols.astype(np.int64)), torch.from_numpy(offsets)


class FingerprintSurrogate(nn.Module):
    """``H`` two-hidden-layer MLP heads on fingerprint bits, evaluated together: ``b -> b x H``."""

    def __init__(self, n_heads: int, hidden_dim: int, *, mean_bits_on: float, generator: torch.Generator) -> None:
        super().__init__()
        self.n_heads, self.hidden_dim = n_heads, hidden_dim
        self.embed = nn.EmbeddingBag(FINGERPRINT_N_BITS, n_heads * hidden_dim, mode="sum")
        self.b_1 = nn.Parameter(torch.zeros(n_heads * hidden_dim))
        self.w_2 = nn.Parameter(torch.empty(n_heads, hidden_dim, hidden_dim))
        self.b_2 = nn.Parameter(torch.zeros(n_heads, hidden_dim))
        self.w_3 = nn.Parameter(torch.empty(n_heads, hidden_dim))
        self.b_3 = nn.Parameter(torch.zeros(n_heads))
        with torch.no_grad():  # unit-variance pre-activations for a typical fingerprint
            bound_1 = math.sqrt(3.0 / max(mean_bits_on, 1.0))
            self.embed.weight.uniform_(-bound_1, bound_1, generator=generator)
            bound = math.sqrt(3.0 / hidden_dim)
            self.w_2.uniform_(-bound, bound, generator=generator)
            self.w_3.uniform_(-bound, bound, generator=generator)
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_scale", torch.ones(()))

    def forward(self, bit_index: Tensor, offsets: Tensor) -> Tensor:
        """Standardised predictions ``b x H`` from EmbeddingBag inputs of ``b`` fingerprints."""
        z = self.embed(bit_index, offsets) + self.b_1  # b x (H hidden)
        z = torch.relu(z).view(-1, self.n_heads, self.hidden_dim)  # b x H x hidden
        z = torch.relu(torch.einsum("bhi,hij->bhj", z, self.w_2) + self.b_2)  # b x H x hidden
        return (z * self.w_3).sum(-1) + self.b_3  # b x H

    @torch.no_grad()
    def predict_heads(self, fingerprints: np.ndarray, *, batch_size: int = 16384) -> np.ndarray:
        """Per-head predictions ``float32 H x N`` in activity units."""
        fingerprints = check_fingerprints(fingerprints)
        out = np.empty((self.n_heads, len(fingerprints)), dtype=np.float32)
        for start in range(0, len(fingerprints), batch_size):
            chunk = fingerprints[start:start + batch_size]
            y = self(*fingerprint_bags(chunk)) * self.y_scale + self.y_mean  # b x H
            out[:, start:start + len(chunk)] = y.T.numpy()
        return out


def _targets(values: np.ndarray, n_heads: int, target: str) -> np.ndarray:
    """``H x n`` head targets from ``K x n`` member values (or ``n``)."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float32))
    if target == "mean":
        values = values.mean(axis=0, keepdims=True)
    return values[np.arange(n_heads) % len(values)]


def train_surrogate(
    fingerprints: np.ndarray,
    values: np.ndarray,
    *,
    config: SurrogateConfig = SurrogateConfig(),
    seed: int = 0,
    measured_fingerprints: np.ndarray | None = None,
    measured_activity: np.ndarray | None = None,
) -> tuple[FingerprintSurrogate, dict[str, Any]]:
    """Fit the heads to simulated values (and measured ones) and report out-of-bag quality.

    Args:
        fingerprints: ``uint8 n x 256`` simulated compounds.
        values: ``K x n`` per-member activities (or ``n``) from the virtual assay.
        config: ``SurrogateConfig``.
        seed: initialisation, bootstrap and batch order.
        measured_fingerprints, measured_activity: ``m x 256`` and ``m`` lab measurements
            (every head fits them, weighted ``config.measured_weight``).

    Returns:
        ``(surrogate, diagnostics)``: diagnostics has n_train, n_measured, n_fingerprints (distinct
        ones, simulated and measured), steps, seconds, final loss, constant_targets (every target
        the same value: the surrogate has nothing to rank, its predictions are that value up to
        noise of its relative size) and the out-of-bag Spearman correlation of the head mean with
        the member mean over distinct simulated fingerprints (NaN without bootstrap, with fewer
        than ``MIN_OUT_OF_BAG`` out-of-bag fingerprints, or with constant targets; n_out_of_bag).
    """
    t0 = time.perf_counter()
    fingerprints = check_fingerprints(fingerprints)
    values = np.asarray(values, dtype=np.float32)
    n = len(fingerprints)
    if values.shape[-1] != n or values.ndim not in (1, 2):
        raise ValueError(f"values must be K x n or n with n={n} (one per fingerprint), got shape {values.shape}")
    if n < 2:
        raise ValueError(f"need >= 2 simulated compounds to train the surrogate, got {n}")
    if not np.isfinite(values).all():
        raise ValueError(f"{int((~np.isfinite(values)).sum())} simulated values are NaN or inf; the surrogate "
                         "needs finite ones")
    y = _targets(values, config.n_heads, config.target)  # H x n
    x = fingerprints
    row_weight = np.ones(n, dtype=np.float32)
    n_measured = 0
    if measured_fingerprints is not None or measured_activity is not None:
        if measured_fingerprints is None or measured_activity is None:
            raise ValueError("measured_fingerprints and measured_activity go together")
        measured_fingerprints = check_fingerprints(measured_fingerprints, name="measured_fingerprints")
        measured_activity = np.asarray(measured_activity, dtype=np.float32)
        if measured_activity.shape != (len(measured_fingerprints),) or not np.isfinite(measured_activity).all():
            raise ValueError(f"measured_activity must be {len(measured_fingerprints)} finite values, "
                             f"got shape {measured_activity.shape}")
        n_measured = len(measured_activity)
        x = np.concatenate([x, measured_fingerprints])
        y = np.concatenate([y, np.broadcast_to(measured_activity, (config.n_heads, n_measured))], axis=1)
        row_weight = np.concatenate([row_weight, np.full(n_measured, config.measured_weight, np.float32)])
    n_rows = len(x)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    groups = fingerprint_groups(x)
    n_groups = int(groups.max()) + 1
    if config.bootstrap:
        counts = np.stack([np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[groups]
                           for _ in range(config.n_heads)]).astype(np.float32)  # H x rows
    else:
        counts = np.ones((config.n_heads, n_rows), dtype=np.float32)
    weight = torch.from_numpy(counts * row_weight)  # H x rows
    y_mean, y_scale, constant = _target_scale(y)
    y_std = torch.from_numpy((y - y_mean) / y_scale)  # H x rows
    mean_bits = float(np.unpackbits(x[: min(n_rows, 2048)], axis=1).sum(1).mean())
    model = FingerprintSurrogate(config.n_heads, config.hidden_dim, mean_bits_on=mean_bits, generator=generator)
    model.y_mean.fill_(y_mean)
    model.y_scale.fill_(y_scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(n_rows / config.batch_size)
    n_steps = min(config.max_steps, config.n_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps)
    step, loss_value = 0, float("nan")
    model.train()
    while step < n_steps:
        order = rng.permutation(n_rows)
        for start in range(0, n_rows, config.batch_size):
            batch = order[start:start + config.batch_size]
            pred = model(*fingerprint_bags(x[batch]))  # b x H
            w = weight[:, batch].T  # b x H
            loss = (w * (pred - y_std[:, batch].T) ** 2).sum() / w.sum().clamp_min(1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_value = float(loss.detach())
            step += 1
            if step >= n_steps:
                break
    model.eval()
    oob, n_oob = float("nan"), 0
    if config.bootstrap:
        oob, n_oob = _out_of_bag_spearman(model, fingerprints, values, counts[:, :n], groups[:n], config)
    diagnostics = dict(n_train=n, n_measured=n_measured, n_fingerprints=n_groups, n_heads=config.n_heads,
                       steps=step, final_loss=float(f"{loss_value:.4g}"), constant_targets=constant,
                       oob_spearman=round(oob, 4), n_out_of_bag=n_oob,
                       seconds=round(time.perf_counter() - t0, 2), config=config.to_dict())
    log.info("surrogate: %d heads on %d simulated + %d measured compounds (%d distinct fingerprints), %d steps "
             "in %.1f s (out-of-bag Spearman %s over %d fingerprints)", config.n_heads, n, n_measured, n_groups,
             step, diagnostics["seconds"], "n/a" if math.isnan(oob) else f"{oob:.3f}", n_oob)
    return model, diagnostics


def fingerprint_groups(packed: np.ndarray) -> np.ndarray:
    """``int64 n`` group of each row: rows with the same packed fingerprint share one, numbered in
    order of first appearance (all-distinct rows: ``0 .. n-1``, the row order)."""
    _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    by_appearance = np.empty(len(first), dtype=np.int64)
    by_appearance[np.argsort(first, kind="stable")] = np.arange(len(first))
    return by_appearance[inverse.reshape(-1)]


def _target_scale(y: np.ndarray) -> tuple[float, float, bool]:
    """``(mean, scale, constant)`` that standardise the targets. Constant targets have no spread to
    scale by: their own magnitude is the scale (so a prediction off by the network's untrained
    noise is off by a fraction of the value, not by 1 in activity units), with a warning."""
    if np.ptp(y) > 0:  # ptp: exactly 0 for equal values, unlike a float64 std with rounding
        return float(y.mean(dtype=np.float64)), float(y.std(dtype=np.float64)), False  # float32 overflows
    value = float(y.flat[0])
    log.warning("surrogate: every one of the %d targets is %g: it has nothing to rank (constant targets); its "
                "predictions are that value up to noise", y.shape[-1], value)
    return value, max(abs(value), _TINY_SCALE), True


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (ties ranked in order); NaN with fewer than ``MIN_OUT_OF_BAG`` pairs or no spread."""
    if len(a) < MIN_OUT_OF_BAG or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _out_of_bag_spearman(model: FingerprintSurrogate, fingerprints: np.ndarray, values: np.ndarray,
                         counts: np.ndarray, groups: np.ndarray, config: SurrogateConfig) -> tuple[float, int]:
    """Rank correlation of each distinct fingerprint's out-of-bag head mean with the member-mean value
    (averaged over its rows), and how many fingerprints some head left out."""
    _, first = np.unique(groups, return_index=True)  # first row of group 0, 1, ... (groups count from 0)
    heads = model.predict_heads(fingerprints[first], batch_size=config.inference_batch_size)  # H x g
    out_of_bag = counts[:, first] == 0  # H x g (a group's rows share their counts)
    has_oob = out_of_bag.any(axis=0)
    oob_mean = (heads * out_of_bag).sum(0)[has_oob] / out_of_bag.sum(0)[has_oob]
    member_mean = np.atleast_2d(values).mean(axis=0, dtype=np.float64)
    target = np.bincount(groups, weights=member_mean) / np.bincount(groups)  # g
    return _spearman(oob_mean, target[has_oob]), int(has_oob.sum())


def prescreen(
    surrogate: FingerprintSurrogate,
    fingerprints: np.ndarray,
    shortlist_size: int,
    *,
    beta: float = 2.0,
    exclude: np.ndarray | None = None,
    batch_size: int = 16384,
) -> np.ndarray:
    """Indices ``int64 (<= shortlist_size,)`` of the top surrogate ``UCB = mean + beta * sd`` (best first).

    Args:
        surrogate: a trained ``FingerprintSurrogate``.
        fingerprints: ``uint8 N x 256``.
        shortlist_size: how many to keep (> 0).
        beta: weight of the head standard deviation (>= 0).
        exclude: ``N`` boolean mask of candidates never returned (measured, pending, already simulated).
    """
    fingerprints = check_fingerprints(fingerprints)
    n = len(fingerprints)
    if isinstance(shortlist_size, bool) or int(shortlist_size) != shortlist_size or shortlist_size < 1:
        raise ValueError(f"shortlist_size must be a positive integer, got {shortlist_size!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if exclude is not None:
        exclude = np.asarray(exclude)
        if exclude.shape != (n,) or exclude.dtype != bool:
            raise ValueError(f"exclude must be a boolean mask of shape ({n},), got {exclude.dtype} {exclude.shape}")
    t0 = time.perf_counter()
    heads = surrogate.predict_heads(fingerprints, batch_size=batch_size)  # H x N
    ucb = heads.mean(axis=0) + beta * heads.std(axis=0, ddof=1 if len(heads) > 1 else 0)
    eligible = np.ones(n, dtype=bool) if exclude is None else ~exclude
    n_eligible = int(eligible.sum())
    n_bad = int((~np.isfinite(ucb) & eligible).sum())
    if n_bad:
        if n_bad == n_eligible:
            raise ValueError(f"the surrogate scored every one of the {n_eligible} eligible candidates as NaN or "
                             "inf (are the virtual assay's values finite and below ~1e18?)")
        log.warning("prescreen: the surrogate scored %d of %d eligible candidates as NaN or inf; they are "
                    "left out of the shortlist", n_bad, n_eligible)
    ucb[~np.isfinite(ucb)] = -np.inf  # a NaN score must never rank above an excluded candidate
    ucb[~eligible] = -np.inf
    k = min(int(shortlist_size), n_eligible - n_bad)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-ucb, k - 1)[:k]
    top = top[np.argsort(-ucb[top], kind="stable")]
    log.info("prescreen: surrogate UCB (beta=%.2f) over %d candidates -> shortlist %d in %.1f s",
             beta, n, k, time.perf_counter() - t0)
    return top.astype(np.int64)
