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

``ObjectiveConfig`` is what a campaign maximises (``loop objective set``): ``activity_weight x
activity + similarity_weight x similarity`` to a named target profile, matched to the
virtual assay's features by name (the target usually comes from measured wells, whose
features are the lab's, not necessarily the model's). Its default is activity alone.

Objectives are BoTorch ``MCAcquisitionObjective``s, mapping posterior samples
``sample_shape x b x q x F`` to ``sample_shape x b x q``; ``member_objective_values``
applies the same objective directly to cached profiles ``K x N x F -> K x N`` (the
fast path used by ``acquisition.greedy`` / ``acquisition.select``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from botorch.acquisition.objective import GenericMCObjective, MCAcquisitionObjective
from torch import Tensor

__all__ = [
    "ObjectiveConfig",
    "activity_objective",
    "target_similarity_objective",
    "weighted_objective",
    "member_objective_values",
    "phenotypic_activity",
    "target_similarity",
]

logger = logging.getLogger(__name__)

MIN_SHARED_FEATURES = 2  # a cosine over fewer features says nothing about a phenotype


def phenotypic_activity(profiles: Tensor) -> Tensor:
    """``||profile||_2 / sqrt(F)`` over the last dim: ``... x F -> ...``."""
    n_features = profiles.shape[-1]
    return torch.linalg.vector_norm(profiles, dim=-1) / math.sqrt(n_features)


def target_similarity(profiles: Tensor, target_profile: Tensor, eps: float = 1e-12, floor_z: float = 0.0) -> Tensor:
    """Cosine similarity of each profile to ``target_profile`` (``F``): ``... x F -> ...``.

    A zero profile (exactly control-like) has similarity 0. ``floor_z > 0`` discounts profiles
    within control noise: ``p . t / (|t| sqrt(|p|^2 + F floor_z^2))``, the cosine when ``|p|``
    is far above ``sqrt(F) floor_z`` (a profile ``floor_z`` control deviations from the origin in
    every feature) and towards 0 below it, where a profile's direction is noise.
    """
    target = target_profile.to(profiles)
    dot = profiles @ target
    sq_norm = (profiles * profiles).sum(dim=-1) + profiles.shape[-1] * floor_z ** 2
    norms = sq_norm.sqrt() * torch.linalg.vector_norm(target)
    return dot / norms.clamp_min(eps)


def activity_objective(clip_z: float | None = None) -> GenericMCObjective:
    """MC objective: phenotypic activity of each sampled profile (clipped to ``+-clip_z`` first when given)."""
    clip = math.inf if clip_z is None else float(clip_z)
    return GenericMCObjective(lambda samples, X=None: phenotypic_activity(samples.clamp(-clip, clip)))


def target_similarity_objective(target_profile: Tensor | np.ndarray, *, feature_index: Sequence[int] | None = None,
                                clip_z: float | None = None, floor_z: float = 0.0) -> GenericMCObjective:
    """MC objective: similarity (``target_similarity``) of each sampled profile to ``target_profile``.

    ``feature_index``: the sampled profiles' features that ``target_profile`` (``len(feature_index)``)
    describes, in order (None: all of them); ``clip_z`` clips profile and target to ``+-clip_z``;
    ``floor_z`` is the control-noise floor of ``target_similarity``."""
    target = torch.as_tensor(np.asarray(target_profile) if not isinstance(target_profile, Tensor)
                             else target_profile)
    if target.ndim != 1:
        raise ValueError(f"target_profile must be 1-d (F,), got shape {tuple(target.shape)}")
    if not torch.isfinite(target).all() or torch.linalg.vector_norm(target.double()) == 0:
        raise ValueError("target_profile must be finite and non-zero")
    index = None if feature_index is None else torch.as_tensor(list(feature_index), dtype=torch.long)
    if index is not None and len(index) != len(target):
        raise ValueError(f"feature_index has {len(index)} entries, target_profile {len(target)}")
    clip = math.inf if clip_z is None else float(clip_z)
    target = target.clamp(-clip, clip)

    def similarity(samples: Tensor, X: Tensor | None = None) -> Tensor:
        if index is not None:
            samples = samples.index_select(-1, index.to(samples.device))
        if samples.shape[-1] != target.shape[0]:
            raise ValueError(
                f"profiles have {samples.shape[-1]} features, target_profile has {target.shape[0]}"
            )
        return target_similarity(samples.clamp(-clip, clip), target, floor_z=floor_z)

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


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the loop maximises per candidate (saved in the campaign and with every proposal).

    ``value = activity_weight * activity(p) + similarity_weight * sim(p[S], target[S])`` for a
    predicted profile ``p``, where ``S`` is the features the target and the virtual assay share
    by name and ``sim`` the cosine with a control-noise floor (``target_similarity``), both
    profiles clipped to ``clip_z``. The default, activity alone, is the loop's phenotypic-activity screen; a target
    with ``similarity_weight > 0`` turns it into a search for compounds that phenocopy it.

    Attributes:
        activity_weight: weight of phenotypic activity, ``>= 0``.
        similarity_weight: weight of cosine similarity to the target, ``>= 0`` (``> 0`` needs
            a target).
        target_features: feature names of the target profile (normalised to controls).
        target_values: the target profile, one finite value per name, not all zero.
        target_label: where the target came from (shown in logs and round configs).
        clip_z: profiles and target are clipped to ``[-clip_z, clip_z]`` before activity and
            cosine, as the lab clips its activity (``lab_io.profiles.phenotypic_activity``): a
            feature whose control wells barely vary has a near-zero MAD and robust z-scores in
            the thousands, which would otherwise be the whole value. None: no clip.
        floor_z: control-noise floor of the similarity (``target_similarity``): a predicted
            profile much weaker than ``floor_z`` control deviations per feature scores near 0
            whatever its direction. Without it the members of an ensemble point a near-control
            prediction in different directions, and qUCB chases that disagreement.
    """

    activity_weight: float = 1.0
    similarity_weight: float = 0.0
    target_features: tuple[str, ...] = ()
    target_values: tuple[float, ...] = ()
    target_label: str = ""
    clip_z: float | None = 10.0
    floor_z: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_features", tuple(str(f) for f in self.target_features))
        object.__setattr__(self, "target_values", tuple(float(v) for v in self.target_values))
        for name in ("activity_weight", "similarity_weight"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if self.clip_z is not None and not (math.isfinite(float(self.clip_z)) and self.clip_z > 0):
            raise ValueError(f"clip_z must be a finite number > 0 or None, got {self.clip_z!r}")
        if not (math.isfinite(float(self.floor_z)) and self.floor_z >= 0):
            raise ValueError(f"floor_z must be a finite number >= 0, got {self.floor_z!r}")
        if self.activity_weight == 0 and self.similarity_weight == 0:
            raise ValueError("activity_weight and similarity_weight cannot both be 0: nothing to maximise")
        if len(self.target_features) != len(self.target_values):
            raise ValueError(f"target has {len(self.target_features)} feature names but "
                             f"{len(self.target_values)} values")
        if len(set(self.target_features)) != len(self.target_features):
            raise ValueError("target feature names must be unique")
        if self.target_values:
            values = np.asarray(self.target_values)
            if not np.isfinite(values).all() or not values.any():
                raise ValueError(f"target profile {self.target_label!r} must be finite and not all zero")
        if self.similarity_weight > 0 and not self.target_features:
            raise ValueError("similarity_weight > 0 needs a target profile (loop objective set --target-compound "
                             "or --target-profile)")

    @property
    def uses_target(self) -> bool:
        return self.similarity_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ObjectiveConfig":
        return cls(**data)

    def build(self, feature_names: Sequence[str]) -> MCAcquisitionObjective:
        """The MC objective over profiles with the virtual assay's ``feature_names`` (``... x F -> ...``).

        Raises ValueError when the target shares fewer than ``MIN_SHARED_FEATURES`` features
        with the assay.
        """
        terms: list[tuple[MCAcquisitionObjective, float]] = []
        if self.activity_weight > 0:
            terms.append((activity_objective(self.clip_z), self.activity_weight))
        if self.uses_target:
            columns, target = self._shared_target(list(feature_names))
            terms.append((target_similarity_objective(target, feature_index=columns, clip_z=self.clip_z,
                                                      floor_z=float(self.floor_z)), self.similarity_weight))
        return weighted_objective(terms)

    def member_values(self, profiles: np.ndarray, feature_names: Sequence[str]) -> np.ndarray:
        """Member profiles ``K x n x F`` (features ``feature_names``) -> objective values ``K x n``."""
        profiles = torch.from_numpy(np.ascontiguousarray(profiles))
        return member_objective_values(profiles, self.build(feature_names)).numpy()

    def _shared_target(self, feature_names: list[str]) -> tuple[list[int], Tensor]:
        position = {name: i for i, name in enumerate(feature_names)}
        shared = [(position[f], v) for f, v in zip(self.target_features, self.target_values) if f in position]
        if len(shared) < MIN_SHARED_FEATURES:
            raise ValueError(
                f"target {self.target_label!r} shares {len(shared)} of its {len(self.target_features)} features "
                f"with the virtual assay's {len(feature_names)} (e.g. target {list(self.target_features[:3])}, "
                f"assay {feature_names[:3]}): it cannot be compared with predicted profiles")
        if len(shared) < len(self.target_features) / 2:
            logger.warning("target %r: only %d of its %d features are predicted by the virtual assay",
                           self.target_label, len(shared), len(self.target_features))
        columns, values = zip(*shared)
        target = torch.tensor(values, dtype=torch.float64)
        if not target.any():
            raise ValueError(f"target {self.target_label!r} is zero on every feature the virtual assay predicts")
        return list(columns), target
