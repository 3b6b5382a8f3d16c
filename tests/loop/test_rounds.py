"""Rounds proposed by mistake: the pending warning and `loop round cancel`."""

import logging
from pathlib import Path

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
    """Ctrl-C (or SIGTERM, which the CLI turns into the same unwinding) after the plate files were
    written and before the round was recorded: the folder is removed and no round is recorded.
    A folder that filled up while the proposal was scoring (another campaign given the same
    --out) is refused and kept: it is not this proposal's to remove."""
    import loop.propose

    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=2))
    add_virtual_library(campaign, 200, seed=0)

    def interrupted(*args, **kwargs):
        assert (tmp_path / "plates" / "round_config.json").exists()
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop.propose, "_record_round", interrupted)
        with pytest.raises(KeyboardInterrupt):
            propose(campaign, 96, out_dir=tmp_path / "plates")
    assert not (tmp_path / "plates").exists() and not (campaign.root / ".proposing.json").exists()
    assert campaign_status(campaign)["rounds"] == 0

    choose = loop.propose.choose_compounds

    def meanwhile(*args, **kwargs):  # another campaign writes its plates to the same --out
        (tmp_path / "plates").mkdir()
        (tmp_path / "plates" / "theirs.txt").write_text("keep")
        return choose(*args, **kwargs)

    monkeypatch.setattr(loop.propose, "choose_compounds", meanwhile)
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        propose(campaign, 96, out_dir=tmp_path / "plates")
    assert (tmp_path / "plates" / "theirs.txt").read_text() == "keep"
    assert campaign_status(campaign)["rounds"] == 0


KILLED_PROPOSAL = """
import os, sys
import loop.propose
from loop.campaign import Campaign
record = loop.propose._record_round
def killed(*args, **kwargs):  # SIGKILL: no clean-up, no finally
    if sys.argv[2] == "after":
        record(*args, **kwargs)
    os._exit(137)
loop.propose._record_round = killed
loop.propose.propose(Campaign.open(sys.argv[1]), 96)
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_proposal_killed_around_its_commit_is_settled_by_the_next(tmp_path, caplog, when):
    """SIGKILL after the plate files appeared and before (or just after) the round was recorded:
    the journal tells the next proposal whose files they are. Not recorded: removed, and the
    round proposed again; recorded: kept, and the next round proposed. A folder of anything else
    (a copy of a round's plates, other files) stays and is refused, as before."""
    import json
    import shutil
    import subprocess
    import sys

    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=2))
    add_virtual_library(campaign, 200, seed=0)
    run = subprocess.run([sys.executable, "-c", KILLED_PROPOSAL, str(campaign.root), when], capture_output=True,
                         text=True)
    assert run.returncode == 137, run.stderr
    left = campaign.round_dir(1) / "plates"
    token = json.loads((left / "round_config.json").read_text())["proposal_token"]
    assert json.loads((campaign.root / ".proposing.json").read_text())["token"] == token
    assert campaign_status(campaign)["rounds"] == (1 if when == "after" else 0)
    with caplog.at_level(logging.WARNING, logger="loop.propose"):
        result = propose(campaign, 96)
    assert ("stopped before the round was recorded" in caplog.text) == (when == "before")
    assert result.round_index == (1 if when == "before" else 2) and campaign_status(campaign)["rounds"] == result.round_index
    assert not (campaign.root / ".proposing.json").exists()
    if when == "after":
        assert json.loads((left / "round_config.json").read_text())["proposal_token"] == token  # kept

    other = tmp_path / "other"  # plates of a recorded round, and a folder of something else
    shutil.copytree(left, other)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for folder in (other, tmp_path / "mine"):
        with pytest.raises(FileExistsError, match="already exists and is not an empty folder"):
            propose(campaign, 96, out_dir=folder)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (other / "round_config.json").exists()


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


def test_a_relative_out_outside_the_campaign_is_stored_so_it_can_be_found_again(tmp_path, monkeypatch):
    """``--out plates`` from another working directory: the round's folder is stored absolute (a
    path relative to the working directory would be read relative to the campaign)."""
    from sqlmodel import select

    from loop import store

    campaign = Campaign.init(tmp_path / "c", CampaignConfig(seed=2))
    add_virtual_library(campaign, 200, seed=0)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    result = propose(campaign, 96, out_dir=Path("plates"))
    with campaign.session() as session:
        stored = session.exec(select(store.Round.out_dir).where(store.Round.index == result.round_index)).one()
        layout = session.exec(select(store.Plate.layout_path)).first()
    assert campaign.absolute(stored) == campaign.absolute(layout) == tmp_path / "work" / "plates"
    assert (campaign.absolute(stored) / "round_config.json").exists()
