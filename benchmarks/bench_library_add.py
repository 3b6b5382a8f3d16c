"""Benchmark what ``loop library add`` does per compound: standardise + Morgan fingerprint.

The input is the embedded virtual library (``enumerate_library``, up to its maximum size),
repeated to N SMILES when N is larger; nothing is cached between rows, so repeats cost the same
as new structures. Two paths are timed:

* ``two-pass``: ``standardize_many`` then ``morgan_fingerprints`` on the canonical SMILES
  (what ``loop.library`` calls today);
* ``one-pass``: ``featurize_smiles`` (parse once, standardise and fingerprint).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_library_add.py --n 1000000 --n-jobs 2 [--paths one-pass]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time

import numpy as np

from lab_io import chem
from lab_io.virtual_library import enumerate_library, max_library_size

log = logging.getLogger("bench_library_add")


def build_smiles(n: int, seed: int) -> list[str]:
    """N SMILES: the virtual library (at most its maximum size), repeated up to N."""
    base = enumerate_library(min(n, max_library_size(), 100_000), seed=seed)["smiles"].tolist()
    reps = -(-n // len(base))
    return (base * reps)[:n]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers), user + system."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_two_pass(smiles: list[str], n_jobs: int | None) -> dict:
    t0 = time.perf_counter()
    canonical, _, errors = chem.standardize_many(smiles, n_jobs=n_jobs)
    t1 = time.perf_counter()
    fps = chem.morgan_fingerprints([s for s in canonical if s is not None], n_jobs=n_jobs)
    t2 = time.perf_counter()
    return {"path": "two-pass", "standardize_s": t1 - t0, "fingerprint_s": t2 - t1, "total_s": t2 - t0,
            "n_errors": len(errors), "fp_shape": list(fps.shape)}


def time_one_pass(smiles: list[str], n_jobs: int | None) -> dict:
    t0 = time.perf_counter()
    result = chem.featurize_smiles(smiles, n_jobs=n_jobs)
    t1 = time.perf_counter()
    return {"path": "one-pass", "total_s": t1 - t0, "n_errors": len(result.errors),
            "fp_shape": list(result.fingerprints.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--n-jobs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", default="one-pass,two-pass")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    t0 = time.perf_counter()
    smiles = build_smiles(args.n, args.seed)
    log.info("built %d SMILES (%d distinct) in %.1f s", len(smiles), len(set(smiles)), time.perf_counter() - t0)
    mean_atoms = float(np.mean([s.count("c") + s.count("C") + s.count("N") + s.count("O") for s in smiles[:1000]]))
    log.info("approx. heavy atoms per SMILES (C/N/O letters): %.1f", mean_atoms)
    for path in args.paths.split(","):
        timer = {"one-pass": time_one_pass, "two-pass": time_two_pass}[path.strip()]
        cpu0 = cpu_seconds()
        result = timer(smiles, args.n_jobs)
        cpu = cpu_seconds() - cpu0
        # cpu_s / 2 is the wall time on 2 dedicated cores (the machine is shared, wall time is not).
        result.update(n=len(smiles), n_jobs=args.n_jobs, us_per_smiles=1e6 * result["total_s"] / len(smiles),
                      cpu_s=cpu, cpu_us_per_smiles=1e6 * cpu / len(smiles))
        log.info("%s", json.dumps(result))


if __name__ == "__main__":
    main()
