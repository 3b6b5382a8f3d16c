import json
"""loop/ingest.py: the per-well table ingest stores."""

import numpy as np
import pandas as pd
import pytest

from lab_io.schema import META_COMPOUND, META_DOSE, META_PLATE, META_ROLE, META_WELL, feature_columns
from lab_io.profiles import aggregate_wells, normalize_to_controls, phenotypic_activity
from loop.ingest import IngestError, well_profiles


def _cells(rng, roles=("negative_control",) * 4 + ("treatment",) * 2):
    rows = []
    for i, role in enumerate(roles):
        for _ in range(20):
            rows.append({META_PLATE: "P1", META_WELL: f"A{i + 1:02d}", META_ROLE: role,
                         META_COMPOUND: "" if role != "treatment" else f"C{i}", META_DOSE: 10.0,
                         "Cells_AreaShape_Area": rng.normal(100.0 + 40.0 * (role == "treatment"), 10.0),
                         "Nuclei_Intensity_MeanIntensity_DNA": rng.normal(1.0, 0.1),
                         "Cells_AreaShape_EulerNumber": 1.0,  # constant on the plate
                         # an integer background: every DMSO well's median is 207, treated wells 208
                         "Cytoplasm_Intensity_MedianIntensity_DNA": 207.0 + (role == "treatment"),
                         "Cells_Location_Center_X": rng.uniform(0.0, 1000.0)})  # bookkeeping
    return pd.DataFrame(rows)


def test_stored_well_features_are_all_in_control_units():
    """Columns the plate cannot normalise (constant, bookkeeping, no spread over the DMSO wells) are
    left out rather than stored raw next to the robust z of the others, or as (x - median) / eps
    (1e6 for the integer background); activity and hits use the normalised ones."""
    cells = _cells(np.random.default_rng(0))
    wells = well_profiles(cells, hit_sd=3.0)
    assert feature_columns(wells.columns) == ["Cells_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA"]
    controls = wells[wells[META_ROLE] == "negative_control"]
    assert controls["Cells_AreaShape_Area"].median() == pytest.approx(0.0, abs=1e-9)
    assert np.abs(wells[feature_columns(wells.columns)].to_numpy()).max() < 100
    treated = wells[wells[META_ROLE] == "treatment"]
    assert (treated["Cells_AreaShape_Area"] > 5).all()
    features = feature_columns(wells.columns)  # a treatment's activity is that of its stored features
    assert treated["Metadata_activity"].to_numpy() == pytest.approx(phenotypic_activity(treated, features))
    assert len(wells) == 6 and set(wells[META_WELL]) == set(cells[META_WELL])


@pytest.mark.parametrize("n_dmso", [8, 16])
def test_dmso_like_wells_are_no_hits_however_many_features(n_dmso):
    """The threshold comes from DMSO activities measured like a treatment's (each DMSO well against
    the others): against statistics it helped set a DMSO well scores low, and with 2,000 features
    every DMSO-like treatment cleared the in-sample threshold (a review's real CellProfiler plate:
    11 of 70)."""
    from loop import ingest

    rng = np.random.default_rng(n_dmso)
    n_treated, n_features = 120, 2000
    wells = pd.DataFrame(rng.normal(size=(n_dmso + n_treated, n_features)),
                         columns=[f"Cells_Intensity_F{i}_DNA" for i in range(n_features)])
    wells.insert(0, META_ROLE, ["negative_control"] * n_dmso + ["treatment"] * n_treated)
    wells.insert(0, META_WELL, [f"W{i}" for i in range(len(wells))])
    wells.insert(0, META_PLATE, "P1")
    profiles = ingest._normalised_profiles(wells, 3.0, say=False)
    assert profiles["Metadata_is_hit"].mean() < 0.02
    controls = (wells[META_ROLE] == "negative_control").to_numpy()
    features = [c for c in wells.columns if c.startswith("Cells_")]
    in_sample = phenotypic_activity(normalize_to_controls(wells, controls, features=features), features)
    threshold = ingest.hit_threshold(in_sample[controls], 3.0)  # the DMSO wells scored against all of them
    assert (profiles["Metadata_activity"][~controls] > threshold).mean() > 0.5


@pytest.mark.parametrize("n_dmso", [3, 4, 7])
def test_plates_with_few_dmso_wells_call_inactive_wells_hits_rarely(n_dmso, caplog):
    """Plates with 3-7 DMSO wells score each DMSO well against the others too (scored against all of
    them, the rule below 8 DMSO wells until session 38, 20-67 % of the inactive wells were hits here),
    and say that their calls are conservative."""
    from loop import ingest

    calls = []
    for seed in range(3):
        cells, truth = _plate_with_cell_counts(np.random.default_rng(seed), n_features=60)
        dmso = sorted(w for w, kind in truth.items() if kind == "dmso")
        cells = cells[~cells[META_WELL].isin(dmso[n_dmso:])]
        with caplog.at_level("WARNING", logger="loop.ingest"):
            wells = ingest._normalised_profiles(aggregate_wells(cells), 3.0)
        calls += [hit for w, hit in zip(wells[META_WELL], wells["Metadata_is_hit"]) if truth[w] == "inactive"]
    assert len(calls) > 300 and np.mean(calls) < 0.05
    assert f"plate P1: {n_dmso} DMSO wells with cells: each is scored against so few others" in caplog.text


def test_a_plate_with_two_dmso_wells_gets_no_hit_calls(caplog):
    """Two DMSO wells cannot score one against the other: no hit calls, said by name (scored against
    both, every DMSO well scored 0.6745 and every inactive well was a hit)."""
    from loop import ingest

    cells, truth = _plate_with_cell_counts(np.random.default_rng(0), n_features=60)
    dmso = sorted(w for w, kind in truth.items() if kind == "dmso")
    cells = cells[~cells[META_WELL].isin(dmso[2:])]
    with caplog.at_level("WARNING", logger="loop.ingest"):
        wells = ingest._normalised_profiles(aggregate_wells(cells), 3.0)
    assert not wells["Metadata_is_hit"].any() and np.isfinite(wells["Metadata_activity"]).all()
    assert "plate P1: no hit calls: 2 DMSO wells" in caplog.text


def test_a_plate_without_dmso_wells_is_refused_by_name():
    cells = _cells(np.random.default_rng(1), roles=("treatment",) * 3)
    with pytest.raises(IngestError, match="plate P1: no negative-control"):
        well_profiles(cells, hit_sd=3.0)
    cells = _cells(np.random.default_rng(1), roles=("negative_control",) + ("treatment",) * 3)
    with pytest.raises(IngestError, match="plate P1: only 1 negative-control .* needs at least 2"):
        well_profiles(cells, hit_sd=3.0)


