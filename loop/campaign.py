"""The campaign: one folder holding a loop's configuration, store and files.

    campaign/
      campaign.json                 CampaignConfig (to_json / from_json)
      campaign.db                   SQLite store (default; any SQLAlchemy URL instead)
      library/fingerprints.npy      packed Morgan fingerprints, row = Compound.fp_row
      rounds/round-NNN/             plate files emitted for the lab, round config
      measurements/<barcode>.*      ingested single cells and well profiles (Parquet)
      models/<version>/             trained virtual assays
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import numbers
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlmodel import Session, select

from loop import store

try:
    import fcntl
except ImportError:  # not POSIX (Windows): campaign writes are not locked there
    fcntl = None

log = logging.getLogger(__name__)

CONFIG_FILE = "campaign.json"
DB_FILE = "campaign.db"
LOCK_FILE = ".write.lock"
LOCK_TIMEOUT_S = 600.0  # a writer waits this long for another to finish (a 10^6 library add takes ~5 min)
TRAIN_LOCK_FILE = ".train.lock"  # trainings wait for each other only (ingest and propose go on meanwhile)
TRAIN_LOCK_TIMEOUT_S = 4 * 3600.0
_HELD: dict[tuple[str, int], int] = {}  # (campaign lock file, thread) this process holds -> depth


@dataclass(frozen=True)
class CampaignConfig:
    """Everything that decides what the loop does; saved in ``campaign.json`` and with every round."""

    seed: int = 0
    dose_um: float = 10.0
    # Plate layout (lab_io.platemap.PlateLayoutConfig keyword arguments).
    layout: dict[str, Any] = field(default_factory=dict)
    # Batch selection (acquisition.select.SelectionConfig keyword arguments).
    selection: dict[str, Any] = field(default_factory=dict)
    # Candidate simulation funnel (acquisition.funnel.FunnelConfig keyword arguments).
    funnel: dict[str, Any] = field(default_factory=dict)
    # What proposals maximise (acquisition.objectives.ObjectiveConfig keyword arguments; default:
    # phenotypic activity; `loop objective set` adds a target phenotype).
    objective: dict[str, Any] = field(default_factory=dict)
    # Virtual assay (models.config.FeatureAssayConfig keyword arguments).
    assay: dict[str, Any] = field(default_factory=dict)
    # Synthetic lab used by `loop lab run` and backtests (lab_io.synthetic_lab.SyntheticLabConfig).
    lab: dict[str, Any] = field(default_factory=dict)
    lab_world_seed: int = 0
    # A well is a hit when its activity exceeds the plate's DMSO activity mean + hit_sd x sd.
    hit_sd: float = 3.0
    # Ingest removes each plate's edge effect (outer-ring wells' offset from the interior, per
    # feature; loop.ingest.plate_profiles). A campaign.json written before this option existed
    # reads as False: its plates were imported without it, and a campaign keeps one normalisation.
    edge_correction: bool = True
    # Hit calls account for cell counts (loop.ingest._cell_count_hits): a profile measured on few
    # cells must pass the threshold of DMSO wells measured with as few cells, and a treatment that
    # leaves far fewer cells than DMSO is a hit by its cell loss. A campaign.json written before
    # this option existed reads as False (one hit rule per campaign).
    cell_count_hits: bool = True
    # Identity, drawn by `loop init` and written into the store too: plate barcodes carry its first
    # four characters (LP3F9A-0001), so one campaign's results are not taken for another's plates,
    # and a store that is not this campaign's is refused. Empty in campaigns made before it existed.
    campaign_id: str = ""

    @property
    def barcode_tag(self) -> str:
        """What plate barcodes carry between the prefix and the plate number (``"3F9A-"``; ``""``
        for campaigns without an id, whose barcodes stay ``LP0001``)."""
        return f"{self.campaign_id[:4].upper()}-" if self.campaign_id else ""

    def validate(self, source: str) -> None:
        """Build every section's typed config, so a bad value fails at ``loop init`` naming ``source``
        and the section, not at a later ``propose``. CampaignError otherwise."""
        from acquisition.funnel import FunnelConfig
        from acquisition.objectives import ObjectiveConfig
        from acquisition.select import SelectionConfig
        from lab_io.platemap import PlateLayoutConfig
        from lab_io.synthetic_lab import SyntheticLabConfig
        from models.config import FeatureAssayConfig

        checks = {
            "seed": lambda: _check_int(self.seed),
            "hit_sd": lambda: _check_positive(self.hit_sd),
            "edge_correction": lambda: _check_bool(self.edge_correction),
            "cell_count_hits": lambda: _check_bool(self.cell_count_hits),
            "lab_world_seed": lambda: _check_int(self.lab_world_seed),
            "layout": lambda: PlateLayoutConfig(**self.layout),
            "dose_um": lambda: (_check_positive(self.dose_um),  # after 'layout': dispensed by its settings
                                PlateLayoutConfig(**self.layout).check_dispensable(self.dose_um, "dose_um")),
            "selection": lambda: SelectionConfig(**self.selection),
            "funnel": lambda: FunnelConfig.from_dict(self.funnel),
            "objective": lambda: ObjectiveConfig.from_dict(self.objective),
            "assay": lambda: FeatureAssayConfig(**self.assay),
            "lab": lambda: SyntheticLabConfig(**self.lab),
        }
        for key, check in checks.items():
            try:
                check()
            except (TypeError, ValueError) as exc:
                raise CampaignError(f"{source}: {key!r}: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, stored: bool = False) -> "CampaignConfig":
        """The config in ``text``; keys it lacks take their defaults, except that a campaign's own
        ``campaign.json`` (``stored``) without ``edge_correction`` (``cell_count_hits``) was
        written before ingest corrected edges (matched hit calls to cell counts), and keeps
        importing without (one normalisation and one hit rule per campaign)."""
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown campaign config keys: {unknown}")
        if stored:
            data.setdefault("edge_correction", False)
            data.setdefault("cell_count_hits", False)
        return cls(**data)


class CampaignError(RuntimeError):
    """A campaign folder is missing, malformed or inconsistent."""


def _check_int(value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"must be an integer, got {value!r}")


def _check_bool(value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")


def _check_positive(value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"must be a number > 0, got {value!r}")


def new_campaign_id(seed: int | None = None) -> str:
    """A campaign id, 12 hex characters: random for a lab's campaign (``seed`` None); derived from
    ``seed`` for a simulated one (a backtest's, the demo's), whose plate barcodes carry it and seed
    the synthetic lab's noise, so the same seed measures the same plates on every run."""
    if seed is None:
        return uuid.uuid4().hex[:12]
    return hashlib.sha256(f"simulated-campaign-{int(seed)}".encode()).hexdigest()[:12]


