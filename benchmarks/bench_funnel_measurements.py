"""The funnel's surrogate with and without the lab's measurements, on the synthetic lab.

Issue #4 asks for a prescreening surrogate "trained on the virtual assay's own predictions and on
real measurements". Since session 31 ``loop propose`` passes the measured conditions to it, put on
the predictions' scale (``acquisition.anchor.on_prediction_scale``); before, it saw simulated
values alone. Per (world, seed) this runs one seeded random round through the real loop
(propose, synthetic lab, ingest, train the default feature assay), then asks the default policy
(``loop``: believer-UCB on the anchored GP) for a batch with the funnel forced on
(``simulate_all_max`` below the library size), once with ``surrogate_measurements`` and once
without. The random sample the surrogate learns from is the same in both (same seed); only the
shortlist differs. Each is scored against the lab's hidden truth (``GroundTruth``): the actives in
the shortlist, and the actives and phenotype classes in the batch.

Run: ``nice -n 10 .venv/bin/python benchmarks/bench_funnel_measurements.py --worlds 0 1 --seeds 3
--json out.json`` (about 3 minutes per (world, seed) on 2 cores, one torch thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging

import numpy as np

import loop.propose
from bench_common import add_world_arguments, each_world, start_benchmark
from lab_io.platemap import PlateLayoutConfig, treatment_capacity
from loop.backtest import run_round, start_run
from loop.propose import candidate_table, choose_compounds
from loop.train import train_assay

log = logging.getLogger("bench_funnel_measurements")

VARIANTS = {"with_measurements": True, "simulated_only": False}


def run_world_seed(template, run_dir, seed: int, actives: dict[str, str], *, batch_wells: int, budget_wells: int,
                   sample_size: int, shortlist_size: int) -> dict:
    """One random round, one trained ensemble, one batch per variant."""
    campaign = start_run(template, run_dir, seed)
    run_round(campaign, 1, batch_wells, "random", seed)
    train_assay(campaign)
    candidates, pending = candidate_table(campaign)
    q = treatment_capacity(budget_wells, PlateLayoutConfig(**campaign.config.layout))
    is_active = candidates["compound_id"].isin(actives).to_numpy()
    base_funnel = dict(campaign.config.funnel)
    funnels = []
    original = loop.propose.funnel_predict

    def keep(*args, **kwargs):  # the funnel's result, for its shortlist
        funnels.append(original(*args, **kwargs))
        return funnels[-1]

    out: dict = {"n_candidates": len(candidates), "candidate_actives": int(is_active.sum())}
    loop.propose.funnel_predict = keep
    try:
        for name, use in VARIANTS.items():
            campaign.config = dataclasses.replace(campaign.config, funnel={
                **base_funnel, "simulate_all_max": min(sample_size, len(candidates) - 1), "sample_size": sample_size,
                "shortlist_size": shortlist_size, "surrogate_measurements": use})
            choice = choose_compounds(campaign, candidates, pending, q, "loop", seed * 1000 + 2)
            funnel = funnels[-1]
            shortlist = funnel.indices[funnel.from_shortlist]
            picked = candidates["compound_id"].iloc[choice.picks].tolist()
            hits = [c for c in picked if c in actives]
            out[name] = {"shortlist_actives": int(is_active[shortlist].sum()), "n_shortlist": len(shortlist),
                         "batch_actives": len(hits), "batch_classes": len({actives[c] for c in hits}),
                         "n_picks": len(picked),
                         "n_measured_labels": choice.applied["funnel"]["surrogate"]["n_measured"]}
    finally:
        loop.propose.funnel_predict = original
        campaign.config = dataclasses.replace(campaign.config, funnel=base_funnel)
        campaign.engine.dispose()
    return out


def describe(row: dict) -> str:
    return "; ".join(f"{name} shortlist {row[name]['shortlist_actives']}, batch {row[name]['batch_actives']}"
                     f"/{row[name]['batch_classes']}" for name in VARIANTS)


def summarise(per_seed: list[dict]) -> dict:
    table = {}
    for name in VARIANTS:
        rows = [s[name] for s in per_seed]
        table[name] = {key: float(np.mean([r[key] for r in rows]))
                       for key in ("shortlist_actives", "batch_actives", "batch_classes")}
    table["paired_batch_actives_difference"] = [s["with_measurements"]["batch_actives"]
                                                - s["simulated_only"]["batch_actives"] for s in per_seed]
    table["paired_shortlist_actives_difference"] = [s["with_measurements"]["shortlist_actives"]
                                                    - s["simulated_only"]["shortlist_actives"] for s in per_seed]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_world_arguments(parser, worlds=[0, 1], batch_wells_help="wells of the random first round")
    parser.add_argument("--budget", type=int, default=384, help="wells of the proposed batch")
    parser.add_argument("--sample-size", type=int, default=1000)
    parser.add_argument("--shortlist-size", type=int, default=500)
    args = parser.parse_args()
    result = {"args": start_benchmark(args), "worlds": {}}
    run = functools.partial(run_world_seed, batch_wells=args.batch_wells, budget_wells=args.budget,
                            sample_size=args.sample_size, shortlist_size=args.shortlist_size)
    for world, actives, per_seed in each_world(args, run, describe):
        summary = summarise(per_seed)
        result["worlds"][str(world)] = {"n_actives": len(actives), "per_seed": per_seed, "summary": summary}
        log.info("world %d: %s", world, json.dumps(summary))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
