import numpy as np
import pandas as pd
import pytest

from lab_io.profiles import (
    MAD_SCALE,
    LeftOutControls,
    aggregate_wells,
    edge_gate_z,
    edge_offsets,
    is_edge_well,
    left_out_control_activity,
    subtract_edge_offsets,
    subsampled_wells,
    feature_select,
    normalize_to_controls,
    phenotypic_activity,
    unscaled_features,
)


def cells_table():
    return pd.DataFrame({
        "Metadata_Plate": ["P1"] * 5 + ["P2"] * 2,
        "Metadata_Well": ["A01", "A01", "A01", "A02", "A02", "A01", "A01"],
        "Metadata_compound": ["x", "x", "x", "DMSO", "DMSO", "y", "y"],
        "Metadata_Site": [1, 1, 2, 1, 1, 1, 2],
        "Nuclei_AreaShape_Area": [1.0, 2.0, 10.0, 4.0, 6.0, 3.0, 5.0],
        "Cells_Intensity_MeanIntensity_DNA": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    })


def test_aggregate_wells_median_and_counts():
    prof = aggregate_wells(cells_table())
    assert list(prof[["Metadata_Plate", "Metadata_Well"]].itertuples(index=False, name=None)) == [
        ("P1", "A01"), ("P1", "A02"), ("P2", "A01")]
    assert prof["Metadata_n_cells"].tolist() == [3, 2, 2]
    assert prof["Nuclei_AreaShape_Area"].tolist() == [2.0, 5.0, 4.0]
    assert prof["Metadata_compound"].tolist() == ["x", "DMSO", "y"]  # constant per well: kept
    assert "Metadata_Site" not in prof.columns  # varies within a well: dropped
    mean = aggregate_wells(cells_table(), how="mean")
    assert mean["Nuclei_AreaShape_Area"].tolist() == pytest.approx([13 / 3, 5.0, 4.0])
    with pytest.raises(ValueError, match="how"):
        aggregate_wells(cells_table(), how="max")


@pytest.mark.parametrize("how", ["median", "mean"])
def test_aggregate_wells_equals_pandas_groupby_with_missing_values(how):
    """The one-well-at-a-time reduction gives pandas' groupby (NaN skipped; a feature NaN in every
    cell of a well stays NaN), for float32 and float64 features."""
    rng = np.random.default_rng(3)
    n = 200
    cells = pd.DataFrame({"Metadata_Plate": rng.choice(["P2", "P1"], n), "Metadata_Well": rng.choice(["B02", "A01", "C10"], n),
                          "Cells_x": rng.normal(size=n), "Nuclei_y": rng.normal(size=n).astype(np.float32),
                          "Cytoplasm_z": rng.integers(0, 5, n)})
    cells.loc[rng.random(n) < 0.2, "Cells_x"] = np.nan
    cells.loc[(cells["Metadata_Plate"] == "P1") & (cells["Metadata_Well"] == "A01"), "Nuclei_y"] = np.nan
    feats = ["Cells_x", "Nuclei_y", "Cytoplasm_z"]
    grouped = cells.groupby(["Metadata_Plate", "Metadata_Well"], sort=True)
    expected = getattr(grouped[feats], how)().astype(np.float64)
    out = aggregate_wells(cells, how=how).set_index(["Metadata_Plate", "Metadata_Well"])
    pd.testing.assert_frame_equal(out[feats], expected, rtol=1e-6)
    assert out["Metadata_n_cells"].tolist() == grouped.size().tolist()
    assert np.isnan(out.loc[("P1", "A01"), "Nuclei_y"])


