"""Campaign store: sqlmodel tables for what the loop has registered, proposed and measured.

Large arrays (fingerprints, per-cell features, predictions) live in NPY/Parquet files in
the campaign folder; rows here reference them by path relative to the campaign root.

SQLite file in the campaign folder by default; any SQLAlchemy URL via ``--db-url`` /
``LOOP_DB_URL``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from sqlalchemy import event, insert
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, create_engine, func, select

# Bulk inserts go through Core `insert()` with executemany in chunks of this size.
BULK_CHUNK_ROWS = 20_000


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class CampaignRecord(SQLModel, table=True):
    """The campaign a store belongs to (``CampaignConfig.campaign_id``, one row written by ``loop init``)."""

    campaign_id: str = Field(primary_key=True)
    created_at: dt.datetime = Field(default_factory=utcnow)


class Compound(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    compound_id: str = Field(index=True, unique=True)
    name: str = ""
    smiles: str
    inchikey: str = Field(index=True, unique=True)
    fp_row: int = Field(index=True, description="row in library/fingerprints.npy")
    source: str = ""
    added_at: dt.datetime = Field(default_factory=utcnow)


class Round(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    index: int = Field(index=True, unique=True)
    policy: str = "loop"
    model_version: Optional[str] = None
    out_dir: str = ""
    config_json: str = "{}"
    # When the version was trained or last made current (re-registered or reused); the newest is current.
    created_at: dt.datetime = Field(default_factory=utcnow)


class Plate(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    barcode: str = Field(index=True, unique=True)
    plate_map_name: str
    round_index: int = Field(index=True)
    layout_path: str = ""
    status: str = Field(default="pending", index=True, description="pending | returned | cancelled")
    results_fingerprint: Optional[str] = None
    created_at: dt.datetime = Field(default_factory=utcnow)
    returned_at: Optional[dt.datetime] = None


class Well(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    barcode: str = Field(index=True, foreign_key="plate.barcode")
    well: str
    role: str
    compound_id: Optional[str] = Field(default=None, index=True)
    dose_um: float = 0.0


class Measurement(SQLModel, table=True):
    """One measured well: summary numbers here, single cells in ``cells_path`` (Parquet)."""

    id: Optional[int] = Field(default=None, primary_key=True)
    barcode: str = Field(index=True, foreign_key="plate.barcode")
    well: str
    role: str
    compound_id: Optional[str] = Field(default=None, index=True)
    dose_um: float = 0.0
    n_cells: int
    activity: Optional[float] = Field(
        default=None, description="phenotypic activity: robust-z distance from plate DMSO (None: no cells)")
    is_hit: bool = False
    cells_path: str
    profiles_path: str


class ModelVersion(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    version: str = Field(index=True, unique=True)
    kind: str = "feature"
    path: str
    n_members: int
    n_training_cells: int = 0
    data_fingerprint: str = ""
    config_json: str = "{}"
    created_at: dt.datetime = Field(default_factory=utcnow)


class Proposal(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    round_index: int = Field(index=True)
    rank: int
    compound_id: str = Field(index=True)
    dose_um: float
    acquisition: str
    acq_value: Optional[float] = None
    pred_mean: Optional[float] = Field(default=None, description="mean over members of the predicted objective")
    pred_sd: Optional[float] = Field(default=None, description="sd over members (disagreement)")
    model_version: Optional[str] = None


SQLITE_CACHE_KIB = 262_144  # page cache a connection may grow to (allocated as used)


def _enable_sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _set_pragmas(dbapi_connection, _record):  # pragma: no cover - trivial
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        # SQLite's default 2 MB cache makes inserting 10^6 compounds into the compound table's
        # indexes re-read pages from the OS: registering 10^6 compounds took 20.7 s, with this 18.5 s.
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        cursor.close()


def make_engine(db_url: str) -> Engine:
    """Engine for ``db_url``; creates the tables if missing."""
    engine = create_engine(db_url)
    if engine.dialect.name == "sqlite":
        _enable_sqlite_pragmas(engine)
    SQLModel.metadata.create_all(engine)
    return engine


def bulk_insert(session: Session, model: type[SQLModel], rows: Iterable[dict[str, Any]]) -> int:
    """Insert many rows with executemany, in chunks; no ORM objects are built."""
    rows = list(rows)
    table = model.__table__  # type: ignore[attr-defined]
    for start in range(0, len(rows), BULK_CHUNK_ROWS):
        session.execute(insert(table), rows[start : start + BULK_CHUNK_ROWS])
    return len(rows)


def current_model_version(session: Session) -> "ModelVersion | None":
    """The campaign's current virtual assay: the version trained or made current last."""
    return session.exec(select(ModelVersion).order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())).first()


def plates_after_model(session: Session, current: "ModelVersion | None" = None) -> list[str]:
    """Barcodes of the plates ingested after the current virtual assay (``current``, looked up when
    not given) was trained or made current: measurements it has not learned from. Empty without a
    model."""
    current = current or current_model_version(session)
    if current is None:
        return []
    return sorted(session.exec(select(Plate.barcode).where(Plate.status == "returned",
                                                           Plate.returned_at > current.created_at)).all())


def count(session: Session, model: type[SQLModel], *where) -> int:
    stmt = select(func.count()).select_from(model)
    for clause in where:
        stmt = stmt.where(clause)
    return int(session.exec(stmt).one())


EXISTING_SCAN_MIN_VALUES = 9_000  # above this many values, compare with the table's size first


def existing_values(session: Session, column, values: Sequence[str]) -> set[str]:
    """Which of ``values`` already exist in ``column``: queried in chunks of 900, or, for more than
    ``EXISTING_SCAN_MIN_VALUES`` values and a table with at most as many rows as values, by reading
    the whole column once (a 10^6-compound library added to a new campaign asks one count instead
    of 1,100 queries)."""
    found: set[str] = set()
    values = list(values)
    if len(values) > EXISTING_SCAN_MIN_VALUES:
        n_rows = count(session, column.class_)
        if n_rows <= len(values):
            return set(session.exec(select(column)).all()).intersection(values) if n_rows else found
    for start in range(0, len(values), 900):
        chunk = values[start : start + 900]
        found.update(session.exec(select(column).where(column.in_(chunk))).all())
    return found
