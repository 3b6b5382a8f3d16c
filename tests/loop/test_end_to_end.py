"""The whole loop on a tiny synthetic campaign: propose -> lab -> ingest -> train -> propose.

One module-scoped campaign is built once; each test checks one promise of issue #2 on it.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlmodel import select

from lab_io.platemap import PlateLayoutConfig
from lab_io.schema import N_COLS, N_ROWS, parse_well
from loop import store
from loop.campaign import Campaign, CampaignConfig
from loop.ingest import IngestError, ingest_results
from loop.lab import run_synthetic_lab
from loop.library import add_virtual_library
from loop.propose import propose
from loop.status import campaign_status
from loop.train import train_assay
from lab_io.results import ResultsError

BUDGET = 96
TINY_ASSAY = dict(n_members=3, n_steps=150, hidden_dim=64, batch_size=256)
TINY_LAB = dict(image_size_px=128, cells_per_field=14.0)


@pytest.fixture(scope="module")
def round_one(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    campaign = Campaign.init(root / "campaign", CampaignConfig(seed=1, assay=TINY_ASSAY, lab=TINY_LAB))
    add_virtual_library(campaign, 300, seed=0)
    proposal = propose(campaign, BUDGET)
    results = root / "results-1"
    run_synthetic_lab(proposal.out_dir, results, campaign=campaign, seed=1)
    status_before = campaign_status(campaign)
    reports = ingest_results(campaign, results)
    snapshot = shutil.copytree(campaign.root, root / "after-round-one")  # no model, no plates in flight
    return dict(root=root, campaign=campaign, proposal=proposal, results=results, reports=reports,
                status_before=status_before, snapshot=snapshot)


def _status_counts(campaign):
    s = campaign_status(campaign)
    return (s["measurements"], s["plates"]["returned"], s["plates"]["pending"], s["compounds"])


def test_plate_map_promises(round_one):
    proposal = round_one["proposal"]
    plates_dir = proposal.out_dir
    barcodes = pd.read_csv(plates_dir / "barcode_platemap.csv")
    maps = pd.concat([pd.read_csv(plates_dir / f"{name}.txt", sep="\t", keep_default_na=False)
                      for name in barcodes["Plate_Map_Name"]])
    for well in maps["well_position"]:
        row, col = parse_well(well)
        assert 0 <= row < N_ROWS and 0 <= col < N_COLS
    used = maps[maps["role"] != "empty"]
    assert len(used) <= BUDGET
    treated = used[used["role"] == "treatment"]["broad_sample"]
    assert treated.is_unique and len(treated) == proposal.n_treatments > 0
    controls = used[used["role"] == "negative_control"]
    rows = {parse_well(w)[0] for w in controls["well_position"]}
    cols = {parse_well(w)[1] for w in controls["well_position"]}
    assert len(rows) >= 8 and len(cols) >= 8
    picklist = pd.read_csv(plates_dir / "picklist.csv")
    dest = {(p, parse_well(w)) for p, w in zip(picklist["Destination Plate Name"], picklist["Destination Well"])}
    mapped = {(b, parse_well(w)) for b, w in zip(
        used["plate_map_name"].map(dict(zip(barcodes["Plate_Map_Name"], barcodes["Assay_Plate_Barcode"]))),
        used["well_position"])}
    assert dest == mapped
    assert all((plates_dir / f"{b}.png").exists() for b in proposal.barcodes)


def test_ingest_recorded_every_mapped_well(round_one):
    campaign = round_one["campaign"]
    status = campaign_status(campaign)
    assert status["plates"]["returned"] == len(round_one["proposal"].barcodes)
    assert status["plates"]["pending"] == 0
    assert status["measurements"] == round_one["proposal"].n_wells
    assert round_one["status_before"]["measurements"] == 0
    qc = round_one["reports"][0]
    assert qc.status == "imported" and qc.cells_per_well_min > 0


def test_reingest_is_a_no_op(round_one):
    campaign = round_one["campaign"]
    before = _status_counts(campaign)
    reports = ingest_results(campaign, round_one["results"])
    assert all(r.status == "already imported" for r in reports)
    assert _status_counts(campaign) == before


def _copy_results(round_one, name):
    dst = round_one["root"] / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(round_one["results"], dst)
    return dst


def test_unknown_barcode_is_rejected_and_nothing_changes(round_one):
    campaign = round_one["campaign"]
    before = _status_counts(campaign)
    results = _copy_results(round_one, "unknown-barcode")
    barcode = round_one["proposal"].barcodes[0]
    plate = results / barcode
    plate.rename(results / "XX9999")
    with pytest.raises((IngestError, ResultsError), match="XX9999"):
        ingest_results(campaign, results)
    assert _status_counts(campaign) == before


def test_truncated_file_is_rejected_naming_it(round_one):
    campaign = round_one["campaign"]
    before = _status_counts(campaign)
    results = _copy_results(round_one, "truncated")
    nuclei = sorted((results / round_one["proposal"].barcodes[0] / "analysis").glob("*/Nuclei.csv"))[3]
    text = nuclei.read_bytes()
    nuclei.write_bytes(text[: int(len(text) * 0.6)])
    with pytest.raises(IngestError, match="already imported from different files"):
        ingest_results(campaign, results)  # the plate is imported: other bytes are refused before reading
    with pytest.raises(ResultsError, match="Nuclei.csv"):
        ingest_results(campaign, results, replace=True)  # read, and the cut file named
    assert _status_counts(campaign) == before


def test_well_outside_the_map_is_rejected_naming_it(tmp_path_factory):
    """A fresh campaign (plates still pending) whose results carry a well the map left empty."""
    root = tmp_path_factory.mktemp("outside")
    campaign = Campaign.init(root / "c", CampaignConfig(seed=2, lab=TINY_LAB))
    add_virtual_library(campaign, 40, seed=0)
    proposal = propose(campaign, 40)
    results = root / "results"
    run_synthetic_lab(proposal.out_dir, results, campaign=campaign, seed=2, write_images=False)
    barcode = proposal.barcodes[0]
    layout = pd.read_csv(proposal.out_dir / f"{barcode}-MAP.txt", sep="\t", keep_default_na=False)
    empty_well = layout.loc[layout["role"] == "empty", "well_position"].iloc[0]
    analysis = results / barcode / "analysis"
    src = sorted(analysis.iterdir())[0]
    dst = analysis / f"{barcode}-{empty_well}-1"
    shutil.copytree(src, dst)
    image = pd.read_csv(dst / "Image.csv")
    image["Metadata_Well"] = empty_well
    image.to_csv(dst / "Image.csv", index=False)
    before = _status_counts(campaign)
    with pytest.raises(IngestError, match=empty_well):
        ingest_results(campaign, results)
    assert _status_counts(campaign) == before


def _treated(plates_dir):
    maps = pd.read_csv(plates_dir / "barcode_platemap.csv")["Plate_Map_Name"]
    table = pd.concat([pd.read_csv(plates_dir / f"{m}.txt", sep="\t", keep_default_na=False) for m in maps])
    return set(table.loc[table["role"] == "treatment", "broad_sample"])


def test_train_then_propose_excludes_measured_compounds(round_one):
    campaign = round_one["campaign"]
    ensemble = train_assay(campaign)
    assert ensemble.n_members == 3
    measured = _treated(round_one["proposal"].out_dir)
    second = propose(campaign, BUDGET)
    assert second.model_version == ensemble.version
    proposed = _treated(second.out_dir)
    assert len(proposed) == second.n_treatments and not (proposed & measured)
    third = propose(campaign, BUDGET)  # round 2 plates are pending: their compounds are not proposed again
    again = _treated(third.out_dir)
    assert again and not (again & proposed) and not (again & measured)
    config = json.loads((second.out_dir / "round_config.json").read_text())
    assert config["model_version"] == ensemble.version
    assert config["layout"] == dataclasses.asdict(PlateLayoutConfig(**campaign.config.layout))  # every setting used
    assert config["layout"]["transfer_volume_nl"] == 50.0 and config["layout"]["stock_mm"] == 10.0
    with campaign.session() as session:  # the default: the ensemble anchored on the round-1 measurements
        rows = session.exec(select(store.Proposal.acquisition, store.Proposal.acq_value)
                            .where(store.Proposal.round_index >= 2)).all()
    assert {acquisition for acquisition, _ in rows} == {"anchored_gp_ucb"}
    assert all(value is not None and np.isfinite(value) for _, value in rows)  # each pick's UCB is kept


def test_phenotype_penalty_proposes_from_simulated_profiles(round_one, tmp_path):
    import dataclasses

    from loop.train import latest_model

    root = shutil.copytree(round_one["campaign"].root, tmp_path / "campaign")
    campaign = Campaign.open(root)
    if latest_model(campaign) is None:
        train_assay(campaign)
    campaign.config = dataclasses.replace(campaign.config, selection={"phenotype_penalty": 0.5,
                                                                      "measurement_anchor": False})
    proposal = propose(campaign, BUDGET)
    assert len(_treated(proposal.out_dir)) == proposal.n_treatments
    settings = [json.loads(p.read_text()) for p in (root / "cache").rglob("settings.json")]
    # whole profiles (every feature) were simulated and cached for the penalty
    assert any(s["settings"]["profile_dims"] is None and s["profile_dims"] > 0 for s in settings)


def test_anchored_proposal_from_a_prescreened_shortlist_with_pending(round_one, tmp_path, caplog):
    """Above ``simulate_all_max`` the surrogate prescreens; the anchored GP then runs over the
    measured conditions plus the shortlist, pending compounds believed and never proposed."""
    import dataclasses

    from loop.propose import candidate_table, measured_conditions
    from loop.train import latest_model

    root = shutil.copytree(round_one["campaign"].root, tmp_path / "campaign")
    campaign = Campaign.open(root)
    if latest_model(campaign) is None:
        train_assay(campaign)
    campaign.config = dataclasses.replace(campaign.config, funnel={"simulate_all_max": 20, "sample_size": 30,
                                                                   "shortlist_size": 15})
    measured = _treated(round_one["proposal"].out_dir)
    # 24 treatments a round: at least 60 of the 300 compounds stay eligible whichever tests ran before
    first = propose(campaign, 40)
    picked = _treated(first.out_dir)
    _, pending = candidate_table(campaign)
    assert pending.sum() >= len(picked) > 0
    with caplog.at_level("INFO", logger="acquisition.funnel"):
        second = propose(campaign, 40)  # the first proposal's plates are now in flight
    assert "prescreen" in caplog.text  # the surrogate shortlisted: more eligible compounds than 20
    again = _treated(second.out_dir)
    assert len(again) == second.n_treatments and not (again & picked) and not (again & measured)
    config = json.loads((second.out_dir / "round_config.json").read_text())
    assert config["campaign"]["funnel"]["simulate_all_max"] == 20
    # the round records the sizes the funnel used, and its surrogate learned the lab's measurements
    funnel = config["applied"]["funnel"]
    n_measured = len(measured_conditions(campaign))
    assert funnel["mode"] == "funnel" and funnel["n_sample"] == 30
    assert funnel["n_shortlist"] == min(15, funnel["n_eligible"] - 30) > 0
    assert funnel["n_pending"] == pending.sum()  # this test's first proposal and any earlier test's
    assert funnel["n_returned"] == 30 + funnel["n_shortlist"] + pending.sum()
    assert funnel["surrogate"]["n_measured"] == n_measured > 0
    assert config["applied"]["method"] == "anchored_gp_ucb" and 0 <= config["applied"]["anchor"]["weight"] <= 3
    with campaign.session() as session:
        rows = session.exec(select(store.Proposal.acquisition, store.Proposal.acq_value)
                            .where(store.Proposal.round_index == second.round_index)).all()
    assert {acquisition for acquisition, _ in rows} == {"anchored_gp_ucb"}
    assert all(np.isfinite(value) for _, value in rows)


@pytest.mark.parametrize("anchored", [False, True])
def test_scaffold_cap_applies_to_proposals_and_pending(round_one, tmp_path, monkeypatch, anchored):
    """``max_per_scaffold`` caps each scaffold's picks in a proposal, counting plates in flight,
    with ``select_batch`` and with the default anchored GP (which ignored it before session 31).
    The virtual library's Bemis-Murcko scaffolds are nearly all distinct (289 in 300 compounds),
    so the test puts compounds into 10 coarse groups: the 24 an uncapped proposal would pick
    into groups 0-3 (6 each, so a cap of 3 binds), every other one by SMILES length into 4-9."""
    import dataclasses

    import loop.propose
    from loop.library import load_compounds
    from loop.propose import candidate_table, choose_compounds

    top_picks: dict[str, int] = {}

    def coarse_ids(smiles, strict=True):
        return np.array([top_picks.get(s, 4 + len(s) % 6) for s in smiles], dtype=np.int64)

    monkeypatch.setattr(loop.propose, "murcko_scaffold_ids", coarse_ids)
    campaign = Campaign.open(shutil.copytree(round_one["snapshot"], tmp_path / "campaign"))
    train_assay(campaign)
    smiles = load_compounds(campaign).set_index("compound_id")["smiles"]
    candidates, pending = candidate_table(campaign)
    uncapped = choose_compounds(campaign, candidates, pending, 24, "ucb_topk", seed=0).picks
    top_picks.update({s: i % 4 for i, s in enumerate(candidates["smiles"].iloc[uncapped])})
    assert np.bincount(coarse_ids(candidates["smiles"])).min() >= 3  # 10 groups x 3 = 30 compounds can be picked
    selection = {"measurement_anchor": anchored, "max_per_scaffold": 3}
    if not anchored:
        selection.update(diversity_penalty=0.0, exploration_fraction=0.0)
    campaign.config = dataclasses.replace(campaign.config, selection=selection)
    first = propose(campaign, 40)  # 24 treatments, at most 3 in each of 10 groups
    with pytest.warns(UserWarning, match="only 6 candidates"):
        second = propose(campaign, 40)  # the first round is pending: 30 - 24 = 6 left
    treated = [_treated(result.out_dir) for result in (first, second)]
    assert len(treated[0]) == 24 and len(treated[1]) == 6
    assert np.bincount(coarse_ids(smiles[sorted(treated[0] | treated[1])])).max() == 3
    applied = json.loads((first.out_dir / "round_config.json").read_text())["applied"]
    assert applied["method"] == ("anchored_gp_ucb" if anchored else "select_batch")
    assert applied["selection"]["max_per_scaffold"] == 3 and "max_per_scaffold" not in applied["not_applied"]
    assert ("diversity_penalty" in applied["not_applied"]) == anchored  # the anchored GP spreads by itself
    with pytest.raises(ValueError, match="nothing could be proposed: max_per_scaffold=3"):
        propose(campaign, 40)  # every group is full, counting the two rounds in the lab


def test_target_phenotype_objective_drives_the_proposal(round_one, tmp_path, monkeypatch):
    """`loop objective set --target-compound`: the target is the median of the compound's measured
    wells, and proposals maximise the predicted profiles' similarity to it."""
    from typer.testing import CliRunner

    from acquisition.funnel import FunnelConfig
    from acquisition.objectives import ObjectiveConfig
    from acquisition.select import SelectionConfig, select_batch
    from lab_io.schema import feature_columns
    from loop.cli import app
    from loop.objective import measured_objective_values, measured_target
    from loop.propose import candidate_table, measured_conditions

    root = shutil.copytree(round_one["snapshot"], tmp_path / "campaign")  # no plates in flight
    campaign = Campaign.open(root)
    model = train_assay(campaign)
    with campaign.session() as session:
        top = session.exec(select(store.Measurement).where(store.Measurement.role == "treatment",
                                                           store.Measurement.activity.is_not(None))
                           .order_by(store.Measurement.activity.desc())).first()
        unmeasured = session.exec(select(store.Compound.compound_id).where(
            store.Compound.compound_id.not_in(select(store.Measurement.compound_id).where(
                store.Measurement.compound_id.is_not(None))))).first()
    wells = pd.read_parquet(campaign.absolute(top.profiles_path))
    expected = wells.loc[wells["Metadata_compound"] == top.compound_id, feature_columns(wells.columns)].median()
    target = measured_target(campaign, top.compound_id)
    assert dict(zip(target.features, target.values)) == pytest.approx(expected.dropna().to_dict())
    with pytest.raises(ValueError, match=f"{unmeasured}.*no measured wells.*put it on a plate first"):
        measured_target(campaign, unmeasured)

    runner = CliRunner()
    bad = runner.invoke(app, ["--campaign", str(root), "objective", "set", "--target-compound", "no-such"])
    assert bad.exit_code == 1 and "no-such" in bad.output
    ok = runner.invoke(app, ["--campaign", str(root), "objective", "set", "--target-compound", top.compound_id])
    assert ok.exit_code == 0, ok.output
    campaign = Campaign.open(root)
    objective = ObjectiveConfig.from_dict(campaign.config.objective)
    assert objective.uses_target and objective.activity_weight == 0 and objective.target_label == target.label
    assert "similarity" in runner.invoke(app, ["--campaign", str(root), "objective", "show"]).output
    progress = campaign_status(campaign)["target_progress"]  # the target compound is the closest measured one
    assert progress["closest"][0]["compound_id"] == top.compound_id and progress["closest"][0]["similarity"] > 0.9
    from loop.objective import target_progress

    padded = dataclasses.replace(objective, target_features=objective.target_features + ("Cells_NotMeasured_1",),
                                 target_values=objective.target_values + (5.0,))
    assert target_progress(campaign, padded)["closest"] == progress["closest"]  # only the shared features count
    assert progress["n_conditions"] > 50 and campaign_status(round_one["campaign"])["target_progress"] is None

    candidates, _ = candidate_table(campaign)
    proposal = propose(campaign, BUDGET, policy="greedy_mean")
    # the same batch from values computed independently: every candidate simulated with the funnel's
    # settings, the objective applied, greedy_mean's selection
    fps = np.asarray(campaign.load_fingerprints())[candidates["fp_row"].to_numpy()]
    profiles = model.predict_profiles(fps, np.full(len(fps), campaign.config.dose_um),
                                      n_cells=FunnelConfig().n_cells, seed=campaign.config.seed)
    similarity = objective.member_values(profiles, model.feature_names)  # K x n
    greedy = SelectionConfig(acquisition="mean", diversity_penalty=0.0, exploration_fraction=0.0,
                             measurement_anchor=False)
    best = select_batch(similarity, fps, proposal.n_treatments, greedy).indices
    assert _treated(proposal.out_dir) == set(candidates["compound_id"].iloc[best])
    activity = ObjectiveConfig().member_values(profiles, model.feature_names)
    assert set(best) != set(select_batch(activity, fps, proposal.n_treatments, greedy).indices)
    config = json.loads((proposal.out_dir / "round_config.json").read_text())
    assert config["campaign"]["objective"]["target_label"] == target.label
    # the default policy: the anchored GP on the similarity, where measured conditions score their
    # measured profiles; the reference itself is the measured condition most similar to the target
    measured = measured_conditions(campaign)
    observed = measured_objective_values(campaign, measured, objective, model.feature_names)
    assert measured["compound_id"].iloc[int(np.argmax(observed))] == top.compound_id
    assert observed.max() > 0.5 and np.isfinite(observed).all()
    with pytest.raises(ValueError, match="share 0 of the virtual assay's 2 features"):
        measured_objective_values(campaign, measured, objective, ["Cells_Nope_A", "Cells_Nope_B"])
    second = propose(campaign, BUDGET)
    with campaign.session() as session:
        rows = session.exec(select(store.Proposal.acquisition, store.Proposal.acq_value)
                            .where(store.Proposal.round_index == second.round_index)).all()
    assert {acquisition for acquisition, _ in rows} == {"anchored_gp_ucb"}
    assert all(np.isfinite(value) for _, value in rows)

    import loop.propose

    # selections that need no measured profile read none: qEI's incumbent is a prediction, and a
    # prescreen whose measured labels cannot be read learns from simulated compounds alone
    def unreadable(*args, **kwargs):
        raise ValueError("the measured profiles cannot be read")

    with monkeypatch.context() as patch:
        patch.setattr(loop.propose, "measured_objective_values", unreadable)
        saved = campaign.config
        campaign.config = dataclasses.replace(saved, selection={"measurement_anchor": False, "acquisition": "qEI"},
                                              funnel={"simulate_all_max": 20, "sample_size": 30, "shortlist_size": 15})
        candidates, pending = candidate_table(campaign)
        choice = loop.propose.choose_compounds(campaign, candidates, pending, 8, "loop", seed=0)
        assert len(choice.picks) == 8 and choice.applied["funnel"]["surrogate"]["n_measured"] == 0
        assert choice.applied["best_f"] is not None
        campaign.config = saved
    # a target saved before the first model (nothing to check it against then) that the model cannot
    # predict fails before any candidate is simulated, and nothing is recorded

    n_rounds = campaign_status(campaign)["rounds"]
    with monkeypatch.context() as patch:
        patch.setattr(loop.propose, "funnel_predict", lambda *a, **k: pytest.fail("simulated before the check"))
        foreign = dataclasses.replace(objective, target_features=("Cells_Nope_A", "Cells_Nope_B"),
                                      target_values=(1.0, 1.0))
        campaign.save_config(dataclasses.replace(campaign.config, objective=foreign.to_dict()))
        with pytest.raises(ValueError, match="shares 0 of its 2 features"):
            propose(campaign, BUDGET)
    # qEI with a target: the incumbent is the best member-mean predicted similarity of the measured
    # conditions (the lab's wells are in other units than the predictions)
    seen = {}
    original = loop.propose.select_batch
    monkeypatch.setattr(loop.propose, "select_batch", lambda *a, **k: seen.update(best_f=k["best_f"]) or original(*a, **k))
    campaign.save_config(dataclasses.replace(campaign.config, objective=objective.to_dict(),
                                             selection={"measurement_anchor": False, "acquisition": "qEI"}))
    n_rounds += 1
    propose(campaign, BUDGET)
    measured_fps = np.asarray(campaign.load_fingerprints())[measured["fp_row"].to_numpy()]
    predicted = objective.member_values(model.predict_profiles(measured_fps, measured["dose_um"].to_numpy(),
                                                               n_cells=FunnelConfig().n_cells, seed=campaign.config.seed),
                                        model.feature_names)
    assert seen["best_f"] == pytest.approx(float(predicted.mean(axis=0).max()), rel=1e-5)
    assert campaign_status(campaign)["rounds"] == n_rounds  # the refused proposal recorded nothing