def test_robust_z_closed_form():
    rng = np.random.default_rng(0)
    prof = pd.DataFrame({"Metadata_Plate": ["P1"] * 6 + ["P2"] * 6, "Metadata_Well": [f"A{i:02d}" for i in range(1, 13)],
                         "Cells_X": rng.normal(size=12), "Nuclei_Y": rng.normal(5, 2, size=12)})
    ctrl = np.array([1, 1, 1, 0, 0, 0] * 2, dtype=bool)
    out = normalize_to_controls(prof, ctrl)
    for plate in ("P1", "P2"):
        rows = (prof["Metadata_Plate"] == plate).to_numpy()
        for col in ("Cells_X", "Nuclei_Y"):
            c = prof.loc[rows & ctrl, col].to_numpy()
            med = np.median(c)
            mad = np.median(np.abs(c - med))
            expected = (prof.loc[rows, col] - med) / (MAD_SCALE * mad)
            assert np.allclose(out.loc[rows, col], expected)
    assert out["Metadata_Well"].equals(prof["Metadata_Well"])
    std = normalize_to_controls(prof, ctrl, method="standardize")
    c = prof.loc[ctrl & (prof["Metadata_Plate"] == "P1").to_numpy(), "Cells_X"]
    assert std.loc[0, "Cells_X"] == pytest.approx((prof.loc[0, "Cells_X"] - c.mean()) / c.std(ddof=0))


def test_normalize_requires_controls_per_plate():
    prof = pd.DataFrame({"Metadata_Plate": ["P1", "P2"], "Metadata_Well": ["A01", "A01"], "Cells_X": [1.0, 2.0]})
    with pytest.raises(ValueError, match="P2"):
        normalize_to_controls(prof, [True, False])
    with pytest.raises(ValueError, match="shape"):
        normalize_to_controls(prof, [True])


def test_left_out_control_activity_scores_each_control_against_the_others():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(9, 3)) * [1, 5, 0.1], columns=["Cells_A", "Cells_B", "Nuclei_C"])
    df["Metadata_Plate"] = "P1"
    controls = np.array([True] * 6 + [False] * 3)
    got = left_out_control_activity(df, controls, ["Cells_A", "Cells_B", "Nuclei_C"])
    for i in range(6):  # reference: normalise to the other five controls, read well i
        others = controls.copy()
        others[i] = False
        z = normalize_to_controls(df, others, features=["Cells_A", "Cells_B", "Nuclei_C"])
        assert got[i] == pytest.approx(phenotypic_activity(z, ["Cells_A", "Cells_B", "Nuclei_C"])[i])
    df.loc[1:5, "Nuclei_C"] = 7.0  # the others of well 0 do not vary in C: left out of its mean square
    got = left_out_control_activity(df, controls, ["Cells_A", "Cells_B", "Nuclei_C"])
    z = normalize_to_controls(df, np.array([False] + [True] * 5 + [False] * 3), features=["Cells_A", "Cells_B"])
    assert got[0] == pytest.approx(phenotypic_activity(z, ["Cells_A", "Cells_B"])[0])


def test_left_out_controls_score_each_draw_against_the_controls_but_its_donor():
    """Reference: normalise the draws to the controls without their donor (``normalize_to_controls``);
    a feature the other controls do not vary in is left out, a draw with a missing value has none,
    and a donor that is no control well is refused by name."""
    rng = np.random.default_rng(1)
    feats = ["Cells_A", "Cells_B", "Nuclei_C"]
    controls = pd.DataFrame(rng.normal(size=(6, 3)) * [1, 5, 0.1], columns=feats)
    controls.insert(0, "Metadata_Well", [f"C{c:02d}" for c in range(3, 9)])
    controls.insert(0, "Metadata_Plate", "P1")
    draws = pd.DataFrame(rng.normal(size=(4, 3)) * [1, 5, 0.1], columns=feats)
    donors = ["C05", "C03", "C05", "C08"]
    got = LeftOutControls(controls, feats).activity(draws, donors)
    for i, donor in enumerate(donors):
        others = controls[controls["Metadata_Well"] != donor]
        both = pd.concat([others, draws.iloc[[i]].assign(Metadata_Plate="P1")], ignore_index=True)
        z = normalize_to_controls(both, np.arange(len(both)) < len(others), features=feats)
        assert got[i] == pytest.approx(phenotypic_activity(z, feats)[-1])
    assert not np.allclose(got, phenotypic_activity(normalize_to_controls(
        pd.concat([controls, draws.assign(Metadata_Plate="P1")], ignore_index=True),
        np.arange(10) < 6, features=feats), feats)[6:])  # all six controls give other activities
    controls.loc[controls["Metadata_Well"] != "C03", "Nuclei_C"] = 7.0  # C03's others do not vary in C
    draws.loc[3, "Cells_A"] = np.nan
    got = LeftOutControls(controls, feats).activity(draws, donors)
    others = controls[controls["Metadata_Well"] != "C03"]
    both = pd.concat([others, draws.iloc[[1]].assign(Metadata_Plate="P1")], ignore_index=True)
    z = normalize_to_controls(both, np.arange(6) < 5, features=feats[:2])
    assert got[1] == pytest.approx(phenotypic_activity(z, feats[:2])[-1])
    assert np.isnan(got[3]) and np.isfinite(got[[0, 1, 2]]).all()
    with pytest.raises(ValueError, match="D01"):
        LeftOutControls(controls, feats).activity(draws, ["C05", "C03", "C05", "D01"])


