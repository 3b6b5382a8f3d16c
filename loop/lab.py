"""``loop lab run``: send plate files to the synthetic lab and collect its results folder."""

from __future__ import annotations

import logging
from pathlib import Path

from lab_io.ground_truth import GroundTruth
from lab_io.synthetic_lab import SyntheticLab, SyntheticLabConfig
from loop.campaign import Campaign, CampaignConfig

log = logging.getLogger(__name__)


def make_lab(config: CampaignConfig, seed: int, write_images: bool = True) -> SyntheticLab:
    """The campaign's synthetic lab: its hidden world (ground truth) and its instrument settings."""
    lab_cfg = SyntheticLabConfig(**{**config.lab, "write_images": write_images})
    return SyntheticLab(GroundTruth(world_seed=config.lab_world_seed), seed=seed, config=lab_cfg)


def run_synthetic_lab(plates_dir: Path, results_dir: Path, *, campaign: Campaign | None = None, seed: int = 0,
                      write_images: bool = True) -> list[str]:
    """Image and measure every plate in ``plates_dir``; returns the barcodes written to ``results_dir``."""
    plates_dir = Path(plates_dir)
    if not (plates_dir / "barcode_platemap.csv").exists():
        raise FileNotFoundError(f"{plates_dir}: no barcode_platemap.csv; is this a plates folder from `loop propose`?")
    config = campaign.config if campaign is not None else CampaignConfig()
    lab = make_lab(config, seed=seed, write_images=write_images)
    barcodes = lab.run_plates(plates_dir, Path(results_dir))
    log.info("synthetic lab returned %d plate(s) -> %s", len(barcodes), results_dir)
    return barcodes
