"""Target phenotype on real BBBC021 profiles: do proposals find other compounds of the reference's MoA?

A scientist who measured one compound of a mechanism asks the loop for compounds that phenocopy
it (`loop objective set --target-compound C`). On BBBC021 the mechanism is known (the MoA
annotations), so the question has an answer. Per seed, a seeded random batch of ``--measured``
(compound, dose) conditions is revealed (the lab replaced by the real per-well profiles,
``loop.simulation``) and the default lookup virtual assay is trained on them. Every revealed
condition with an MoA annotation that other compounds share is then a reference in turn: its
mean normalised profile is the target, and each method picks ``--q`` unmeasured conditions of
other compounds. A pick counts when its compound has the reference's MoA.

- ``target``: the loop's default selection on the target objective: believer-UCB on the
  anchored GP (``acquisition.anchor``, ``log_scale=False``) whose data are the revealed
  conditions' measured similarity to the target and whose prior mean is the members' predicted
  similarity, weighted by its out-of-bag skill;
- ``target_gp_only``: the same GP without the virtual assay (its weight fixed at 0): the
  measurements alone, to show what the members add;
- ``target_ensemble``: ``select_batch`` over the members' predicted similarity (qUCB, Tanimoto
  penalty 0.5, 10 % exploration; ``measurement_anchor=False``);
- ``target_greedy``: the members' mean predicted similarity, top-k;
- ``activity``: the loop's default screen without a target (anchored GP on log activity);
- ``tanimoto``: the q structurally closest conditions to the reference (Morgan Tanimoto), the
  chemist's baseline, which needs no assay at all;
- ``random``: the exact expectation ``q x (same-MoA candidates) / candidates``.

Run: ``nice .venv/bin/loop profiles convert-bbbc021 ../shared/data/bbbc021 --out t.parquet`` then
``nice .venv/bin/python benchmarks/bench_target_moa.py --profiles t.parquet --seeds 5 --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import hypergeom

from acquisition.anchor import anchored_ucb_batch
from bench_common import start_benchmark
from acquisition.diversity import tanimoto_matrix
from acquisition.objectives import ObjectiveConfig
from acquisition.select import SelectionConfig, select_batch
from lab_io.profile_table import read_profile_table
from lab_io.schema import META_COMPOUND, META_DOSE, META_MOA
from loop.simulation import LookupBacktestConfig, build_lookup_lab, predict_conditions

log = logging.getLogger("bench_target_moa")

METHODS = ("target", "target_gp_only", "target_ensemble", "target_greedy", "activity", "tanimoto")


def condition_moa(table, lab) -> np.ndarray:
    """MoA of every condition of ``lab`` ('' where not annotated)."""
    frame = table.frame
    pairs = frame[[META_COMPOUND, META_DOSE, META_MOA]].astype({META_DOSE: float}).fillna({META_MOA: ""})
    lookup = {(c, d): m for c, d, m in pairs.itertuples(index=False) if m}
    keys = zip(lab.conditions[META_COMPOUND], lab.conditions[META_DOSE].astype(float))
    return np.array([lookup.get(k, "") for k in keys], dtype=object)


def reference_profile(lab, index: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
    wells = lab.wells[lab.wells["Metadata_condition"] == index]
    return tuple(lab.features), tuple(float(v) for v in wells[lab.features].mean().to_numpy())


def run_seed(table, lab, moa, seed: int, n_measured: int, q: int, work_dir: Path) -> list[dict]:
    rng = np.random.default_rng(seed)
    n = len(lab.conditions)
    measured = np.zeros(n, dtype=bool)
    measured[rng.choice(n, size=n_measured, replace=False)] = True
    activity, profiles, out_of_bag = predict_conditions(lab, measured, LookupBacktestConfig(), seed, work_dir)
    compound = lab.conditions[META_COMPOUND].to_numpy()
    measured_profiles = (lab.wells[lab.wells["Metadata_condition"] >= 0].groupby("Metadata_condition")[lab.features]
                         .mean().loc[np.flatnonzero(measured)].to_numpy(np.float32))
    measured_activity = lab.conditions["activity"].to_numpy()[measured]
    loop_selection = SelectionConfig(measurement_anchor=False, seed=seed)
    greedy = SelectionConfig(acquisition="mean", diversity_penalty=0.0, exploration_fraction=0.0,
                             measurement_anchor=False)

    def anchored(values, observed, exclude, log_scale, **weight):
        return anchored_ucb_batch(values, lab.fingerprints, lab.log10_dose, measured, observed, q,
                                  out_of_bag=out_of_bag, pending=exclude & ~measured, log_scale=log_scale,
                                  **weight).indices

    rows = []
    for ref in np.flatnonzero(measured & (moa != "")):
        exclude = measured | (compound == compound[ref])
        same = (moa == moa[ref]) & ~exclude
        if not same.any():
            continue  # no other compound of this MoA left to find
        features, values = reference_profile(lab, ref)
        target = ObjectiveConfig(activity_weight=0.0, similarity_weight=1.0, target_features=features,
                                 target_values=values, target_label=f"{compound[ref]} {moa[ref]}")
        target_values = target.member_values(profiles, lab.features)
        observed = target.member_values(measured_profiles[None], lab.features)[0]
        picks = {
            "target": anchored(target_values, observed, exclude, log_scale=False),
            "target_gp_only": anchored(target_values, observed, exclude, log_scale=False, prior_weight=0.0,
                                       prior_sd=0.0),
            "target_ensemble": select_batch(target_values, lab.fingerprints, q, loop_selection,
                                            exclude=exclude).indices,
            "target_greedy": select_batch(target_values, lab.fingerprints, q, greedy, exclude=exclude).indices,
            "activity": anchored(activity, measured_activity, exclude, log_scale=True),
        }
        similarity = tanimoto_matrix(lab.fingerprints, lab.fingerprints[[ref]])[:, 0].astype(float)
        similarity[exclude] = -np.inf
        picks["tanimoto"] = np.argsort(-similarity, kind="stable")[:q]
        row = {"reference": f"{compound[ref]} @ {lab.conditions[META_DOSE].iloc[ref]:g} uM", "moa": moa[ref],
               "n_same_moa_candidates": int(same.sum()), "n_candidates": int((~exclude).sum()),
               "random": q * same.sum() / (~exclude).sum(),
               "random_any": 1.0 - hypergeom.pmf(0, int((~exclude).sum()), int(same.sum()), q)}
        row.update({name: int(same[p].sum()) for name, p in picks.items()})
        rows.append(row)
    return rows


def plot_summary(summary: dict, q: int, png: Path) -> Path:
    """Bar chart: same-MoA picks per batch, one bar per method (the figure for the README)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*METHODS, "random"]
    values = [summary[m]["same_moa_per_batch"] for m in names]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.barh(names[::-1], values[::-1], color=["0.6" if n in ("random", "tanimoto") else "C0" for n in names[::-1]])
    ax.set_xlabel(f"same-MoA compounds among {q} picks (mean over {summary['n_references']} references)")
    ax.set_title("BBBC021: search for a reference compound's phenotype", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--measured", type=int, default=24, help="conditions revealed before the target search")
    parser.add_argument("--q", type=int, default=8, help="conditions picked per reference")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None, help="bar chart of the summary")
    args = parser.parse_args()
    result = {"args": start_benchmark(args), "per_seed": []}
    table = read_profile_table(args.profiles)
    lab = build_lookup_lab(table)
    moa = condition_moa(table, lab)
    with tempfile.TemporaryDirectory(prefix="bench-target-moa-") as tmp:
        for seed in range(args.seeds):
            start = time.perf_counter()
            rows = run_seed(table, lab, moa, seed, args.measured, args.q, Path(tmp) / f"seed{seed}")
            result["per_seed"].append(rows)
            log.info("seed %d (%.0f s), %d references: %s; random %.2f", seed, time.perf_counter() - start,
                     len(rows), " ".join(f"{m} {np.mean([r[m] for r in rows]):.2f}" for m in METHODS),
                     np.mean([r["random"] for r in rows]))
    every = [r for rows in result["per_seed"] for r in rows]
    result["summary"] = {m: {"same_moa_per_batch": float(np.mean([r[m] for r in every])),
                             "references_with_any": float(np.mean([r[m] > 0 for r in every]))} for m in METHODS}
    result["summary"]["random"] = {"same_moa_per_batch": float(np.mean([r["random"] for r in every])),
                                   "references_with_any": float(np.mean([r["random_any"] for r in every]))}
    result["summary"]["n_references"] = len(every)
    for m in (*METHODS, "random"):
        log.info("%-14s same-MoA picks per batch of %d: %.2f (references with at least one: %.0f%%)", m, args.q,
                 result["summary"][m]["same_moa_per_batch"], 100 * result["summary"][m]["references_with_any"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.png:
        log.info("wrote %s", plot_summary(result["summary"], args.q, args.png))


if __name__ == "__main__":
    main()
