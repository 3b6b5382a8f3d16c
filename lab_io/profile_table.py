"""Pycytominer-style per-well profile tables (CSV or Parquet) and the BBBC021 converter.

A profile table has one row per well: ``Metadata_Plate``, ``Metadata_Well``,
``Metadata_compound``, ``Metadata_smiles``, ``Metadata_dose_um``, optional ``Metadata_moa``,
and numeric feature columns (every numeric non-``Metadata_`` column; text columns such as
CellProfiler's ``Image_FileName_*``, flags and row or object numbers such as a saved pandas index
``Unnamed: 0`` or ``ImageNumber`` are ignored with a warning). A missing SMILES may also read
``nan``, ``None`` or ``NA`` (a table that went through ``str``): all mean "no SMILES". An empty dose is allowed (control
wells often have none); a dose that is not a number is an error naming the row.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lab_io.schema import META_COMPOUND, META_DOSE, META_MOA, META_PLATE, META_SMILES, META_WELL
from lab_io.tempfiles import naming_path

log = logging.getLogger(__name__)

REQUIRED = (META_PLATE, META_WELL, META_COMPOUND, META_SMILES, META_DOSE)
IDENTIFIERS = (META_PLATE, META_WELL, META_COMPOUND)  # text, never empty: plate 0101 stays 0101
_TEXT_COLUMNS = {c: str for c in (*IDENTIFIERS, META_SMILES)}
# numeric columns that number rows or objects, not measure cells: a saved pandas index
# ("Unnamed: 0", "index") and CellProfiler's object links
_ROW_NUMBERS = re.compile(r"^(Unnamed: \d+|index|level_\d+|ImageNumber|ObjectNumber|TableNumber)$")
# how a missing SMILES often reads once a table has been through str(): never a molecule
_MISSING_TEXT = {"", "nan", "none", "null", "na", "n/a", "<na>"}


@dataclass(frozen=True)
class ProfileTable:
    frame: pd.DataFrame
    features: list[str]
    source: str


def read_table_file(path: Path) -> pd.DataFrame:
    """A profile table's rows, from .csv(.gz), .tsv(.gz)/.txt or .parquet; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such profile table")
    suffixes = "".join(path.suffixes).lower()
    try:
        if suffixes.endswith(".parquet"):
            return pd.read_parquet(path)
        if suffixes.endswith((".csv", ".csv.gz")):
            return pd.read_csv(path, low_memory=False, dtype=_TEXT_COLUMNS)
        if suffixes.endswith((".tsv", ".tsv.gz", ".txt")):
            return pd.read_csv(path, sep="\t", low_memory=False, dtype=_TEXT_COLUMNS)
    except (ValueError, OSError) as err:  # parser, Arrow and decoding errors are ValueErrors
        raise ValueError(f"{path}: cannot read the profile table ({err})") from err
    raise ValueError(f"{path}: profile tables must be .csv, .tsv or .parquet")


