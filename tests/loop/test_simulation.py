"""Lookup-table backtests on real-shaped profile tables."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lab_io.profile_table import ProfileTable, convert_bbbc021, read_profile_table
from loop.simulation import (HIT_QUANTILE, LookupBacktestConfig, _pick, build_lookup_lab, random_expected_fraction,
                             run_lookup_backtest)

SMILES = ["CCO", "CCN", "CCCl", "c1ccccc1O", "c1ccccc1N", "CC(=O)O", "CC(=O)N", "c1ccncc1", "C1CCCCC1O",
          "OC(=O)c1ccccc1", "Nc1ccc(Cl)cc1", "COc1ccccc1"]
SHARED = Path(os.environ.get("LOOP_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))


def _table(tmp_path, rng=np.random.default_rng(0)):
    rows = []
    for plate in ("P1", "P2", "P3"):
        for i in range(6):
            rows.append(dict(Metadata_Plate=plate, Metadata_Well=f"A{i + 1:02d}", Metadata_compound="DMSO",
                             Metadata_smiles="CS(C)=O", Metadata_dose_um=0.0, shift=0.0))
        for j, smi in enumerate(SMILES):
            for dose in (1.0, 10.0):
                shift = 6.0 * dose / 10 if j < 3 else 0.0  # three potent compounds, dose-dependent
                rows.append(dict(Metadata_Plate=plate, Metadata_Well=f"B{j + 1:02d}" if dose == 1 else f"C{j + 1:02d}",
                                 Metadata_compound=f"cpd{j}", Metadata_smiles=smi, Metadata_dose_um=dose, shift=shift))
        rows.append(dict(Metadata_Plate=plate, Metadata_Well="D01", Metadata_compound="secret",
                         Metadata_smiles="", Metadata_dose_um=1.0, shift=0.0))
    frame = pd.DataFrame(rows)
    for k in range(6):
        frame[f"Cells_Feature_{k}"] = rng.normal(size=len(frame)) + frame["shift"] * (k < 3)
    frame = frame.drop(columns="shift")
    path = tmp_path / "profiles.csv"
    frame.to_csv(path, index=False)
    return path


def test_lookup_lab_conditions_hits_and_skips(tmp_path):
    lab = build_lookup_lab(read_profile_table(_table(tmp_path)))
    assert len(lab.conditions) == 2 * len(SMILES)
    assert lab.n_skipped_no_smiles == 3
    assert lab.n_hits_unreachable == 0  # the 'secret' no-SMILES condition is control-like
    assert lab.n_hits == int(lab.conditions["is_hit"].sum()) == 3  # 25 conditions: above the 90% quantile
    top = lab.conditions.sort_values("activity", ascending=False).head(3)
    assert set(top["Metadata_compound"]) <= {"cpd0", "cpd1", "cpd2"} and (top["Metadata_dose_um"] == 10).all()


def test_cold_start_takes_each_compound_at_its_highest_dose(tmp_path):
    lab = build_lookup_lab(read_profile_table(_table(tmp_path)))
    config = LookupBacktestConfig()
    measured = np.zeros(len(lab.conditions), dtype=bool)
    for policy in ("loop", "diversity_only"):
        picks = _pick(policy, lab, measured, 5, config, seed=3, work_dir=tmp_path, rng=np.random.default_rng(0))
        chosen = lab.conditions.iloc[picks]
        assert chosen["Metadata_compound"].is_unique and (chosen["Metadata_dose_um"] == 10.0).all()


def test_random_cold_start_varies_with_the_seed_and_diversity_only_stays_deterministic(tmp_path):
    lab = build_lookup_lab(read_profile_table(_table(tmp_path)))
    config = LookupBacktestConfig(selection={"cold_start_method": "random"})
    measured = np.zeros(len(lab.conditions), dtype=bool)

    def pick(policy, seed):
        return _pick(policy, lab, measured, 5, config, seed=seed, work_dir=tmp_path, rng=np.random.default_rng(0))

    rounds_1 = {tuple(sorted(pick("loop", seed))) for seed in range(6)}
    assert len(rounds_1) > 1  # seeds no longer share round 1
    for picks in rounds_1:
        chosen = lab.conditions.iloc[list(picks)]
        assert chosen["Metadata_compound"].is_unique and (chosen["Metadata_dose_um"] == 10.0).all()
    assert np.array_equal(pick("diversity_only", 0), pick("diversity_only", 5))  # coverage: seed-free here


def test_lookup_backtest_json_shape_and_monotone(tmp_path):
    config = LookupBacktestConfig(n_rounds=2, batch_size=3, n_seeds=2,
                                  assay=dict(n_members=2, n_steps=40, hidden_dim=32, batch_size=64))
    result = run_lookup_backtest(read_profile_table(_table(tmp_path)), config)
    assert set(result["policies"]) == {"loop", "random", "greedy_mean", "diversity_only", "gp_ucb", "random_top_dose"}
    n = result["n_conditions"]
    assert result["random_expected_hit_fraction"] == pytest.approx([3 / n, 6 / n])
    for curve in result["policies"].values():
        assert len(curve["hit_fraction_mean"]) == len(curve["hit_fraction_sd"]) == 2
        for per_seed in curve["per_seed"]:
            assert 0 <= per_seed[0] <= per_seed[1] <= 1


def test_profile_table_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"Metadata_Plate": ["P"], "Metadata_Well": ["A01"], "x": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="bad.csv.*Metadata_compound"):
        read_profile_table(bad)
    with pytest.raises(ValueError, match="no control wells"):
        build_lookup_lab(read_profile_table(_table(tmp_path)), control_label="PBS")


def test_lookup_lab_tolerates_what_real_tables_hold(tmp_path):
    """Text columns, DMSO wells without a dose, treated wells with dose 0, a feature missing in
    many wells (dropped) and one missing in a single well (kept, set to the control median)."""
    frame = pd.read_csv(_table(tmp_path))
    clean = build_lookup_lab(read_profile_table(_table(tmp_path)))
    frame["Image_FileName_DNA"] = "x.tif"
    frame.loc[frame["Metadata_compound"] == "DMSO", "Metadata_dose_um"] = np.nan
    zero = (frame["Metadata_compound"] == "cpd5") & (frame["Metadata_dose_um"] == 1.0)
    frame.loc[zero, "Metadata_dose_um"] = 0.0
    frame.loc[frame.index[:10], "Cells_Feature_5"] = np.nan  # 10 of 117 wells: over the 5% cutoff
    frame.loc[frame.index[40], "Cells_Feature_0"] = np.nan
    frame.to_csv(tmp_path / "messy.csv", index=False)
    lab = build_lookup_lab(read_profile_table(tmp_path / "messy.csv"))
    assert lab.features == [f"Cells_Feature_{k}" for k in range(5)]
    assert lab.n_skipped_no_dose == int(zero.sum()) == 3 and lab.n_skipped_no_smiles == 3
    assert len(lab.conditions) == len(clean.conditions) - 1
    assert np.isfinite(lab.wells[lab.features].to_numpy()).all()
    assert set(lab.conditions.loc[lab.conditions["is_hit"], "Metadata_compound"]) <= {"cpd0", "cpd1", "cpd2"}


@pytest.mark.skipif(not (SHARED / "bbbc021").exists(), reason="../shared/data/bbbc021 not present")
def test_convert_bbbc021_real_profiles():
    table = convert_bbbc021(SHARED / "bbbc021")
    assert len(table) == 632
    assert {"Metadata_moa", "Metadata_smiles"} <= set(table.columns)
    assert (table.loc[table["Metadata_compound"] == "DMSO", "Metadata_dose_um"] == 0).all()
    lab = build_lookup_lab(ProfileTable(table, [c for c in table if not c.startswith("Metadata_")], "bbbc021"))
    assert len(lab.conditions) > 40 and 9 <= lab.n_hits <= 12 and lab.n_hits_unreachable >= 1  # of 103 conditions


def test_a_condition_is_out_of_bag_only_when_its_whole_compound_is(tmp_path):
    from loop.simulation import _compound_out_of_bag

    lab = build_lookup_lab(read_profile_table(_table(tmp_path)))  # 12 compounds x 2 doses, sorted
    measured = np.zeros(len(lab.conditions), bool)
    measured[[0, 1, 2, 5]] = True  # cpd0 at both doses, cpd1 at 1 uM, cpd10 at 10 uM

    class Members:  # what each of 2 members' condition bootstrap left out
        def out_of_bag(self, ids):
            assert ids == ["cond-0", "cond-1", "cond-2", "cond-5"]
            return np.array([[True, False, True, True], [True, True, False, True]])

    out = _compound_out_of_bag(lab, measured, Members())
    assert lab.conditions["Metadata_compound"].iloc[[0, 1]].nunique() == 1  # one compound, two doses
    # member 0 trained on cpd0 at one dose: neither dose is out of bag for it; member 1 left cpd0 out
    assert out.tolist() == [[False, False, True, True], [True, True, False, True]]


def test_random_expected_fraction_is_the_mean_of_random_batches():
    """Monte Carlo over the random policy's own picks: the cumulative hit fraction averages r B / N."""
    lab_hits = np.zeros(50, dtype=bool)
    lab_hits[[1, 7, 8, 30, 49]] = True
    rng = np.random.default_rng(0)
    found = np.zeros(4)
    n_draws = 4000
    for _ in range(n_draws):
        measured = np.zeros(50, dtype=bool)
        for r in range(4):
            measured[rng.choice(np.flatnonzero(~measured), size=min(15, (~measured).sum()), replace=False)] = True
            found[r] += lab_hits[measured].sum() / lab_hits.sum()
    assert found / n_draws == pytest.approx(random_expected_fraction(50, 15, 4), abs=0.01)
    assert random_expected_fraction(50, 15, 4) == [0.3, 0.6, 0.9, 1.0]