def test_positive_controls_go_on_every_plate_and_are_never_picked(tmp_path):
    """A campaign with positive-control wells: a reference compound the library lacks is written by
    id alone, one the library holds with its structure; neither is ever proposed as a treatment,
    and the plates come back and are ingested."""
    layout = dict(n_negative_controls=16, n_positive_controls=8, positive_control_id="STAURO",
                  positive_control_dose_um=1.25)  # two droplets of 10 mM in 40 uL
    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=2, layout=layout, assay=TINY_ASSAY, lab=TINY_LAB))
    add_virtual_library(campaign, 120, seed=0)
    first = propose(campaign, 60)
    meta = pd.read_csv(first.out_dir / "compound_metadata.tsv", sep="\t", dtype=str, keep_default_na=False)
    stauro = meta[meta["broad_sample"] == "STAURO"]
    assert stauro[["pert_type", "control_type", "smiles"]].values.tolist() == [["control", "poscon", ""]]
    run_synthetic_lab(first.out_dir, tmp_path / "r1", campaign=campaign, seed=0)
    reports = ingest_results(campaign, tmp_path / "r1")
    assert [r.status for r in reports] == ["imported"]
    from loop.objective import measured_target

    target = measured_target(campaign, "STAURO")  # the positive control can be the target phenotype
    assert "8 well(s)" in target.label and len(target.features) > 10

    library_control = "VL-000005"
    campaign.config = dataclasses.replace(campaign.config, layout={**layout, "positive_control_id": library_control})
    second = propose(campaign, 60)
    treated = _treated(second.out_dir)
    assert library_control not in treated and "STAURO" not in treated and len(treated) == second.n_treatments
    meta = pd.read_csv(second.out_dir / "compound_metadata.tsv", sep="\t", dtype=str, keep_default_na=False)
    row = meta[meta["broad_sample"] == library_control].iloc[0]
    assert row["control_type"] == "poscon" and row["smiles"] and row["InChIKey"]


