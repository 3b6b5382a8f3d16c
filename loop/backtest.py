"""``loop backtest``: simulated campaigns against the synthetic lab.

Each (seed, policy) runs the real loop — the same propose, lab, ingest and train functions
the CLI calls — in a throw-away campaign folder, and scores it with the lab's ground truth
(reachable only here, through ``GroundTruth.for_smiles``): the cumulative fraction of the
library's ground-truth actives that the campaign has measured after each round.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sqlmodel import select

from lab_io.ground_truth import GroundTruth
from loop import store
from loop.campaign import Campaign, CampaignConfig, local_store_url
from loop.ingest import ingest_results
from loop.lab import run_synthetic_lab
from loop.library import add_virtual_library, load_compounds
from loop.propose import MODEL_POLICIES, POLICIES, propose
from loop.status import campaign_status
from loop.train import train_assay

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BacktestConfig:
    n_compounds: int = 5000
    n_rounds: int = 3
    batch_wells: int = 96
    n_seeds: int = 5
    policies: tuple[str, ...] = ("loop", "random")
    library_seed: int = 0
    dose_um: float = 10.0
    n_negative_controls: int = 16
    lab_world_seed: int = 0
    assay: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    lab: dict = field(default_factory=dict)


def run_backtest(config: BacktestConfig, work_dir: Path | None = None) -> dict:
    """Returns ``{"policies": {name: {"hit_fraction_mean": [...], "hit_fraction_sd": [...]}}, ...}``."""
    unknown = [p for p in config.policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    keep = work_dir is not None
    root = Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix="loop-backtest-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        template = library_template(root / "template", config)
        actives = ground_truth_actives(template, config)
        per_class = dict(sorted(Counter(actives.values()).items(), key=lambda kv: -kv[1]))
        log.info("backtest library: %d compounds, %d ground-truth actives (%s)", config.n_compounds, len(actives),
                 ", ".join(f"{name} {n}" for name, n in per_class.items()))
        curves = {p: [] for p in config.policies}
        classes = {p: [] for p in config.policies}
        for seed in range(config.n_seeds):
            for policy in config.policies:
                run_dir = root / f"seed{seed}-{policy}"
                fractions, n_classes = _run_campaign(template, run_dir, policy, seed, config, actives)
                curves[policy].append(fractions)
                classes[policy].append(n_classes)
                log.info("seed %d %s: actives found %s; phenotype classes found %s", seed, policy,
                         ", ".join(f"{f:.3f}" for f in fractions), n_classes)
                if not keep:
                    shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "config": dataclasses.asdict(config),
        "n_actives": len(actives),
        "actives_per_class": per_class,
        "policies": {
            p: {
                "hit_fraction_mean": np.mean(c, axis=0).tolist(),
                "hit_fraction_sd": np.std(c, axis=0, ddof=1).tolist() if len(c) > 1 else [0.0] * config.n_rounds,
                "per_seed": [list(map(float, row)) for row in c],
                "classes_found_mean": np.mean(classes[p], axis=0).tolist(),
                "classes_found_sd": np.std(classes[p], axis=0, ddof=1).tolist() if len(c) > 1
                else [0.0] * config.n_rounds,
            }
            for p, c in curves.items()
        },
    }


def library_template(path: Path, config: BacktestConfig) -> Path:
    """A campaign with the library registered once, copied for every (seed, policy)."""
    campaign_config = CampaignConfig(
        dose_um=config.dose_um, layout=dict(n_negative_controls=config.n_negative_controls),
        lab_world_seed=config.lab_world_seed, assay=dict(config.assay), selection=dict(config.selection),
        lab=dict(config.lab),
    )
    campaign = Campaign.init(path, campaign_config, db_url=local_store_url(path), id_seed=config.library_seed)
    add_virtual_library(campaign, config.n_compounds, seed=config.library_seed)
    campaign.engine.dispose()
    return path


def ground_truth_actives(template: Path, config: BacktestConfig) -> dict[str, str]:
    """compound_id -> phenotype class of every ground-truth active in the library."""
    compounds = load_compounds(Campaign.open(template, local_store_url(template)))
    truth = GroundTruth(world_seed=config.lab_world_seed).for_smiles(compounds["smiles"].tolist())
    active = truth["is_active"].to_numpy()
    return dict(zip(compounds["compound_id"][active], truth["phenotype_class"][active]))


def start_run(template: Path, run_dir: Path, seed: int) -> Campaign:
    """A copy of the library template at ``run_dir``, seeded ``seed``."""
    shutil.copytree(template, run_dir)
    campaign = Campaign.open(run_dir, local_store_url(run_dir))
    campaign.config = dataclasses.replace(campaign.config, seed=seed)
    return campaign


def run_round(campaign: Campaign, round_index: int, batch_wells: int, policy: str, seed: int) -> None:
    """Propose ``batch_wells`` wells by ``policy``, measure them in the synthetic lab (no images), ingest."""
    result = propose(campaign, batch_wells, policy=policy, seed=seed * 1000 + round_index)
    results_dir = campaign.root / "results" / f"round-{round_index:03d}"
    run_synthetic_lab(result.out_dir, results_dir, campaign=campaign, seed=seed * 1000 + round_index,
                      write_images=False)
    ingest_results(campaign, results_dir)


def _run_campaign(template: Path, run_dir: Path, policy: str, seed: int, config: BacktestConfig,
                  actives: dict[str, str]) -> tuple[list[float], list[int]]:
    campaign = start_run(template, run_dir, seed)
    fractions, n_classes = [], []
    for round_index in range(1, config.n_rounds + 1):
        run_round(campaign, round_index, config.batch_wells, policy, seed)
        found = _found_actives(campaign, actives)
        fractions.append(len(found) / max(len(actives), 1))
        n_classes.append(len({actives[c] for c in found}))
        if policy in MODEL_POLICIES and round_index < config.n_rounds:
            train_assay(campaign)
    status = campaign_status(campaign)
    log.debug("campaign %s: %s", run_dir, status)
    campaign.engine.dispose()
    return fractions, n_classes


def _found_actives(campaign: Campaign, actives: dict[str, str]) -> set[str]:
    with campaign.session() as session:
        measured = set(session.exec(select(store.Measurement.compound_id)).all())
    return measured & set(actives)


def plot_curves(result: dict, png: Path) -> Path:
    """Cumulative fraction of actives (or table hits) found per round, mean ± sd over seeds, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for name, curve in result["policies"].items():
        mean = np.asarray(curve["hit_fraction_mean"])
        sd = np.asarray(curve["hit_fraction_sd"])
        rounds = np.arange(1, len(mean) + 1)
        ax.plot(rounds, mean, marker="o", label=name)
        ax.fill_between(rounds, mean - sd, mean + sd, alpha=0.2)
    ax.set_xlabel("round")
    # profile-table backtests (loop.simulation) score hits, the synthetic lab ground-truth actives
    ax.set_ylabel("fraction of hits found" if "hit_definition" in result else "fraction of actives found")
    if "source" in result:
        ax.set_title(Path(str(result["source"])).name, fontsize=9)
    ax.set_xticks(np.arange(1, len(mean) + 1))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png