def test_lookup_lab_drops_a_plate_with_one_control_well(tmp_path, caplog):
    """One DMSO well has no spread: its plate's robust z would be undefined for every feature."""
    frame = pd.read_csv(_table(tmp_path))
    lone = (frame["Metadata_Plate"] == "P3") & (frame["Metadata_compound"] == "DMSO")
    frame = frame.drop(index=frame.index[lone][1:])
    frame.to_csv(tmp_path / "lone.csv", index=False)
    lab = build_lookup_lab(read_profile_table(tmp_path / "lone.csv"))
    assert "P3" not in set(lab.wells["Metadata_Plate"])
    assert "fewer than two DMSO wells are dropped, with their 25 treated well(s): P3" in caplog.text
    assert lab.n_skipped_no_controls == 25


def test_lookup_lab_skips_unparseable_and_stringified_missing_smiles(tmp_path, caplog):
    """'nan' / 'None' (a table that went through str) mean no SMILES; an unparseable one is skipped
    with a count, its compound and a plate / well; a table where nothing parses is an error."""
    frame = pd.read_csv(_table(tmp_path))
    frame.loc[frame["Metadata_compound"] == "secret", "Metadata_smiles"] = "nan"
    bad = frame["Metadata_compound"] == "cpd4"
    frame.loc[bad, "Metadata_smiles"] = "C1CC(N"
    frame.to_parquet(tmp_path / "smiles.parquet")
    lab = build_lookup_lab(read_profile_table(tmp_path / "smiles.parquet"))
    assert lab.n_skipped_no_smiles == 3 and lab.n_skipped_bad_smiles == int(bad.sum()) == 6
    assert "cpd4" not in set(lab.conditions["Metadata_compound"]) and len(lab.conditions) == 2 * (len(SMILES) - 1)
    assert "cannot parse skipped: cpd4 (first: plate P1 well B05" in caplog.text
    treated = ~frame["Metadata_compound"].isin(["DMSO"])
    frame.loc[treated, "Metadata_smiles"] = "not a molecule"
    frame.to_csv(tmp_path / "none.csv", index=False)
    with pytest.raises(ValueError, match="none.csv: no treated well has a parseable SMILES"):
        build_lookup_lab(read_profile_table(tmp_path / "none.csv"))


