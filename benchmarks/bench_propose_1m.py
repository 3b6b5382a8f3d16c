"""Benchmark: the acquisition funnel + ``select_batch`` over 10^6 candidates on CPU.

Stages timed (each logged and written to ``results.json``):

1. library: ``--n-real`` compounds from ``lab_io.virtual_library.enumerate_library`` (max ~138k),
   fingerprinted with ``lab_io.chem.morgan_fingerprints``; tiled to ``--n`` candidates by
   perturbing real fingerprints (each copy drops ~10% of its on-bits and sets 1-3 random
   bits), so bit densities and co-occurrences look like real Morgan fingerprints. InChIKeys
   of the copies are synthetic unique strings (they only key the prediction cache).
2. assay: a small ``FeatureAssayEnsemble`` (K = ``--members``) trained on the synthetic
   single-cell table of ``benchmarks/bench_feature_assay.py`` with real library fingerprints
   as its compounds.
3. funnel (``acquisition.funnel.funnel_predict``): simulate a random sample, train the
   surrogate, prescreen 10^6, simulate the shortlist (all through the prediction cache).
4. ``acquisition.select.select_batch`` for ``--q`` picks from the funnel's candidates.
5. the funnel again with the same cache (every prediction a cache hit).

Quality numbers (synthetic, so indicative only): surrogate out-of-bag Spearman; mean
ensemble activity of the surrogate shortlist vs the random sample; share of the picks
that came from the shortlist.

    nice -n 10 .venv/bin/python benchmarks/bench_propose_1m.py [--n 1000000] [--out bench_out/propose_1m]

Target: everything under 10 minutes on 2 shared cores (one torch thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from acquisition.funnel import FunnelConfig, funnel_predict  # noqa: E402
from acquisition.prediction_cache import PredictionCache  # noqa: E402
from acquisition.select import SelectionConfig, select_batch  # noqa: E402
from acquisition.surrogate import SurrogateConfig  # noqa: E402
from bench_feature_assay import synthetic_table  # noqa: E402
from lab_io.chem import morgan_fingerprints  # noqa: E402
from lab_io.virtual_library import enumerate_library  # noqa: E402
from models.config import FeatureAssayConfig  # noqa: E402
from models.ensemble import train_ensemble  # noqa: E402
from models.training_data import FeatureTrainingSet  # noqa: E402

log = logging.getLogger("bench_propose_1m")


def perturbed_library(real_fps: np.ndarray, n: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """``n`` fingerprints: copy ``i`` is real fingerprint ``i mod n_real`` (the first ``n_real`` unchanged);
    later copies drop each on-bit with p = 0.1 and set 1-3 random bits."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, real_fps.shape[1]), dtype=np.uint8)
    n_real = len(real_fps)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        bits = np.unpackbits(real_fps[rows % n_real], axis=1).astype(bool)  # b x 2048
        copy = rows >= n_real
        drop = rng.random(bits.shape, dtype=np.float32) < 0.1
        bits[copy] &= ~drop[copy]
        n_add = rng.integers(1, 4, size=len(rows))
        for j in range(3):
            add = copy & (n_add > j)
            bits[np.flatnonzero(add), rng.integers(0, 2048, size=int(add.sum()))] = True
        out[rows] = np.packbits(bits, axis=1)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="candidates")
    parser.add_argument("--n-real", type=int, default=20_000, help="real library compounds to fingerprint")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300, help="flow-matching steps per member")
    parser.add_argument("--sample", type=int, default=10_000)
    parser.add_argument("--shortlist", type=int, default=5_000)
    parser.add_argument("--q", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("bench_out/propose_1m"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. library
    t0 = time.perf_counter()
    library = enumerate_library(args.n_real, seed=0)
    real_fps = morgan_fingerprints(library["smiles"].tolist(), n_jobs=1)
    timings["library_enumerate_fingerprint_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fps = perturbed_library(real_fps, args.n, seed=1)
    inchikeys = np.array([f"BENCH{i:09d}-SYNTHETIC-N" for i in range(args.n)], dtype=object)
    timings["library_tile_s"] = time.perf_counter() - t0
    log.info("library: %d real -> %d candidates, %.1f on-bits per fingerprint", args.n_real, args.n,
             float(np.unpackbits(fps[:10000], axis=1).sum(1).mean()))

    # 2. assay
    t0 = time.perf_counter()
    cells, table_fps = synthetic_table(n_features=24, n_plates=2, n_compounds=60, cells_per_well=30)
    pick = np.random.default_rng(2).choice(args.n_real, len(table_fps), replace=False)
    table_fps = {cid: real_fps[i] for cid, i in zip(table_fps, pick)}
    train_set = FeatureTrainingSet.from_dataframe(cells, table_fps, source="benchmark single-cell table")
    config = FeatureAssayConfig(n_members=args.members, n_steps=args.train_steps, hidden_dim=64, n_blocks=2,
                                cond_dim=32, fp_hidden_dim=64, write_loss_plot=False, checkpoint_every=10_000,
                                n_control_cells=256)
    assay = train_ensemble(train_set, config, args.out / "model", executor="local")
    timings["assay_train_s"] = time.perf_counter() - t0

    # 3. funnel
    rng = np.random.default_rng(3)
    exclude = np.zeros(args.n, dtype=bool)
    exclude[rng.choice(args.n, 1000, replace=False)] = True  # "measured"
    pending = rng.choice(np.flatnonzero(~exclude), 96, replace=False)
    funnel_cfg = FunnelConfig(sample_size=args.sample, shortlist_size=args.shortlist,
                              surrogate=SurrogateConfig())
    cache = PredictionCache(args.out / "cache")
    t0 = time.perf_counter()
    result = funnel_predict(assay, fps, inchikeys, 10.0, exclude=exclude, pending=pending, config=funnel_cfg,
                            cache=cache, seed=0)
    timings["funnel_s"] = time.perf_counter() - t0

    # 4. selection
    t0 = time.perf_counter()
    selection = select_batch(result.values, fps[result.indices], args.q, SelectionConfig(seed=0),
                             pending=result.pending)
    timings["select_batch_s"] = time.perf_counter() - t0
    picks = result.indices[selection.indices]
    assert len(set(picks.tolist())) == args.q and not exclude[picks].any() and not np.isin(picks, pending).any()
    timings["total_first_round_s"] = time.perf_counter() - t_all

    # 5. same request again: all from the cache
    t0 = time.perf_counter()
    again = funnel_predict(assay, fps, inchikeys, 10.0, exclude=exclude, pending=pending, config=funnel_cfg,
                           cache=PredictionCache(args.out / "cache"), seed=0)
    timings["funnel_cached_rerun_s"] = time.perf_counter() - t0
    assert again.diagnostics["n_simulated"] == 0 and np.array_equal(again.values, result.values)

    d = result.diagnostics
    mean_value = result.values.mean(axis=0)  # member mean per candidate
    sampled = ~result.from_shortlist
    sampled[result.pending] = False
    picked_from_shortlist = result.from_shortlist[selection.indices]
    results = {
        "n_candidates": args.n,
        "n_real_compounds": args.n_real,
        "members": args.members,
        "q": args.q,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "funnel_timings_s": d["timings"],
        "funnel_sizes": {k: d[k] for k in ("n_eligible", "n_pending", "n_sample", "n_shortlist", "n_returned",
                                           "n_simulated", "n_cached")},
        "surrogate": {k: d["surrogate"][k] for k in ("n_train", "steps", "oob_spearman", "seconds")},
        "mean_activity_random_sample": round(float(mean_value[sampled].mean()), 4),
        "mean_activity_shortlist": round(float(mean_value[result.from_shortlist].mean()), 4),
        "sample_quantile_of_shortlist_median": round(float(
            (mean_value[sampled] < np.median(mean_value[result.from_shortlist])).mean()), 4),
        "mean_activity_picks": round(float(mean_value[selection.indices].mean()), 4),
        "share_of_picks_from_shortlist": round(float(picked_from_shortlist.mean()), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "selection": {k: selection.diagnostics[k] for k in ("n_candidates", "n_exploit", "n_explore",
                                                            "mean_pairwise_tanimoto")},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    log.info("results: %s", json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
