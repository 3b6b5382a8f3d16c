"""Rounds proposed by mistake: the pending warning and `loop round cancel`."""

import logging

import pytest
from typer.testing import CliRunner

from loop.campaign import Campaign, CampaignConfig
from loop.cli import app
from loop.ingest import IngestError, ingest_results
from loop.lab import run_synthetic_lab
from loop.library import add_virtual_library
from loop.propose import candidate_table, propose
from loop.rounds import cancel_round
from loop.status import campaign_status


def test_a_cancelled_round_releases_its_compounds_and_refuses_its_results(tmp_path, caplog):
    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=2, lab=dict(image_size_px=128, cells_per_field=8.0)))
    add_virtual_library(campaign, 300, seed=0)
    first = propose(campaign, 96)
    with caplog.at_level(logging.WARNING, logger="loop.propose"):
        second = propose(campaign, 96)  # the second `propose` by mistake
    assert "round(s) 1 still have plates in the lab" in caplog.text
    _, pending = candidate_table(campaign)
    assert pending.sum() == first.n_treatments + second.n_treatments
    res = CliRunner().invoke(app, ["--campaign", str(campaign.root), "round", "cancel", "2"])
    assert res.exit_code == 0, res.output
    assert second.barcodes[0] in res.output
    _, pending = candidate_table(campaign)
    assert pending.sum() == first.n_treatments  # round 2's compounds are candidates again
    assert campaign_status(campaign)["plates"] == {"total": 2, "pending": 1, "returned": 0, "cancelled": 1}
    with pytest.raises(ValueError, match="round 2 was already cancelled"):
        cancel_round(campaign, 2)
    with pytest.raises(ValueError, match="no round 7"):
        cancel_round(campaign, 7)

    run_synthetic_lab(second.out_dir, tmp_path / "late", campaign=campaign, seed=1, write_images=False)
    with pytest.raises(IngestError, match=f"plate {second.barcodes[0]} belongs to round 2, which was cancelled"):
        ingest_results(campaign, tmp_path / "late")
    run_synthetic_lab(first.out_dir, tmp_path / "results", campaign=campaign, seed=1, write_images=False)
    ingest_results(campaign, tmp_path / "results")
    with pytest.raises(ValueError, match="already imported; a round with measurements cannot be cancelled"):
        cancel_round(campaign, 1)


def test_an_interrupted_proposal_leaves_no_plate_files_and_no_round(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which the CLI turns into the same unwinding) while the plate files are
    written: the half-written folder is removed and no round is recorded."""
    import loop.propose

    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=2))
    add_virtual_library(campaign, 200, seed=0)

    def interrupted(*args, **kwargs):
        (tmp_path / "plates").mkdir(exist_ok=True)
        (tmp_path / "plates" / "half.txt").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.propose, "write_plate_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        propose(campaign, 96, out_dir=tmp_path / "plates")
    assert not (tmp_path / "plates").exists()
    assert campaign_status(campaign)["rounds"] == 0


def test_sigterm_during_lab_run_leaves_no_temporary_plate_folder(tmp_path):
    """A scheduler's SIGTERM unwinds the CLI like Ctrl-C, so the synthetic lab removes the plate
    folder it was writing (it used to stay behind as results/.tmp-<barcode>-*)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=2))
    add_virtual_library(campaign, 200, seed=0)
    proposal = propose(campaign, 384)
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "loop.cli", "--campaign", str(campaign.root), "lab", "run",
                             str(proposal.out_dir), "--out", str(results)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and any(p.name.startswith(".tmp-") for p in results.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "lab run ended before writing a plate"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert not [p.name for p in results.iterdir() if p.name.startswith(".tmp-")]