def test_a_compound_with_two_structures_takes_its_most_frequent_one(tmp_path, caplog):
    frame = pd.read_csv(_table(tmp_path))
    odd = (frame["Metadata_compound"] == "cpd3") & (frame["Metadata_Plate"] == "P1")
    frame.loc[odd, "Metadata_smiles"] = "CCCCCC"
    frame.to_csv(tmp_path / "two.csv", index=False)
    lab = build_lookup_lab(read_profile_table(tmp_path / "two.csv"))
    cpd3 = lab.conditions[lab.conditions["Metadata_compound"] == "cpd3"]
    assert list(cpd3["smiles"]) == ["Oc1ccccc1", "Oc1ccccc1"]  # 4 wells on P2 / P3 against 2 on P1, every dose
    assert "compound cpd3 has 2 different structures" in caplog.text and "plate P1 well B04" in caplog.text


def test_lookup_lab_is_independent_of_feature_units(tmp_path):
    path = _table(tmp_path)
    frame = pd.read_csv(path)
    features = [c for c in frame.columns if c.startswith("Cells_")]
    small = frame.assign(**{c: frame[c] * 1e-7 for c in features})
    small.to_csv(tmp_path / "small.csv", index=False)
    a = build_lookup_lab(read_profile_table(path))
    b = build_lookup_lab(read_profile_table(tmp_path / "small.csv"))
    assert a.features == b.features
    np.testing.assert_allclose(a.conditions["activity"], b.conditions["activity"], rtol=1e-9)
    assert a.conditions["is_hit"].equals(b.conditions["is_hit"])