def test_phenotypic_activity_closed_form():
    z = np.array([[3.0, 4.0], [0.0, 0.0], [100.0, 0.0]])
    act = phenotypic_activity(z)
    assert act == pytest.approx([5 / np.sqrt(2), 0.0, 10 / np.sqrt(2)])
    assert phenotypic_activity(z, clip=None)[2] == pytest.approx(100 / np.sqrt(2))
    df = pd.DataFrame(z, columns=["Cells_A", "Nuclei_B"]).assign(Metadata_Well=["A01", "A02", "A03"])
    assert phenotypic_activity(df) == pytest.approx(act)


def test_control_wells_score_about_one_and_treatment_higher():
    rng = np.random.default_rng(3)
    n_ctrl, n_feat = 200, 50
    prof = pd.DataFrame(rng.normal(size=(n_ctrl + 1, n_feat)), columns=[f"Cells_F{i}" for i in range(n_feat)])
    prof.iloc[-1] += 3.0
    prof.insert(0, "Metadata_Plate", "P1")
    prof.insert(1, "Metadata_Well", [f"W{i}" for i in range(n_ctrl + 1)])
    mask = np.arange(n_ctrl + 1) < n_ctrl
    act = phenotypic_activity(normalize_to_controls(prof, mask))
    assert np.median(act[:n_ctrl]) == pytest.approx(0.95, abs=0.15)
    assert act[-1] > 2.5


def test_feature_select_drops_constant_nan_and_bookkeeping():
    table = pd.DataFrame({"Metadata_Well": ["A01", "A02", "A03"], "Cells_Good": [1.0, 2.0, 3.0],
                          "Cells_Constant": [1.0, 1.0, 1.0], "Nuclei_Nan": [1.0, np.nan, 2.0],
                          "Nuclei_AreaShape_Center_X": [1.0, 5.0, 9.0], "Cells_Parent_Nuclei": [1, 2, 3],
                          # object ids of real CellProfiler tables (a review found them used as features)
                          "Nuclei_Neighbors_FirstClosestObjectNumber_Adjacent": [2, 1, 2],
                          "Cells_Neighbors_SecondClosestObjectNumber_5": [3, 3, 1]})
    assert feature_select(table) == ["Cells_Good"]
    assert "Nuclei_AreaShape_Center_X" in feature_select(table, drop_bookkeeping=False)
    # pycytominer-style tolerance: one missing value in three is kept at a 0.4 cutoff, not at 0.3
    assert feature_select(table, max_nonfinite_fraction=0.4) == ["Cells_Good", "Nuclei_Nan"]
    assert feature_select(table, max_nonfinite_fraction=0.3) == ["Cells_Good"]


def test_normalize_to_controls_ignores_missing_values():
    prof = pd.DataFrame({"Metadata_Plate": "P1", "Cells_x": [1.0, 2.0, 3.0, np.nan, 7.0, np.inf]})
    mask = np.array([True, True, True, True, False, False])
    z = normalize_to_controls(prof, mask)["Cells_x"].to_numpy()
    expected = (7.0 - 2.0) / (1.4826 * 1.0 + 1e-6)  # median 2 and MAD 1 of the finite controls 1, 2, 3
    assert z[4] == pytest.approx(expected, rel=1e-3)
    assert np.isnan(z[3]) and np.isnan(z[5])  # missing stays missing