def read_profile_table(path: Path) -> ProfileTable:
    """Read and check a profile table; errors name the file, and the column or row at fault."""
    path = Path(path)
    frame = read_table_file(path)
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; found {list(frame.columns[:8])}...")
    empty = np.zeros(len(frame), dtype=bool)
    for col in IDENTIFIERS:  # e.g. empty wells listed without a compound: not a condition, left out
        empty |= frame[col].isna().to_numpy() | (frame[col].astype(str).str.strip() == "").to_numpy()
    if empty.all():
        raise ValueError(f"{path}: every row lacks a plate, a well or a compound")
    if empty.any():
        log.warning("%s: %d row(s) without a plate, well or compound left out (first: row %d)", path,
                    int(empty.sum()), int(np.flatnonzero(empty)[0]) + 2)
        frame = frame[~empty].reset_index(drop=True)
    frame = frame.assign(**{c: frame[c].astype(str).str.strip() for c in IDENTIFIERS})
    repeated = frame.duplicated([META_PLATE, META_WELL])
    if repeated.any():  # e.g. one row per site: kept, each a replicate of its condition
        row = int(np.flatnonzero(repeated.to_numpy())[0])
        log.warning("%s: %d row(s) repeat a plate and well (first: plate %s well %s); each is kept as a "
                    "replicate of its condition", path, int(repeated.sum()), frame[META_PLATE].iloc[row],
                    frame[META_WELL].iloc[row])
    features = [c for c in frame.columns if not c.startswith("Metadata_")]
    row_numbers = [c for c in features if _ROW_NUMBERS.match(str(c)) or pd.api.types.is_bool_dtype(frame[c])]
    if row_numbers:
        log.warning("%s: %d column(s) that number rows or objects, or hold flags, are not features and are "
                    "ignored: %s", path, len(row_numbers), ", ".join(map(str, row_numbers[:5])))
        features = [c for c in features if c not in row_numbers]
    text = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if text:  # e.g. CellProfiler's Image_FileName_* / Image_PathName_* left in a table
        log.warning("%s: %d non-numeric column(s) without the Metadata_ prefix are not features and are ignored: %s",
                    path, len(text), ", ".join(text[:5]) + (" ..." if len(text) > 5 else ""))
        features = [c for c in features if c not in text]
    if not features:
        raise ValueError(f"{path}: no numeric feature columns (every other column starts with Metadata_)")
    dose_text = frame[META_DOSE]
    if not pd.api.types.is_numeric_dtype(dose_text):  # text (a Parquet string column): a blank cell is missing
        stripped = dose_text.astype("string").str.strip()
        dose_text = stripped.where(stripped != "", None).astype(object)
        frame = frame.assign(**{META_DOSE: dose_text})
    dose = pd.to_numeric(dose_text, errors="coerce")
    bad_text = dose.isna().to_numpy() & frame[META_DOSE].notna().to_numpy()
    if bad_text.any():  # "10 uM" and the like; an empty cell (e.g. a DMSO well) is left to the caller
        row = int(np.flatnonzero(bad_text)[0])
        raise ValueError(f"{path}: row {row + 2} ({frame[META_PLATE].iloc[row]} {frame[META_WELL].iloc[row]}): "
                         f"{META_DOSE} {frame[META_DOSE].iloc[row]!r} is not a number (give doses in uM)")
    smiles = frame[META_SMILES].astype("string").str.strip()
    smiles = smiles.where(~smiles.str.lower().isin(_MISSING_TEXT), None).fillna("")
    frame = frame.assign(**{META_DOSE: dose.astype(float), META_SMILES: smiles.astype(object)})
    return ProfileTable(frame=frame, features=features, source=str(path))


def write_profile_table(table: pd.DataFrame, path: Path) -> Path:
    """Write a profile table as Parquet (``.parquet``) or CSV (anything else), atomically:
    an interrupted write leaves any earlier file at ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if path.suffix.lower() == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except OSError as exc:
        raise naming_path(exc, path) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def convert_bbbc021(data_dir: Path) -> pd.DataFrame:
    """BBBC021 per-well mean profiles (Ljosa et al. 2013) -> a profile table.

    Joins the per-well table to the image table (plate + well -> compound, concentration),
    SMILES from ``compounds_smiles_matched.csv`` (empty where unmatched) and MoA labels.
    """
    data_dir = Path(data_dir)
    wells = pd.read_csv(data_dir / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz")
    images = pd.read_csv(data_dir / "BBBC021_v1_image.csv.gz")
    smiles = pd.read_csv(data_dir / "compounds_smiles_matched.csv")
    moa = pd.read_csv(data_dir / "BBBC021_v1_moa.csv")
    meta = (
        images.rename(columns={"Image_Metadata_Plate_DAPI": META_PLATE, "Image_Metadata_Well_DAPI": META_WELL,
                               "Image_Metadata_Compound": META_COMPOUND,
                               "Image_Metadata_Concentration": META_DOSE})
        [[META_PLATE, META_WELL, META_COMPOUND, META_DOSE]]
        .drop_duplicates([META_PLATE, META_WELL])
    )
    wells = wells.rename(columns={"Image_Metadata_Plate": META_PLATE, "Image_Metadata_Well": META_WELL})
    table = wells.merge(meta, on=[META_PLATE, META_WELL], how="left").copy()
    missing = table[META_COMPOUND].isna()
    if missing.any():
        first = table.loc[missing, [META_PLATE, META_WELL]].iloc[0].tolist()
        raise ValueError(f"{data_dir}: {int(missing.sum())} wells of the per-well table are not in the image "
                         f"table (first: plate {first[0]} well {first[1]})")
    lookup = dict(zip(smiles["compound"], smiles["smiles"].fillna("")))
    moa_lookup = {(c, float(d)): m for c, d, m in zip(moa["compound"], moa["concentration"], moa["moa"])}
    table = table.assign(**{
        META_SMILES: table[META_COMPOUND].map(lookup).fillna(""),
        META_MOA: [moa_lookup.get((c, float(d)), "DMSO" if c == "DMSO" else "")
                   for c, d in zip(table[META_COMPOUND], table[META_DOSE])],
    })
    meta_cols = [META_PLATE, META_WELL, META_COMPOUND, META_SMILES, META_DOSE, META_MOA]
    features = [c for c in table.columns if c not in meta_cols]
    return table[meta_cols + features]