def test_lookup_lab_refuses_tables_it_cannot_normalise(tmp_path):
    frame = pd.read_csv(_table(tmp_path))
    dmso = frame["Metadata_compound"] == "DMSO"
    keep = ~dmso | ~frame.duplicated(["Metadata_Plate", "Metadata_compound"])
    frame[keep].to_csv(tmp_path / "lone.csv", index=False)
    with pytest.raises(ValueError, match="lone.csv: every plate has fewer than two DMSO wells"):
        build_lookup_lab(read_profile_table(tmp_path / "lone.csv"))
    flat = frame.copy()
    for c in [c for c in frame.columns if c.startswith("Cells_")]:
        flat.loc[dmso, c] = 1.0
    flat.to_csv(tmp_path / "flat.csv", index=False)
    with pytest.raises(ValueError, match="flat.csv: every condition has the same phenotypic activity"):
        build_lookup_lab(read_profile_table(tmp_path / "flat.csv"))


def test_profile_table_ignores_row_numbers_and_reads_blank_text_doses(tmp_path, caplog):
    frame = pd.read_csv(_table(tmp_path))
    frame.insert(0, "Unnamed: 0", np.arange(len(frame)))
    frame["ImageNumber"] = np.arange(len(frame))
    frame["Image_Flag"] = True
    frame["Metadata_dose_um"] = frame["Metadata_dose_um"].map(lambda d: "" if d == 0 else f" {d:g} ")
    frame.to_parquet(tmp_path / "numbered.parquet")
    table = read_profile_table(tmp_path / "numbered.parquet")
    assert table.features == [f"Cells_Feature_{k}" for k in range(6)]
    assert "Unnamed: 0, ImageNumber, Image_Flag" in caplog.text
    assert table.frame.loc[table.frame["Metadata_compound"] == "DMSO", "Metadata_dose_um"].isna().all()
    assert set(table.frame["Metadata_dose_um"].dropna()) == {1.0, 10.0}


def test_a_backtest_longer_than_the_table_stops_picking(tmp_path):
    """More rounds x batch than conditions: the last rounds find nothing new instead of failing."""
    config = LookupBacktestConfig(n_rounds=3, batch_size=10, n_seeds=1, policies=("gp_ucb", "random"))
    result = run_lookup_backtest(read_profile_table(_table(tmp_path)), config)
    assert result["n_conditions"] == 24
    for curve in result["policies"].values():
        assert curve["per_seed"][0][-1] == 1.0


def test_the_backtests_anchored_loop_keeps_the_scaffold_cap(tmp_path, monkeypatch):
    """``--selection '{"max_per_scaffold": 1}'`` caps the default anchored policy's picks per
    Bemis-Murcko scaffold in the lookup backtest too (it ran uncapped, silently, before session 31)."""
    import loop.simulation
    from lab_io.chem import murcko_scaffold_ids

    lab = build_lookup_lab(read_profile_table(_table(tmp_path)))
    scaffolds = murcko_scaffold_ids(lab.conditions["smiles"].tolist())
    benzene = scaffolds == scaffolds[lab.conditions["smiles"].to_numpy() == "Oc1ccccc1"][0]  # canonical
    assert benzene.sum() == 10  # five benzene compounds at two doses
    measured = np.zeros(len(lab.conditions), bool)
    measured[[0, 1]] = True
    noise = np.random.default_rng(0).normal(0, 0.01, (3, len(benzene)))
    values = np.where(benzene, 5.0, 1.0)[None] + noise  # K x N: the members favour every benzene

    monkeypatch.setattr(loop.simulation, "predict_conditions",
                        lambda *args: (values, None, np.ones((3, measured.sum()), bool)))
    for cap, most in ((None, 6), (1, 1)):
        config = LookupBacktestConfig(selection={"max_per_scaffold": cap, "anchor_prior_sd": 0.0,
                                                 "anchor_prior_weight": 3.0})
        picks = _pick("loop", lab, measured, 6, config, 0, tmp_path, np.random.default_rng(0))
        assert benzene[picks].sum() == most


