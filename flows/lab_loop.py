"""Prefect flows for scheduled and lab-triggered runs.

Tasks wrap the same plain functions the CLI calls; the flows only wire them together.
Arguments are paths and numbers so runs can be scheduled from deployments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import flow, task

from loop.campaign import Campaign
from loop.ingest import ingest_each_plate, ingest_results
from loop.lab import return_pending_rounds, run_synthetic_lab
from loop.propose import propose
from loop.runtime import configure_torch_threads
from loop.train import retrain_current, train_if_measured

configure_torch_threads()


@task(name="propose-plates")
def propose_task(campaign_dir: str, budget_wells: int, out_dir: Optional[str] = None, policy: str = "loop",
                 db_url: Optional[str] = None) -> dict:
    result = propose(Campaign.open(Path(campaign_dir), db_url), budget_wells,
                     out_dir=Path(out_dir) if out_dir else None, policy=policy)
    return dict(round_index=result.round_index, out_dir=str(result.out_dir), barcodes=result.barcodes,
                n_treatments=result.n_treatments, model_version=result.model_version)


@task(name="ingest-results")
def ingest_task(campaign_dir: str, results_dir: str, db_url: Optional[str] = None, allow_missing_wells: bool = False,
                crop_px: Optional[int] = None, crops_per_well: int = 64, replace: bool = False,
                allow_uneven_fields: bool = False, each_plate: bool = False,
                channel_names: Optional[list[str]] = None) -> list[dict]:
    options = dict(crop_px=crop_px, crops_per_well=crops_per_well, allow_missing_wells=allow_missing_wells,
                   allow_uneven_fields=allow_uneven_fields, replace=replace, channel_names=channel_names)
    campaign = Campaign.open(Path(campaign_dir), db_url)
    reports, refused = (ingest_each_plate(campaign, Path(results_dir), **options) if each_plate
                        else (ingest_results(campaign, Path(results_dir), **options), {}))
    return [dict(barcode=r.barcode, status=r.status, n_wells=r.n_wells, n_hits=r.n_hits) for r in reports] + \
        [dict(barcode=name, status="refused", reason=reason) for name, reason in refused.items()]


@task(name="train-assay")
def train_task(campaign_dir: str, executor: str = "local", ray_address: Optional[str] = None,
               db_url: Optional[str] = None) -> str:
    return retrain_current(Campaign.open(Path(campaign_dir), db_url), executor=executor, ray_address=ray_address)


@task(name="synthetic-lab")
def lab_task(campaign_dir: str, plates_dir: str, results_dir: str, seed: int = 0, write_images: bool = True,
             db_url: Optional[str] = None) -> list[str]:
    return run_synthetic_lab(Path(plates_dir), Path(results_dir), campaign=Campaign.open(Path(campaign_dir), db_url),
                             seed=seed, write_images=write_images)


@task(name="return-pending-rounds")
def finish_rounds_task(campaign_dir: str, seed: int = 0, write_images: bool = True,
                       db_url: Optional[str] = None) -> list[str]:
    return [str(p) for p in return_pending_rounds(Campaign.open(Path(campaign_dir), db_url), seed=seed,
                                                  write_images=write_images)]


@task(name="catch-up-training")
def catch_up_task(campaign_dir: str, executor: str = "local", db_url: Optional[str] = None) -> Optional[str]:
    return train_if_measured(Campaign.open(Path(campaign_dir), db_url), executor=executor)


@flow(name="propose")
def propose_flow(campaign_dir: str, budget_wells: int = 384, out_dir: Optional[str] = None, policy: str = "loop",
                 db_url: Optional[str] = None) -> dict:
    return propose_task(campaign_dir, budget_wells, out_dir, policy, db_url)


@flow(name="ingest")
def ingest_flow(campaign_dir: str, results_dir: str, db_url: Optional[str] = None, allow_missing_wells: bool = False,
                crop_px: Optional[int] = None, crops_per_well: int = 64, replace: bool = False,
                allow_uneven_fields: bool = False, each_plate: bool = False,
                channel_names: Optional[list[str]] = None) -> list[dict]:
    """Import a results folder; ``each_plate`` (a schedule watching a drop folder): plate by plate,
    a refused plate listed with ``status: refused`` and its reason while the others are imported.
    ``channel_names``: the stains of images-only plates' channels (``loop ingest --channels``)."""
    return ingest_task(campaign_dir, results_dir, db_url, allow_missing_wells, crop_px, crops_per_well, replace,
                       allow_uneven_fields, each_plate, channel_names)


@flow(name="retrain")
def retrain_flow(campaign_dir: str, executor: str = "local", ray_address: Optional[str] = None,
                 db_url: Optional[str] = None) -> str:
    """Train the feature ensemble on everything ingested; a campaign whose virtual assay is an image
    assay (``loop use-assay``) keeps it, with a warning (``loop.train.retrain_current``)."""
    return train_task(campaign_dir, executor, ray_address, db_url)


@flow(name="lab_round")
def lab_round_flow(campaign_dir: str, budget_wells: int = 384, seed: int = 0, write_images: bool = True,
                   executor: str = "local", db_url: Optional[str] = None) -> dict:
    """One closed-loop round against the synthetic lab: propose -> lab -> ingest -> retrain.

    A rerun after a failure first finishes what the stopped run left (pending rounds through the lab
    and ingested, a model trained on everything ingested), so the next proposal uses all of it."""
    finish_rounds_task(campaign_dir, seed, write_images, db_url)
    catch_up_task(campaign_dir, executor, db_url)
    proposal = propose_task(campaign_dir, budget_wells, None, "loop", db_url)
    results_dir = str(Path(proposal["out_dir"]).parent / "results")
    lab_task(campaign_dir, proposal["out_dir"], results_dir, seed, write_images, db_url)
    qc = ingest_task(campaign_dir, results_dir, db_url)
    version = train_task(campaign_dir, executor, None, db_url)
    return dict(proposal=proposal, ingest=qc, model_version=version)