class Campaign:
    """A campaign folder, its config and its store."""

    def __init__(self, root: Path, config: CampaignConfig, engine: Engine):
        self.root = Path(root)
        self.config = config
        self.engine = engine

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def init(cls, root: Path, config: CampaignConfig | None = None, db_url: str | None = None,
             config_source: str = "campaign config", id_seed: int | None = None) -> "Campaign":
        """Create the campaign folder and its store; ``config`` gets a fresh ``campaign_id`` (one
        copied from another campaign's ``campaign.json`` is replaced; :func:`new_campaign_id` of
        ``id_seed``) and is validated, errors naming ``config_source``."""
        root = Path(root)
        if (root / CONFIG_FILE).exists():
            raise CampaignError(f"{root / CONFIG_FILE} already exists: this folder is a campaign")
        config = dataclasses.replace(config or CampaignConfig(), campaign_id=new_campaign_id(id_seed))
        config.validate(config_source)
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        try:
            engine = _claim_store(resolve_db_url(root, db_url), root, config.campaign_id)
        except CampaignError:
            if created:  # leave no half-made campaign folder behind
                shutil.rmtree(root, ignore_errors=True)
            raise
        for sub in ("library", "rounds", "measurements", "models"):
            (root / sub).mkdir(exist_ok=True)
        _atomic_write_text(root / CONFIG_FILE, config.to_json())
        return cls(root, config, engine)

    @classmethod
    def open(cls, root: Path, db_url: str | None = None) -> "Campaign":
        root = Path(root)
        path = root / CONFIG_FILE
        if not path.exists():
            raise CampaignError(f"no campaign at {root} (missing {CONFIG_FILE}); run `loop init` first")
        try:
            config = CampaignConfig.from_json(path.read_text(), stored=True)
        except (ValueError, TypeError) as exc:
            raise CampaignError(f"{path}: {exc}") from exc
        url = resolve_db_url(root, db_url)
        if _missing_sqlite_file(url):  # init made it: opening would start an empty store beside the real one
            raise CampaignError(f"{root}: its store {url} does not exist; if the campaign was created with "
                                "--db-url (or LOOP_DB_URL), pass the same one")
        engine = open_store(url)
        if config.campaign_id:
            _check_store_owner(engine, url, path, config.campaign_id)
        return cls(root, config, engine)

    def session(self) -> Session:
        return Session(self.engine)

    @contextlib.contextmanager
    def writing(self, what: str, timeout_s: float = LOCK_TIMEOUT_S, lock_file: str = LOCK_FILE) -> Iterator[None]:
        """Hold the campaign's write lock (``<root>/.write.lock``, an OS file lock) while ``what`` runs
        (``lock_file``: another of the campaign's locks, e.g. ``TRAIN_LOCK_FILE``).

        Two writers that read the store and then write (``library add`` assigning fingerprint rows,
        ``ingest`` checking a plate is not yet imported, ``propose`` numbering a round) would
        otherwise interleave and corrupt what the other stored; the second waits up to
        ``timeout_s`` seconds and then fails with a :class:`CampaignError` naming the campaign.
        The lock is released when the block ends or the process dies; a block inside another block of
        the same thread on the same campaign just runs (the lock is already held), another thread waits."""
        path = self.root / lock_file
        key = (str(path.resolve()), threading.get_ident())  # another thread of this process waits too
        if fcntl is None or _HELD.get(key):
            _HELD[key] = _HELD.get(key, 0) + 1
            try:
                yield
            finally:
                _HELD[key] -= 1
                if not _HELD[key]:
                    del _HELD[key]
            return
        with open(path, "a+") as handle:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise CampaignError(f"{self.root}: another loop command is writing to this campaign "
                                            f"(lock {path} held for over {timeout_s:g} s); {what} did not start")
                    time.sleep(0.2)
            _HELD[key] = 1
            try:
                yield
            finally:
                del _HELD[key]
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def save_config(self, config: CampaignConfig) -> None:
        """Replace ``campaign.json`` atomically (a crash leaves the old file) and use ``config``."""
        _atomic_write_text(self.root / CONFIG_FILE, config.to_json())
        self.config = config

    # -- paths -------------------------------------------------------------------------
    @property
    def fingerprints_path(self) -> Path:
        return self.root / "library" / "fingerprints.npy"

    def round_dir(self, index: int) -> Path:
        return self.root / "rounds" / f"round-{index:03d}"

    @property
    def measurements_dir(self) -> Path:
        return self.root / "measurements"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def relative(self, path: Path) -> str:
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def absolute(self, rel: str) -> Path:
        path = Path(rel)
        return path if path.is_absolute() else self.root / path

    # -- fingerprints ------------------------------------------------------------------
    def load_fingerprints(self) -> np.ndarray:
        """uint8 n_compounds x 256 packed Morgan fingerprints (row = Compound.fp_row)."""
        if not self.fingerprints_path.exists():
            return np.zeros((0, 256), dtype=np.uint8)
        return np.load(self.fingerprints_path, mmap_mode="r")

    def save_fingerprints(self, fingerprints: np.ndarray) -> None:
        tmp = self.fingerprints_path.with_suffix(".tmp.npy")
        np.save(tmp, np.ascontiguousarray(fingerprints, dtype=np.uint8))
        os.replace(tmp, self.fingerprints_path)


