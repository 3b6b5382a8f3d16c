"""Pycytominer-style well profiles: aggregate single cells, normalise to controls, score activity.

* :func:`aggregate_wells` — one row per (``Metadata_Plate``, ``Metadata_Well``): the median (or
  mean) of each feature over the well's cells, plus ``Metadata_n_cells``; other ``Metadata_*``
  columns constant within a well are carried along.
* :func:`normalize_to_controls` — per plate (``by``), robust z-score against the plate's control
  wells: ``z = (x - median_ctrl) / (1.4826 * MAD_ctrl + eps)`` where ``MAD_ctrl`` is the median
  absolute deviation of the control wells (1.4826 * MAD estimates the standard deviation of a
  normal distribution), or ``method="standardize"``: ``(x - mean_ctrl) / (std_ctrl + eps)``.
* :func:`phenotypic_activity` — ``||clip(z, -clip, clip)||_2 / sqrt(n_features)``: the RMS of the
  normalised profile; a control-like well scores about 1, a strong phenotype far above.
* :func:`edge_offsets` / :func:`subtract_edge_offsets` — the plate edge effect: outer-ring wells
  (rows A and P, columns 1 and 24 of a 384-well plate) evaporate faster and are imaged dimmer and
  sparser, so their profiles shift. Per feature, ``offset = median(edge wells) - median(interior
  wells)`` over the plate's reference wells (DMSO and inactive treatments: the layout puts
  compounds on random wells, so their medians differ by the position effect alone), kept only
  beyond :func:`edge_gate_z` standard errors of that difference (a Bonferroni bound over the
  plate's features), then subtracted from every edge well
  (and from its single cells: a constant per feature shifts a well's median by exactly that
  constant). Too few reference wells on either side (fewer than
  ``EDGE_MIN_WELLS``, e.g. a plate with an empty edge) -> no correction.
* :func:`feature_select` — drop NaN, constant and non-biological columns (object/image
  bookkeeping such as ``*_Center_X``, ``*_Location_*``, ``*_Number_Object_Number``, ``*_Parent_*``,
  ``*_Children_*``, as pycytominer's blocklist does).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from lab_io.schema import META_PLATE, META_WELL, N_COLS, N_ROWS, feature_columns, parse_well

META_N_CELLS = "Metadata_n_cells"
MAD_SCALE = 1.4826
CONSTANT_RELATIVE_SD = 1e-12  # a column whose sd is this small against its values is constant up to rounding
_BOOKKEEPING = ("_Center_", "_Location_", "_Number_Object_Number", "_Parent_", "_Children_", "_ObjectNumber",
                "ClosestObjectNumber", "_BoundingBox", "_Orientation")  # Neighbors_FirstClosestObjectNumber_*: ids


def _features(table: pd.DataFrame, features: Sequence[str] | None) -> list[str]:
    cols = list(features) if features is not None else feature_columns(table.columns)
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise ValueError(f"feature columns not in table: {missing[:5]}")
    if not cols:
        raise ValueError("no feature columns (expected Nuclei_*, Cells_*, Cytoplasm_*)")
    return cols


def aggregate_wells(cells: pd.DataFrame, features: Sequence[str] | None = None, how: str = "median") -> pd.DataFrame:
    """Single cells -> one row per (Metadata_Plate, Metadata_Well) with ``Metadata_n_cells``.

    ``how``: ``"median"`` (pycytominer default) or ``"mean"``. Extra ``Metadata_*`` columns that
    are constant within every well are kept.
    """
    if how not in ("median", "mean"):
        raise ValueError(f"how must be 'median' or 'mean', got {how!r}")
    for col in (META_PLATE, META_WELL):
        if col not in cells.columns:
            raise ValueError(f"cells table has no {col} column")
    feats = _features(cells, features)
    keys = [META_PLATE, META_WELL]
    grouped = cells.groupby(keys, sort=True)
    out = _reduce_groups(cells, feats, grouped, how)
    out.insert(0, META_N_CELLS, grouped.size())
    extra = [c for c in cells.columns if c.startswith("Metadata_") and c not in keys and c != META_N_CELLS]
    if extra:
        nunique = grouped[extra].nunique(dropna=False)
        constant = [c for c in extra if (nunique[c] <= 1).all()]
        if constant:
            out = grouped[constant].first().join(out)
    return out.reset_index()


def _cell_block(cells: pd.DataFrame, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``cells.iloc[rows, positions]`` as float64, rows taken first: pandas takes a scattered set of
    columns from the plate's one feature block column by column, about 1 s for a real plate's
    ~5,700 features whatever the rows; from the few rows' frame it takes 2 ms."""
    return cells.iloc[rows].iloc[:, positions].to_numpy(dtype=np.float64)