def test_a_feature_the_controls_do_not_vary_in_has_no_robust_z():
    """One plate's DMSO wells all read 207 (an integer background): (x - 207) / eps would be 1e6, so
    the plate's values are NaN there and the feature is reported; the other plate keeps its z."""
    prof = pd.DataFrame({"Metadata_Plate": ["P1"] * 4 + ["P2"] * 4,
                         "Cells_bg": [207.0, 207.0, 207.0, 208.0, 200.0, 202.0, 204.0, 210.0],
                         "Cells_ok": [1.0, 2.0, 3.0, 9.0, 1.0, 2.0, 3.0, 9.0]})
    mask = np.array([True, True, True, False] * 2)
    out = normalize_to_controls(prof, mask)
    assert out["Cells_bg"].iloc[:4].isna().all()
    assert out["Cells_bg"].iloc[7] == pytest.approx((210.0 - 202.0) / (MAD_SCALE * 2.0), rel=1e-3)
    assert np.isfinite(out["Cells_ok"]).all()
    assert unscaled_features(out, ["Cells_bg", "Cells_ok"]) == ["Cells_bg"]


def _plate_wells(shift: float, rng) -> pd.DataFrame:
    """All 384 wells of a plate: feature ``Cells_a`` is ``shift`` higher on the outer ring, ``Cells_b``
    is not, ``Cells_Location_Center_X`` is bookkeeping."""
    from lab_io.schema import well_name

    wells = [well_name(r, c) for r in range(16) for c in range(24)]
    edge = is_edge_well(wells)
    return pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": wells,
                         "Cells_a": rng.normal(size=384) + shift * edge, "Cells_b": rng.normal(size=384),
                         "Cells_Location_Center_X": rng.uniform(0, 1000, 384).astype(np.float32)})


def test_edge_wells_are_the_outer_ring_of_a_384_well_plate():
    assert is_edge_well(["A01", "A12", "P24", "B1", "b24", "H01", "B02", "O23", "H12"]).tolist() == \
        [True, True, True, True, True, True, False, False, False]
    from lab_io.schema import well_name

    assert is_edge_well([well_name(r, c) for r in range(16) for c in range(24)]).sum() == 2 * 24 + 2 * 14


