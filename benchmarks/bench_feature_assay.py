"""Benchmark of the feature virtual assay at its default config (CPU).

Measures (1) training seconds per member on a synthetic single-cell table
(~20k cells x 48 features, 4 plates, 120 compounds at 2 doses), (2) predict_profiles
throughput (compounds / s) for K members x n_cells cells x n_sample_steps Euler steps.

    nice -n 10 .venv/bin/python benchmarks/bench_feature_assay.py [--out bench_out/feature_assay]
        [--n-compounds 5000] [--threads 1]

Writes ``results.json`` in ``--out`` and logs a summary. Synthetic data only: the
compound effects are random low-rank shifts of the control distribution, so the
numbers measure speed, not biology.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.config import FeatureAssayConfig  # noqa: E402
from models.ensemble import train_ensemble  # noqa: E402
from models.training_data import FeatureTrainingSet  # noqa: E402

log = logging.getLogger("bench_feature_assay")
COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")


def synthetic_table(
    *, n_features: int = 48, n_plates: int = 4, n_compounds: int = 120, cells_per_well: int = 40, seed: int = 0
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Single cells: correlated Gaussian controls; each compound shifts along a random rank-4
    direction scaled by log-dose; a small per-plate offset."""
    rng = np.random.default_rng(seed)
    names = [f"{COMPARTMENTS[j % 3]}_Feature_{j:03d}" for j in range(n_features)]
    mix = rng.normal(size=(n_features, n_features)) / np.sqrt(n_features)
    basis = rng.normal(size=(4, n_features))
    effects = rng.normal(size=(n_compounds, 4)) * rng.exponential(0.5, size=(n_compounds, 1))
    fps = {f"CPD{c:04d}": np.packbits(rng.random(2048) < 0.02) for c in range(n_compounds)}
    frames = []
    for p in range(n_plates):
        plate_offset = rng.normal(scale=0.2, size=n_features)
        conditions = [("DMSO", 0.0, np.zeros(n_features))] * 32
        for c in range(p, n_compounds, n_plates):
            for dose in (1.0, 10.0):
                conditions.append((f"CPD{c:04d}", dose, effects[c] @ basis * (1 + np.log10(dose))))
        for w, (cid, dose, shift) in enumerate(conditions):
            x = rng.normal(size=(cells_per_well, n_features)) @ mix + plate_offset + shift
            frame = pd.DataFrame(x.astype(np.float32), columns=names)
            frame.insert(0, "Metadata_Plate", f"BENCH{p:02d}")
            frame.insert(1, "Metadata_Well", f"{'ABCDEFGHIJKLMNOP'[w // 24]}{w % 24 + 1:02d}")
            frame.insert(2, "Metadata_compound", cid)
            frame.insert(3, "Metadata_dose_um", dose)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True), fps


def training_fidelity(ensemble, train_set: FeatureTrainingSet) -> dict:
    """Pearson r between the ensemble-mean predicted profile and the observed profile of every
    training (compound, dose): observed = (mean of its cells - control mean) / control std, in
    normalised units, plates pooled. Returns overall r (all entries) and median per-condition r."""
    z = train_set.normalized_x()
    ctrl = train_set.compound_index < 0
    mu, sd = z[ctrl].mean(0), z[ctrl].std(0)
    keys = np.unique(np.stack([train_set.compound_index, train_set.log10_dose_um]).T[~ctrl], axis=0)
    observed = np.stack([
        (z[(train_set.compound_index == c) & (train_set.log10_dose_um == d)].mean(0) - mu) / sd for c, d in keys
    ])
    predicted = ensemble.predict_profiles(
        train_set.fingerprints[keys[:, 0].astype(int)], 10 ** keys[:, 1].astype(np.float64), n_cells=64, seed=0
    ).mean(0)
    per_condition = [np.corrcoef(o, p)[0, 1] for o, p in zip(observed, predicted)]
    return {
        "overall": round(float(np.corrcoef(observed.ravel(), predicted.ravel())[0, 1]), 3),
        "median_per_condition": round(float(np.median(per_condition)), 3),
        "n_conditions": int(len(keys)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/feature_assay"))
    parser.add_argument("--n-compounds", type=int, default=5000, help="compounds to predict")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    cells, fps = synthetic_table()
    train_set = FeatureTrainingSet.from_dataframe(cells, fps, source="synthetic benchmark table")
    config = FeatureAssayConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / f"model_{int(time.time())}"
    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    ensemble = train_ensemble(train_set, config, model_dir, executor="local")
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    member_s = [json.loads((m.member_dir / "config.json").read_text())["train_seconds"] for m in ensemble.members]

    rng = np.random.default_rng(1)
    query_fps = np.packbits(rng.random((args.n_compounds, 2048)) < 0.02, axis=1)
    doses = 10 ** rng.uniform(-1, 1.5, size=args.n_compounds)
    t0, c0 = time.perf_counter(), time.process_time()
    profiles = ensemble.predict_profiles(query_fps, doses, n_cells=32, seed=0)
    predict_s, predict_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    fidelity = training_fidelity(ensemble, train_set)
    results = {
        "n_train_cells": train_set.n_cells,
        "n_features": train_set.n_features,
        "n_train_compounds": train_set.n_compounds,
        "config": config.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_start": round(load_before, 2),
        "n_cpus": os.cpu_count(),
        "train_seconds_total": round(train_s, 2),
        "train_cpu_seconds_total": round(train_cpu_s, 2),
        "train_seconds_per_member": member_s,
        "predict_compounds": args.n_compounds,
        "predict_seconds": round(predict_s, 2),
        "predict_cpu_seconds": round(predict_cpu_s, 2),
        "predict_compounds_per_s": round(args.n_compounds / predict_s, 1),
        "profiles_shape": list(profiles.shape),
        "train_profile_pearson_r": fidelity,
        "final_loss_per_member": [
            float(pd.read_csv(m.member_dir / "training_log.csv")["loss"].iloc[-1]) for m in ensemble.members
        ],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    log.info("fidelity on training conditions (ensemble mean vs observed profile): %s", fidelity)
    log.info("load average at start %.1f on %d cpus", load_before, os.cpu_count())
    log.info("train: %.1f s total (%.1f CPU s), per member %s s", train_s, train_cpu_s, member_s)
    log.info("predict_profiles: %d compounds x %d members x 32 cells x %d steps in %.1f s, %.1f CPU s "
             "(%.0f compounds/s)", args.n_compounds, ensemble.n_members, config.n_sample_steps, predict_s,
             predict_cpu_s, args.n_compounds / predict_s)
    return results


if __name__ == "__main__":
    main()
