"""``loop status``: what the campaign holds, in numbers."""

from __future__ import annotations

from sqlmodel import select

from lab_io.schema import WellRole
from loop import store
from loop.campaign import Campaign
from loop.objective import campaign_objective, describe, target_progress


def campaign_status(campaign: Campaign) -> dict:
    """Counts of rounds, plates (pending / returned / cancelled), compounds, measurements, model versions and hits,
    and what proposals maximise."""
    from loop.train import plates_not_in_model  # models and torch only when the status is asked for

    S = store
    objective = campaign_objective(campaign)
    with campaign.session() as session:
        current = store.current_model_version(session)
        latest = None if current is None else current.version
        hit_compounds = set(session.exec(select(S.Measurement.compound_id).where(S.Measurement.is_hit)).all())
        measured_compounds = set(session.exec(select(S.Measurement.compound_id).where(
            S.Measurement.role == WellRole.treatment.value)).all())
        return {
            "campaign": str(campaign.root),
            "rounds": store.count(session, S.Round),
            "plates": {
                "total": store.count(session, S.Plate),
                "pending": store.count(session, S.Plate, S.Plate.status == "pending"),
                "returned": store.count(session, S.Plate, S.Plate.status == "returned"),
                "cancelled": store.count(session, S.Plate, S.Plate.status == "cancelled"),
            },
            "compounds": store.count(session, S.Compound),
            "compounds_measured": len(measured_compounds),
            "measurements": store.count(session, S.Measurement),
            "model_versions": store.count(session, S.ModelVersion),
            "latest_model": latest,
            # plates the current model has not learned from (a feature ensemble: ingested after it was
            # trained, `loop train` would learn from them; an image assay: not among its training plates)
            "plates_not_in_model": plates_not_in_model(campaign, session, current),
            "hits": {"wells": store.count(session, S.Measurement, S.Measurement.is_hit),
                     "compounds": len(hit_compounds)},
            "objective": describe(objective),
            # with a target phenotype: the measured conditions closest to it (None without one)
            "target_progress": target_progress(campaign, objective),
        }