def test_hits_are_of_all_treated_conditions_those_without_smiles_included(tmp_path):
    """Planted: 12 compounds at 2 doses with SMILES (3 potent at 10 uM) and 5 stronger conditions
    without SMILES. The top 10% of all 29 conditions (activity >= the 90% quantile: 3) are the no-SMILES
    ones, which no policy can pick; the candidates hold no hit, and every fraction is of those 3."""
    frame = pd.read_csv(_table(tmp_path))
    rng = np.random.default_rng(1)
    extra = []
    for plate in ("P1", "P2", "P3"):
        for k in range(5):
            row = dict(Metadata_Plate=plate, Metadata_Well=f"E{k + 1:02d}", Metadata_compound=f"hidden{k}",
                       Metadata_smiles="", Metadata_dose_um=10.0)
            row.update({f"Cells_Feature_{f}": rng.normal() + (40.0 if f < 3 else 0.0) for f in range(6)})
            extra.append(row)
    frame = pd.concat([frame, pd.DataFrame(extra)], ignore_index=True)
    path = tmp_path / "with_hidden.csv"
    frame.to_csv(path, index=False)
    lab = build_lookup_lab(read_profile_table(path))
    assert len(lab.conditions) == 24 and lab.n_hits_unreachable == 3 and lab.n_hits == 3
    assert not lab.conditions["is_hit"].any()
    result = run_lookup_backtest(read_profile_table(path), LookupBacktestConfig(
        n_rounds=1, batch_size=24, n_seeds=1, policies=("random",)))
    assert result["n_hits"] == 3 and result["n_hits_unreachable"] == 3
    assert result["policies"]["random"]["hit_fraction_mean"] == [0.0]  # every candidate measured, no hit found
    assert result["random_expected_hit_fraction"] == [0.0]


def test_row_order_of_the_file_changes_nothing(tmp_path):
    path = _table(tmp_path)
    shuffled = tmp_path / "shuffled.csv"
    pd.read_csv(path).sample(frac=1.0, random_state=3).to_csv(shuffled, index=False)
    a, b = build_lookup_lab(read_profile_table(path)), build_lookup_lab(read_profile_table(shuffled))
    pd.testing.assert_frame_equal(a.conditions, b.conditions)
    pd.testing.assert_frame_equal(a.wells, b.wells)


def test_ties_at_the_hit_threshold_are_all_hits_and_counted(tmp_path, caplog):
    frame = pd.read_csv(_table(tmp_path))
    treated = frame["Metadata_compound"].str.startswith("cpd")
    strong = treated & frame["Metadata_compound"].isin([f"cpd{j}" for j in range(6)])
    features = [c for c in frame if c.startswith("Cells_")]
    frame.loc[strong, features] = 1e6  # six conditions saturate the +-10 z clip: equal activity
    path = tmp_path / "tied.csv"
    frame.to_csv(path, index=False)
    with caplog.at_level("WARNING"):
        lab = build_lookup_lab(read_profile_table(path))
    assert lab.n_tied_at_threshold == 12 and lab.n_hits == 12  # 6 compounds x 2 doses tie at the top
    assert "tie at the hit threshold" in caplog.text


def test_random_top_dose_takes_each_compound_at_its_highest_unmeasured_dose(tmp_path):
    lab = build_lookup_lab(read_profile_table(_table(tmp_path)))
    config = LookupBacktestConfig(n_rounds=2, batch_size=6, n_seeds=1, policies=("random_top_dose",))
    measured = np.zeros(len(lab.conditions), dtype=bool)
    dose = lab.conditions["Metadata_dose_um"].to_numpy()
    first = _pick("random_top_dose", lab, measured, 6, config, 0, tmp_path, np.random.default_rng(0))
    assert len(set(first)) == 6 and (dose[first] == 10.0).all()
    measured[first] = True
    again = _pick("random_top_dose", lab, measured, 6, config, 1, tmp_path, np.random.default_rng(0))
    compound = lab.conditions["Metadata_compound"].to_numpy()
    assert not measured[again].any() and len(set(compound[again])) == 6
    for i in again:  # the compound's highest dose not yet measured
        assert dose[i] == dose[(compound == compound[i]) & ~measured].max()


def test_a_conditions_activity_is_the_rms_of_the_mean_z_of_its_wells(tmp_path):
    """Closed form from the stored wells: per condition, the mean (over its replicate wells, one per
    plate) of each normalised feature, clipped to +-10, then the root mean square over features."""
    lab = build_lookup_lab(read_profile_table(_table(tmp_path)))
    wells = lab.wells[lab.wells["Metadata_condition"] >= 0]
    assert (wells.groupby("Metadata_condition").size() == 3).all()  # replicates to average
    for i in range(len(lab.conditions)):
        z = wells.loc[wells["Metadata_condition"] == i, lab.features].to_numpy(dtype=np.float64)
        mean_z = np.clip(z.mean(axis=0), -10.0, 10.0)
        assert lab.conditions["activity"].iloc[i] == pytest.approx(np.sqrt(np.mean(mean_z ** 2)), rel=1e-9)
