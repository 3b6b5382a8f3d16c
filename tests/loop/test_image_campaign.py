"""A campaign can use an image assay (``loop use-assay``) as its virtual assay."""

import json
import logging

import pytest
from typer.testing import CliRunner

from loop.campaign import Campaign, CampaignConfig
from loop.cli import app
from loop.library import add_library_file
from loop.propose import propose
from loop.status import campaign_status
from loop.train import latest_model, register_image_assay
from models.image_assay import ImageAssay, train_image_assay

from image_helpers import tiny_config, tiny_crops

SMILES = ["CCO", "CCN", "CCCl", "c1ccccc1O", "c1ccccc1N", "CC(=O)O", "CCOC(=O)C", "C1CCCCC1N", "OCCO", "NCCN"]


@pytest.fixture(scope="module")
def image_campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_campaign")
    model_dir = root / "image_model"
    train_image_assay(tiny_crops(), model_dir, tiny_config(exclude_plates=("P2",)))
    return _campaign_with_library(root), model_dir


def _campaign_with_library(root):
    campaign = Campaign.init(root / "campaign", CampaignConfig(seed=3, funnel={"n_cells": 4}))
    library = root / "library.csv"
    library.write_text("smiles,compound_id\n" + "".join(f"{s},cmp{i}\n" for i, s in enumerate(SMILES)))
    add_library_file(campaign, library)
    return campaign


def test_registered_image_assay_drives_propose(image_campaign):
    campaign, model_dir = image_campaign
    assert latest_model(campaign) is None
    assay = register_image_assay(campaign, model_dir)
    current = latest_model(campaign)
    assert isinstance(current, ImageAssay) and current.version == assay.version
    assert campaign_status(campaign)["latest_model"] == assay.version
    proposal = propose(campaign, 40)
    assert proposal.model_version == assay.version and proposal.n_treatments >= 1
    config = json.loads((proposal.out_dir / "round_config.json").read_text())
    assert config["model_version"] == assay.version
    again = register_image_assay(campaign, model_dir)  # idempotent: still one version row
    assert again.version == assay.version and campaign_status(campaign)["model_versions"] == 1