def open_store(url: str) -> Engine:
    """``store.make_engine(url)``, with a URL that cannot be opened (unparsable, a missing driver, an
    unreachable server or folder) as a CampaignError naming it."""
    try:
        return store.make_engine(url)
    except (ImportError, SQLAlchemyError) as exc:
        raise CampaignError(f"cannot open the store {url}: {type(exc).__name__}: {str(exc).splitlines()[0]}") \
            from exc


def _claim_store(url: str, root: Path, campaign_id: str) -> Engine:
    """Open the new campaign's store and write its id into it; CampaignError when the store already
    holds a campaign (e.g. a ``LOOP_DB_URL`` left pointing at another one)."""
    engine = open_store(url)
    with Session(engine) as session:
        if session.exec(select(store.CampaignRecord.campaign_id)).first() is not None \
                or store.count(session, store.Compound) or store.count(session, store.Plate):
            engine.dispose()
            raise CampaignError(f"{root}: the store {url} already holds a campaign; give this one its own "
                                "(--db-url, LOOP_DB_URL, or neither for a campaign.db in its folder)")
        session.add(store.CampaignRecord(campaign_id=campaign_id))
        session.commit()
    return engine


def _check_store_owner(engine: Engine, url: str, config_path: Path, campaign_id: str) -> None:
    """CampaignError unless the store at ``url`` was made for campaign ``campaign_id``."""
    with Session(engine) as session:
        ids = session.exec(select(store.CampaignRecord.campaign_id)).all()
    if campaign_id not in ids:
        engine.dispose()
        raise CampaignError(f"{config_path.parent}: the store {url} is not this campaign's (it holds "
                            f"{', '.join(ids) or 'no campaign'}; {config_path} is campaign {campaign_id}); "
                            "pass the --db-url (or LOOP_DB_URL) it was created with")


def local_store_url(root: Path) -> str:
    """The SQLite file in the campaign folder, whatever ``LOOP_DB_URL`` says (for the loop's own
    throw-away campaigns: backtests, the demo)."""
    return f"sqlite:///{Path(root).resolve() / DB_FILE}"


def _missing_sqlite_file(url: str) -> bool:
    try:
        parsed = make_url(url)
    except ArgumentError:
        return False  # open_store names the unparsable URL
    return (parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
            and not Path(parsed.database).exists())


def resolve_db_url(root: Path, db_url: str | None) -> str:
    """``--db-url`` beats ``LOOP_DB_URL`` beats the SQLite file in the campaign folder."""
    return db_url or os.environ.get("LOOP_DB_URL") or local_store_url(root)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