@pytest.fixture(scope="module")
def two_plates_template(tmp_path_factory):
    """A campaign with two plates proposed and their results from the synthetic lab (built once)."""
    from loop.campaign import Campaign, CampaignConfig
    from loop.lab import run_synthetic_lab
    from loop.library import add_virtual_library
    from loop.propose import propose

    root = tmp_path_factory.mktemp("two_plates")
    campaign = Campaign.init(root / "c", CampaignConfig(seed=1, lab=dict(image_size_px=96, cells_per_field=6.0)))
    add_virtual_library(campaign, 800, seed=0)
    proposal = propose(campaign, 500)  # two plates
    assert len(proposal.barcodes) == 2
    run_synthetic_lab(proposal.out_dir, root / "results", campaign=campaign, seed=1, write_images=False)
    return root, proposal.barcodes


def _two_plates(tmp_path, template):
    """A fresh copy of the template's campaign (nothing ingested) and results folder."""
    import shutil

    from loop.campaign import Campaign

    root, barcodes = template
    shutil.copytree(root / "results", tmp_path / "results")
    return Campaign.open(shutil.copytree(root / "c", tmp_path / "c")), barcodes


def test_a_plate_that_fails_its_profiles_stops_the_whole_import(tmp_path, monkeypatch, two_plates_template):
    """Two plates come back; the second cannot be profiled. Nothing of the first is stored either
    (its files, its measurements, its status), and the error names the failing plate's folder."""
    import loop.ingest
    from loop.ingest import ingest_results
    from loop.status import campaign_status

    campaign, barcodes = _two_plates(tmp_path, two_plates_template)
    original = loop.ingest.plate_profiles
    second = barcodes[1]

    def failing(cells, hit_sd, edge_correction, cell_count_hits):
        if (cells[META_PLATE] == second).all():
            raise ValueError("no feature columns (expected Nuclei_*, Cells_*, Cytoplasm_*)")
        return original(cells, hit_sd, edge_correction, cell_count_hits)

    monkeypatch.setattr(loop.ingest, "plate_profiles", failing)
    with pytest.raises(IngestError, match=f"{second}: plate {second}: no feature columns"):
        ingest_results(campaign, tmp_path / "results")
    status = campaign_status(campaign)
    assert status["measurements"] == 0 and status["plates"]["returned"] == 0
    assert not list(campaign.measurements_dir.iterdir())
    monkeypatch.undo()
    assert [r.status for r in ingest_results(campaign, tmp_path / "results")] == ["imported", "imported"]


def test_ingest_cuts_crops_the_image_assay_can_load(tmp_path):
    """`loop ingest --crops-px`: measurements/<barcode>.crops/ holds the plate's crops labelled from its
    map (campaign compound ids and SMILES, DMSO at 0 uM for controls), loadable with the crops reader."""
    from typer.testing import CliRunner

    from lab_io.crops import load_crops
    from loop.campaign import Campaign, CampaignConfig
    from loop.cli import app
    from loop.lab import run_synthetic_lab
    from loop.library import add_virtual_library, load_compounds
    from loop.propose import propose

    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=1, lab=dict(image_size_px=160, cells_per_field=10.0)))
    add_virtual_library(campaign, 200, seed=0)
    proposal = propose(campaign, 40)
    run_synthetic_lab(proposal.out_dir, tmp_path / "results", campaign=campaign, seed=1)
    assert CliRunner().invoke(app, ["--campaign", str(campaign.root), "ingest", str(tmp_path / "results")]).exit_code == 0
    for barcode in proposal.barcodes:  # a new campaign's hit calls account for cell counts, flagged per well
        wells = pd.read_parquet(campaign.measurements_dir / f"{barcode}.wells.parquet")
        hit, withdrawn, loss = (wells[c].to_numpy(dtype=bool) for c in
                                ("Metadata_is_hit", "Metadata_hit_withdrawn", "Metadata_hit_by_cell_loss"))
        assert not (hit & withdrawn).any() and not (loss & ~hit).any()
    # imported without crops first: asking again with --crops-px adds them (it used to be a silent no-op)
    res = CliRunner().invoke(app, ["--campaign", str(campaign.root), "ingest", str(tmp_path / "results"),
                                   "--crops-px", "32", "--crops-per-well", "3"])
    assert res.exit_code == 0, res.output
    assert all((campaign.measurements_dir / f"{b}.crops").is_dir() for b in proposal.barcodes)
    crops = load_crops(campaign.measurements_dir)
    meta = crops.metadata
    assert crops.images.shape[1:] == (32, 32, 3) and meta.groupby("well").size().max() <= 3
    assert set(meta["plate"]) == set(proposal.barcodes)
    controls = meta["role"] == "negative_control"
    assert (meta.loc[controls, "compound"] == "DMSO").all() and (meta.loc[controls, "concentration_um"] == 0).all()
    library = load_compounds(campaign).set_index("compound_id")["smiles"]
    treated = meta[meta["role"] == "treatment"]
    assert len(treated) > 0 and (treated["smiles"] == treated["compound"].map(library)).all()
    assert (treated["concentration_um"] == campaign.config.dose_um).all()
    # and the image assay trains on them (tiny config: the loop closes through images)
    from image_helpers import tiny_config
    from models.image_assay import train_image_assay

    assay = train_image_assay(crops, tmp_path / "assay", tiny_config(n_members=1))
    assert assay.n_members == 1 and set(assay.meta["train_plates"]) == set(proposal.barcodes)