def test_edge_offsets_are_the_edge_minus_interior_medians_and_are_subtracted_from_edge_rows_only():
    rng = np.random.default_rng(0)
    wells = _plate_wells(3.0, rng)
    edge = is_edge_well(wells["Metadata_Well"].tolist())
    reference = np.ones(384, bool)
    reference[:5] = False  # e.g. positive controls: left out of the estimate
    offsets = edge_offsets(wells, reference, ["Cells_a", "Cells_b"], alpha=None)
    for col in ("Cells_a", "Cells_b"):  # closed form: the two medians' difference
        values = wells[col].to_numpy()
        assert offsets[col] == pytest.approx(np.median(values[reference & edge]) - np.median(values[reference & ~edge]))
    assert offsets["Cells_a"] == pytest.approx(3.0, abs=0.5) and 0 < abs(offsets["Cells_b"]) < 0.5
    # by default an offset within edge_gate_z standard errors of the medians' difference is noise: 0
    se = np.sqrt(np.pi / 2) * np.sqrt(sum(
        (MAD_SCALE * np.median(np.abs(v - np.median(v)))) ** 2 / len(v)
        for v in (wells["Cells_b"].to_numpy()[reference & edge], wells["Cells_b"].to_numpy()[reference & ~edge])))
    gated = edge_offsets(wells, reference, ["Cells_a", "Cells_b"])
    assert abs(offsets["Cells_b"]) < edge_gate_z(2, dof=75) * se and gated["Cells_b"] == 0.0
    assert gated["Cells_a"] == offsets["Cells_a"]
    corrected = subtract_edge_offsets(wells, offsets)
    assert list(corrected.columns) == list(wells.columns)
    np.testing.assert_allclose(corrected.loc[edge, "Cells_a"], wells.loc[edge, "Cells_a"] - offsets["Cells_a"])
    pd.testing.assert_frame_equal(corrected[~edge], wells[~edge])
    pd.testing.assert_series_equal(corrected["Cells_Location_Center_X"], wells["Cells_Location_Center_X"])
    again = edge_offsets(corrected, reference, ["Cells_a", "Cells_b"], alpha=None)  # nothing left to remove
    np.testing.assert_allclose(again.to_numpy(), 0.0, atol=1e-12)
    # float32 single cells stay float32; an integer feature becomes float64 and keeps the offset;
    # a plate with an empty edge has nothing to estimate from
    cells = wells.astype({"Cells_a": np.float32})
    assert subtract_edge_offsets(cells, offsets)["Cells_a"].dtype == np.float32
    counts = wells.assign(Cells_b=np.arange(384))
    shifted = subtract_edge_offsets(counts, pd.Series({"Cells_b": 0.25}))["Cells_b"]
    assert shifted.dtype == np.float64 and shifted[edge].tolist() == (np.arange(384)[edge] - 0.25).tolist()
    assert edge_offsets(wells, ~edge, ["Cells_a"]) is None
    assert edge_offsets(wells, reference & (~edge | (np.cumsum(edge) <= 7)), ["Cells_a"]) is None  # 7 < 8 edge wells


def test_the_edge_gate_is_a_bonferroni_bound_and_skips_features_without_spread():
    """With no edge effect, about ``alpha`` of plates get any feature corrected, whatever the feature
    count (3.5 standard errors for 100 features, 4.45 for 5,800); a discrete feature whose MAD is 0 on
    a side has no standard error and is never corrected."""
    assert edge_gate_z(100) == pytest.approx(3.48, abs=0.01) and edge_gate_z(5800) == pytest.approx(4.45, abs=0.01)
    assert edge_gate_z(300, dof=10) == pytest.approx(5.83, abs=0.01)  # few wells: Student's t
    rng = np.random.default_rng(1)
    corrected_plates = 0
    for _ in range(40):
        wells = _plate_wells(0.0, rng).drop(columns=["Cells_a", "Cells_b"])
        noise = pd.DataFrame(rng.normal(size=(384, 300)), columns=[f"Cells_n{j}" for j in range(300)])
        wells = pd.concat([wells, noise], axis=1)
        corrected_plates += bool(edge_offsets(wells, np.ones(384, bool), list(noise.columns)).any())
    assert corrected_plates <= 6  # expected about 2 of 40
    wells = _plate_wells(0.0, rng)
    wells["Cells_flag"] = (rng.random(384) < 0.2).astype(float) + 0.5 * is_edge_well(wells["Metadata_Well"].tolist())
    assert edge_offsets(wells, np.ones(384, bool), ["Cells_flag"])["Cells_flag"] == 0.0  # MAD 0 on both sides


def test_subsampled_wells_medians_of_drawn_cells():
    """All of a well's cells drawn: its median profile; fewer: the median of some of its cells;
    wells with too few cells give no rows; the same generator seed gives the same draws."""
    rng = np.random.default_rng(0)
    cells = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": ["A01"] * 9 + ["B02"] * 3,
                          "Cells_a": rng.normal(size=12), "Cells_b": rng.normal(size=12)})
    whole = subsampled_wells(cells, ["A01", "B02"], 3, 2, np.random.default_rng(1))
    b02 = cells[cells.Metadata_Well == "B02"][["Cells_a", "Cells_b"]].median().to_numpy()
    np.testing.assert_allclose(whole[whole.Metadata_Well == "B02"][["Cells_a", "Cells_b"]].to_numpy(), [b02, b02])
    assert list(whole.Metadata_Well) == ["A01", "A01", "B02", "B02"] and (whole.Metadata_n_cells == 3).all()
    a01 = cells[cells.Metadata_Well == "A01"]["Cells_a"].to_numpy()
    drawn = whole[whole.Metadata_Well == "A01"]["Cells_a"].to_numpy()
    assert all(np.any(np.isclose(d, a01)) for d in drawn)  # the median of 3 values is one of them
    assert len(subsampled_wells(cells, ["A01", "B02"], 5, 2, np.random.default_rng(1))) == 2  # B02 has 3
    pd.testing.assert_frame_equal(whole, subsampled_wells(cells, ["A01", "B02"], 3, 2, np.random.default_rng(1)))
    with pytest.raises(ValueError, match="n_cells and draws"):
        subsampled_wells(cells, ["A01"], 0, 1, rng)


