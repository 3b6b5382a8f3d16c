"""Register compounds in a campaign: standardise, de-duplicate, fingerprint, store."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sqlmodel import func, select

from lab_io import chem
from lab_io.virtual_library import enumerate_library
from loop import store
from loop.campaign import Campaign

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LibraryAddReport:
    source: str
    n_read: int
    n_added: int
    n_invalid: int
    n_duplicate_in_file: int
    n_already_registered: int
    errors: list[tuple[int, str, str]]
    n_id_conflicts: int = 0  # skipped: the id is registered for another structure


def add_library_file(campaign: Campaign, path: Path, n_jobs: int | None = None) -> LibraryAddReport:
    """``loop library add FILE``: invalid SMILES are reported with line numbers and skipped."""
    result = chem.read_library(Path(path), n_jobs=n_jobs, fingerprints=True, smiles_as_given=True)
    for line, raw, reason in result.errors[:20]:
        log.warning("%s line %d: skipped SMILES %r (%s)", path, line, raw, reason)
    if len(result.errors) > 20:
        log.warning("%s: %d more invalid rows skipped", path, len(result.errors) - 20)
    n_added, n_conflicts = register_compounds(campaign, result.table, result.fingerprints, source=str(path))
    return LibraryAddReport(
        source=str(path),
        n_read=len(result.table) + len(result.errors) + result.n_duplicates,
        n_added=n_added,
        n_invalid=len(result.errors),
        n_duplicate_in_file=result.n_duplicates,
        n_already_registered=len(result.table) - n_added - n_conflicts,
        errors=list(result.errors),
        n_id_conflicts=n_conflicts,
    )


def add_virtual_library(campaign: Campaign, n_compounds: int, seed: int = 0) -> LibraryAddReport:
    """Register the embedded combinatorial library (enumerated with RDKit reactions)."""
    table = enumerate_library(n_compounds, seed=seed)
    featurized = chem.featurize_smiles(table["smiles"].tolist())
    if featurized.errors:
        raise RuntimeError(f"embedded virtual library produced invalid products: {featurized.errors[:3]}")
    table = table.assign(smiles=featurized.smiles, inchikey=featurized.inchikeys)
    unique = ~table["inchikey"].duplicated().to_numpy()
    n_added, _ = register_compounds(campaign, table[unique], featurized.fingerprints[unique],
                                    source=f"virtual:{n_compounds}:{seed}")
    return LibraryAddReport(f"virtual library ({n_compounds}, seed {seed})", len(table), n_added, 0, 0,
                            len(table) - n_added, [])


def register_compounds(campaign: Campaign, table: pd.DataFrame, fingerprints: np.ndarray,
                       source: str) -> tuple[int, int]:
    """Insert compounds not yet registered (by InChIKey) and append their fingerprints; returns the
    number added and the number skipped because their id is registered for another structure.

    ``fingerprints`` (uint8 N x 256, packed) are aligned with the rows of ``table``.
    The fingerprint file is rewritten (old rows untouched) before the database commit, so a
    failed commit leaves only unreferenced trailing rows, which the next add overwrites.
    """
    with campaign.writing(f"library add from {source}"), campaign.session() as session:
        known_keys = store.existing_values(session, store.Compound.inchikey, table["inchikey"].tolist())
        if len(fingerprints) != len(table):
            raise ValueError(f"{source}: {len(fingerprints)} fingerprints for {len(table)} compounds")
        is_new = ~table["inchikey"].isin(known_keys).to_numpy()
        new = table[is_new]
        known_ids = store.existing_values(session, store.Compound.compound_id, new["compound_id"].tolist())
        n_conflicts = int(new["compound_id"].isin(known_ids).sum()) if known_ids else 0
        if known_ids:
            # An id already used by another structure: skip the row (named), never abort the import.
            log.warning("%s: skipped %d compound(s) whose id is registered for another structure: %s", source,
                        len(known_ids), ", ".join(sorted(known_ids)[:10]))
            keep = ~new["compound_id"].isin(known_ids).to_numpy()
            is_new[np.flatnonzero(is_new)[~keep]] = False
            new = table[is_new]
        if new.empty:
            return 0, n_conflicts
        next_row = session.exec(select(func.max(store.Compound.fp_row))).one()
        next_row = 0 if next_row is None else int(next_row) + 1
        fps_new = np.asarray(fingerprints)[is_new]
        fps_old = np.asarray(campaign.load_fingerprints()[:next_row])
        campaign.save_fingerprints(np.concatenate([fps_old, fps_new], axis=0))
        rows = [
            dict(compound_id=cid, name=name or cid, smiles=smi, inchikey=key, fp_row=next_row + i, source=source,
                 added_at=store.utcnow())
            for i, (cid, name, smi, key) in enumerate(
                zip(new["compound_id"], new["name"].fillna(""), new["smiles"], new["inchikey"])
            )
        ]
        store.bulk_insert(session, store.Compound, rows)
        session.commit()
    log.info("registered %d compounds from %s", len(rows), source)
    return len(rows), n_conflicts


def load_compounds(campaign: Campaign) -> pd.DataFrame:
    """All registered compounds ordered by fingerprint row (columns as in the Compound table)."""
    with campaign.session() as session:
        frame = pd.read_sql(select(store.Compound).order_by(store.Compound.fp_row), session.connection())
    return frame