def test_propose_checks_out_and_campaign_json_before_scoring(round_one, tmp_path, monkeypatch):
    """An --out that is a file, or a hand-edited campaign.json with an unknown or ill-typed setting,
    fails before any compound is scored, naming the option or the file and section."""
    import loop.propose
    from loop.campaign import CampaignError

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the checks")

    monkeypatch.setattr(loop.propose, "choose_compounds", no_scoring)
    campaign = Campaign.open(shutil.copytree(round_one["snapshot"], tmp_path / "campaign"))
    (tmp_path / "afile.txt").write_text("hi")
    with pytest.raises(FileExistsError, match=r"--out .*afile.txt: already exists and is not an empty folder"):
        propose(campaign, 40, out_dir=tmp_path / "afile.txt")
    with pytest.raises(FileExistsError, match=r"--out .*afile.txt/plates: .*afile.txt is a file, not a folder"):
        propose(campaign, 40, out_dir=tmp_path / "afile.txt" / "plates")
    for section, value, message in (("selection", {"bogus": 1}, "bogus"),
                                    ("selection", {"max_per_scaffold": "2"}, "max_per_scaffold"),
                                    ("layout", {"n_positive_controls": 2}, "positive_control_id"),
                                    ("layout", {"n_negative_controls": 16.5}, "whole number"),
                                    ("layout", {"empty_edge": "false"}, "true or false")):
        campaign.config = dataclasses.replace(round_one["campaign"].config, **{section: value})
        with pytest.raises(CampaignError, match=rf"campaign.json: '{section}': .*{message}"):
            propose(campaign, 40)