def test_use_assay_cli_names_a_folder_without_a_model(image_campaign, tmp_path):
    campaign, model_dir = image_campaign
    runner = CliRunner()
    res = runner.invoke(app, ["--campaign", str(campaign.root), "use-assay", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "nope" in res.output
    res = runner.invoke(app, ["--campaign", str(campaign.root), "use-assay", str(model_dir)])
    assert res.exit_code == 0, res.output
    assert "image assay" in res.output


def test_image_assay_proposes_for_a_target_phenotype(image_campaign, tmp_path):
    """The target objective needs whole predicted profiles: the image assay's featurised cells."""
    from loop.objective import Target, set_objective

    _, model_dir = image_campaign
    campaign = _campaign_with_library(tmp_path)
    assay = register_image_assay(campaign, model_dir)
    names = assay.feature_names[:6]
    set_objective(campaign, target=Target(tuple(names), (2.0, -1.0, 0.5, 1.0, -2.0, 1.5), "test target"),
                  activity_weight=0.0, similarity_weight=1.0)
    proposal = propose(campaign, 40)
    config = json.loads((proposal.out_dir / "round_config.json").read_text())
    assert proposal.n_treatments >= 1 and config["campaign"]["objective"]["target_features"] == names
    with pytest.raises(ValueError, match="shares 0 of its 2 features"):
        set_objective(campaign, target=Target(("Cells_Nope_A", "Cells_Nope_B"), (1.0, 1.0), "other pipeline"),
                      activity_weight=0.0, similarity_weight=1.0)


def test_registered_folder_moved_retrained_or_deleted(tmp_path):
    """The campaign's image assay is its registered version: a moved folder is re-pointed by
    ``use-assay``, a folder retrained in place (another version) or deleted is an error saying so."""
    import shutil
    from dataclasses import replace

    model_dir = tmp_path / "m"
    cfg = tiny_config(n_members=1)
    assay = train_image_assay(tiny_crops(), model_dir, cfg)
    campaign = _campaign_with_library(tmp_path)
    register_image_assay(campaign, model_dir)
    moved = tmp_path / "moved"
    shutil.move(model_dir, moved)
    with pytest.raises(FileNotFoundError, match=f"image assay {assay.version} was registered there.*use-assay"):
        latest_model(campaign)
    register_image_assay(campaign, moved)
    assert latest_model(campaign).version == assay.version and campaign_status(campaign)["model_versions"] == 1
    # retrain in the same folder (one member more): a new version there, the registered one is gone
    train_image_assay(tiny_crops(), moved, replace(cfg, n_members=2))  # one member more
    with pytest.raises(ValueError, match=f"holds image assay .* not the campaign's registered {assay.version}"):
        latest_model(campaign)
    res = CliRunner().invoke(app, ["--campaign", str(campaign.root), "propose", "--budget", "40"])
    assert res.exit_code == 1 and "loop use-assay" in res.output


def test_use_assay_warns_when_the_campaign_measured_other_stains(image_campaign, tmp_path, caplog):
    _, model_dir = image_campaign
    campaign = _campaign_with_library(tmp_path)
    folder = campaign.measurements_dir / "PLATE1.crops"
    folder.mkdir(parents=True)
    (folder / "channels.json").write_text(json.dumps({"channel_names": ["DNA", "ER", "Mito"]}))
    with caplog.at_level("WARNING"):
        register_image_assay(campaign, model_dir)
    assert "trained on channels ['DNA', 'Tubulin', 'Actin'], but the campaign's PLATE1.crops has" in caplog.text
    # guessed names (ingest of an images-only plate without names) are not compared: said to be positional
    (folder / "channels.json").write_text(json.dumps({"channel_names": ["DNA", "Ch2", "Ch3"], "named": False}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        register_image_assay(campaign, model_dir)
    assert "trained on channels" not in caplog.text
    assert "the channels of PLATE1.crops are taken by position" in caplog.text
    # the library (ethanol, phenol, ...) holds no analogue of cyclohexamide, the model's one compound
    assert "0.0 % of the campaign's library (a sample of 10) is an analogue" in caplog.text


def test_scheduled_rounds_keep_the_chosen_image_assay(image_campaign, tmp_path, monkeypatch):
    """The flows' training steps (the rerun's catch-up, the retrain after ingest) train a feature
    ensemble; they must not make it current over an image assay chosen with ``loop use-assay``."""
    from flows.lab_loop import lab_round_flow, retrain_flow
    from loop.status import campaign_status

    _, model_dir = image_campaign
    campaign = _campaign_with_library(tmp_path)
    assay = register_image_assay(campaign, model_dir)
    records = []  # the flow's run sets up Prefect's logging: listen on the logger itself
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("loop.train")
    logger.addHandler(handler)
    try:
        out = lab_round_flow.fn(str(campaign.root), budget_wells=40, write_images=False)
    finally:
        logger.removeHandler(handler)
    assert out["proposal"]["model_version"] == assay.version and out["model_version"] == assay.version
    assert out["ingest"][0]["status"] == "imported"
    # said once: by the retrain after the ingest (the catch-up before the proposal had nothing to train on)
    kept = [r for r in records if f"image assay {assay.version} (`loop use-assay`), kept" in r.getMessage()]
    assert len(kept) == 1
    assert latest_model(campaign).version == assay.version
    assert campaign_status(campaign)["model_versions"] == 1  # no feature ensemble trained behind its back
    assert retrain_flow.fn(str(campaign.root)) == assay.version
    # `loop train` is the explicit way back to a feature ensemble
    res = CliRunner().invoke(app, ["--campaign", str(campaign.root), "train"])
    assert res.exit_code == 0, res.output
    feature_version = latest_model(campaign).version
    assert feature_version != assay.version
    # `loop use-assay` while a training runs: a version counts from when its training began, so
    # the image assay chosen meanwhile stays current
    import loop.train as train_module

    original = train_module._train_or_reuse

    def use_assay_meanwhile(*args, **kwargs):
        register_image_assay(campaign, model_dir)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_or_reuse", use_assay_meanwhile)
    assert train_module.train_assay(campaign).version == feature_version  # reused, not made current
    assert latest_model(campaign).version == assay.version


def test_an_image_assay_has_not_learned_from_plates_outside_its_training_plates(image_campaign, tmp_path, caplog):
    """An image assay made current after plates were ingested is not thereby trained on them: the
    status and the proposal warning list the returned plates with crops that are not among its
    training plates (the tiny model trained on P1 only)."""
    import datetime as dt

    from loop import store
    from loop.train import warn_if_model_behind

    _, model_dir = image_campaign
    campaign = _campaign_with_library(tmp_path)
    with campaign.session() as session:
        for barcode in ("P1", "LP0007"):
            session.add(store.Plate(barcode=barcode, plate_map_name=barcode, round_index=1, status="returned",
                                    returned_at=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)))
        session.commit()
    register_image_assay(campaign, model_dir)
    assert campaign_status(campaign)["plates_not_in_model"] == []  # no crops: no image assay can learn them
    for barcode in ("P1", "LP0007"):
        (campaign.measurements_dir / f"{barcode}.crops").mkdir(parents=True)
    assert campaign_status(campaign)["plates_not_in_model"] == ["LP0007"]
    with caplog.at_level("WARNING"):
        assert warn_if_model_behind(campaign) == ["LP0007"]
    assert "has not learned from plate(s) LP0007 (not among its training plates)" in caplog.text
