"""``make demo``: two full closed-loop rounds against the synthetic lab, on a fresh campaign.

    init -> library (2,000 compounds) -> propose 384 -> lab -> ingest -> retrain
         -> propose 384 -> lab -> ingest -> retrain -> propose (round 3, ready for the lab)

The demo starts from scratch: it removes its previous campaign folder, and only that. A folder it
removes is empty, holds the demo's marker (``DEMO_MARKER``, written into each demo campaign), or is
a demo campaign made before the marker (its ``campaign.json`` is the demo's own configuration,
seed and seed-derived id included: a lab's campaign has a random id). Any other folder, a real
campaign above all, is refused (``DemoError``) and left as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from loop.campaign import CONFIG_FILE, Campaign, CampaignConfig, local_store_url, new_campaign_id
from loop.ingest import ingest_results
from loop.lab import run_synthetic_lab
from loop.library import add_virtual_library
from loop.propose import propose
from loop.runtime import configure_torch_threads
from loop.status import campaign_status
from loop.train import train_assay

console = Console()
log = logging.getLogger("loop.demo")

DEMO_MARKER = ".loop-demo"  # in a campaign folder: the demo made it, and may remove it on its next run


class DemoError(RuntimeError):
    """The demo's campaign folder holds something the demo did not make."""


def demo_config(seed: int) -> CampaignConfig:
    """The demo campaign's configuration, as ``Campaign.init`` saves it (id derived from ``seed``)."""
    return CampaignConfig(seed=seed, campaign_id=new_campaign_id(seed))


def is_previous_demo(root: Path, seed: int) -> bool:
    """Whether the folder ``root`` is a campaign the demo made: its marker, or (made before the
    marker) a ``campaign.json`` equal to the demo's own configuration for ``seed``."""
    if (root / DEMO_MARKER).is_file():
        return True
    try:
        return CampaignConfig.from_json((root / CONFIG_FILE).read_text()) == demo_config(seed)
    except (OSError, ValueError, TypeError):  # no campaign.json, or not one
        return False


def clear_previous_demo(root: Path, seed: int) -> None:
    """Remove ``root`` when it is empty or a previous demo campaign; DemoError for anything else."""
    if not root.exists() and not root.is_symlink():
        return
    if root.is_symlink() or not root.is_dir():
        raise DemoError(f"{root} is not a folder: the demo needs a new or demo campaign folder (pass another "
                        "--campaign)")
    if any(root.iterdir()) and not is_previous_demo(root, seed):
        raise DemoError(f"{root} is not a demo campaign (no {DEMO_MARKER} marker, and no campaign.json with the "
                        "demo's configuration): the demo removes only its own previous campaign. Pass another "
                        "--campaign, or remove the folder yourself if it is really not needed")
    log.info("removing the previous demo campaign at %s", root)
    shutil.rmtree(root)


def run_demo(root: Path, n_compounds: int = 2000, n_rounds: int = 2, budget_wells: int = 384, seed: int = 0) -> dict:
    clear_previous_demo(root, seed)
    campaign = Campaign.init(root, CampaignConfig(seed=seed), db_url=local_store_url(root), id_seed=seed)
    (root / DEMO_MARKER).write_text("made by `python -m loop.demo` (make demo), which removes it on its next run\n")
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
    try:
        result = run_demo(args.campaign, args.compounds, args.rounds, args.budget)
    except DemoError as exc:
        console.print("[bold red]error:[/]", escape(str(exc)), soft_wrap=True)  # a path stays on one line
        raise SystemExit(1) from None
    console.rule("where everything is")
    for what, path in result["files"].items():
        console.print(f"- {what}: {path}", soft_wrap=True)
    console.rule("campaign status")
    console.print_json(json.dumps(result["status"]))
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s. Try: "
                  f".venv/bin/loop --campaign {args.campaign} status")


if __name__ == "__main__":
    main()