def test_init_refuses_a_dose_the_echo_cannot_dispense(tmp_path):
    from loop.campaign import CampaignError

    with pytest.raises(CampaignError, match=r"dose_um: 13.0 uM needs 52.5 nL of 10.0 mM stock"):
        Campaign.init(tmp_path / "c", CampaignConfig(dose_um=13.0))
    with pytest.raises(CampaignError, match=r"dose_um: 0.35 uM would be dispensed as 0.625 uM"):
        Campaign.init(tmp_path / "c", CampaignConfig(dose_um=0.35))
    with pytest.raises(CampaignError, match=r"positive_control_dose_um: 50.0 uM needs 200.0 nL"):
        Campaign.init(tmp_path / "d", CampaignConfig(layout=dict(n_positive_controls=4, positive_control_id="P",
                                                                 positive_control_dose_um=50.0)))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_exploration_picks_are_recorded_as_exploration():
    from acquisition.select import Selection, SelectionConfig
    from loop.propose import _pick_labels

    selection = Selection(np.arange(4), np.zeros(4), {"phase": ["exploit"] * 3 + ["explore"],
                                                      "exploration_method": "std"})
    assert _pick_labels(selection, SelectionConfig(acquisition="qUCB")) == ["qUCB"] * 3 + ["qPosteriorStandardDeviation"]
    selection.diagnostics["exploration_method"] = "maxmin"
    assert _pick_labels(selection, SelectionConfig())[-1] == "maxmin"