def test_a_partial_delivery_is_refused_by_well_and_imported_without_them_only_on_request(tmp_path, monkeypatch):
    """Ten wells' site folders are missing (an export copied before it finished): refused naming them,
    nothing stored. With allow_missing_wells the plate is imported without them: no measurement for
    those wells, so their compounds stay candidates, and the QC lists them. Another campaign's
    results carry another barcode tag and are refused as not emitted by this campaign."""
    import shutil

    from loop.campaign import Campaign, CampaignConfig
    from loop.ingest import ingest_results
    from loop.lab import run_synthetic_lab
    from loop.library import add_virtual_library
    from loop.propose import candidate_table, propose
    from loop.status import campaign_status

    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=1, lab=dict(image_size_px=128, cells_per_field=8.0)))
    add_virtual_library(campaign, 300, seed=0)
    proposal = propose(campaign, 96)
    barcode = proposal.barcodes[0]
    assert barcode.startswith("LP" + campaign.config.barcode_tag)
    run_synthetic_lab(proposal.out_dir, tmp_path / "results", campaign=campaign, seed=1, write_images=False)
    site_dirs = sorted((tmp_path / "results" / barcode / "analysis").iterdir())
    dropped = sorted({d.name.split("-")[-2] for d in site_dirs[:10]})
    for d in site_dirs:
        if d.name.split("-")[-2] in dropped:
            shutil.rmtree(d)
    with pytest.raises(IngestError, match=f"plate {barcode}: nothing was delivered for {len(dropped)} mapped "
                                          f"well\\(s\\) \\({dropped[0]}.*--allow-missing-wells"):
        ingest_results(campaign, tmp_path / "results")
    assert campaign_status(campaign)["measurements"] == 0
    [qc] = ingest_results(campaign, tmp_path / "results", allow_missing_wells=True)
    assert qc.status == "imported" and qc.missing_wells == dropped
    with campaign.session() as session:
        from loop import store
        from sqlmodel import select
        stored = set(session.exec(select(store.Measurement.well).where(store.Measurement.barcode == barcode)).all())
        mapped = session.exec(select(store.Well).where(store.Well.barcode == barcode, store.Well.well.in_(dropped))).all()
    assert not stored & set(dropped)
    lost = {w.compound_id for w in mapped if w.role == "treatment"}
    candidates, _ = candidate_table(campaign)
    assert lost and lost <= set(candidates["compound_id"])

    other = Campaign.init(tmp_path / "other", CampaignConfig(seed=1))
    add_virtual_library(other, 300, seed=0)
    propose(other, 96)
    import loop.ingest

    monkeypatch.setattr(loop.ingest, "read_plate", lambda *a, **k: pytest.fail("read before its barcode was checked"))
    with pytest.raises(IngestError, match=f"plate barcode '{barcode}' was not emitted by this campaign"):
        ingest_results(other, tmp_path / "results")  # refused before a plate is read (or segmented)


def test_a_plate_measured_with_other_features_is_refused_by_name(tmp_path, two_plates_template):
    """A plate whose object tables carry other column names (e.g. a database-style export that
    repeats the compartment prefix) shares no feature with the others: refused, nothing stored."""
    from loop.ingest import ingest_results
    from loop.status import campaign_status

    campaign, barcodes = _two_plates(tmp_path, two_plates_template)
    for table in (tmp_path / "results" / barcodes[1] / "analysis").glob("*/Nuclei.csv"):
        frame = pd.read_csv(table)
        frame.columns = [f"Nuclei_{c}" if c.startswith(("AreaShape_", "Intensity_")) else c for c in frame.columns]
        frame.to_csv(table, index=False)
    with pytest.raises(IngestError, match=rf"{barcodes[1]}: plate {barcodes[1]} measures \d+ features and plate "
                                          rf"{barcodes[0]} \d+; they share \d+: it lacks \d+ \(e.g. Nuclei_AreaShape"):
        ingest_results(campaign, tmp_path / "results")
    assert campaign_status(campaign)["measurements"] == 0 and not list(campaign.measurements_dir.iterdir())


def test_a_signal_right_after_the_commit_keeps_the_plate_files(tmp_path, monkeypatch, two_plates_template):
    """Ctrl-C can land while the commit returns, after SQLite stored the plate: its files stay."""
    import sqlmodel

    from loop.ingest import ingest_results

    campaign, barcodes = _two_plates(tmp_path, two_plates_template)
    real_commit = sqlmodel.Session.commit

    def commit_then_interrupt(self):
        real_commit(self)
        if any(getattr(o, "status", None) == "returned" for o in self.identity_map.values()):
            raise KeyboardInterrupt

    monkeypatch.setattr(sqlmodel.Session, "commit", commit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ingest_results(campaign, tmp_path / "results")
    monkeypatch.undo()
    assert (campaign.measurements_dir / f"{barcodes[0]}.cells.parquet").is_file()
    assert [r.status for r in ingest_results(campaign, tmp_path / "results")] == ["already imported", "imported"]


@pytest.mark.parametrize("images_only", [False, True])
def test_a_well_short_of_the_fields_its_neighbours_have_is_refused(tmp_path, images_only, monkeypatch):
    """A copy cut inside its last well (one of two fields there, the rest complete), from the
    CellProfiler tables or from the images alone: refused naming the well, nothing stored; the
    complete copy then imports. With allow_uneven_fields the short well is imported as delivered."""
    import shutil

    from loop.campaign import Campaign, CampaignConfig
    from loop.ingest import ingest_results
    from loop.lab import run_synthetic_lab
    from loop.library import add_virtual_library
    from loop.propose import propose
    from loop.status import campaign_status

    lab = dict(image_size_px=96, cells_per_field=6.0, fields_per_well=2)
    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=1, lab=lab))
    add_virtual_library(campaign, 60, seed=0)
    proposal = propose(campaign, 40)
    barcode = proposal.barcodes[0]
    complete = tmp_path / "complete"
    run_synthetic_lab(proposal.out_dir, complete, campaign=campaign, seed=1, write_images=images_only)
    partial = tmp_path / "partial"
    shutil.copytree(complete, partial)
    if images_only:
        shutil.rmtree(partial / barcode / "analysis")
        for path in sorted((partial / barcode / "Images").glob("*f02*"))[-3:]:  # the last field's channels
            path.unlink()
    else:
        shutil.rmtree(sorted((partial / barcode / "analysis").iterdir(), key=lambda p: p.name)[-1])
    with pytest.raises(IngestError, match=rf"plate {barcode}: 1 well\(s\) have fewer fields than the plate's others "
                                          r"\(\w+: 1 of 2\): a copy still in progress"):
        ingest_results(campaign, partial)
    assert campaign_status(campaign)["measurements"] == 0
    on_request = Campaign.open(shutil.copytree(campaign.root, tmp_path / "c2"))
    with pytest.raises(IngestError, match="fewer fields"):  # a flag for undelivered wells does not cover it
        ingest_results(on_request, partial, allow_missing_wells=True)
    [qc] = ingest_results(on_request, partial, allow_uneven_fields=True)
    assert qc.status == "imported" and campaign_status(on_request)["measurements"] > 0
    if images_only:
        shutil.rmtree(complete / barcode / "analysis")
    [qc] = ingest_results(campaign, complete)
    assert qc.status == "imported"

    def fail(*args, **kwargs):
        raise AssertionError("a plate imported before was parsed or segmented again")

    monkeypatch.setattr("lab_io.morphology.measure_field", fail)  # a scheduled re-read of the drop folder
    monkeypatch.setattr("lab_io.results._read_csv_strict", fail)
    monkeypatch.setattr("lab_io.results._parse_batch", fail)
    assert [r.status for r in ingest_results(campaign, complete)] == ["already imported"]


