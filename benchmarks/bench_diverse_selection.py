"""Diverse selection against pure qUCB top-k on the synthetic lab: one batch, one ensemble.

Issue #4 asks that, on the synthetic lab, diverse selection finds at least as many actives as
pure qUCB top-k and more distinct phenotype classes. ``loop backtest`` answers it over whole
campaigns, where the random first round and three rounds of feedback blur the selection step
itself. This benchmark isolates that step: per (world, seed) it runs one seeded random round
through the real loop (propose, synthetic lab, ingest, train the default feature assay), then
asks every selection policy for a batch from the *same* trained ensemble and the same
candidates, and scores each batch against the lab's hidden truth (``GroundTruth``): the
ground-truth actives in it and the phenotype classes among them.

Policies (``loop.propose.choose_compounds``; nothing is recorded in the campaign):

- ``ucb_topk``: qUCB (beta 2) joint greedy, no diversity, no exploration;
- ``greedy_mean``: top-k by member-mean activity;
- ``diverse``: ``select_batch`` with the default diversity (``measurement_anchor=False``:
  qUCB, Tanimoto penalty 0.5, 10 % exploration by member disagreement);
- ``phenotype``: ``diverse`` plus the predicted-profile cosine penalty (``phenotype_penalty=0.5``);
- ``phenotype_only``: qUCB with the cosine penalty alone (no Tanimoto penalty, no exploration);
- ``loop``: the default proposal (believer-UCB on the anchored GP, ``acquisition.anchor``);
- ``random``: a seeded random batch.

Run: ``nice -n 10 .venv/bin/python benchmarks/bench_diverse_selection.py --worlds 0 1 --seeds 5
--json out.json`` (about 2 minutes per (world, seed) on 2 cores, one torch thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
from pathlib import Path

import numpy as np

from lab_io.platemap import PlateLayoutConfig, treatment_capacity
from bench_common import add_world_arguments, each_world, start_benchmark
from loop.backtest import run_round, start_run
from loop.propose import candidate_table, choose_compounds
from loop.train import train_assay

log = logging.getLogger("bench_diverse_selection")

# policy name -> (propose policy, SelectionConfig overrides)
VARIANTS = {
    "ucb_topk": ("ucb_topk", {}),
    "greedy_mean": ("greedy_mean", {}),
    "diverse": ("loop", {"measurement_anchor": False}),
    "phenotype": ("loop", {"measurement_anchor": False, "phenotype_penalty": 0.5}),
    "phenotype_only": ("loop", {"measurement_anchor": False, "phenotype_penalty": 0.5, "diversity_penalty": 0.0,
                                "exploration_fraction": 0.0}),
    "loop": ("loop", {}),
    "random": ("random", {}),
}


def score_batch(compound_ids: list[str], actives: dict[str, str]) -> dict:
    hits = [c for c in compound_ids if c in actives]
    return {"n_picks": len(compound_ids), "n_actives": len(hits), "n_classes": len({actives[c] for c in hits})}


def run_world_seed(template: Path, run_dir: Path, seed: int, actives: dict[str, str], *, batch_wells: int,
                   budgets_wells: list[int]) -> dict:
    """One random round, one trained ensemble, every policy's batch at every budget."""
    campaign = start_run(template, run_dir, seed)
    run_round(campaign, 1, batch_wells, "random", seed)
    train_assay(campaign)
    candidates, pending = candidate_table(campaign)
    layout = PlateLayoutConfig(**campaign.config.layout)
    base_selection = dict(campaign.config.selection)
    out: dict = {"n_candidates": len(candidates),
                 "candidate_actives": int(candidates["compound_id"].isin(actives).sum())}
    for budget in budgets_wells:
        q = treatment_capacity(budget, layout)
        for name, (policy, overrides) in VARIANTS.items():
            campaign.config = dataclasses.replace(campaign.config, selection={**base_selection, **overrides})
            picks = choose_compounds(campaign, candidates, pending, q, policy, seed * 1000 + 2).picks
            out[f"{name}@{budget}"] = score_batch(candidates["compound_id"].iloc[picks].tolist(), actives)
    campaign.config = dataclasses.replace(campaign.config, selection=base_selection)
    campaign.engine.dispose()
    return out


def describe(row: dict) -> str:
    return "; ".join(f"{k} {v['n_actives']}/{v['n_classes']}" for k, v in row.items() if isinstance(v, dict))


def summarise(per_seed: list[dict], budgets_wells: list[int]) -> dict:
    table = {}
    for budget in budgets_wells:
        for name in VARIANTS:
            rows = [s[f"{name}@{budget}"] for s in per_seed]
            actives = np.array([r["n_actives"] for r in rows], dtype=float)
            classes = np.array([r["n_classes"] for r in rows], dtype=float)
            table[f"{name}@{budget}"] = {
                "n_picks": rows[0]["n_picks"],
                "actives_mean": float(actives.mean()), "actives_sd": float(actives.std(ddof=1)) if len(rows) > 1 else 0.0,
                "classes_mean": float(classes.mean()),
                "actives_per_seed": actives.astype(int).tolist(), "classes_per_seed": classes.astype(int).tolist(),
            }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_world_arguments(parser, worlds=[0, 1], batch_wells_help="wells of the random first round")
    parser.add_argument("--budgets", type=int, nargs="+", default=[96, 384], help="wells per proposed batch")
    args = parser.parse_args()
    result = {"args": start_benchmark(args),
              "policies": {name: {"propose_policy": p, "selection": o} for name, (p, o) in VARIANTS.items()},
              "worlds": {}}
    run = functools.partial(run_world_seed, batch_wells=args.batch_wells, budgets_wells=args.budgets)
    for world, actives, per_seed in each_world(args, run, describe):
        result["worlds"][str(world)] = {"n_actives": len(actives), "per_seed": per_seed,
                                        "summary": summarise(per_seed, args.budgets)}
        for key, row in result["worlds"][str(world)]["summary"].items():
            log.info("world %d %-18s actives %.1f ± %.1f, classes %.1f", world, key, row["actives_mean"],
                     row["actives_sd"], row["classes_mean"])
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