def _edge_plate(edge_columns: dict, inside_columns: dict) -> pd.DataFrame:
    """A full 384-well plate whose features take ``edge_columns[f]`` (76 values, in ring order) on the
    outer ring and ``inside_columns[f]`` (308 values) inside it."""
    from lab_io.schema import well_name

    wells = [well_name(r, c) for r in range(16) for c in range(24)]
    edge = is_edge_well(wells)
    table = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": wells})
    for f in edge_columns:
        values = np.empty(384)
        values[edge], values[~edge] = edge_columns[f], inside_columns[f]
        table[f] = values
    return table


def _centred(rng, n: int) -> np.ndarray:
    z = rng.normal(size=n)
    return z - np.median(z)  # median exactly 0


def test_the_edge_gate_standard_error_weights_each_side_by_its_own_well_count():
    """Closed form of the gate with unequal sides: 76 edge wells with a wide spread, 308 interior wells
    with a narrow one, so ``s_edge^2 / n_edge`` dominates the standard error. An offset 0.8 of the gate
    is set to 0, one 1.25 of it is kept whole (pairing each side's spread with the other's count
    would let the first through)."""
    rng = np.random.default_rng(5)
    z_edge, z_inside = _centred(rng, 76), _centred(rng, 308)
    s_edge_true, s_inside_true = 4.0, 0.5

    def robust(v):
        return MAD_SCALE * np.median(np.abs(v - np.median(v)))

    s_e, s_i = robust(s_edge_true * z_edge), robust(s_inside_true * z_inside)
    threshold = edge_gate_z(2, dof=75) * np.sqrt(np.pi / 2) * np.sqrt(s_e ** 2 / 76 + s_i ** 2 / 308)
    wells = _edge_plate({"Cells_below": 0.8 * threshold + s_edge_true * z_edge,
                         "Cells_above": 1.25 * threshold + s_edge_true * z_edge},
                        {"Cells_below": s_inside_true * z_inside, "Cells_above": s_inside_true * z_inside})
    offsets = edge_offsets(wells, np.ones(384, bool), ["Cells_below", "Cells_above"])
    assert offsets["Cells_below"] == 0.0
    assert offsets["Cells_above"] == pytest.approx(1.25 * threshold, rel=1e-9)


def test_a_feature_without_spread_on_one_side_only_is_never_corrected():
    """The edge wells all read one value (MAD 0 there) while the interior varies: the difference of
    medians has no standard error on the edge side, so no offset is kept however large it is."""
    rng = np.random.default_rng(6)
    wells = _edge_plate({"Cells_flat_edge": np.full(76, 5.0), "Cells_flat_inside": rng.normal(size=76)},
                        {"Cells_flat_edge": rng.normal(size=308), "Cells_flat_inside": np.full(308, -5.0)})
    offsets = edge_offsets(wells, np.ones(384, bool), ["Cells_flat_edge", "Cells_flat_inside"])
    assert offsets.tolist() == [0.0, 0.0]
    ungated = edge_offsets(wells, np.ones(384, bool), ["Cells_flat_edge", "Cells_flat_inside"], alpha=None)
    assert abs(ungated["Cells_flat_edge"]) > 4 and abs(ungated["Cells_flat_inside"]) > 4  # large, yet not kept
