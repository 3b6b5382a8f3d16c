"""Target-phenotype objective on the synthetic lab: does it find compounds of the reference's class?

`loop objective set --target-compound C` makes proposals maximise the cosine similarity of each
candidate's predicted profile to C's measured profile. This benchmark asks whether that finds
more compounds of C's hidden phenotype class than the default activity screen. Per (world, seed)
it runs `--random-rounds` seeded random rounds through the real loop (propose, synthetic lab,
ingest) and trains the default feature assay. Then, for every phenotype class among the measured
hits (hit calls are the lab's own; the class is the hidden truth a scientist would know from the
reference's biology), it takes that class's most active measured hit as the reference and asks
for one batch of `--budget` wells with each objective, scoring the picks against the truth:

- ``activity``: the default objective (policy ``loop``: the anchored GP on log activity);
- ``target``: similarity to the reference, policy ``loop``: the anchored GP on the similarity
  (measured conditions score their measured profiles' similarity);
- ``target_ensemble``: the same without the anchor (``measurement_anchor=False``): ensemble
  qUCB, Tanimoto penalty 0.5, 10 % exploration;
- ``target_greedy``: similarity, top-k by member mean (policy ``greedy_mean``);
- ``target+activity``: similarity + 0.5 x activity (policy ``loop``);
- ``target_no_floor``: ``target_ensemble`` with the plain cosine (``ObjectiveConfig.floor_z = 0``).

Reported per class: picks that are ground-truth actives of the reference's class, and all actives.
Random's expectation is ``q x (class actives among candidates) / candidates``.

Run: ``nice .venv/bin/python benchmarks/bench_target_objective.py --worlds 0 --seeds 5 --json out.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
from pathlib import Path

import numpy as np
from sqlmodel import select

from lab_io.platemap import PlateLayoutConfig, treatment_capacity
from loop import store
from bench_common import add_world_arguments, each_world, start_benchmark
from loop.backtest import run_round, start_run
from loop.objective import measured_target, set_objective
from loop.propose import candidate_table, choose_compounds
from loop.train import train_assay

log = logging.getLogger("bench_target_objective")

# name -> (propose policy, activity weight, similarity weight, ObjectiveConfig overrides,
# SelectionConfig overrides); similarity 0 = the activity screen
VARIANTS = {
    "activity": ("loop", 1.0, 0.0, {}, {}),
    "target": ("loop", 0.0, 1.0, {}, {}),
    "target_ensemble": ("loop", 0.0, 1.0, {}, {"measurement_anchor": False}),
    "target_greedy": ("greedy_mean", 0.0, 1.0, {}, {}),
    "target+activity": ("loop", 0.5, 1.0, {}, {}),
    "target_no_floor": ("loop", 0.0, 1.0, {"floor_z": 0.0}, {"measurement_anchor": False}),
}


def measured_hits(campaign) -> list[tuple[str, float]]:
    """(compound_id, activity) of the lab's hit calls with a profile (a well without a cell, a hit
    by cell loss, has no activity), most active first."""
    with campaign.session() as session:
        rows = session.exec(select(store.Measurement.compound_id, store.Measurement.activity)
                            .where(store.Measurement.is_hit, store.Measurement.activity.is_not(None))).all()
    return sorted(((c, float(a)) for c, a in rows), key=lambda r: -r[1])


def run_world_seed(template: Path, run_dir: Path, seed: int, actives: dict[str, str], *, random_rounds: int,
                   batch_wells: int, budget: int) -> dict:
    campaign = start_run(template, run_dir, seed)
    for round_index in range(1, random_rounds + 1):
        run_round(campaign, round_index, batch_wells, "random", seed)
    train_assay(campaign)
    candidates, pending = candidate_table(campaign)
    q = treatment_capacity(budget, PlateLayoutConfig(**campaign.config.layout))
    cand_classes = candidates["compound_id"].map(actives).fillna("inactive").to_numpy()
    references: dict[str, str] = {}
    for compound_id, _ in measured_hits(campaign):  # the most active measured hit of each true class
        references.setdefault(actives.get(compound_id, "inactive"), compound_id)
    references.pop("inactive", None)
    base_selection = dict(campaign.config.selection)
    out = {"n_candidates": len(candidates), "q": q, "classes": {}}
    for cls, reference in sorted(references.items()):
        target = measured_target(campaign, reference)
        row = {"reference": reference, "candidate_class_actives": int((cand_classes == cls).sum())}
        row["random_expected"] = q * row["candidate_class_actives"] / len(candidates)
        for name, (policy, w_activity, w_similarity, objective_overrides, selection) in VARIANTS.items():
            objective = set_objective(campaign, target=target if w_similarity else None,
                                      activity_weight=w_activity, similarity_weight=w_similarity)
            campaign.config = dataclasses.replace(campaign.config,
                                                  objective={**objective.to_dict(), **objective_overrides},
                                                  selection={**base_selection, **selection})
            picks = choose_compounds(campaign, candidates, pending, q, policy, seed * 1000 + 7).picks
            picked = cand_classes[picks]
            row[name] = {"class_actives": int((picked == cls).sum()), "actives": int((picked != "inactive").sum())}
        out["classes"][cls] = row
    campaign.engine.dispose()
    return out


def describe(row: dict) -> str:
    return "; ".join(f"{cls}: " + " ".join(f"{n} {r[n]['class_actives']}" for n in VARIANTS)
                     + f" random {r['random_expected']:.1f}" for cls, r in row["classes"].items())


def summarise(per_seed: list[dict]) -> dict:
    table: dict = {}
    for name in [*VARIANTS, "random_expected"]:
        values = [r[name] if name == "random_expected" else r[name]["class_actives"]
                  for s in per_seed for r in s["classes"].values()]
        actives = [r[name]["actives"] for s in per_seed for r in s["classes"].values()] if name in VARIANTS else []
        table[name] = {"class_actives_mean": float(np.mean(values)), "n_references": len(values),
                       "actives_mean": float(np.mean(actives)) if actives else None}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_world_arguments(parser, worlds=[0], batch_wells_help="wells of each random round")
    parser.add_argument("--random-rounds", type=int, default=1)
    parser.add_argument("--budget", type=int, default=96, help="wells of the proposed batch")
    args = parser.parse_args()
    result = {"args": start_benchmark(args),
              "variants": {k: dict(zip(("policy", "activity_weight", "similarity_weight", "objective", "selection"), v))
                           for k, v in VARIANTS.items()}, "worlds": {}}
    run = functools.partial(run_world_seed, random_rounds=args.random_rounds, batch_wells=args.batch_wells,
                            budget=args.budget)
    for world, _, per_seed in each_world(args, run, describe):
        result["worlds"][str(world)] = {"per_seed": per_seed, "summary": summarise(per_seed)}
        for name, row in result["worlds"][str(world)]["summary"].items():
            log.info("world %d %-16s class actives %.2f (actives %s) over %d references", world, name,
                     row["class_actives_mean"], row["actives_mean"], row["n_references"])
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
