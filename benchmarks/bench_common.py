"""Set-up shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

from loop.backtest import BacktestConfig, ground_truth_actives, library_template
from loop.runtime import configure_torch_threads


def start_benchmark(args: argparse.Namespace) -> dict:
    """INFO logging for the script, WARNING for the packages, the torch thread setting; returns
    the arguments as JSON-ready values (saved with the results)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("loop", "models", "acquisition", "lab_io"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configure_torch_threads()
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def synthetic_worlds(root: Path, worlds: list[int], n_compounds: int,
                     batch_wells: int) -> Iterator[tuple[int, Path, dict[str, str]]]:
    """Per hidden world: its number, a campaign template with the library registered (under
    ``root``) and the ground-truth actives (compound_id -> phenotype class)."""
    for world in worlds:
        config = BacktestConfig(n_compounds=n_compounds, lab_world_seed=world, batch_wells=batch_wells)
        template = library_template(root / f"world{world}-template", config)
        yield world, template, ground_truth_actives(template, config)
