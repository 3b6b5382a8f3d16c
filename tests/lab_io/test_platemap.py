"""Tests for lab_io.platemap: layouts, capacity, files, round trip, validation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lab_io import platemap as pm
from lab_io.schema import N_WELLS, WellRole, echo_well, parse_well

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
CPJUMP1 = SHARED / "jump" / "platemaps"


def make_compounds(n: int) -> pd.DataFrame:
    ids = [f"C{i:05d}" for i in range(n)]
    return pd.DataFrame({"compound_id": ids, "name": [f"cmpd {i}" for i in range(n)],
                         "smiles": ["C" * (1 + i % 7) + "O" for i in range(n)],
                         "inchikey": [f"KEY{i:011d}-UHFFFAOYSA-N" for i in range(n)]})


def treatments(n: int, dose_um: float = 10.0) -> list[tuple[str, float]]:
    return [(f"C{i:05d}", dose_um) for i in range(n)]


def used_wells(layouts) -> int:
    return sum(int((l.wells["role"] != WellRole.empty.value).sum()) for l in layouts)


# ---------------------------------------------------------------- capacity and layout

@pytest.mark.parametrize("empty_edge, per_plate", [(False, 384), (True, 308)])
def test_treatment_capacity_closed_form(empty_edge, per_plate):
    config = pm.PlateLayoutConfig(empty_edge=empty_edge)
    assert config.usable_wells_per_plate == per_plate
    assert pm.treatment_capacity(0, config) == 0
    assert pm.treatment_capacity(16, config) == 0  # controls only: plate not opened
    assert pm.treatment_capacity(17, config) == 1
    assert pm.treatment_capacity(per_plate, config) == per_plate - 16
    assert pm.treatment_capacity(per_plate + 10, config) == per_plate - 16
    assert pm.treatment_capacity(2 * per_plate + 100, config) == 2 * (per_plate - 16) + 84


@pytest.mark.parametrize("budget", [17, 100, 384, 385, 400, 900, 1200])
def test_design_at_capacity_respects_budget(budget):
    config = pm.PlateLayoutConfig(positive_control_id="POS", n_positive_controls=4)
    n = pm.treatment_capacity(budget, config)
    layouts = pm.design_plates(treatments(n), config, seed=0, budget_wells=budget)
    assert used_wells(layouts) <= budget
    with pytest.raises(ValueError, match="budget"):
        pm.design_plates(treatments(n + 1), config, seed=0, budget_wells=budget)


def test_layout_wells_controls_and_compounds():
    config = pm.PlateLayoutConfig(positive_control_id="POS", n_positive_controls=8)
    layouts = pm.design_plates(treatments(500), config, seed=1, campaign_tag="R01-")
    assert [l.barcode for l in layouts] == ["LPR01-0001", "LPR01-0002"]
    placed = []
    for layout in layouts:
        w = layout.wells
        assert list(w.columns) == list(pm.WELL_COLUMNS) and len(w) == N_WELLS
        assert w["well"].is_unique
        assert all(parse_well(x) == (r, c) for x, r, c in zip(w["well"], w["row"], w["col"]))
        assert set(w["role"]) <= {r.value for r in WellRole}
        neg = layout.wells_with_role(WellRole.negative_control)
        pos = layout.wells_with_role(WellRole.positive_control)
        assert len(neg) == 16 and (neg["compound_id"] == "DMSO").all() and (neg["dose_um"] == 0).all()
        assert neg["row"].nunique() >= 8 and neg["col"].nunique() >= 8
        assert len(pos) == 8 and pos["row"].nunique() == 8 and pos["col"].nunique() == 8
        assert (pos["compound_id"] == "POS").all()
        empty = layout.wells_with_role(WellRole.empty)
        assert (empty["compound_id"] == "").all() and (empty["dose_um"] == 0).all()
        placed += layout.wells_with_role(WellRole.treatment)["compound_id"].tolist()
    assert sorted(placed) == [c for c, _ in treatments(500)]  # each compound exactly once
    sizes = [len(l.wells_with_role(WellRole.treatment)) for l in layouts]
    assert max(sizes) - min(sizes) <= 1


def test_layout_deterministic_and_seeded():
    config = pm.PlateLayoutConfig()
    a = pm.design_plates(treatments(100), config, seed=5)
    b = pm.design_plates(treatments(100), config, seed=5)
    c = pm.design_plates(treatments(100), config, seed=6)
    pd.testing.assert_frame_equal(a[0].wells, b[0].wells)
    assert not a[0].wells.equals(c[0].wells)


def test_empty_edge_honoured_and_spill():
    config = pm.PlateLayoutConfig(empty_edge=True)
    n = 2 * config.treatments_per_plate + 1
    layouts = pm.design_plates(treatments(n), config, seed=2, plate_index_start=7)
    assert [l.barcode for l in layouts] == ["LP0007", "LP0008", "LP0009"]
    for layout in layouts:
        w = layout.wells
        edge = (w["row"].isin([0, 15])) | (w["col"].isin([0, 23]))
        assert (w.loc[edge, "role"] == WellRole.empty.value).all()
        neg = layout.wells_with_role(WellRole.negative_control)
        assert len(neg) == 16 and neg["row"].nunique() >= 8 and neg["col"].nunique() >= 8


def test_design_rejects_bad_treatments():
    config = pm.PlateLayoutConfig()
    with pytest.raises(ValueError, match="dose_um"):
        pm.design_plates([("A", 0.0)], config, seed=0)
    with pytest.raises(ValueError, match="compound_id"):
        pm.design_plates([("DMSO", 1.0)], config, seed=0)
    with pytest.raises(ValueError, match="transfer_volume_nl"):
        pm.design_plates([("A", 100.0)], config, seed=0)  # 400 nL > 50 nL
    with pytest.raises(ValueError, match="positive_control_id"):
        pm.PlateLayoutConfig(n_positive_controls=4)
    assert pm.design_plates([], config, seed=0) == []


def test_compound_volume_rounds_to_droplets():
    config = pm.PlateLayoutConfig()
    assert config.compound_volume_nl(10.0) == 40.0
    assert config.compound_volume_nl(1.0) == 5.0  # 4 nL -> 5 nL (2 droplets)
    assert config.compound_volume_nl(3.0) % 2.5 == 0


def test_a_dose_the_droplets_cannot_give_is_refused():
    """2.5 nL of 10 mM stock in 40 uL is 0.625 uM a droplet: 1 uM would be 1.25 uM (+25 %) and 0.35 uM
    0.625 uM (+79 %), so both are refused naming the doses the droplets give; 3 uM (3.125, +4 %) is not."""
    config = pm.PlateLayoutConfig()
    assert config.dispensed_dose_um(3.0) == pytest.approx(3.125)
    config.check_dispensable(3.0, "dose_um")
    with pytest.raises(ValueError, match=r"dose_um: 1 uM would be dispensed as 1.25 uM .*\+25.0 % \(more than 5 %\); "
                                         r"set dose_um to a dose the droplets give \(0.625 or 1.25 uM\)"):
        config.check_dispensable(1.0, "dose_um")
    with pytest.raises(ValueError, match=r"0.35 uM would be dispensed as 0.625 uM .*\+78.6 %"):
        pm.design_plates([("A", 0.35)], config, seed=0)
    with pytest.raises(ValueError, match="positive_control_dose_um: 1 uM would be dispensed as 1.25 uM"):
        pm.PlateLayoutConfig(positive_control_id="POS", n_positive_controls=4, positive_control_dose_um=1.0)
    pm.PlateLayoutConfig(stock_mm=0.8).check_dispensable(1.0, "dose_um")  # 50 nL of 0.8 mM
    # under half a droplet: the message gives the volume needed, not the 0 nL it rounds to
    with pytest.raises(ValueError, match=r"dose_um: 0.3 uM needs 1.2 nL of 10.0 mM stock, less than half of one "
                                         r"2.5 nL droplet; use a dose of at least 0.625 uM"):
        config.check_dispensable(0.3, "dose_um")


@pytest.mark.parametrize("settings, message", [
    (dict(n_negative_controls=16.5), "n_negative_controls must be a whole number, got 16.5"),
    (dict(n_negative_controls="16"), "n_negative_controls must be a whole number, got '16'"),
    (dict(empty_edge="false"), "empty_edge must be true or false, got 'false'"),
    (dict(stock_mm="10"), "stock_mm must be a finite number"),
    (dict(transfer_volume_nl=51.0), r"transfer_volume_nl must be a whole number of 2.5 nL Echo droplets, got 51.0 "
                                    r"\(e.g. 50\)"),
    (dict(transfer_volume_nl=5000.0), "12.5 % DMSO, above the 1 %"),
    (dict(transfer_volume_nl=410.0), "1.02 % DMSO, above the 1 %"),
    (dict(positive_control_id="NA", n_positive_controls=4), "positive_control_id cannot be 'NA': table readers"),
    (dict(positive_control_id="dmso", n_positive_controls=4), "DMSO is the negative control"),
    (dict(source_max_volume_ul=15.02), r"a source well gives 20 nL .* less than one well's transfer_volume_nl 50 nL"),
    (dict(empty_edge=2), "empty_edge must be true or false, got 2"),
    (dict(source_dead_volume_ul=70.0), "source_dead_volume_ul must be >= 0 and below source_max_volume_ul"),
    (dict(source_plate_type="384 PP"), "source_plate_type '384 PP' may only use"),
])
def test_layout_settings_are_checked(settings, message):
    """campaign.json is hand-editable: a wrong type or an impossible volume is refused at once,
    never taken for something else ("false" as True) or left to fail at propose."""
    with pytest.raises(ValueError, match=message):
        pm.PlateLayoutConfig(**settings)
    config = pm.PlateLayoutConfig(n_negative_controls=np.int64(8), stock_mm=np.float32(10), empty_edge=np.bool_(True))
    assert type(config.n_negative_controls) is int and type(config.stock_mm) is float and config.empty_edge is True
    # what earlier versions wrote and took: 0 / 1 for empty_edge, "" for no positive control
    config = pm.PlateLayoutConfig(empty_edge=1, positive_control_id="", stock_mm=10)
    assert config.empty_edge is True and config.positive_control_id is None and type(config.stock_mm) is float


# ---------------------------------------------------------------- files

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    config = pm.PlateLayoutConfig(positive_control_id="C00000", n_positive_controls=4)
    doses = [(c, 10.0 if i % 2 else 5.0) for i, (c, _) in enumerate(treatments(420)[1:])]
    layouts = pm.design_plates(doses, config, seed=11, campaign_tag="T-")
    out = tmp_path_factory.mktemp("batch") / "plates"
    files = pm.write_plate_files(layouts, make_compounds(420), out)
    return layouts, out, files


def test_written_files(written):
    layouts, out, files = written
    names = {f"{l.plate_map_name}.txt" for l in layouts} | {f"{l.barcode}.png" for l in layouts}
    names |= {"barcode_platemap.csv", "compound_metadata.tsv", "picklist.csv", "source_platemap.csv"}
    assert set(files) == names and all(p.is_file() for p in files.values())
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary leftovers
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".plates.tmp")]
    pmap = pd.read_csv(out / f"{layouts[0].plate_map_name}.txt", sep="\t", dtype=str, keep_default_na=False)
    assert list(pmap.columns) == list(pm.PLATEMAP_COLUMNS)
    dmso = pmap[pmap["role"] == "negative_control"]
    assert (dmso["broad_sample"] == "").all() and (dmso["solvent"] == "DMSO").all()
    barcodes = pd.read_csv(out / "barcode_platemap.csv", dtype=str)
    assert barcodes.columns.tolist() == ["Assay_Plate_Barcode", "Plate_Map_Name"]
    meta = pd.read_csv(out / "compound_metadata.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert meta.columns[:4].tolist() == ["broad_sample", "pert_iname", "smiles", "InChIKey"]
    assert meta.loc[meta["pert_iname"] == "DMSO", "control_type"].tolist() == ["negcon"]
    assert meta.loc[meta["broad_sample"] == "C00000", "control_type"].tolist() == ["poscon"]


def test_picklist_matches_maps(written):
    layouts, out, _ = written
    pick = pd.read_csv(out / "picklist.csv", dtype={"Source Well": str, "Destination Well": str})
    assert pick.columns.tolist() == list(pm.PICKLIST_COLUMNS)
    source = pd.read_csv(out / "source_platemap.csv", dtype={"Source Well": str, "broad_sample": str},
                         keep_default_na=False)
    assert source.columns.tolist() == list(pm.SOURCE_COLUMNS)
    src_of = {(p, w): s for p, w, s in zip(source["Source Plate Name"], source["Source Well"], source["broad_sample"])}
    # named after the batch; 419 compounds and DMSO take two source plates
    assert set(pick["Source Plate Name"]) == {f"SRC-{layouts[0].barcode}-1", f"SRC-{layouts[0].barcode}-2"}
    assert (pick["Source Plate Type"] == "384PP_DMSO2").all()
    assert pick["Source Well"].map(echo_well).eq(pick["Source Well"]).all()  # A1 style, as the destination
    assert (pick["Transfer Volume"] % 2.5 == 0).all()
    drawn = pick.groupby(["Source Plate Name", "Source Well"])["Transfer Volume"].sum() / 1000
    filled = source.set_index(["Source Plate Name", "Source Well"])
    assert np.allclose(filled.loc[drawn.index, "transfer_total_ul"], drawn)
    assert np.allclose(filled["fill_volume_ul"], filled["transfer_total_ul"] + 15.0)
    assert (filled["fill_volume_ul"] <= 65.0).all()
    names = dict(zip(source["broad_sample"], source["pert_iname"]))
    assert names["C00001"] == "cmpd 1" and names[""] == "DMSO"  # the compound's name, not its id
    for layout in layouts:
        w = layout.wells
        rows = pick[pick["Destination Plate Name"] == layout.barcode]
        filled = w[w["role"] != WellRole.empty.value]
        assert set(rows["Destination Well"]) == {echo_well(x) for x in filled["well"]}
        per_well = rows.groupby("Destination Well")["Transfer Volume"].sum()
        assert np.allclose(per_well, 50.0)  # every filled well: 50 nL DMSO in total
        compound_rows = rows[rows["Sample ID"] != "DMSO"]
        by_well = dict(zip(compound_rows["Destination Well"], compound_rows["Sample ID"]))
        expected = {echo_well(x): c for x, c, r in zip(w["well"], w["compound_id"], w["role"])
                    if r in ("treatment", "positive_control")}
        assert by_well == expected
        for p, sw, sample in zip(rows["Source Plate Name"], rows["Source Well"], rows["Sample ID"]):
            assert src_of[(p, sw)] == ("" if sample == "DMSO" else sample)
        dose = dict(zip(map(echo_well, w["well"]), w["dose_um"]))
        for dw, vol in zip(compound_rows["Destination Well"], compound_rows["Transfer Volume"]):
            assert vol == layout.config.compound_volume_nl(dose[dw])


def test_source_wells_hold_what_their_transfers_draw(tmp_path):
    """A sample drawn beyond one source well's working volume (less its dead volume) is split over
    wells: every transfer comes from a well holding its sample, each well is filled with what is
    drawn from it plus the dead volume, none beyond its largest volume, none left unused; two
    batches never share a source plate name."""
    config = pm.PlateLayoutConfig(source_max_volume_ul=20.02, source_dead_volume_ul=15.0)  # 5,020 nL a well
    layouts = pm.design_plates(treatments(700), config, seed=0, campaign_tag="T-")
    files = pm.write_plate_files(layouts, make_compounds(700), tmp_path / "a")
    pick = pd.read_csv(files["picklist.csv"])
    source = pd.read_csv(files["source_platemap.csv"], keep_default_na=False).set_index(
        ["Source Plate Name", "Source Well"])
    assert source.index.is_unique
    drawn_ul = pick.groupby(["Source Plate Name", "Source Well"])["Transfer Volume"].sum() / 1000
    assert sorted(drawn_ul.index) == sorted(source.index)  # every source well is drawn from
    assert np.allclose(source.loc[drawn_ul.index, "transfer_total_ul"], drawn_ul)
    assert np.allclose(source["fill_volume_ul"], source["transfer_total_ul"] + 15.0)
    assert (source["fill_volume_ul"] <= 20.02 + 1e-9).all()
    holds = source["broad_sample"].replace("", "DMSO")
    assert (holds.loc[list(zip(pick["Source Plate Name"], pick["Source Well"]))].to_numpy() == pick["Sample ID"]).all()
    dmso = source[source["pert_iname"] == "DMSO"]
    assert len(dmso) > 1 and np.isclose(dmso["transfer_total_ul"].sum(), drawn_ul[dmso.index].sum())
    later = pm.design_plates(treatments(10), config, seed=0, campaign_tag="T-", plate_index_start=3)
    other = pd.read_csv(pm.write_plate_files(later, make_compounds(10), tmp_path / "b")["picklist.csv"])
    assert set(other["Source Plate Name"]).isdisjoint(pick["Source Plate Name"])


def test_round_trip(written):
    layouts, out, _ = written
    read, compounds = pm.read_plate_files(out)
    assert [l.barcode for l in read] == [l.barcode for l in layouts]
    for a, b in zip(layouts, read):
        assert a.plate_map_name == b.plate_map_name
        pd.testing.assert_frame_equal(a.wells, b.wells)
    expected = make_compounds(420).set_index("compound_id")
    assert len(compounds) == 420 and list(compounds.columns) == ["compound_id", "name", "smiles", "inchikey"]
    got = compounds.set_index("compound_id")
    pd.testing.assert_frame_equal(got.sort_index(), expected.loc[got.index].sort_index())


def test_write_refuses_existing_folder_and_missing_compounds(tmp_path, written):
    layouts, out, _ = written
    with pytest.raises(ValueError, match="already exists"):
        pm.write_plate_files(layouts, make_compounds(420), out)
    with pytest.raises(ValueError, match="not in the compounds table"):
        pm.write_plate_files(layouts, make_compounds(10), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    layouts = pm.design_plates(treatments(30), pm.PlateLayoutConfig(), seed=0)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(pm, "_plot_plate", fail)
    out = tmp_path / "plates"
    with pytest.raises(RuntimeError, match="disk full"):
        pm.write_plate_files(layouts, make_compounds(30), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- reading errors

def copy_batch(written, tmp_path) -> Path:
    _, out, _ = written
    dest = tmp_path / "copy"
    dest.mkdir()
    for p in out.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_read_unknown_plate_map(written, tmp_path):
    d = copy_batch(written, tmp_path)
    (d / "barcode_platemap.csv").write_text("Assay_Plate_Barcode,Plate_Map_Name\nX1,NOPE\n")
    with pytest.raises(ValueError, match=r"barcode_platemap\.csv.*NOPE"):
        pm.read_plate_files(d)


def test_read_invalid_and_duplicate_wells(written, tmp_path):
    layouts, _, _ = written
    d = copy_batch(written, tmp_path)
    path = d / f"{layouts[0].plate_map_name}.txt"
    lines = path.read_text().splitlines()
    bad = lines.copy()
    bad[5] = bad[5].replace("\tA05\t", "\tQ05\t")
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(ValueError, match=rf"{path.name} line 6.*Q05"):
        pm.read_plate_files(d)
    dup = lines.copy()
    dup[5] = dup[5].replace("\tA05\t", "\tA04\t")
    path.write_text("\n".join(dup) + "\n")
    with pytest.raises(ValueError, match=rf"{path.name} line 6: duplicate well A04"):
        pm.read_plate_files(d)


def test_read_strips_spaces_and_refuses_bad_doses(written, tmp_path):
    """A trailing space a spreadsheet left is not part of a barcode or a compound id; a dose must be > 0."""
    layouts, _, _ = written
    d = copy_batch(written, tmp_path)
    barcodes = d / "barcode_platemap.csv"
    barcodes.write_text(barcodes.read_text().replace(f"{layouts[0].barcode},", f"{layouts[0].barcode} ,"))
    path = d / f"{layouts[0].plate_map_name}.txt"
    lines = path.read_text().splitlines()
    treated = next(i for i, line in enumerate(lines) if "\ttreatment" in line)
    spaced = lines.copy()
    fields = spaced[treated].split("\t")
    fields[2] = fields[2] + "  "  # broad_sample
    spaced[treated] = "\t".join(fields)
    path.write_text("\n".join(spaced) + "\n")
    read, compounds = pm.read_plate_files(d)
    assert read[0].barcode == layouts[0].barcode
    pd.testing.assert_frame_equal(read[0].wells, layouts[0].wells)
    for bad_dose in ("nan", "-1"):
        fields[4] = bad_dose  # dose_um
        lines[treated] = "\t".join(fields)
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=rf"{path.name} line {treated + 1}: dose_um '{bad_dose}'.*> 0"):
            pm.read_plate_files(d)


def test_a_96_well_plate_map_is_refused_not_read_as_a_384_well_quarter(written, tmp_path):
    """A map of exactly the wells A01-H12 is a 96-well plate's: read on a 384-well plate its wells
    would be the top-left quarter, the rest never appearing. A sparse 384-well map still reads."""
    layouts, _, _ = written
    d = copy_batch(written, tmp_path)
    path = d / f"{layouts[0].plate_map_name}.txt"
    header, *rows = path.read_text().splitlines()
    well = header.split("\t").index("well_position")
    quarter = [line for line in rows if parse_well(line.split("\t")[well])[0] < 8
               and parse_well(line.split("\t")[well])[1] < 12]
    assert len(quarter) == 96
    path.write_text("\n".join([header, *quarter]) + "\n")
    with pytest.raises(ValueError, match=rf"{path.name}: lists exactly the 96 wells A01-H12.*96-well plate map"):
        pm.read_plate_files(d)
    path.write_text("\n".join([header, *quarter[:95]]) + "\n")  # one well fewer: a sparse 384-well map
    read, _ = pm.read_plate_files(d)
    assert (read[0].wells["role"] != "empty").sum() <= 95


@pytest.mark.skipif(not CPJUMP1.is_dir(), reason=f"shared data absent: {CPJUMP1}")
def test_read_real_cpjump1_platemap():
    layouts, compounds = pm.read_plate_files(CPJUMP1)
    barcodes = pd.read_csv(CPJUMP1 / "barcode_platemap_CPJUMP1_10a.csv")
    assert [l.barcode for l in layouts] == barcodes["Assay_Plate_Barcode"].tolist()
    w = layouts[0].wells
    assert layouts[0].plate_map_name == "C-7210-01-CMP-013"
    assert (w["role"] == "negative_control").sum() == 64
    assert (w["role"] == "treatment").sum() == 320
    assert w.loc[w["well"] == "A01", "compound_id"].item() == "BRD-A86665761-001-01-1"
    assert w.loc[w["role"] == "treatment", "dose_um"].isna().all()  # CPJUMP1 has no dose_um column
    placed = set(w.loc[w["role"] == "treatment", "compound_id"])
    assert placed <= set(compounds["compound_id"])
    assert compounds["smiles"].str.len().gt(0).all()


def test_a_dose_that_takes_the_whole_transfer_volume_gets_no_back_fill_transfer():
    """12.5 uM of 10 mM stock into 40 uL is exactly the 50 nL transfer volume: such a well gets the
    compound alone, no 0 nL DMSO back-fill row; every pick-list row moves liquid and every filled well
    gets 50 nL in all."""
    config = pm.PlateLayoutConfig()
    assert config.compound_volume_nl(12.5) == config.transfer_volume_nl  # the premise
    layouts = pm.design_plates(treatments(10, dose_um=12.5) + [("C99999", 2.5)], config, seed=0)
    _, pick = pm._source_and_picklist(layouts, {})
    assert (pick["Transfer Volume"] > 0).all()
    per_well = pick.groupby("Destination Well")["Transfer Volume"]
    assert np.allclose(per_well.sum(), 50.0)
    w = layouts[0].wells
    full = {echo_well(x) for x, d in zip(w["well"], w["dose_um"]) if d == 12.5}
    assert (per_well.size()[sorted(full)] == 1).all()  # compound only
    assert per_well.size()[echo_well(w.loc[w["compound_id"] == "C99999", "well"].iloc[0])] == 2  # 10 nL + 40 nL DMSO


def test_a_sample_takes_as_many_source_wells_as_its_volume_needs_a_full_well_included():
    """Closed form: a sample drawing ``V`` nL needs ``ceil(V / capacity)`` source wells. 20 DMSO wells
    of 50 nL (and no back-fill: every treatment takes the whole 50 nL) draw exactly one 1,000 nL well."""
    config = pm.PlateLayoutConfig(n_negative_controls=20, source_max_volume_ul=16.0, source_dead_volume_ul=15.0)
    assert config.source_capacity_nl == 1000.0
    layouts = pm.design_plates(treatments(5, dose_um=12.5), config, seed=0)
    source, pick = pm._source_and_picklist(layouts, {})
    dmso = source[source["pert_iname"] == "DMSO"]
    assert pick.loc[pick["Sample ID"] == "DMSO", "Transfer Volume"].sum() == 1000.0
    assert len(dmso) == 1 and dmso["transfer_total_ul"].tolist() == [1.0] and dmso["fill_volume_ul"].tolist() == [16.0]
    more = pm.design_plates(treatments(5, dose_um=12.5), pm.PlateLayoutConfig(
        n_negative_controls=21, source_max_volume_ul=16.0, source_dead_volume_ul=15.0), seed=0)
    source, _ = pm._source_and_picklist(more, {})
    assert sorted(source.loc[source["pert_iname"] == "DMSO", "transfer_total_ul"]) == [0.05, 1.0]