def test_two_trainings_at_once_train_once(round_one, tmp_path):
    """A scheduled retrain beside `loop train` on the same data: the second waits for the first and
    reuses its version, instead of training into the same folder and failing on registration."""
    from concurrent.futures import ThreadPoolExecutor

    root = shutil.copytree(round_one["snapshot"], tmp_path / "campaign")
    with ThreadPoolExecutor(2) as pool:
        versions = list(pool.map(lambda _: train_assay(Campaign.open(root)).version, range(2)))
    assert versions[0] == versions[1]
    with Campaign.open(root).session() as session:
        assert len(session.exec(select(store.ModelVersion)).all()) == 1


def _rewrite_cells(root, change):
    """Apply ``change(cells) -> cells`` to every ingested plate's single-cell file of the campaign at ``root``."""
    for path in sorted((Path(root) / "measurements").glob("*.cells.parquet")):
        change(pd.read_parquet(path)).to_parquet(path, index=False)


def test_train_refuses_plates_with_dmso_cells_only(round_one, tmp_path):
    from loop.train import NothingToTrainOn

    root = shutil.copytree(round_one["snapshot"], tmp_path / "campaign")
    _rewrite_cells(root, lambda cells: cells[cells["Metadata_role"] != "treatment"])
    with pytest.raises(NothingToTrainOn, match="no treated cells"):
        train_assay(Campaign.open(root))
    with Campaign.open(root).session() as session:
        assert session.exec(select(store.ModelVersion)).first() is None  # proposals stay on the cold start


