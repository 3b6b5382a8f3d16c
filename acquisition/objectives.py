"""Scalar objectives over predicted morphology profiles.

Normalised space: a profile is a vector of ``F`` CellProfiler-style features, each a
robust z-score against the plate's DMSO (control) wells — as ``lab_io.profiles``
normalises measurements and as every ``VirtualAssay`` member normalises its
predictions against its own predicted controls.  Controls therefore sit at the origin
and one unit is one control-MAD-scaled standard deviation.  In that space:

* phenotypic activity = ``||profile||_2 / sqrt(F)`` (root-mean-square z; 0 for a
  control-like compound, ~1 for a profile one typical control deviation away);
* target similarity = cosine similarity of the profile to a reference profile
  (e.g. a known mechanism's median profile), in ``[-1, 1]``.

Objectives are BoTorch ``MCAcquisitionObjective``s, mapping posterior samples
``sample_shape x b x q x F`` to ``sample_shape x b x q``; ``member_objective_values``
applies the same objective directly to cached profiles ``K x N x F -> K x N`` (the
fast path used by ``acquisition.greedy`` / ``acquisition.select``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from botorch.acquisition.objective import GenericMCObjective, MCAcquisitionObjective
from torch import Tensor

__all__ = [
    "activity_objective",
    "target_similarity_objective",
    "weighted_objective",
    "member_objective_values",
    "phenotypic_activity",
    "target_similarity",
]


def phenotypic_activity(profiles: Tensor) -> Tensor:
    """``||profile||_2 / sqrt(F)`` over the last dim: ``... x F -> ...``."""
    n_features = profiles.shape[-1]
    return torch.linalg.vector_norm(profiles, dim=-1) / math.sqrt(n_features)


def target_similarity(profiles: Tensor, target_profile: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarity of each profile to ``target_profile`` (``F``): ``... x F -> ...``.

    A zero profile (exactly control-like) has similarity 0.
    """
    target = target_profile.to(profiles)
    dot = profiles @ target
    norms = torch.linalg.vector_norm(profiles, dim=-1) * torch.linalg.vector_norm(target)
    return dot / norms.clamp_min(eps)


def activity_objective() -> GenericMCObjective:
    """MC objective: phenotypic activity of each sampled profile."""
    return GenericMCObjective(lambda samples, X=None: phenotypic_activity(samples))


def target_similarity_objective(target_profile: Tensor | np.ndarray) -> GenericMCObjective:
    """MC objective: cosine similarity of each sampled profile to ``target_profile`` (F)."""
    target = torch.as_tensor(np.asarray(target_profile) if not isinstance(target_profile, Tensor)
                             else target_profile)
    if target.ndim != 1:
        raise ValueError(f"target_profile must be 1-d (F,), got shape {tuple(target.shape)}")
    if not torch.isfinite(target).all() or torch.linalg.vector_norm(target.double()) == 0:
        raise ValueError("target_profile must be finite and non-zero")

    def similarity(samples: Tensor, X: Tensor | None = None) -> Tensor:
        if samples.shape[-1] != target.shape[0]:
            raise ValueError(
                f"profiles have {samples.shape[-1]} features, target_profile has {target.shape[0]}"
            )
        return target_similarity(samples, target)

    return GenericMCObjective(similarity)


def weighted_objective(terms: Sequence[tuple[MCAcquisitionObjective, float]]) -> GenericMCObjective:
    """MC objective ``sum_j w_j * objective_j(samples)``.

    Args:
        terms: ``[(objective, weight), ...]``, at least one.
    """
    terms = list(terms)
    if not terms:
        raise ValueError("weighted_objective needs at least one (objective, weight) term")
    for objective, weight in terms:
        if not isinstance(objective, MCAcquisitionObjective):
            raise TypeError(f"expected an MCAcquisitionObjective, got {type(objective).__name__}")
        if not math.isfinite(float(weight)):
            raise ValueError(f"weight must be finite, got {weight}")

    def combined(samples: Tensor, X: Tensor | None = None) -> Tensor:
        return sum(float(w) * objective(samples, X) for objective, w in terms)

    return GenericMCObjective(combined)


def member_objective_values(
    profiles: Tensor | np.ndarray,
    objective: MCAcquisitionObjective,
    *,
    chunk_size: int = 65536,
) -> Tensor:
    """Per-member objective values from cached profiles.

    Args:
        profiles: ``K x N x F`` member profiles (normalised to controls).
        objective: an MC objective, e.g. ``activity_objective()``.
        chunk_size: candidates per chunk (bounds temporary memory).

    Returns:
        ``K x N`` objective values (same dtype as ``profiles``).
    """
    profiles = torch.as_tensor(profiles)
    if profiles.ndim != 3:
        raise ValueError(f"profiles must be K x N x F, got shape {tuple(profiles.shape)}")
    if not profiles.is_floating_point():
        raise ValueError(f"profiles must be floating point, got {profiles.dtype}")
    chunks = [
        objective(profiles[:, start:start + chunk_size], None)  # K x n
        for start in range(0, profiles.shape[1], chunk_size)
    ]
    values = torch.cat(chunks, dim=1)
    if values.shape != profiles.shape[:2]:
        raise ValueError(
            f"objective must map K x N x F to K x N, got {tuple(values.shape)}"
        )
    return values