def test_replace_imports_the_complete_copy_of_a_partly_imported_plate(tmp_path, monkeypatch):
    """A plate imported without its undelivered wells refuses the complete copy (naming --replace);
    with replace it is imported again: measurements and files replaced in one step. A failure on
    the way leaves the earlier measurements and files exactly as they were."""
    import shutil

    from sqlmodel import select

    from loop import store
    from loop.campaign import Campaign, CampaignConfig
    from loop.ingest import ingest_results
    from loop.lab import run_synthetic_lab
    from loop.library import add_virtual_library
    from loop.propose import propose

    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=1, lab=dict(image_size_px=96, cells_per_field=6.0)))
    add_virtual_library(campaign, 60, seed=0)
    proposal = propose(campaign, 40)
    barcode = proposal.barcodes[0]
    run_synthetic_lab(proposal.out_dir, tmp_path / "complete", campaign=campaign, seed=1, write_images=False)
    shutil.copytree(tmp_path / "complete", tmp_path / "partial")
    for site in sorted((tmp_path / "partial" / barcode / "analysis").iterdir())[-3:]:
        shutil.rmtree(site)
    ingest_results(campaign, tmp_path / "partial", allow_missing_wells=True)

    def measured():
        with campaign.session() as session:
            return sorted(session.exec(select(store.Measurement.well).where(store.Measurement.barcode == barcode)).all())

    def files():
        return {p.name: p.read_bytes() for p in campaign.measurements_dir.iterdir()}

    partial_wells, partial_files = measured(), files()
    import loop.ingest

    with monkeypatch.context() as patch:  # refused from the files' bytes, before they are read
        patch.setattr(loop.ingest, "read_plate", lambda *a, **k: pytest.fail("read before its fingerprint"))
        with pytest.raises(IngestError, match="already imported from different files.*pass --replace"):
            ingest_results(campaign, tmp_path / "complete")

    def broken_insert(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(store, "bulk_insert", broken_insert)
        with pytest.raises(RuntimeError, match="disk full"):
            ingest_results(campaign, tmp_path / "complete", replace=True)
    assert measured() == partial_wells and files() == partial_files

    [qc] = ingest_results(campaign, tmp_path / "complete", replace=True)
    assert qc.status == "imported" and len(measured()) == len(partial_wells) + 3 == len(set(measured()))
    assert not [p for p in campaign.measurements_dir.iterdir() if p.name.startswith(".")]
    [again] = ingest_results(campaign, tmp_path / "complete")
    assert again.status != "imported" and len(measured()) == len(partial_wells) + 3


def test_a_replacement_stopped_anywhere_is_finished_by_the_next_ingest(tmp_path, monkeypatch):
    """--replace killed hard (no clean-up ran) before the commit: the next ingest puts the earlier
    files back; after the commit: it removes the set-aside ones, and the crops are not read twice.
    A replace that would drop a plate's crops (no --crops-px) is refused."""
    import shutil

    import loop.ingest as ingest
    from lab_io.crops import load_crops
    from loop.campaign import Campaign, CampaignConfig
    from loop.lab import run_synthetic_lab
    from loop.library import add_virtual_library
    from loop.propose import propose
    from loop.train import load_measured_cells

    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=1, lab=dict(image_size_px=96, cells_per_field=6.0)))
    add_virtual_library(campaign, 60, seed=0)
    proposal = propose(campaign, 40)
    barcode = proposal.barcodes[0]
    run_synthetic_lab(proposal.out_dir, tmp_path / "complete", campaign=campaign, seed=1)
    shutil.copytree(tmp_path / "complete", tmp_path / "partial")
    for site in sorted((tmp_path / "partial" / barcode / "analysis").iterdir())[-2:]:
        shutil.rmtree(site)
    ingest.ingest_results(campaign, tmp_path / "partial", allow_missing_wells=True, crop_px=24)
    earlier_cells = len(load_measured_cells(campaign))
    earlier_crops = len(load_crops(campaign.measurements_dir))
    with pytest.raises(IngestError, match=rf"\['{barcode}'\] have crops from their earlier files; pass --crops-px"):
        ingest.ingest_results(campaign, tmp_path / "complete", replace=True)

    real_record = ingest._record_plate

    def killed_before_commit(*args, **kwargs):
        raise SystemExit("killed")

    def killed_after_commit(*args, **kwargs):
        real_record(*args, **kwargs)
        raise SystemExit("killed")

    for kill, earlier_kept in ((killed_before_commit, True), (killed_after_commit, False)):
        with monkeypatch.context() as patch:
            patch.setattr(ingest, "_record_plate", kill)
            patch.setattr(ingest, "recover_replacements", lambda *args, **kwargs: None)  # a hard kill cleans nothing
            with pytest.raises(SystemExit):
                ingest.ingest_results(campaign, tmp_path / "complete", replace=True, crop_px=24)
        assert [p for p in campaign.measurements_dir.iterdir() if p.name.startswith(".")]
        [qc] = ingest.ingest_results(campaign, tmp_path / ("partial" if earlier_kept else "complete"))
        assert qc.status != "imported"  # the store's results, already imported
        assert not [p for p in campaign.measurements_dir.iterdir() if p.name.startswith(".")]
        cells, crops = len(load_measured_cells(campaign)), len(load_crops(campaign.measurements_dir))
        assert (cells == earlier_cells and crops == earlier_crops) if earlier_kept else \
            (cells > earlier_cells and crops > earlier_crops)


def test_each_plate_on_its_own_imports_the_good_plates_beside_a_refused_one(tmp_path, two_plates_template):
    """A watched drop folder where the second plate is still being written (a file cut mid-row):
    plate by plate, the first is imported and the second refused by name; once whole, it imports.
    ingest_results on the folder stays all or nothing."""
    from loop.ingest import ingest_each_plate, ingest_results
    from loop.status import campaign_status

    campaign, barcodes = _two_plates(tmp_path, two_plates_template)
    nuclei = sorted((tmp_path / "results" / barcodes[1] / "analysis").glob("*/Nuclei.csv"))[5]
    whole = nuclei.read_bytes()
    nuclei.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(Exception, match="Nuclei.csv"):
        ingest_results(campaign, tmp_path / "results")
    assert campaign_status(campaign)["measurements"] == 0
    reports, refused = ingest_each_plate(campaign, tmp_path / "results")
    assert [(r.barcode, r.status) for r in reports] == [(barcodes[0], "imported")]
    assert list(refused) == [barcodes[1]] and "Nuclei.csv" in refused[barcodes[1]]
    nuclei.write_bytes(whole)
    reports, refused = ingest_each_plate(campaign, tmp_path / "results")
    assert [r.status for r in reports] == ["already imported", "imported"] and not refused