def test_training_keeps_a_feature_missing_in_a_few_cells_and_leaves_those_cells_out(round_one, tmp_path, caplog):
    from lab_io.schema import feature_columns
    from loop.train import MAX_MISSING_FRACTION, load_measured_cells, training_features

    root = shutil.copytree(round_one["snapshot"], tmp_path / "campaign")
    cells = load_measured_cells(Campaign.open(root))
    complete, _ = training_features(cells)
    scattered, sparse = complete[0], complete[1]

    def holes(frame):
        frame = frame.copy()
        frame.loc[frame.index[0], scattered] = np.nan  # one cell, as CellProfiler leaves an undefined value
        n_sparse = int(2 * MAX_MISSING_FRACTION * len(frame)) + 1
        frame.loc[frame.index[:n_sparse], sparse] = np.nan  # missing in more than 5 % of the cells
        return frame

    _rewrite_cells(root, holes)
    cells = load_measured_cells(Campaign.open(root))
    with caplog.at_level("WARNING"):
        features, kept = training_features(cells)
    assert scattered in features and sparse not in features
    assert set(features) == set(complete) - {sparse}
    assert np.isfinite(kept[features].to_numpy()).all() and len(kept) < len(cells)
    assert "left out" in caplog.text
    assert set(feature_columns(kept.columns)) >= set(features)


