"""Benchmarks for batch selection.

1. ``select_batch``: 384 picks from 10^6 cached candidates, K = 8 members
   (target: < 15 s, peak RSS < 4 GB).
2. ``greedy_select`` vs ``botorch.optim.optimize_acqf_discrete`` at N = 2,000, q = 64,
   K = 8, qUCB over ``CachedEnsembleModel`` (target: identical picks, >= 100x faster).

Run: ``nice -n 10 .venv/bin/python benchmarks/bench_selection.py [--n 1000000]``.
Inputs are synthetic and seeded (clustered fingerprints, correlated member values).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import time
import tracemalloc
import warnings

import numpy as np
import torch
from botorch.optim import optimize_acqf_discrete

from acquisition.ensemble_model import CachedEnsembleModel, index_choices
from acquisition.greedy import greedy_select
from acquisition.registry import make_acquisition
from acquisition.select import SelectionConfig, select_batch

logger = logging.getLogger("bench_selection")


def synthetic_candidates(n: int, n_members: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded member values ``K x N`` (float32), packed fps ``N x 256``, scaffold ids ``N``.

    Compounds come in clusters of ~200 (a "scaffold"): each fingerprint is its cluster's
    random 5%-density centre with ~1% of bits flipped; member values share a per-cluster
    and a per-compound effect plus member noise.
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // 200)
    scaffold_ids = rng.integers(0, n_clusters, size=n)
    centres = rng.random((n_clusters, 2048), dtype=np.float32) < 0.05
    fps = np.empty((n, 256), dtype=np.uint8)
    for start in range(0, n, 65536):  # chunked: never materialise N x 2048 bits
        bits = centres[scaffold_ids[start:start + 65536]]
        bits ^= rng.random(bits.shape, dtype=np.float32) < 0.01
        fps[start:start + 65536] = np.packbits(bits, axis=1)
    cluster_effect = 0.5 * rng.standard_normal(n_clusters, dtype=np.float32)
    shared = rng.standard_normal(n, dtype=np.float32) + cluster_effect[scaffold_ids]
    values = shared[None] + 0.3 * rng.standard_normal((n_members, n), dtype=np.float32)
    return values, fps, scaffold_ids


def bench_large(n: int, q: int, n_members: int) -> dict:
    values, fps, scaffold_ids = synthetic_candidates(n, n_members, seed=0)
    rng = np.random.default_rng(1)
    exclude = rng.random(n) < 0.001
    pending = rng.choice(np.flatnonzero(~exclude), size=96, replace=False)
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = SelectionConfig(acquisition="qUCB", beta=2.0, diversity_penalty=0.5,
                             exploration_fraction=0.1, max_per_scaffold=4, seed=0)
    start = time.perf_counter()
    selection = select_batch(values, fps, q, config, exclude=exclude, pending=pending,
                             scaffold_ids=scaffold_ids)
    seconds = time.perf_counter() - start
    assert len(selection.indices) == q and len(set(selection.indices.tolist())) == q
    assert not exclude[selection.indices].any()
    assert not np.isin(selection.indices, pending).any()
    d = selection.diagnostics
    rss_after_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "q": q, "K": n_members, "select_batch_s": round(seconds, 2),
            "peak_rss_mb_before_select": round(rss_before_mb, 1),
            "peak_rss_mb_after_select": round(rss_after_mb, 1),
            "n_joint_exploit": d["n_joint_exploit"], "mean_pairwise_tanimoto": round(d["mean_pairwise_tanimoto"], 3)}


def bench_tracemalloc(n: int, q: int, n_members: int) -> float:
    """Peak tracemalloc-traced allocation (MB) of select_batch, inputs excluded.

    tracemalloc sees numpy (and Python) allocations, not torch's; RSS covers both.
    """
    values, fps, scaffold_ids = synthetic_candidates(n, n_members, seed=0)
    tracemalloc.start()
    select_batch(values, fps, q, SelectionConfig(max_per_scaffold=4), scaffold_ids=scaffold_ids)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def bench_greedy_vs_botorch(n: int, q: int, n_members: int) -> dict:
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(1, n, generator=g, dtype=torch.float64)
              + 0.3 * torch.randn(n_members, n, generator=g, dtype=torch.float64))
    model = CachedEnsembleModel(values.unsqueeze(-1))
    acqf = make_acquisition("qUCB", model, beta=2.0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X, ref_values = optimize_acqf_discrete(acqf, q, index_choices(n))
    botorch_s = time.perf_counter() - start
    greedy_s = math.inf
    for _ in range(5):  # best of 5 (shared machine)
        start = time.perf_counter()
        indices, acq_values = greedy_select(values, q, "qUCB", {"beta": 2.0})
        greedy_s = min(greedy_s, time.perf_counter() - start)
    identical = torch.equal(X[:, 0].long(), indices) and torch.equal(ref_values, acq_values)
    return {"n": n, "q": q, "K": n_members, "botorch_s": round(botorch_s, 3),
            "greedy_s": round(greedy_s, 4), "speedup": round(botorch_s / greedy_s, 1),
            "identical": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--q", type=int, default=384)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: the hot loop is small, memory-bound ops; "
                             "extra threads only spin on a shared, loaded machine); 0 = torch default")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {"torch_threads": torch.get_num_threads(),
               "greedy_vs_botorch": bench_greedy_vs_botorch(2000, 64, args.members)}
    logger.info(json.dumps(results["greedy_vs_botorch"]))
    if not args.skip_large:
        results["select_batch"] = bench_large(args.n, args.q, args.members)
        results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        logger.info(json.dumps(results["select_batch"]))
        results["select_batch_tracemalloc_peak_mb"] = round(bench_tracemalloc(args.n, args.q, args.members), 1)
    logger.info(json.dumps(results))


if __name__ == "__main__":
    main()