def test_a_harmony_export_folder_of_an_images_only_plate(tmp_path, caplog):
    """Harmony's export folder (``<barcode>__<timestamp>-Measurement 1``) imports as its plate; without
    a Harmony index the channel names are guessed, with a warning, and its crops' channels.json says
    they are not declared; a second export of the plate beside it is refused naming both folders; the
    same images with names given (``--channels``) are imported again, with those names, only with
    ``replace``."""
    import json
    import shutil

    from loop.campaign import Campaign, CampaignConfig
    from loop.ingest import ingest_results
    from loop.lab import run_synthetic_lab
    from loop.library import add_virtual_library
    from loop.propose import propose

    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=1, lab=dict(image_size_px=96, cells_per_field=6.0)))
    add_virtual_library(campaign, 60, seed=0)
    barcode = propose(campaign, 40).barcodes[0]
    results = tmp_path / "results"
    run_synthetic_lab(campaign.round_dir(1) / "plates", results, campaign=campaign, seed=1, write_images=True)
    export = results / f"{barcode}__2024-01-02T03_04_05-Measurement 1"
    (results / barcode).rename(export)
    shutil.rmtree(export / "analysis")
    (export / "Images" / "Index.idx.xml").unlink()
    with caplog.at_level("WARNING", logger="lab_io.results"):
        [qc] = ingest_results(campaign, results, crop_px=24)
    assert qc.barcode == barcode and qc.status == "imported" and "guessed" in caplog.text
    channels_json = campaign.measurements_dir / f"{barcode}.crops" / "channels.json"
    assert json.loads(channels_json.read_text()) == {"channel_names": ["DNA", "Ch2", "Ch3"], "named": False}

    again = results / f"{barcode}__2024-01-02T05_00_00-Measurement 2"
    shutil.copytree(export, again)
    with pytest.raises(IngestError, match=r"Measurement 1 and .*Measurement 2: both hold plate"):
        ingest_results(campaign, results)
    shutil.rmtree(again)
    names = ["Ch3", "Ch2", "DNA"]  # as if the guess (DNA, Ch2, Ch3) had been wrong about DNA

    def stored_features():
        return set(pd.read_parquet(campaign.measurements_dir / f"{barcode}.cells.parquet").columns)

    guessed = stored_features()
    assert [r.status for r in ingest_results(campaign, results, channel_names=names)] == ["already imported"]
    [qc] = ingest_results(campaign, results, channel_names=names, replace=True, crop_px=24)
    assert qc.status == "imported" and stored_features() == guessed  # same stains named, other channels measured
    # the same files read with other names: the new files stay (the journal tells the imports apart)
    assert json.loads(channels_json.read_text()) == {"channel_names": names, "named": True}
    assert not list(campaign.measurements_dir.glob(".*"))
    renamed = ["DNA", "Tubulin", "Actin"]  # other stains: the plate is not compared with its own earlier copy
    [qc] = ingest_results(campaign, results, channel_names=renamed, replace=True, crop_px=24)
    assert qc.status == "imported" and any(c.endswith("_Tubulin") for c in stored_features())
    assert json.loads(channels_json.read_text()) == {"channel_names": renamed, "named": True}
    assert [r.status for r in ingest_results(campaign, results)] == ["already imported"]
    partial = tmp_path / "partial" / export.name  # the locked checks name the folder as it is called
    shutil.copytree(export, partial)
    first_well = sorted(partial.glob("Images/*.tiff"))[0].name[:6]  # r..c..
    for path in partial.glob(f"Images/{first_well}*"):
        path.unlink()
    with pytest.raises(IngestError, match=f"{partial}: plate {barcode}: nothing was delivered for 1 mapped well"):
        ingest_results(campaign, partial.parent, replace=True)


def test_ingest_removes_the_edge_effect_from_profiles_and_stored_cells(tmp_path, two_plates_template):
    """The synthetic lab images outer-ring wells sparser and dimmer. Ingest removes each plate's
    edge offset from its edge wells' profiles and cells (the stored cells' well medians are the
    raw ones less the offsets); a campaign.json written before the option imports as before."""
    import dataclasses

    from lab_io.profiles import is_edge_well
    from lab_io.results import read_plate
    from loop.campaign import CONFIG_FILE, Campaign, CampaignConfig
    from loop.ingest import annotate_cells, ingest_results, plate_profiles

    campaign, barcodes = _two_plates(tmp_path, two_plates_template)
    assert campaign.config.edge_correction
    reports = ingest_results(campaign, tmp_path / "results")
    assert all(r.edge_offset_sd > 0 for r in reports)
    wells = pd.read_parquet(campaign.measurements_dir / f"{reports[0].barcode}.wells.parquet")
    dmso = wells.loc[wells[META_ROLE] == "negative_control", "Metadata_activity"]
    assert reports[0].hit_threshold == pytest.approx(dmso.mean() + 3.0 * dmso.std(ddof=1))  # the QC table's
    barcode = barcodes[0]
    folder = next(p for p in (tmp_path / "results").iterdir() if p.name.startswith(barcode))
    with campaign.session() as session:
        from loop.ingest import _check_plate
        plan = _check_plate(session, read_plate(folder), tmp_path / "results", replace=True)
    raw = annotate_cells(plan.plate.cells, plan.well_map)
    _, edge = plate_profiles(raw, 3.0, edge_correction=True)
    feature = edge.offsets.abs().idxmax()
    stored = pd.read_parquet(campaign.measurements_dir / f"{barcode}.cells.parquet")
    raw_medians = raw.groupby("Metadata_Well")[feature].median()
    stored_medians = stored.groupby("Metadata_Well")[feature].median()
    on_edge = is_edge_well(raw_medians.index.tolist())
    np.testing.assert_allclose(stored_medians[on_edge], raw_medians[on_edge] - edge.offsets[feature], rtol=1e-5)
    np.testing.assert_array_equal(stored_medians[~on_edge], raw_medians[~on_edge])
    bookkeeping = [c for c in stored.columns if "_Center_" in c]  # object positions stay as measured
    assert bookkeeping and np.array_equal(stored[bookkeeping].to_numpy(), raw[bookkeeping].to_numpy())

    # a campaign.json without the key (written before it existed) keeps importing without it
    old = json.loads((campaign.root / CONFIG_FILE).read_text())
    del old["edge_correction"], old["cell_count_hits"]
    (campaign.root / CONFIG_FILE).write_text(json.dumps(old))
    assert not Campaign.open(campaign.root).config.edge_correction
    assert not Campaign.open(campaign.root).config.cell_count_hits
    new = CampaignConfig.from_json(json.dumps({"seed": 3}))
    assert new.edge_correction and new.cell_count_hits  # a new campaign's config: on
    with pytest.raises(Exception, match="edge_correction"):
        Campaign.init(tmp_path / "other", dataclasses.replace(CampaignConfig(), edge_correction="false"))


