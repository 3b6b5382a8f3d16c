"""``loop round cancel N``: a proposed round whose plates will not be run."""

from __future__ import annotations

import logging

from sqlmodel import select

from loop import store
from loop.campaign import Campaign

log = logging.getLogger(__name__)


def cancel_round(campaign: Campaign, round_index: int) -> list[str]:
    """Mark round ``round_index``'s plates ``cancelled`` (they will not be run): their compounds are
    candidates again, and their results, should they come back, are refused. Only a round none of
    whose plates was imported can be cancelled; its plate files and records stay as history.
    Returns the cancelled barcodes."""
    with campaign.writing(f"cancel of round {round_index}"), campaign.session() as session:
        plates = session.exec(select(store.Plate).where(store.Plate.round_index == round_index)).all()
        if not plates:
            raise ValueError(f"{campaign.root}: no round {round_index}")
        returned = [p.barcode for p in plates if p.status == "returned"]
        if returned:
            raise ValueError(f"round {round_index}: plate(s) {', '.join(returned)} were already imported; "
                             "a round with measurements cannot be cancelled")
        pending = [p for p in plates if p.status == "pending"]
        if not pending:
            raise ValueError(f"round {round_index} was already cancelled")
        for plate in pending:
            plate.status = "cancelled"
            session.add(plate)
        session.commit()
        barcodes = [p.barcode for p in pending]
    log.info("round %d cancelled: plates %s; their compounds are candidates again", round_index, ", ".join(barcodes))
    return barcodes
