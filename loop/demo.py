"""``make demo``: two full closed-loop rounds against the synthetic lab, on a fresh campaign.

    init -> library (2,000 compounds) -> propose 384 -> lab -> ingest -> retrain
         -> propose 384 -> lab -> ingest -> retrain -> propose (round 3, ready for the lab)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from loop.campaign import Campaign, CampaignConfig, local_store_url
from loop.ingest import ingest_results
from loop.lab import run_synthetic_lab
from loop.library import add_virtual_library
from loop.propose import propose
from loop.runtime import configure_torch_threads
from loop.status import campaign_status
from loop.train import train_assay

console = Console()
log = logging.getLogger("loop.demo")


def run_demo(root: Path, n_compounds: int = 2000, n_rounds: int = 2, budget_wells: int = 384, seed: int = 0) -> dict:
    if root.exists():
        log.info("removing the previous demo campaign at %s", root)
        shutil.rmtree(root)
    campaign = Campaign.init(root, CampaignConfig(seed=seed), db_url=local_store_url(root), id_seed=seed)
    steps = 1 + n_rounds * 4 + 1
    files: dict[str, str] = {"campaign": str(root), "store": str(root / "campaign.db")}
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("library", total=steps)
        add_virtual_library(campaign, n_compounds, seed=seed)
        files["fingerprints"] = str(campaign.fingerprints_path)
        bar.advance(task)
        for r in range(1, n_rounds + 1):
            bar.update(task, description=f"round {r}: propose")
            proposal = propose(campaign, budget_wells)
            files[f"round {r} plate files"] = str(proposal.out_dir)
            bar.advance(task)
            bar.update(task, description=f"round {r}: synthetic lab")
            results_dir = proposal.out_dir.parent / "results"
            run_synthetic_lab(proposal.out_dir, results_dir, campaign=campaign, seed=seed * 100 + r)
            files[f"round {r} lab results (Phenix TIFFs + CellProfiler CSVs)"] = str(results_dir)
            bar.advance(task)
            bar.update(task, description=f"round {r}: ingest")
            for qc in ingest_results(campaign, results_dir):
                log.info("ingested %s: %d wells, %d cells, %d hits", qc.barcode, qc.n_wells, qc.n_cells, qc.n_hits)
            bar.advance(task)
            bar.update(task, description=f"round {r}: retrain")
            ensemble = train_assay(campaign)
            files[f"model after round {r}"] = str(campaign.models_dir / ensemble.version)
            bar.advance(task)
        bar.update(task, description=f"round {n_rounds + 1}: propose")
        proposal = propose(campaign, budget_wells)
        files[f"round {n_rounds + 1} plate files (ready for the lab)"] = str(proposal.out_dir)
        bar.advance(task)
    files["measurements"] = str(campaign.measurements_dir)
    return {"files": files, "status": campaign_status(campaign)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--campaign", type=Path, default=Path("demo_campaign"))
    parser.add_argument("--compounds", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget", type=int, default=384)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("prefect", "httpx", "botorch", "linear_operator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configure_torch_threads()
    start = time.perf_counter()
    result = run_demo(args.campaign, args.compounds, args.rounds, args.budget)
    console.rule("where everything is")
    for what, path in result["files"].items():
        console.print(f"- {what}: {path}", soft_wrap=True)
    console.rule("campaign status")
    console.print_json(json.dumps(result["status"]))
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s. Try: "
                  f".venv/bin/loop --campaign {args.campaign} status")


if __name__ == "__main__":
    main()