def test_parquet_written_in_chunks_reads_back_as_the_frame(tmp_path):
    from loop.ingest import write_parquet_in_chunks

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"Metadata_Well": [f"A{i:02d}" for i in range(10)], "Metadata_compound": [""] * 5 + ["c1"] * 5,
                          "Cells_x": rng.normal(size=10).astype(np.float32), "Nuclei_n": np.arange(10)})
    write_parquet_in_chunks(frame, tmp_path / "cells.parquet", chunk_rows=3)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "cells.parquet").num_row_groups == 4
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cells.parquet"), frame)


def test_a_refused_plate_is_told_the_channel_names_of_the_imported_ones(tmp_path):
    """An images-only plate whose channels were named otherwise than the imported plates' (e.g.
    guessed as DNA, Ch2, Ch3 where the campaign's were imported as DNA, Tubulin, Actin) is told
    which names to give."""
    from types import SimpleNamespace

    from loop.ingest import _stored_channel_hint

    campaign = SimpleNamespace(measurements_dir=tmp_path)
    assert _stored_channel_hint(campaign) == ""
    (tmp_path / "LP0001.crops").mkdir()
    (tmp_path / "LP0001.crops" / "channels.json").write_text(
        json.dumps({"channel_names": ["DNA", "Tubulin", "Actin"], "named": False}))
    assert _stored_channel_hint(campaign) == ", e.g. --channels DNA,Tubulin,Actin as LP0001.crops was imported"


def _simulated_plate(rng, edge_shift: float, active_fraction: float, n_features: int = 30) -> pd.DataFrame:
    """Single cells of a 384-well plate: 16 DMSO wells and 340 treatments on random wells, a share
    of them active along one direction; edge wells shifted by ``edge_shift`` along another."""
    from lab_io.profiles import is_edge_well
    from lab_io.schema import well_name

    wells = [well_name(r, c) for r in range(16) for c in range(24)]
    order = rng.permutation(384)[:356]
    edge_direction, active_direction = rng.normal(size=n_features), rng.normal(size=n_features)
    frames = []
    for i, w in enumerate(order):
        role = "negative_control" if i < 16 else "treatment"
        active = role == "treatment" and rng.random() < active_fraction
        mean = 0.3 * rng.normal(size=n_features) + edge_shift * edge_direction * is_edge_well([wells[w]])[0] \
            + 2.0 * active_direction * active
        frame = pd.DataFrame(mean + rng.normal(size=(8, n_features)), columns=[f"Cells_f{j}" for j in range(n_features)])
        frames.append(frame.assign(**{META_PLATE: "P1", META_WELL: wells[w], META_ROLE: role, "active": active}))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("edge_shift, active_fraction", [(0.0, 0.5), (1.0, 0.05), (1.0, 0.5)])
def test_the_edge_correction_removes_an_edge_effect_and_invents_none(edge_shift, active_fraction):
    """Inactive treatments on edge wells score like inside ones after the correction, whether 5 % or
    half of the compounds act; without an edge effect, a plate where half act (the median of all
    wells then jumps between actives and inactives) is left as it is."""
    from lab_io.profiles import is_edge_well
    from loop.ingest import plate_profiles

    rng = np.random.default_rng(7)
    cells = _simulated_plate(rng, edge_shift, active_fraction)
    truth = cells.groupby(META_WELL)["active"].first()
    gaps = {}
    for corrected in (False, True):
        wells, edge = plate_profiles(cells.drop(columns="active"), 3.0, corrected)
        treated = wells[wells[META_ROLE] == "treatment"].set_index(META_WELL)
        quiet = treated[~truth.loc[treated.index].to_numpy()]
        on_edge = is_edge_well(quiet.index.tolist())
        gaps[corrected] = quiet["Metadata_activity"][on_edge].median() - quiet["Metadata_activity"][~on_edge].median()
    if edge_shift == 0.0:
        assert edge is None or edge.size_sd < 0.1
        assert abs(gaps[True]) < 0.05
    else:
        assert edge is not None and gaps[False] > 0.2 and abs(gaps[True]) < 0.25 * gaps[False]


def _plate_with_cell_counts(rng, n_features=40, few=(4, 8), many=(30, 45), toxic_fraction=0.0, edge_loss=0.0):
    """192 wells of a 384-well plate: 32 DMSO, treatments all inactive except ``toxic_fraction``
    that keep 15 % of their cells (profile unchanged); a third of the inactive ones have only
    ``few`` cells; edge wells lose ``edge_loss`` of their cells."""
    from lab_io.profiles import is_edge_well

    wells = [f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)]
    frames, truth = [], {}
    for i, w in enumerate(rng.permutation(wells)[:192]):
        role = "negative_control" if i < 32 else "treatment"
        kind = "dmso" if i < 32 else ("toxic" if rng.random() < toxic_fraction else
                                      "few" if rng.random() < 1 / 3 else "inactive")
        n = int(rng.integers(*(few if kind == "few" else many)))
        n = max(1, int(round(n * (0.15 if kind == "toxic" else 1.0) * (1 - edge_loss * is_edge_well([w])[0]))))
        values = 0.25 * rng.normal(size=n_features) + rng.normal(size=(n, n_features))
        frames.append(pd.DataFrame(values, columns=[f"Cells_f{j}" for j in range(n_features)])
                      .assign(**{META_PLATE: "P1", META_WELL: w, META_ROLE: role}))
        truth[w] = kind
    return pd.concat(frames, ignore_index=True), truth


def test_profile_hit_calls_matched_to_cell_counts_stop_calling_few_cells_hits():
    """Inactive wells imaged on 4-7 cells (DMSO wells have 30-44): the plate's threshold calls most
    of them hits, because a median over few cells is noisy; checked against DMSO wells measured
    with as few cells they are hits about as rarely as the other inactive wells. (Their cell loss
    alone makes them hits in ingest, ``cell_loss_rule``; this is the profile's share of the call.)"""
    from lab_io.profiles import aggregate_wells
    from loop.ingest import _count_matched_profile_hits, plate_profiles

    calls = []
    for seed in range(3):
        cells, truth = _plate_with_cell_counts(np.random.default_rng(seed))
        wells, _ = plate_profiles(cells, 3.0, False)
        matched = _count_matched_profile_hits(wells, aggregate_wells(cells), cells, None, 3.0)
        calls += [(truth[w], hit, m) for w, hit, m in zip(wells[META_WELL], wells["Metadata_is_hit"], matched)]
    rate = pd.DataFrame(calls, columns=["kind", "plate", "matched"]).groupby("kind").mean()
    assert rate.loc["few", "plate"] > 0.5  # what the plate threshold did
    assert rate.loc["few", "matched"] < 0.05 and rate.loc["inactive", "matched"] <= rate.loc["inactive", "plate"]
    assert rate.loc["dmso"].eq(0).all()  # controls are never hits


