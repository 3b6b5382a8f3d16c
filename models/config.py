"""Typed, frozen configurations of the virtual assays, saved as JSON with every trained model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["FeatureAssayConfig", "config_from_dict", "config_hash"]

_TIME_SCHEMES = ("uniform", "logit_normal")
_SAMPLERS = ("euler", "heun")
_FEATURE_TRANSFORMS = ("none", "asinh")


@dataclass(frozen=True)
class FeatureAssayConfig:
    """Feature-space virtual assay: K conditional flow-matching members over per-cell features.

    Defaults are sized for 2 CPU cores (~10-30 s per member on ~20k cells x ~50 features).
    """

    # ensemble
    n_members: int = 3
    base_seed: int = 0  # member k trains with seed base_seed + k
    bootstrap: bool = True  # every member trains on a bootstrap resample of the compounds

    # velocity network v_theta(x_t, t, cond): residual MLP with adaLN-Zero conditioning
    hidden_dim: int = 128
    n_blocks: int = 3
    mlp_ratio: float = 2.0
    cond_dim: int = 64  # width of the condition / time embeddings
    fp_hidden_dim: int = 128  # compound encoder hidden width (fingerprint MLP)
    n_dose_frequencies: int = 6
    n_time_frequencies: int = 32

    # training
    n_steps: int = 1000
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip_norm: float = 1.0
    ema_decay: float = 0.995
    time_scheme: str = "uniform"
    p_drop_compound: float = 0.1  # label dropout -> null compound token (CFG)
    p_drop_plate: float = 0.2  # label dropout -> unknown plate token (unseen plates)
    p_drop_bits: float = 0.0  # fingerprint bit dropout (generalisation to unseen compounds)
    control_fraction: float | None = None  # share of each batch drawn from control cells (None: uniform over cells)
    feature_transform: str = "asinh"  # train on asinh(z) of control-unit features z ("none": on z)
    checkpoint_every: int = 250
    log_every: int = 25
    write_loss_plot: bool = True

    # sampling (prediction)
    n_sample_steps: int = 8
    sampler: str = "euler"
    guidance_scale: float = 1.0
    n_control_cells: int = 512
    sample_bf16: bool = False  # bfloat16 autocast while sampling on CPU (~1.7x faster, ~1e-2 profile error)

    def __post_init__(self) -> None:
        _check_positive(self, "n_members", "hidden_dim", "n_blocks", "cond_dim", "fp_hidden_dim",
                        "n_dose_frequencies", "n_time_frequencies", "n_steps", "batch_size",
                        "checkpoint_every", "log_every", "n_sample_steps", "n_control_cells")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip_norm must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("p_drop_compound", "p_drop_plate", "p_drop_bits"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.control_fraction is not None and not 0.0 < self.control_fraction < 1.0:
            raise ValueError(f"control_fraction must be in (0, 1) or None, got {self.control_fraction}")
        if self.feature_transform not in _FEATURE_TRANSFORMS:
            raise ValueError(f"feature_transform must be one of {_FEATURE_TRANSFORMS}, got {self.feature_transform!r}")
        if self.time_scheme not in _TIME_SCHEMES:
            raise ValueError(f"time_scheme must be one of {_TIME_SCHEMES}, got {self.time_scheme!r}")
        if self.sampler not in _SAMPLERS:
            raise ValueError(f"sampler must be one of {_SAMPLERS}, got {self.sampler!r}")
        if self.guidance_scale != 1.0 and self.p_drop_compound == 0.0:
            raise ValueError("guidance_scale != 1 needs p_drop_compound > 0 (an unconditional model)")

    # cadence of checkpoints and logs: resuming is bit-identical, so the weights do not depend on them
    RUN_ONLY_FIELDS = ("checkpoint_every", "log_every", "write_loss_plot")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureAssayConfig":
        return config_from_dict(cls, data)


def config_from_dict(cls, data: dict[str, Any]):
    """Build a config dataclass from a dict; unknown keys are an error (no silent drift)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
    return cls(**data)


def config_hash(config, *extra: str, length: int = 12) -> str:
    """Short sha256 of a config's canonical JSON plus extra strings (e.g. a data fingerprint).

    Fields a config lists in ``RUN_ONLY_FIELDS`` (logging and checkpoint cadence: the trained
    weights do not depend on them) are hashed at their defaults, so changing them names no new
    model version (and trains none)."""
    run_only = {f.name: f.default for f in fields(config) if f.name in getattr(config, "RUN_ONLY_FIELDS", ())}
    h = hashlib.sha256(json.dumps(dataclasses.asdict(dataclasses.replace(config, **run_only)),
                                  sort_keys=True).encode())
    for e in extra:
        h.update(b"\0" + e.encode())
    return h.hexdigest()[:length]


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