def _reduce_groups(cells: pd.DataFrame, feats: list[str], grouped, how: str) -> pd.DataFrame:
    """Per-group median (or mean) of ``feats`` skipping NaN, as ``grouped[feats].median()`` gives,
    one group's rows at a time: pandas' groupby first copies every feature column to float64, which
    for a real plate's ~500,000 cells x ~5,700 features is two more copies of the plate."""
    reduce = np.nanmedian if how == "median" else np.nanmean
    positions = cells.columns.get_indexer(feats)
    sizes = grouped.size()
    indices = grouped.indices
    values = np.empty((len(sizes), len(feats)), dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature NaN in every cell of a well stays NaN
        for i, key in enumerate(sizes.index):
            block = _cell_block(cells, indices[key], positions)
            values[i] = reduce(block, axis=0)
    return pd.DataFrame(values, index=sizes.index, columns=feats)


def subsampled_wells(cells: pd.DataFrame, wells: Sequence[str], n_cells: int, draws: int,
                     rng: np.random.Generator, features: Sequence[str] | None = None) -> pd.DataFrame:
    """What ``wells`` would have measured with ``n_cells`` cells: for each well, ``draws`` median
    profiles of ``n_cells`` of its cells drawn without replacement (``cells``: one plate's single
    cells). Rows carry ``Metadata_Plate``, ``Metadata_Well`` and ``Metadata_n_cells`` = ``n_cells``;
    a well with fewer than ``n_cells`` cells gives no rows."""
    if n_cells < 1 or draws < 1:
        raise ValueError(f"n_cells and draws must be >= 1, got {n_cells} and {draws}")
    feats = _features(cells, features)
    positions = cells.columns.get_indexer(feats)
    indices = cells.groupby(META_WELL, sort=True).indices
    rows, values = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature NaN in every drawn cell stays NaN
        for well in wells:
            members = indices.get(well, np.zeros(0, dtype=int))
            if len(members) < n_cells:
                continue
            for _ in range(draws):
                block = _cell_block(cells, rng.choice(members, n_cells, replace=False), positions)
                values.append(np.nanmedian(block, axis=0))
                rows.append((cells[META_PLATE].iloc[members[0]], well))
    out = pd.DataFrame(np.asarray(values, dtype=np.float64).reshape(len(values), len(feats)), columns=feats)
    out.insert(0, META_N_CELLS, n_cells)
    out.insert(0, META_WELL, [w for _, w in rows])
    out.insert(0, META_PLATE, [p for p, _ in rows])
    return out


def normalize_to_controls(profiles: pd.DataFrame, control_mask, by: str | None = META_PLATE,
                          method: str = "robust_z", features: Sequence[str] | None = None,
                          eps: float = 0.0) -> pd.DataFrame:
    """Normalise each feature to the control wells of its group (plate), see module docstring.

    control_mask: boolean array/Series aligned with ``profiles`` rows. Every group must contain
    at least one control well (ValueError naming the group otherwise). Returns a copy with the
    features replaced by normalised values; metadata columns untouched. A feature whose control
    wells in a group all share one value (MAD or sd 0, e.g. an integer background intensity) is
    NaN in that group: no control scale exists to express it in (:func:`unscaled_features`).
    ``eps`` (default 0) is added to every scale; any ``eps > 0`` makes the result depend on the
    features' units (a feature measured in small units would be shrunk towards 0).
    """
    if method not in ("robust_z", "standardize"):
        raise ValueError(f"method must be 'robust_z' or 'standardize', got {method!r}")
    feats = _features(profiles, features)
    mask = np.asarray(control_mask, dtype=bool)
    if mask.shape != (len(profiles),):
        raise ValueError(f"control_mask has shape {mask.shape}, expected ({len(profiles)},)")
    values = _finite_or_nan(profiles[feats].to_numpy(dtype=np.float64))  # a missing value stays missing, and is ignored
    result = np.empty_like(values)
    groups = profiles[by].to_numpy() if by is not None else np.zeros(len(profiles))
    for group in pd.unique(groups):
        rows = groups == group
        ctrl = values[rows & mask]
        if ctrl.shape[0] == 0:
            raise ValueError(f"{by or 'table'} {group!r} has no control wells to normalise to")
        with warnings.catch_warnings():  # an all-missing column gives NaN, which feature_select drops
            warnings.simplefilter("ignore", RuntimeWarning)
            if method == "robust_z":
                center = np.nanmedian(ctrl, axis=0)
                scale = MAD_SCALE * np.nanmedian(np.abs(ctrl - center), axis=0)
            else:
                center = np.nanmean(ctrl, axis=0)
                scale = np.nanstd(ctrl, axis=0)
        # a feature the group's controls do not vary in at all has no control scale: its z is
        # undefined (NaN), not (x - median) / eps, which reached 1e6 for integer-valued features
        scale = np.where(scale > 0, scale, np.nan)
        result[rows] = (values[rows] - center) / (scale + eps)
    # one block for the features, the columns in their order: assigning ~5,800 columns one by one
    # (``out[feats] = result``) took about 0.5 s a call on a real plate's well table
    normalised = pd.DataFrame(result, columns=feats, index=profiles.index)
    return pd.concat([profiles.drop(columns=feats), normalised], axis=1)[list(profiles.columns)]


EDGE_MIN_WELLS = 8  # reference wells needed on the edge ring and inside it to estimate the edge offset
EDGE_ALPHA = 0.05  # chance that any feature of a plate without an edge effect is corrected (edge_offsets)


def is_edge_well(wells: Sequence[str]) -> np.ndarray:
    """bool per well: on the outer ring of a 384-well plate (rows A and P, columns 1 and 24)."""
    names = pd.Series(list(wells), dtype=object)
    ring = {}
    for well in names.unique():  # a plate has 384 names however many cells it has
        row, col = parse_well(well)
        ring[well] = row in (0, N_ROWS - 1) or col in (0, N_COLS - 1)
    return names.map(ring).to_numpy(dtype=bool)


def robust_sd(values: np.ndarray) -> np.ndarray:
    """Per column of ``n x F`` values, 1.4826 x the median absolute deviation from the median (NaN
    ignored; a column with no finite value gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return MAD_SCALE * np.nanmedian(np.abs(values - np.nanmedian(values, axis=0)), axis=0)


def edge_gate_z(n_features: int, alpha: float = EDGE_ALPHA, dof: int | None = None) -> float:
    """The standard errors an edge offset must exceed so that, with no edge effect, any of
    ``n_features`` passes with probability about ``alpha`` (two-sided, Bonferroni): the normal
    quantile (3.5 for 100 features, 4.45 for 5,800), or with ``dof`` Student's t (the medians and
    MADs of few wells have heavier tails: 11 edge wells and 300 features need 5.8)."""
    from scipy import stats

    tail = alpha / (2 * max(n_features, 1))
    return float(stats.norm.isf(tail) if dof is None else stats.t.isf(tail, max(dof, 1)))


def edge_offsets(wells: pd.DataFrame, reference_mask, features: Sequence[str] | None = None,
                 min_wells: int = EDGE_MIN_WELLS, alpha: float | None = EDGE_ALPHA) -> pd.Series | None:
    """One plate's edge effect per feature: the median of the reference edge wells minus the
    median of the reference interior wells (NaN values ignored; a feature missing on either side
    gets 0). ``reference_mask``: bool per row, the wells to estimate it from (leave out positive
    controls, wells without cells and, where known, active wells: the medians assume the
    reference wells differ by position only). None when either side has fewer than ``min_wells``.

    ``alpha``: a feature's offset is kept only beyond :func:`edge_gate_z` standard errors (Student's
    t with the smaller side's wells less one degrees of freedom) of the difference of two medians,
    ``sqrt(pi / 2) * sqrt(s_edge^2 / n_edge + s_inside^2 / n_inside)`` with ``s`` each side's robust sd (1.4826 MAD), else 0, so a plate without an edge effect is
    corrected in no feature with probability about ``1 - alpha`` however many features it has; a
    feature whose MAD is 0 on either side (a discrete feature, most wells one value) has no
    standard error and gets 0. None keeps every offset."""
    feats = _features(wells, features)
    mask = np.asarray(reference_mask, dtype=bool)
    if mask.shape != (len(wells),):
        raise ValueError(f"reference_mask has shape {mask.shape}, expected ({len(wells)},)")
    edge = is_edge_well(wells[META_WELL].tolist())
    on_edge, inside = mask & edge, mask & ~edge
    if on_edge.sum() < min_wells or inside.sum() < min_wells:
        return None
    values = wells[feats].to_numpy(dtype=np.float64)
    values = np.where(np.isfinite(values), values, np.nan)
    with warnings.catch_warnings():  # a feature missing on one side: no estimate, no correction
        warnings.simplefilter("ignore", RuntimeWarning)
        medians = [np.nanmedian(values[side], axis=0) for side in (on_edge, inside)]
        offset = medians[0] - medians[1]
        if alpha is not None:
            spread = [robust_sd(values[side]) for side in (on_edge, inside)]
            counts = [np.sum(np.isfinite(values[side]), axis=0) for side in (on_edge, inside)]
            stderr = np.sqrt(np.pi / 2) * np.sqrt(spread[0] ** 2 / counts[0] + spread[1] ** 2 / counts[1])
            estimable = (spread[0] > 0) & (spread[1] > 0)
            gate = edge_gate_z(len(feats), alpha, dof=int(min(on_edge.sum(), inside.sum())) - 1)
            offset = np.where(estimable & (np.abs(offset) > gate * stderr), offset, 0.0)
    return pd.Series(np.nan_to_num(offset, nan=0.0), index=feats, name="edge_offset")


def subtract_edge_offsets(table: pd.DataFrame, offsets: pd.Series) -> pd.DataFrame:
    """A copy of ``table`` (wells or single cells, with ``Metadata_Well``) with ``offsets``
    subtracted from the features of its edge-well rows. float32 features stay float32 (a plate's
    single cells); any other feature becomes float64, so an integer-valued one keeps the offset."""
    edge = is_edge_well(table[META_WELL].tolist())
    if not edge.any():
        return table.copy()
    feats = list(offsets.index)
    single = all(table[f].dtype == np.float32 for f in feats)  # a plate's cells: one float32 block, kept so
    block = table[feats].to_numpy(dtype=np.float32 if single else np.float64, copy=True)
    block[edge] -= offsets.to_numpy(dtype=np.float64).astype(block.dtype)
    corrected = pd.DataFrame(block, columns=feats, index=table.index, copy=False)
    if not single:
        corrected = corrected.astype({f: np.float32 if table[f].dtype == np.float32 else np.float64 for f in feats})
    return pd.concat([table.drop(columns=feats), corrected], axis=1)[list(table.columns)]


def unscaled_features(normalized: pd.DataFrame, features: Sequence[str]) -> list[str]:
    """Features of a :func:`normalize_to_controls` output with a missing value (where every input
    value was finite, these are the features some group's controls do not vary in)."""
    values = normalized[list(features)].to_numpy(dtype=np.float64)
    return [f for f, ok in zip(features, np.isfinite(values).all(axis=0)) if not ok]


def phenotypic_activity(normalized: pd.DataFrame | np.ndarray, features: Sequence[str] | None = None,
                        clip: float | None = 10.0) -> np.ndarray:
    """``||clip(z)||_2 / sqrt(F)`` per row of normalised profiles (``N`` x ``F`` -> ``N``)."""
    if isinstance(normalized, pd.DataFrame):
        z = normalized[_features(normalized, features)].to_numpy(dtype=np.float64)
    else:
        z = np.asarray(normalized, dtype=np.float64)
        if z.ndim != 2:
            raise ValueError(f"normalized must be N x F, got shape {z.shape}")
    if clip is not None:
        z = np.clip(z, -clip, clip)
    return np.sqrt(np.sum(z * z, axis=1) / max(z.shape[1], 1))


def left_out_control_activity(profiles: pd.DataFrame, control_mask, features: Sequence[str],
                               clip: float | None = 10.0) -> np.ndarray:
    """``phenotypic_activity`` of each control well (rows of ``control_mask``) in robust z against
    the *other* control wells' median and MAD: what it would score as a sample. Against statistics
    it helped set, a control well scores low (16 DMSO wells of real CellProfiler tables with 5,400
    features: 1.27 against 1.51 left out), so a threshold taken from those activities calls
    DMSO-like wells hits far above its nominal rate. A feature the other controls do not vary in
    is left out of that well's mean square."""
    mask = np.asarray(control_mask, dtype=bool)
    values = _finite_or_nan(profiles.loc[mask, list(features)].to_numpy(dtype=np.float64))
    out = np.full(len(values), np.nan)
    for i in range(len(values)):
        center, scale = _left_out_statistics(values, i)
        z = (values[i] - center) / np.where(scale > 0, scale, np.nan)
        z = z[np.isfinite(z)]
        if len(z):
            out[i] = phenotypic_activity(z.reshape(1, -1), clip=clip)[0]
    return out


class LeftOutControls:
    """A plate's control wells (rows of ``controls``, one per ``Metadata_Well``) as the reference
    for samples drawn from them: :meth:`activity` scores each sample in robust z against the control
    wells other than its donor, what it would score as a sample, as :func:`left_out_control_activity`
    measures the control wells themselves (against statistics its own donor helped set, a draw
    scores low). Each well's left-out centre and scale are computed once, on first use."""

    def __init__(self, controls: pd.DataFrame, features: Sequence[str]) -> None:
        self.features = list(features)
        self._position = {well: i for i, well in enumerate(controls[META_WELL].tolist())}
        self._values = _finite_or_nan(controls[self.features].to_numpy(dtype=np.float64))
        self._statistics: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def activity(self, samples: pd.DataFrame, donors: Sequence[str], clip: float | None = 10.0) -> np.ndarray:
        """Activity per row of ``samples`` (``donors``: its control well, aligned). A feature the
        other controls do not vary in is left out of the mean square; a sample with a missing
        value in any other feature gets NaN (no activity). ValueError names a donor that is no
        control well."""
        donors = np.asarray(list(donors), dtype=object)
        if len(donors) != len(samples):
            raise ValueError(f"{len(donors)} donors for {len(samples)} samples")
        drawn = _finite_or_nan(samples[self.features].to_numpy(dtype=np.float64))
        out = np.full(len(samples), np.nan)
        for donor in pd.unique(donors):
            center, scale = self._left_out(donor)
            scaled = np.isfinite(center) & (scale > 0)  # the other controls give the feature a centre and a scale
            rows = np.flatnonzero(donors == donor)
            z = (drawn[rows][:, scaled] - center[scaled]) / scale[scaled]
            complete = np.isfinite(z).all(axis=1)
            if z.shape[1]:
                out[rows[complete]] = phenotypic_activity(z[complete], clip=clip)
        return out

    def _left_out(self, donor: str) -> tuple[np.ndarray, np.ndarray]:
        if donor not in self._position:
            raise ValueError(f"donor well {donor} is not among the control wells")
        if donor not in self._statistics:
            self._statistics[donor] = _left_out_statistics(self._values, self._position[donor])
        return self._statistics[donor]


def _left_out_statistics(values: np.ndarray, left_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the median and robust sd of the rows of ``values`` (wells x features, NaN where
    missing) other than row ``left_out``."""
    others = np.delete(values, left_out, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature missing in every other well
        center = np.nanmedian(others, axis=0)
    return center, robust_sd(others)


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    """``values`` with every infinite value made NaN (missing)."""
    return np.where(np.isfinite(values), values, np.nan)


def feature_select(table: pd.DataFrame, features: Sequence[str] | None = None, *,
                   drop_bookkeeping: bool = True, min_std: float = 0.0,
                   max_nonfinite_fraction: float = 0.0) -> list[str]:
    """Feature columns worth modelling: not bookkeeping, at most ``max_nonfinite_fraction`` of
    the rows missing or infinite (default: none; pycytominer's ``drop_na_columns`` uses 0.05),
    and not constant over their finite values. Constant means a spread (sd) of at most
    ``CONSTANT_RELATIVE_SD`` of the column's largest magnitude, or at most ``min_std``: both
    independent of the feature's units unless ``min_std > 0`` (a feature in small units, e.g.
    intensities scaled to 1e-6, is a feature like any other)."""
    feats = _features(table, features)
    keep = []
    for col in feats:
        if drop_bookkeeping and any(tag in col for tag in _BOOKKEEPING):
            continue
        values = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)
        finite = np.isfinite(values)
        if finite.sum() < 2 or 1.0 - finite.mean() > max_nonfinite_fraction:
            continue
        spread, magnitude = np.std(values[finite]), np.max(np.abs(values[finite]))
        if spread <= min_std or spread <= CONSTANT_RELATIVE_SD * magnitude:
            continue
        keep.append(col)
    return keep