def test_count_matched_hit_calls_score_dmso_draws_without_their_donor_well():
    """Inactive wells on 14-23 cells (DMSO wells have 30-44), hit_sd 2: checked against DMSO draws
    each scored against the DMSO wells other than its donor (as the plate's DMSO activities are),
    they are hits about as often as inactive wells on as many cells as DMSO (2.6 % against 1.9 %
    over 8 plates). Draws scored against DMSO statistics their donor helped set score low, and
    the calls were 7.2 % against 2.6 %."""
    from loop.ingest import _count_matched_profile_hits, plate_profiles

    calls = []
    for seed in range(8):
        cells, truth = _plate_with_cell_counts(np.random.default_rng(seed), n_features=60, few=(14, 24))
        wells, _ = plate_profiles(cells, 2.0, False)
        matched = _count_matched_profile_hits(wells, aggregate_wells(cells), cells, None, 2.0)
        calls += [(truth[w], m) for w, m in zip(wells[META_WELL], matched)]
    rate = pd.DataFrame(calls, columns=["kind", "matched"]).groupby("kind")["matched"].mean()
    assert rate["few"] < 1.6 * rate["inactive"] and rate["inactive"] > 0.01


def test_hit_calls_matched_to_cell_counts_keep_strong_profiles_and_are_reproducible():
    """A well on few cells whose profile is far from DMSO stays a hit, and two runs agree."""
    from lab_io.profiles import aggregate_wells
    from loop.ingest import _count_matched_profile_hits, plate_profiles

    cells, truth = _plate_with_cell_counts(np.random.default_rng(5))
    few = [w for w, k in truth.items() if k == "few"][:5]
    feats = [c for c in cells.columns if c.startswith("Cells_")]
    cells.loc[cells[META_WELL].isin(few), feats[:20]] += 3.0
    wells, _ = plate_profiles(cells, 3.0, False)
    matched = pd.Series(_count_matched_profile_hits(wells, aggregate_wells(cells), cells, None, 3.0),
                        index=wells[META_WELL])
    assert matched[few].all()
    first, _ = plate_profiles(cells, 3.0, False, True)
    second, _ = plate_profiles(cells, 3.0, False, True)
    pd.testing.assert_frame_equal(first, second)


def _cell_loss_calls(wells, hit_sd=3.0):
    from loop.ingest import cell_loss_rule

    rule = cell_loss_rule(wells, hit_sd)
    treated = (wells[META_ROLE] == "treatment").to_numpy()
    return rule.calls(wells[META_WELL].tolist(), wells["Metadata_n_cells"].to_numpy()) & treated


def test_cell_loss_is_a_hit_and_a_drying_edge_is_not():
    """Treatments that leave 15 % of the cells are hits by cell loss whatever their profile; an edge
    ring with 35 % fewer cells in every well is put on the interior's scale, not taken for cell loss."""
    from lab_io.profiles import aggregate_wells, is_edge_well

    cells, truth = _plate_with_cell_counts(np.random.default_rng(1), many=(60, 70), toxic_fraction=0.1,
                                           edge_loss=0.35)
    wells = aggregate_wells(cells)  # keeps the per-well role
    loss = pd.Series(_cell_loss_calls(wells), index=wells[META_WELL])
    kinds = pd.Series(truth).loc[loss.index].to_numpy()
    on_edge = is_edge_well(loss.index.tolist())
    assert loss[kinds == "toxic"].all() and (kinds == "toxic").sum() >= 10
    assert not loss[kinds == "dmso"].any() and not loss[(kinds == "inactive") & on_edge].any()


def test_cell_loss_calls_at_about_the_nominal_rate_with_16_dmso_wells():
    """Inactive plates (log counts normal, sd 0.1), 16 DMSO wells: at hit_sd 3 a well is a cell-loss
    hit under 0.4 % of the time (about 0.05 %; nominal 0.13 %); a plain 3-robust-sd cut of the 16
    DMSO wells called 1.3 %."""
    rng = np.random.default_rng(0)
    calls = []
    for _ in range(300):
        n = np.round(np.exp(np.log(1000) + 0.1 * rng.normal(size=96))).astype(int)
        wells = pd.DataFrame({META_ROLE: ["negative_control"] * 16 + ["treatment"] * 80,
                              META_WELL: [f"{r}{c:02d}" for r in "CDEFGHIJ" for c in range(3, 15)],
                              META_PLATE: "P", "Metadata_n_cells": n})
        calls.append(_cell_loss_calls(wells)[16:])
    assert np.mean(calls) < 0.004


def test_a_treatment_well_without_a_cell_is_a_hit_by_cell_loss():
    """A compound that killed every cell of its well is a hit by cell loss (with cell_count_hits),
    as one that left a single cell is; an empty DMSO well is not."""
    from loop.ingest import _emptied_by_cell_loss

    class Config:
        cell_count_hits, hit_sd = True, 3.0

    class FakeCampaign:
        config = Config()

    wells = pd.DataFrame({META_ROLE: ["negative_control"] * 10 + ["treatment"],
                          META_WELL: [f"C{c:02d}" for c in range(3, 14)], META_PLATE: "P",
                          "Metadata_n_cells": [40, 42, 38, 41, 39, 40, 43, 37, 40, 41, 40]})
    mapped = pd.DataFrame({"well": ["C03", "C13", "D05", "D06"], "role": ["negative_control", "treatment",
                                                                          "treatment", "negative_control"]})
    n_cells = wells.set_index(META_WELL)["Metadata_n_cells"]
    assert _emptied_by_cell_loss(FakeCampaign(), wells, mapped, n_cells) == {"D05"}  # not the empty DMSO well
    one_cell = wells.assign(Metadata_n_cells=[40, 42, 38, 41, 39, 40, 43, 37, 40, 41, 1])
    assert _cell_loss_calls(one_cell).tolist() == [False] * 10 + [True]
    Config.cell_count_hits = False
    assert _emptied_by_cell_loss(FakeCampaign(), wells, mapped, n_cells) == set()


