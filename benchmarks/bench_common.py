"""Set-up shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from loop.backtest import BacktestConfig, ground_truth_actives, library_template
from loop.runtime import configure_torch_threads

log = logging.getLogger("benchmarks")


def start_benchmark(args: argparse.Namespace) -> dict:
    """INFO logging for the script, WARNING for the packages, the torch thread setting; returns
    the arguments as JSON-ready values (saved with the results)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("loop", "models", "acquisition", "lab_io"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configure_torch_threads()
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def each_world(root: Path, args: argparse.Namespace, run_seed: Callable[..., dict],
               describe: Callable[[dict], str]) -> Iterator[tuple[int, dict[str, str], list[dict]]]:
    """For each of ``args.worlds`` (hidden synthetic worlds of ``args.compounds`` compounds): its
    number, its ground-truth actives (compound_id -> phenotype class) and the rows of
    ``run_seed(template, run_dir, seed, actives)`` for ``args.seeds`` seeds from ``args.first_seed``.
    ``template`` is a campaign with the library registered once; each run's folder is removed after."""
    for world in args.worlds:
        config = BacktestConfig(n_compounds=args.compounds, lab_world_seed=world, batch_wells=args.batch_wells)
        template = library_template(root / f"world{world}-template", config)
        actives = ground_truth_actives(template, config)
        per_seed = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            start, run_dir = time.perf_counter(), root / f"world{world}-seed{seed}"
            per_seed.append(run_seed(template, run_dir, seed, actives))
            log.info("world %d seed %d (%.0f s): %s", world, seed, time.perf_counter() - start, describe(per_seed[-1]))
            shutil.rmtree(run_dir, ignore_errors=True)
        yield world, actives, per_seed
