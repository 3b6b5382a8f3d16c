"""``loop lab run``: send plate files to the synthetic lab and collect its results folder (and return
the rounds a stopped closed-loop run left in it, :func:`return_pending_rounds`)."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlmodel import select

from lab_io.ground_truth import GroundTruth
from lab_io.synthetic_lab import SyntheticLab, SyntheticLabConfig
from loop import store
from loop.campaign import Campaign, CampaignConfig
from loop.ingest import ingest_results

log = logging.getLogger(__name__)


def make_lab(config: CampaignConfig, seed: int, write_images: bool = True) -> SyntheticLab:
    """The campaign's synthetic lab: its hidden world (ground truth) and its instrument settings."""
    lab_cfg = SyntheticLabConfig(**{**config.lab, "write_images": write_images})
    return SyntheticLab(GroundTruth(world_seed=config.lab_world_seed), seed=seed, config=lab_cfg)


def run_synthetic_lab(plates_dir: Path, results_dir: Path, *, campaign: Campaign | None = None, seed: int = 0,
                      write_images: bool = True, barcodes: list[str] | None = None) -> list[str]:
    """Image and measure every plate in ``plates_dir`` (``barcodes``: only these); returns the
    barcodes written to ``results_dir``."""
    plates_dir = Path(plates_dir)
    if not (plates_dir / "barcode_platemap.csv").exists():
        raise FileNotFoundError(f"{plates_dir}: no barcode_platemap.csv; is this a plates folder from `loop propose`?")
    config = campaign.config if campaign is not None else CampaignConfig()
    lab = make_lab(config, seed=seed, write_images=write_images)
    barcodes = lab.run_plates(plates_dir, Path(results_dir), barcodes=barcodes)
    log.info("synthetic lab returned %d plate(s) -> %s", len(barcodes), results_dir)
    return barcodes


def return_pending_rounds(campaign: Campaign, *, seed: int = 0, write_images: bool = True) -> list[Path]:
    """Finish the rounds a stopped closed-loop run against the synthetic lab left in the lab: each
    round's pending plates that have no results yet go through the synthetic lab into
    ``<round>/results`` (a plate there is whole: the lab renames each one into place), and the
    folder is ingested (plates imported before are no-ops). Returns those results folders.

    Only for campaigns run against the synthetic lab (``lab_round_flow``): it stands in for the
    lab on every pending plate."""
    with campaign.session() as session:
        pending = session.exec(select(store.Plate.round_index, store.Plate.barcode)
                               .where(store.Plate.status == "pending")).all()
        rounds = session.exec(select(store.Round).where(store.Round.index.in_({i for i, _ in pending}))).all()
    done = []
    for round_ in sorted(rounds, key=lambda r: r.index):
        plates_dir = campaign.absolute(round_.out_dir)
        results_dir = plates_dir.parent / "results"
        missing = [b for i, b in pending if i == round_.index and not (results_dir / b).exists()]
        log.info("round %d has plates in the synthetic lab: returning them into %s", round_.index, results_dir)
        if missing:
            run_synthetic_lab(plates_dir, results_dir, campaign=campaign, seed=seed, write_images=write_images,
                              barcodes=missing)
        ingest_results(campaign, results_dir)
        done.append(results_dir)
    return done
