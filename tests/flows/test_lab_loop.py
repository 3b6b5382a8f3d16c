"""Prefect flows wrap the loop's functions: unit-tested with ``.fn()``, one real run in a test harness."""

import pytest

from lab_io.results import ResultsError
from flows.lab_loop import ingest_flow, lab_round_flow, propose_flow, retrain_flow
from loop.campaign import Campaign, CampaignConfig
from loop.library import add_virtual_library
from loop.status import campaign_status

TINY = dict(assay=dict(n_members=2, n_steps=60, hidden_dim=32, batch_size=128),
            lab=dict(image_size_px=96, cells_per_field=8.0))


@pytest.fixture()
def campaign_dir(tmp_path):
    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=3, **TINY))
    add_virtual_library(campaign, 60, seed=0)
    return str(campaign.root)


def test_lab_round_flow_fn_runs_the_whole_round(campaign_dir):
    out = lab_round_flow.fn(campaign_dir, budget_wells=40, write_images=False)
    status = campaign_status(Campaign.open(campaign_dir))
    assert status["plates"]["returned"] == 1 and status["model_versions"] == 1
    assert out["model_version"] == status["latest_model"]
    assert out["proposal"]["n_treatments"] == 40 - 16


def test_flows_are_thin_wrappers(campaign_dir, tmp_path):
    proposal = propose_flow.fn(campaign_dir, budget_wells=30)
    assert proposal["round_index"] == 1 and len(proposal["barcodes"]) == 1
    with pytest.raises(RuntimeError, match="no measurements"):
        retrain_flow.fn(campaign_dir)
    with pytest.raises(ValueError, match="executor must be 'local' or 'ray', got 'Local'"):
        retrain_flow.fn(campaign_dir, executor="Local")
    with pytest.raises(ValueError, match=r"budget \(--budget\) must be a positive number of wells, got 0"):
        propose_flow.fn(campaign_dir, budget_wells=0)
    with pytest.raises(ResultsError, match="missing"):
        ingest_flow.fn(campaign_dir, str(tmp_path / "missing"))
    with pytest.raises(ResultsError, match="missing"):  # plate by plate, a folder that is not there still fails
        ingest_flow.fn(campaign_dir, str(tmp_path / "missing"), each_plate=True)


def test_ingest_flow_passes_the_channel_names(campaign_dir, tmp_path, monkeypatch):
    import flows.lab_loop as lab_loop

    seen = {}

    def ingest(campaign, results_dir, **options):
        seen.update(options)
        return []

    monkeypatch.setattr(lab_loop, "ingest_results", ingest)
    assert ingest_flow.fn(campaign_dir, str(tmp_path), channel_names=["Mito", "DNA"]) == []
    assert seen["channel_names"] == ["Mito", "DNA"]


@pytest.mark.slow
def test_propose_flow_real_run(campaign_dir, prefect_harness):
    result = propose_flow(campaign_dir, budget_wells=30)
    assert result["n_treatments"] == 14


def test_a_rerun_after_a_failure_finishes_the_stopped_round_first(campaign_dir, monkeypatch):
    """The lab step fails: the round stays in the lab. Training fails: the data sit unused. A rerun
    first returns and ingests the pending round and trains on everything, then proposes from that
    model, so no round is left pending and no proposal ignores measured data."""
    import flows.lab_loop as lab_loop

    def fail(*args, **kwargs):
        raise RuntimeError("instrument down")

    with monkeypatch.context() as patch:
        patch.setattr(lab_loop, "run_synthetic_lab", fail)
        with pytest.raises(RuntimeError, match="instrument down"):
            lab_round_flow.fn(campaign_dir, budget_wells=30, write_images=False)
    assert campaign_status(Campaign.open(campaign_dir))["plates"]["pending"] == 1
    with monkeypatch.context() as patch:
        patch.setattr(lab_loop, "retrain_current", fail)
        with pytest.raises(RuntimeError, match="instrument down"):
            lab_round_flow.fn(campaign_dir, budget_wells=30, write_images=False)  # round 1 returned, round 2 ingested
    status = campaign_status(Campaign.open(campaign_dir))
    assert status["plates"] == {**status["plates"], "pending": 0, "returned": 2}
    with monkeypatch.context() as patch:  # the lab returned round 3, its ingest failed: results on disk
        patch.setattr(lab_loop, "ingest_results", fail)
        with pytest.raises(RuntimeError, match="instrument down"):
            lab_round_flow.fn(campaign_dir, budget_wells=30, write_images=False)
    out = lab_round_flow.fn(campaign_dir, budget_wells=30, write_images=False)
    assert out["proposal"]["round_index"] == 4 and out["proposal"]["model_version"] is not None
    assert campaign_status(Campaign.open(campaign_dir))["plates"]["returned"] == 4
