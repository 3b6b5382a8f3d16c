"""Tests for models/training_data.py; also home of the synthetic single-cell table the
other feature-assay tests import (``from test_training_data import synthetic_cells``)."""

import numpy as np
import pandas as pd
import pytest

from models.training_data import CONTROL_INDEX, FeatureTrainingSet, fit_normalization

FEATURES = ["Nuclei_Intensity_MeanIntensity_DNA", "Cells_AreaShape_Area", "Cytoplasm_Texture_Contrast_Actin",
            "Nuclei_AreaShape_Eccentricity"]


def random_fingerprint(rng: np.random.Generator, density: float = 0.02) -> np.ndarray:
    return np.packbits(rng.random(2048) < density)


def synthetic_cells(
    shifts_sd: dict[str, float] | None = None,
    *,
    n_plates: int = 2,
    wells_per_compound: int = 2,
    n_dmso_wells: int = 4,
    cells_per_well: int = 60,
    dose_um: float = 10.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Single-cell table: DMSO cells ~ N(center, diag(scale^2)); compound c shifts feature 0 by
    ``shifts_sd[c]`` control standard deviations. Returns (cells, fingerprint lookup)."""
    shifts_sd = {"A": 3.0, "B": 0.0} if shifts_sd is None else shifts_sd
    rng = np.random.default_rng(seed)
    center = np.array([100.0, 500.0, 2.0, 0.5])
    scale = np.array([10.0, 50.0, 0.5, 0.1])
    rows = []
    for p in range(n_plates):
        plate = f"P{p + 1}"
        conditions = [("DMSO", 0.0, 0.0)] * n_dmso_wells
        for cid, shift in shifts_sd.items():
            conditions += [(cid, dose_um, shift)] * wells_per_compound
        for w, (cid, dose, shift) in enumerate(conditions):
            z = rng.normal(size=(cells_per_well, len(FEATURES)))
            z[:, 0] += shift
            x = center + scale * z
            frame = pd.DataFrame(x, columns=FEATURES)
            frame.insert(0, "Metadata_Plate", plate)
            frame.insert(1, "Metadata_Well", f"{'ABCDEFGH'[w // 12]}{w % 12 + 1:02d}")
            frame.insert(2, "Metadata_compound", cid)
            frame.insert(3, "Metadata_dose_um", dose)
            rows.append(frame)
    fps = {cid: random_fingerprint(rng) for cid in shifts_sd}
    return pd.concat(rows, ignore_index=True), fps


def test_builds_arrays_vocabularies_and_control_normalisation():
    cells, fps = synthetic_cells(cells_per_well=200)
    ts = FeatureTrainingSet.from_dataframe(cells, fps)
    assert ts.x.shape == (len(cells), 4) and ts.x.dtype == np.float32
    assert ts.feature_names == tuple(FEATURES)
    assert ts.compound_ids == ("A", "B") and ts.plate_ids == ("P1", "P2")
    assert ts.fingerprints.shape == (2, 256) and ts.fingerprints.dtype == np.uint8
    is_ctrl = cells["Metadata_compound"].to_numpy() == "DMSO"
    assert np.all(ts.compound_index[is_ctrl] == CONTROL_INDEX)
    assert np.allclose(ts.log10_dose_um[~is_ctrl], 1.0) and np.all(ts.log10_dose_um[is_ctrl] == 0)
    # robust stats on controls: median ~ center, IQR / 1.349 ~ sd
    assert np.allclose(ts.normalization.center, [100, 500, 2, 0.5], rtol=0.02)
    assert np.allclose(ts.normalization.scale, [10, 50, 0.5, 0.1], rtol=0.1)
    z = ts.normalized_x()
    a = ts.compound_index == ts.compound_ids.index("A")
    assert z[a, 0].mean() == pytest.approx(3.0, abs=0.2)
    assert np.allclose(ts.normalization.invert(z), ts.x, rtol=1e-5, atol=1e-4)


def test_normalisation_methods_and_constant_feature_fallback():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 3)) * [1, 2, 3] + [5, 6, 7]
    x[:, 2] = 4.0  # constant feature: scale falls back to 1
    norm = fit_normalization(x, x, ["a", "b", "c"], "standard")
    assert np.allclose(norm.center[:2], x[:, :2].mean(0)) and np.allclose(norm.scale[:2], x[:, :2].std(0))
    assert norm.scale[2] == 1.0
    robust = fit_normalization(x, x, ["a", "b", "c"], "robust")
    q75, q25 = np.percentile(x[:, 1], [75, 25])
    assert robust.scale[1] == pytest.approx((q75 - q25) / 1.349)
    with pytest.raises(ValueError, match="normalization"):
        fit_normalization(x, x, ["a", "b", "c"], "zscore")


def test_cap_cells_per_well_is_seeded_and_fingerprint_changes():
    cells, fps = synthetic_cells(cells_per_well=30)
    full = FeatureTrainingSet.from_dataframe(cells, fps)
    capped = FeatureTrainingSet.from_dataframe(cells, fps, max_cells_per_well=10, seed=1)
    again = FeatureTrainingSet.from_dataframe(cells, fps, max_cells_per_well=10, seed=1)
    other = FeatureTrainingSet.from_dataframe(cells, fps, max_cells_per_well=10, seed=2)
    n_wells = cells.groupby(["Metadata_Plate", "Metadata_Well"]).ngroups
    assert capped.n_cells == 10 * n_wells
    assert capped.data_fingerprint == again.data_fingerprint and np.array_equal(capped.x, again.x)
    assert len({full.data_fingerprint, capped.data_fingerprint, other.data_fingerprint}) == 3
    assert len(full.data_fingerprint) == 64


def test_bootstrap_cells_resamples_compounds_and_keeps_controls():
    cells, fps = synthetic_cells({"A": 1.0, "B": 0.0, "C": 2.0}, cells_per_well=5)
    ts = FeatureTrainingSet.from_dataframe(cells, fps)
    idx = ts.bootstrap_cells(np.array([0, 0, 2]))  # A twice, C once, B never
    ci = ts.compound_index[idx]
    n_per = {c: int((ts.compound_index == c).sum()) for c in (-1, 0, 1, 2)}
    assert (ci == -1).sum() == n_per[-1]
    assert (ci == 0).sum() == 2 * n_per[0] and (ci == 1).sum() == 0 and (ci == 2).sum() == n_per[2]


def test_narrow_errors_name_the_problem():
    cells, fps = synthetic_cells(cells_per_well=3)
    with pytest.raises(ValueError, match="no fingerprint for compound 'B'.*plate P1"):
        FeatureTrainingSet.from_dataframe(cells, {"A": fps["A"]})
    bad = cells.copy()
    bad.loc[bad.index[-1], FEATURES[1]] = np.nan
    with pytest.raises(ValueError, match="non-finite feature 'Cells_AreaShape_Area' at plate P2, well"):
        FeatureTrainingSet.from_dataframe(bad, fps, source="cells.parquet")
    bad = cells.copy()
    bad.loc[bad["Metadata_compound"] == "A", "Metadata_dose_um"] = 0.0
    with pytest.raises(ValueError, match="dose_um must be > 0.*plate P1, well"):
        FeatureTrainingSet.from_dataframe(bad, fps)
    with pytest.raises(ValueError, match="no control cells"):
        FeatureTrainingSet.from_dataframe(cells[cells["Metadata_compound"] != "DMSO"], fps)
    with pytest.raises(ValueError, match="missing metadata columns"):
        FeatureTrainingSet.from_dataframe(cells.drop(columns=["Metadata_Well"]), fps)
    with pytest.raises(ValueError, match="packed uint8"):
        FeatureTrainingSet.from_dataframe(cells, {"A": fps["A"], "B": np.unpackbits(fps["B"])})