def test_count_matched_threshold_has_no_cliff_and_survives_missing_values():
    """A hit one cell short of the median DMSO well is judged (nearly) by the plate's threshold, not
    by DMSO wells of 80 % of its count; a feature missing in most cells (finite in every well's
    median) never withdraws hits."""
    from lab_io.profiles import aggregate_wells
    from loop.ingest import _count_matched_profile_hits, plate_profiles

    rng = np.random.default_rng(3)
    cells, truth = _plate_with_cell_counts(rng, few=(39, 40), many=(40, 41))  # DMSO wells have 40 cells
    feats = [c for c in cells.columns if c.startswith("Cells_")]
    short = [w for w, k in truth.items() if k == "few"]
    cells.loc[cells[META_WELL].isin(short), feats[:6]] += 1.1  # just above the plate's threshold
    wells, _ = plate_profiles(cells, 3.0, False)
    hits = wells.set_index(META_WELL).loc[short, "Metadata_is_hit"]
    matched = pd.Series(_count_matched_profile_hits(wells, aggregate_wells(cells), cells, None, 3.0),
                        index=wells[META_WELL])
    assert hits.sum() >= 10 and matched[short].sum() >= 0.9 * hits.sum()

    sparse = cells.copy()
    missing = rng.random(len(sparse)) < 0.75
    sparse.loc[missing, feats[-1]] = np.nan
    strong = [w for w, k in truth.items() if k == "few"][:5]
    sparse.loc[sparse[META_WELL].isin(strong), feats[:20]] += 3.0
    wells, _ = plate_profiles(sparse, 3.0, False)
    assert feats[-1] in wells.columns  # every well's median is finite
    matched = pd.Series(_count_matched_profile_hits(wells, aggregate_wells(sparse), sparse, None, 3.0),
                        index=wells[META_WELL])
    assert matched[strong].all()


def test_cell_loss_needs_more_than_the_poisson_noise_when_dmso_wells_agree_exactly():
    """DMSO wells all with 40 cells (no spread): the sd is the Poisson sd (1/sqrt(40)); a well with
    30 cells is not a hit (1.8 sd), one with 10 is (8.8 sd)."""
    wells = pd.DataFrame({META_ROLE: ["negative_control"] * 8 + ["treatment"] * 2, META_PLATE: "P",
                          META_WELL: [f"C{c:02d}" for c in range(3, 13)],
                          "Metadata_n_cells": [40] * 8 + [30, 10]})
    assert _cell_loss_calls(wells).tolist() == [False] * 9 + [True]


def test_the_first_edge_estimate_leaves_out_the_most_active_treatments_of_each_side():
    """``_quiet_on_each_side`` closed form: 2 of the 10 interior treatments score above the interior
    DMSO wells' hit threshold (20 %), so on each side the 20 % most active treatments (2 of 10) are
    left out of the first edge estimate, the edge ring's by rank although all its wells are inflated."""
    from loop.ingest import _quiet_on_each_side, hit_threshold

    dmso_activity = [0.9, 1.0, 1.1, 1.0, 0.95, 1.05]
    inside_treated = [1.0, 12.0, 0.8, 1.1, 10.0, 0.9, 1.2, 1.0, 0.7, 1.1]
    edge_treated = [3.0, 2.5, 9.0, 3.5, 2.0, 8.0, 3.2, 2.8, 3.1, 2.9]  # an edge effect lifts every one
    wells = [f"C{c:02d}" for c in range(3, 9)] + [f"D{c:02d}" for c in range(3, 13)] + [f"A{c:02d}" for c in range(1, 11)]
    activity = np.array(dmso_activity + inside_treated + edge_treated)
    profiles = pd.DataFrame({META_WELL: wells, "Metadata_activity": activity})
    dmso = np.arange(len(wells)) < 6
    treated = ~dmso
    threshold = hit_threshold(activity[dmso], 3.0)
    assert (np.array(inside_treated) > threshold).sum() == 2  # the closed form's premise
    quiet = _quiet_on_each_side(profiles, treated, dmso, 3.0)
    loud = set(np.flatnonzero(~quiet).tolist())
    assert loud == {6 + 1, 6 + 4, 16 + 2, 16 + 5}  # interior 12 and 10, edge 9 and 8


def test_only_treatment_wells_are_hits_however_active_a_control_is():
    """Hit calls are for treatments: positive controls far above the DMSO threshold (mean + 1 sd) are
    no hits, nor is a DMSO well above it; the treatments above it are."""
    from loop.ingest import hit_threshold

    roles = ("negative_control",) * 6 + ("positive_control",) * 2 + ("treatment",) * 2
    cells = _cells(np.random.default_rng(2), roles=roles)
    positive = cells[META_ROLE] == "positive_control"
    cells.loc[positive, "Cells_AreaShape_Area"] += 400.0
    wells = well_profiles(cells, hit_sd=1.0)
    dmso = (wells[META_ROLE] == "negative_control").to_numpy()
    threshold = hit_threshold(wells.loc[dmso, "Metadata_activity"].to_numpy(), 1.0)
    above = wells["Metadata_activity"].to_numpy() > threshold
    by_role = wells.assign(above=above).groupby(META_ROLE)
    assert by_role["above"].all()[["positive_control", "treatment"]].all()  # the premise: controls above it
    assert by_role["above"].any()["negative_control"]
    assert wells["Metadata_is_hit"].tolist() == (wells[META_ROLE] == "treatment").tolist()


def test_qc_counts_withdrawn_and_cell_loss_hits_and_wells_without_a_cell():
    """The QC row counts the flags of the plate's profiles, and a treatment well without a cell that
    is a cell-loss hit is a hit and a cell-loss hit there too."""
    from loop.ingest import _qc

    wells = pd.DataFrame({META_ROLE: ["negative_control"] * 3 + ["treatment"] * 4, META_WELL: list("ABCDEFG"),
                          "Metadata_activity": [1.0, 1.2, 0.8, 5.0, 0.9, 4.0, 1.1],
                          "Metadata_is_hit": [False, False, False, True, True, False, False],
                          "Metadata_hit_withdrawn": [False, False, False, False, False, True, False],
                          "Metadata_hit_by_cell_loss": [False, False, False, False, True, False, False]})
    n_cells = pd.Series([30, 31, 29, 28, 3, 12, 30], index=list("ABCDEFG"))
    qc = _qc("P1", wells, n_cells, [], ["H"], None, 3.0, {"H"})
    assert (qc.n_hits, qc.n_hits_withdrawn, qc.n_hits_cell_loss) == (3, 1, 2)
    plain = _qc("P1", wells.drop(columns=["Metadata_hit_withdrawn", "Metadata_hit_by_cell_loss"]), n_cells, [], [])
    assert (plain.n_hits, plain.n_hits_withdrawn, plain.n_hits_cell_loss) == (2, 0, 0)  # an old campaign's rule