def test_cells_are_capped_per_well_as_each_plate_is_read(round_one, tmp_path):
    from loop.train import load_measured_cells

    campaign = Campaign.open(shutil.copytree(round_one["snapshot"], tmp_path / "campaign"))
    full = load_measured_cells(campaign, max_cells_per_well=None)
    capped = load_measured_cells(campaign, max_cells_per_well=3)
    per_well = full.groupby(["Metadata_Plate", "Metadata_Well"]).size()
    assert (capped.groupby(["Metadata_Plate", "Metadata_Well"]).size() == per_well.clip(upper=3)).all()
    pd.testing.assert_frame_equal(capped, load_measured_cells(campaign, max_cells_per_well=3))  # seeded


def test_status_and_propose_name_plates_ingested_after_the_model(round_one, tmp_path, caplog):
    import datetime as dt

    from loop.train import warn_if_model_behind

    root = shutil.copytree(round_one["snapshot"], tmp_path / "campaign")
    campaign = Campaign.open(root)
    version = train_assay(campaign).version
    assert campaign_status(campaign)["plates_not_in_model"] == []
    with campaign.session() as session:  # a plate comes back after the training
        trained_at = session.exec(select(store.ModelVersion.created_at)
                                  .where(store.ModelVersion.version == version)).one()
        plate = session.exec(select(store.Plate).where(store.Plate.status == "returned")).first()
        plate.returned_at = trained_at + dt.timedelta(seconds=1)
        session.add(plate)
        session.commit()
        barcode = plate.barcode
    assert campaign_status(campaign)["plates_not_in_model"] == [barcode]
    with caplog.at_level("WARNING"):
        assert warn_if_model_behind(campaign) == [barcode]
    assert barcode in caplog.text and "loop train" in caplog.text


def test_bad_assay_settings_in_campaign_json_are_named(round_one, tmp_path):
    from loop.train import assay_config

    root = shutil.copytree(round_one["snapshot"], tmp_path / "campaign")
    settings = json.loads((root / "campaign.json").read_text())
    settings["assay"]["hidden_dm"] = 64
    (root / "campaign.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"campaign.json: its \"assay\" settings: unknown FeatureAssayConfig keys"):
        assay_config(Campaign.open(root))
