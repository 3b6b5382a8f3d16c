"""Which phenotype classes a batch can reach on the synthetic lab, and why (issue #4's class target).

Issue #4 asks that diverse selection find more distinct phenotype classes than pure qUCB top-k.
``bench_diverse_selection.py`` measures the batches; this script explains them, per hidden
world and seed, in two parts.

1. **What the ensemble knows about each class.** One seeded random round through the real loop
   (propose, synthetic lab, ingest, train the default feature assay, as
   ``bench_diverse_selection.py`` does), then every candidate is simulated once (the funnel, cached).
   Per ground-truth class: its actives among the candidates, how many round 1 measured, the
   median rank of its actives by member-mean predicted activity (0 = top, 0.5 = chance), the
   fraction of them in the top 10 %, and how many of them the ``loop``, ``ucb_topk`` and
   ``random`` batches of ``--budget`` wells pick.
2. **What exploring chemistry reaches without a model.** ``--explore-seeds`` draws of a random
   round-1 set of the same size, then ``m`` picks by each ``select_cold_start`` method (random,
   maxmin, coverage, stratified) from the rest, scored by the ground truth alone: actives and
   distinct classes among the picks.

Run: ``nice -n 10 .venv/bin/python benchmarks/bench_class_reach.py --worlds 1 0 --seeds 10
--explore-seeds 20 --json out.json`` (26 minutes on one torch thread: about a minute per (world,
seed), two to three minutes per world for part 2).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging

import numpy as np

from acquisition.funnel import FunnelConfig, funnel_predict
from acquisition.prediction_cache import PredictionCache
from acquisition.select import select_cold_start
from bench_common import add_world_arguments, each_world, start_benchmark
from lab_io.ground_truth import INACTIVE
from lab_io.platemap import PlateLayoutConfig, treatment_capacity
from loop.backtest import run_round, start_run
from loop.campaign import Campaign, local_store_url
from loop.library import load_compounds
from loop.propose import candidate_table, choose_compounds, measured_conditions
from loop.train import latest_model, train_assay

log = logging.getLogger("bench_class_reach")

PICK_POLICIES = ("loop", "ucb_topk", "random")
EXPLORE_METHODS = ("random", "maxmin", "coverage", "stratified")


def class_of(compound_ids, actives: dict[str, str]) -> np.ndarray:
    return np.array([actives.get(c, INACTIVE) for c in compound_ids])


def rank_from_top(values: np.ndarray) -> np.ndarray:
    """Rank of each value, 0 for the largest, scaled to [0, 1)."""
    return np.argsort(np.argsort(-values, kind="stable"), kind="stable") / len(values)


def class_knowledge(template, run_dir, seed: int, actives: dict[str, str], *, batch_wells: int,
                    budget_wells: int) -> dict:
    """Part 1 for one (world, seed): per class, what round 1 measured and how the ensemble ranks it."""
    campaign = start_run(template, run_dir, seed)
    run_round(campaign, 1, batch_wells, "random", seed)
    train_assay(campaign)
    candidates, pending = candidate_table(campaign)
    fps = np.asarray(campaign.load_fingerprints())[candidates["fp_row"].to_numpy()]
    funnel = funnel_predict(latest_model(campaign), fps, candidates["inchikey"].to_numpy(), campaign.config.dose_um,
                            config=FunnelConfig.from_dict({"simulation_seed": campaign.config.seed,
                                                           **campaign.config.funnel}),
                            cache=PredictionCache(campaign.root / "cache"), seed=seed)
    rank = rank_from_top(np.asarray(funnel.values, dtype=np.float64).mean(axis=0))
    classes = class_of(candidates["compound_id"].to_numpy()[funnel.indices], actives)
    measured = collections.Counter(class_of(measured_conditions(campaign)["compound_id"], actives))
    q = treatment_capacity(budget_wells, PlateLayoutConfig(**campaign.config.layout))
    picked = {}
    for policy in PICK_POLICIES:
        picks = choose_compounds(campaign, candidates, pending, q, policy, seed * 1000 + 2).picks
        picked[policy] = collections.Counter(class_of(candidates["compound_id"].iloc[picks], actives))
    campaign.engine.dispose()
    rows = {}
    for name in sorted(set(classes)):
        members = classes == name
        rows[name] = {"candidates": int(members.sum()), "measured_round_1": int(measured.get(name, 0)),
                      "median_rank": float(np.median(rank[members])),
                      "top_10_percent": float(np.mean(rank[members] < 0.1)),
                      **{f"{p}_picks": int(picked[p].get(name, 0)) for p in PICK_POLICIES}}
    return {"n_candidates_simulated": int(len(classes)), "n_picks": int(q), "classes": rows}


def describe(row: dict) -> str:
    return "; ".join(f"{name} meas {r['measured_round_1']} rank {r['median_rank']:.2f} picks "
                     + "/".join(str(r[f'{p}_picks']) for p in PICK_POLICIES)
                     for name, r in row["classes"].items() if name != INACTIVE)


def exploration_reach(template, actives: dict[str, str], *, n_measured: int, budgets: list[int],
                      n_seeds: int) -> dict:
    """Part 2 for one world: actives and classes among ``m`` picks of each cold-start method."""
    campaign = Campaign.open(template, local_store_url(template))
    compounds = load_compounds(campaign)
    fps = np.asarray(campaign.load_fingerprints())[compounds["fp_row"].to_numpy()]
    campaign.engine.dispose()
    classes = class_of(compounds["compound_id"], actives)
    out = {}
    for m in budgets:
        found = collections.defaultdict(list)
        for seed in range(n_seeds):
            measured = np.zeros(len(fps), dtype=bool)
            measured[np.random.default_rng(seed).choice(len(fps), n_measured, replace=False)] = True
            for method in EXPLORE_METHODS:
                hits = classes[select_cold_start(fps, m, seed=seed, exclude=measured, method=method).indices]
                hits = hits[hits != INACTIVE]
                found[method].append((len(hits), len(set(hits))))
        out[str(m)] = {method: {"actives_mean": float(np.mean([a for a, _ in v])),
                                "classes_mean": float(np.mean([c for _, c in v]))} for method, v in found.items()}
        log.info("m = %d: %s", m, "; ".join(f"{k} {v['actives_mean']:.1f} actives, {v['classes_mean']:.2f} classes"
                                              for k, v in out[str(m)].items()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_world_arguments(parser, worlds=[0, 1], batch_wells_help="wells of the random first round")
    parser.add_argument("--budget", type=int, default=384, help="wells of the batches in part 1")
    parser.add_argument("--explore-picks", type=int, nargs="+", default=[37, 80, 368],
                        help="picks per batch in part 2")
    parser.add_argument("--explore-seeds", type=int, default=8, help="draws per size in part 2")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    result = {"args": start_benchmark(args), "worlds": {}}
    template_of_world: list = [None]  # each_world keeps the current world's template until the loop ends

    def run(template, run_dir, seed, actives):
        template_of_world[0] = template
        return class_knowledge(template, run_dir, seed, actives, batch_wells=args.batch_wells,
                               budget_wells=args.budget)

    n_measured = treatment_capacity(args.batch_wells, PlateLayoutConfig())  # compounds of the random round
    for world, actives, per_seed in each_world(args, run, describe):
        result["worlds"][str(world)] = {
            "actives_per_class": dict(collections.Counter(actives.values())), "per_seed": per_seed,
            "exploration": exploration_reach(template_of_world[0], actives, n_measured=n_measured,
                                             budgets=args.explore_picks, n_seeds=args.explore_seeds)}
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
