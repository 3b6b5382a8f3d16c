"""Training data of the feature virtual assay, built from a single-cell profile table.

Input: a pycytominer-style single-cell DataFrame (one row per cell) with
``Metadata_Plate``, ``Metadata_Well``, ``Metadata_compound`` (compound id, ``DMSO`` for
controls), ``Metadata_dose_um`` and compartment-prefixed feature columns
(``Nuclei_*``, ``Cells_*``, ``Cytoplasm_*``), plus a fingerprint lookup
``{compound_id: uint8 256}`` (packed 2048-bit Morgan).

Output: ``FeatureTrainingSet`` with per-cell arrays (``C`` cells, ``F`` features):

    x                 float32 C x F   raw feature values
    compound_index    int64   C       index into compound_ids, -1 = control (DMSO)
    log10_dose_um     float32 C       log10 of the dose, 0 for controls (unused for them)
    plate_index       int64   C       index into plate_ids

Feature normalisation (``FeatureNormalization``), computed on the *control* cells
only, so that normalised features are "in DMSO units" on every plate pooled:

    robust (default): center = median, scale = IQR / 1.349 (the sd of a normal with that IQR)
    standard:         center = mean,   scale = std
    scale < 1e-6 * (1 + |center|) (a constant feature) -> scale falls back to the std over
    all cells, then to 1.

The model trains on ``(x - center) / scale``. Stats are saved with every member
(``normalization.json``). ``data_fingerprint`` is the sha256 of all arrays and
vocabularies, saved with every member and part of the ensemble's version id.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from lab_io.schema import CONTROL_COMPOUND_ID, META_COMPOUND, META_DOSE, META_PLATE, META_WELL, feature_columns
from models.virtual_assay import FINGERPRINT_N_BYTES

log = logging.getLogger(__name__)

CONTROL_INDEX = -1
_NORMALIZATION_METHODS = ("robust", "standard")
_IQR_TO_SD = 1.349

__all__ = ["CONTROL_INDEX", "FeatureNormalization", "FeatureTrainingSet", "fit_normalization"]


@dataclass(frozen=True, eq=False)
class FeatureNormalization:
    """Per-feature affine normalisation ``z = (x - center) / scale`` (``F`` vectors)."""

    method: str
    feature_names: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.center) / self.scale).astype(np.float32)

    def invert(self, z: np.ndarray) -> np.ndarray:
        return (z * self.scale + self.center).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "feature_names": list(self.feature_names),
            "center": [float(v) for v in self.center],
            "scale": [float(v) for v in self.scale],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureNormalization":
        return cls(
            method=str(data["method"]),
            feature_names=tuple(data["feature_names"]),
            center=np.asarray(data["center"], dtype=np.float64),
            scale=np.asarray(data["scale"], dtype=np.float64),
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "FeatureNormalization":
        return cls.from_dict(json.loads(Path(path).read_text()))


def fit_normalization(
    x_control: np.ndarray, x_all: np.ndarray, feature_names: list[str], method: str = "robust"
) -> FeatureNormalization:
    """Normalisation stats from control cells ``x_control: c x F`` (fallback scale from ``x_all``)."""
    if method not in _NORMALIZATION_METHODS:
        raise ValueError(f"normalization must be one of {_NORMALIZATION_METHODS}, got {method!r}")
    x_control = np.asarray(x_control, dtype=np.float64)
    if method == "robust":
        center = np.median(x_control, axis=0)
        q75, q25 = np.percentile(x_control, [75, 25], axis=0)
        scale = (q75 - q25) / _IQR_TO_SD
    else:
        center = x_control.mean(axis=0)
        scale = x_control.std(axis=0)
    tiny = scale < 1e-6 * (1.0 + np.abs(center))
    if tiny.any():
        fallback = np.asarray(x_all, dtype=np.float64)[:, tiny].std(axis=0)
        fallback[fallback < 1e-6 * (1.0 + np.abs(center[tiny]))] = 1.0
        scale = scale.copy()
        scale[tiny] = fallback
        log.info("normalisation: %d near-constant control features use a fallback scale", int(tiny.sum()))
    return FeatureNormalization(method, tuple(feature_names), center, scale)


@dataclass(frozen=True, eq=False)
class FeatureTrainingSet:
    """Per-cell training arrays for the feature assay (see module docstring for shapes)."""

    x: np.ndarray
    compound_index: np.ndarray
    log10_dose_um: np.ndarray
    plate_index: np.ndarray
    compound_ids: tuple[str, ...]
    fingerprints: np.ndarray
    plate_ids: tuple[str, ...]
    feature_names: tuple[str, ...]
    normalization: FeatureNormalization
    build_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c, f = self.x.shape
        for name in ("compound_index", "log10_dose_um", "plate_index"):
            if getattr(self, name).shape != (c,):
                raise ValueError(f"{name} must have shape ({c},), got {getattr(self, name).shape}")
        if len(self.feature_names) != f:
            raise ValueError(f"{len(self.feature_names)} feature names for {f} features")
        if self.fingerprints.shape != (len(self.compound_ids), FINGERPRINT_N_BYTES):
            raise ValueError(
                f"fingerprints must be {len(self.compound_ids)} x {FINGERPRINT_N_BYTES}, got {self.fingerprints.shape}"
            )
        object.__setattr__(self, "_fingerprint_cache", None)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_dataframe(
        cls,
        cells: pd.DataFrame,
        fingerprint_lookup: Mapping[str, np.ndarray],
        *,
        max_cells_per_well: int | None = None,
        seed: int = 0,
        normalization: str = "robust",
        feature_names: list[str] | None = None,
        source: str = "single-cell table",
    ) -> "FeatureTrainingSet":
        """Build from single-cell rows; ``source`` names the table in error messages.

        ``max_cells_per_well`` keeps at most that many cells per (plate, well), chosen
        uniformly at random with ``np.random.default_rng(seed)``.
        """
        _check_columns(cells, source)
        names = list(feature_names) if feature_names is not None else feature_columns(cells.columns)
        if not names:
            raise ValueError(f"{source}: no compartment-prefixed feature columns (Nuclei_*, Cells_*, Cytoplasm_*)")
        missing = [n for n in names if n not in cells.columns]
        if missing:
            raise ValueError(f"{source}: missing feature columns {missing[:5]}")
        if max_cells_per_well is not None:
            if max_cells_per_well < 1:
                raise ValueError(f"max_cells_per_well must be >= 1, got {max_cells_per_well}")
            cells = cap_cells_per_well(cells, max_cells_per_well, seed)

        x = _feature_matrix(cells, names, source)
        compound = cells[META_COMPOUND].astype(str).to_numpy()
        is_control = compound == CONTROL_COMPOUND_ID
        if not is_control.any():
            raise ValueError(f"{source}: no control cells ({META_COMPOUND} == {CONTROL_COMPOUND_ID!r}); "
                             "normalisation and predicted controls need them")
        compound_ids = tuple(sorted(set(compound[~is_control])))
        fingerprints = _lookup_fingerprints(compound_ids, fingerprint_lookup, cells, compound, source)
        # position in compound_ids; -1 (= CONTROL_INDEX) for DMSO, which is not in compound_ids
        compound_index = pd.Index(compound_ids, dtype=object).get_indexer(compound).astype(np.int64)
        log10_dose = _log10_doses(cells, is_control, source)
        plate = cells[META_PLATE].astype(str).to_numpy()
        plate_ids = tuple(sorted(set(plate)))
        plate_index = pd.Index(plate_ids, dtype=object).get_indexer(plate).astype(np.int64)

        norm = fit_normalization(x[is_control], x, names, normalization)
        options = {"max_cells_per_well": max_cells_per_well, "seed": seed, "normalization": normalization,
                   "source": source}
        log.info("%s: %d cells (%d control), %d compounds, %d plates, %d features",
                 source, len(x), int(is_control.sum()), len(compound_ids), len(plate_ids), len(names))
        return cls(x, compound_index, log10_dose, plate_index, compound_ids, fingerprints,
                   plate_ids, tuple(names), norm, options)

    # -- views -----------------------------------------------------------------------------------

    @property
    def n_cells(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_compounds(self) -> int:
        return len(self.compound_ids)

    def normalized_x(self) -> np.ndarray:
        """``float32 C x F`` features in control units."""
        return self.normalization.apply(self.x)

    @property
    def data_fingerprint(self) -> str:
        """sha256 (hex) of every array and vocabulary of the training set."""
        cached = getattr(self, "_fingerprint_cache", None)
        if cached is None:
            h = hashlib.sha256()
            for arr in (self.x, self.compound_index, self.log10_dose_um, self.plate_index, self.fingerprints,
                        self.normalization.center, self.normalization.scale):
                a = np.ascontiguousarray(arr)
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(a.tobytes())
            for vocab in (self.compound_ids, self.plate_ids, self.feature_names):
                h.update(json.dumps(list(vocab)).encode())
            h.update(self.normalization.method.encode())
            cached = h.hexdigest()
            object.__setattr__(self, "_fingerprint_cache", cached)
        return cached

    def bootstrap_cells(self, compound_draws: np.ndarray) -> np.ndarray:
        """Cell indices of a compound bootstrap.

        ``compound_draws`` is an ``n_compounds`` int array of resampled compound indices (draw it
        from the member's generator). Each drawn compound contributes all its cells,
        once per draw; control cells are always kept once. Returns ``int64`` indices.
        """
        order = np.argsort(self.compound_index, kind="stable")
        sorted_ci = self.compound_index[order]
        starts = np.searchsorted(sorted_ci, np.arange(-1, self.n_compounds), side="left")
        ends = np.searchsorted(sorted_ci, np.arange(-1, self.n_compounds), side="right")
        parts = [order[starts[0]:ends[0]]]  # controls
        for c in np.asarray(compound_draws, dtype=np.int64):
            parts.append(order[starts[c + 1]:ends[c + 1]])
        return np.concatenate(parts).astype(np.int64)


def _check_columns(cells: pd.DataFrame, source: str) -> None:
    required = [META_PLATE, META_WELL, META_COMPOUND, META_DOSE]
    missing = [c for c in required if c not in cells.columns]
    if missing:
        raise ValueError(f"{source}: missing metadata columns {missing}")
    if len(cells) == 0:
        raise ValueError(f"{source}: no cells")


def cap_cells_per_well(cells: pd.DataFrame, cap: int, seed: int | Sequence[int]) -> pd.DataFrame:
    """At most ``cap`` cells of each (plate, well), chosen uniformly at random (``seed``); a well
    with at most ``cap`` cells keeps them all."""
    keys = np.random.default_rng(seed).random(len(cells))
    rank = (
        pd.Series(keys, index=cells.index)
        .groupby([cells[META_PLATE].to_numpy(), cells[META_WELL].to_numpy()])
        .rank(method="first")
    )
    return cells.loc[rank.to_numpy() <= cap]


def _where(cells: pd.DataFrame, row: int) -> str:
    r = cells.iloc[row]
    return f"plate {r[META_PLATE]!s}, well {r[META_WELL]!s}"


def _feature_matrix(cells: pd.DataFrame, names: list[str], source: str) -> np.ndarray:
    try:
        x = cells[names].to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: feature columns must be numeric ({exc})") from exc
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"{source}: non-finite feature {names[col]!r} at {_where(cells, row)} "
            f"({int(bad.any(axis=1).sum())} cells affected); drop or impute them first"
        )
    return np.ascontiguousarray(x)


def _lookup_fingerprints(
    compound_ids: tuple[str, ...],
    lookup: Mapping[str, np.ndarray],
    cells: pd.DataFrame,
    compound: np.ndarray,
    source: str,
) -> np.ndarray:
    out = np.zeros((len(compound_ids), FINGERPRINT_N_BYTES), dtype=np.uint8)
    for i, cid in enumerate(compound_ids):
        if cid not in lookup:
            row = int(np.flatnonzero(compound == cid)[0])
            raise ValueError(f"{source}: no fingerprint for compound {cid!r} (first at {_where(cells, row)})")
        fp = np.asarray(lookup[cid])
        if fp.shape != (FINGERPRINT_N_BYTES,) or not (fp.dtype == np.uint8):
            raise ValueError(
                f"fingerprint of compound {cid!r} must be packed uint8 ({FINGERPRINT_N_BYTES},), "
                f"got {fp.dtype} {fp.shape}"
            )
        out[i] = fp
    return out


def _log10_doses(cells: pd.DataFrame, is_control: np.ndarray, source: str) -> np.ndarray:
    dose = pd.to_numeric(cells[META_DOSE], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~is_control & ~(np.isfinite(dose) & (dose > 0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{source}: {META_DOSE} must be > 0 for treated cells; got {cells[META_DOSE].iloc[row]!r} "
            f"at {_where(cells, row)}"
        )
    out = np.zeros(len(dose), dtype=np.float32)
    out[~is_control] = np.log10(dose[~is_control])
    return out
