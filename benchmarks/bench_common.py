"""Set-up shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
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


def add_world_arguments(parser: argparse.ArgumentParser, *, worlds: list[int], batch_wells_help: str) -> None:
    """The options ``each_world`` reads, and ``--json``."""
    parser.add_argument("--worlds", type=int, nargs="+", default=worlds)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--compounds", type=int, default=5000)
    parser.add_argument("--batch-wells", type=int, default=96, help=batch_wells_help)
    parser.add_argument("--json", type=Path, default=None)


def each_world(args: argparse.Namespace, run_seed: Callable[..., dict],
               describe: Callable[[dict], str]) -> Iterator[tuple[int, dict[str, str], list[dict]]]:
    """For each of ``args.worlds`` (hidden synthetic worlds of ``args.compounds`` compounds): its
    number, its ground-truth actives (compound_id -> phenotype class) and the rows of
    ``run_seed(template, run_dir, seed, actives)`` for ``args.seeds`` seeds from ``args.first_seed``.
    ``template`` is a campaign with the library registered once. Everything lives in a temporary
    folder, each run's removed after it and the whole folder when the loop ends (or fails)."""
    root = Path(tempfile.mkdtemp(prefix="bench-worlds-"))
    try:
        for world in args.worlds:
            config = BacktestConfig(n_compounds=args.compounds, lab_world_seed=world, batch_wells=args.batch_wells)
            template = library_template(root / f"world{world}-template", config)
            actives = ground_truth_actives(template, config)
            per_seed = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                start, run_dir = time.perf_counter(), root / f"world{world}-seed{seed}"
                per_seed.append(run_seed(template, run_dir, seed, actives))
                log.info("world %d seed %d (%.0f s): %s", world, seed, time.perf_counter() - start,
                         describe(per_seed[-1]))
                shutil.rmtree(run_dir, ignore_errors=True)
            yield world, actives, per_seed
    finally:
        shutil.rmtree(root, ignore_errors=True)
