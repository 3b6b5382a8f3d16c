"""Compound library chemistry (RDKit): standardise, read library files, fingerprint, compare.

Standardisation (``standardize_smiles``) is deliberately small and fast, because ``loop library
add`` runs it on up to 10^6 SMILES:

1. parse and sanitise (RDKit ``MolFromSmiles``);
2. keep the largest fragment (``rdMolStandardize.LargestFragmentChooser(preferOrganic=True)``),
   only when the SMILES has more than one fragment (``.``);
3. neutralise charges (``rdMolStandardize.Uncharger``), only when the SMILES has a charged atom;
4. canonical isomeric SMILES and standard InChIKey of the result.

``loop library add`` keeps the SMILES a file gives for every plainly written structure that steps
2 and 3 leave unchanged (``smiles_as_given``; no stereo marks, explicit hydrogens or CXSMILES
extension: ``_given_smiles``): writing canonical SMILES is about a tenth of its time on 10^6
compounds, and structures are identified by their InChIKey, never by their SMILES text.

No tautomer canonicalisation or functional-group normalisation is done.

Fingerprints are Morgan (ECFP-like, ``rdFingerprintGenerator.GetMorganGenerator``) bit vectors,
stored packed: ``N x n_bits/8`` uint8 with ``np.packbits(..., bitorder="big")``, i.e. RDKit bit
``i`` is bit ``7 - i % 8`` (most significant first) of byte ``i // 8``. ``unpack_fingerprints``
inverts it.

Large inputs (more than ``PARALLEL_MIN_ITEMS`` SMILES) are processed in chunks by a ``spawn``
multiprocessing pool (workers are module-level functions, safe under any start method); smaller
inputs run in-process.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import multiprocessing
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rdkit import Chem, rdBase
from rdkit.Chem import rdFingerprintGenerator
from rdkit.Chem.MolStandardize import rdMolStandardize

from lab_io.schema import CONTROL_COMPOUND_ID, DMSO_INCHIKEY, MISSING_VALUE_TEXT

log = logging.getLogger(__name__)

SMILES_COLUMNS = ("smiles", "canonical_smiles", "metadata_smiles")
ID_COLUMNS = ("compound_id", "id", "broad_id", "broad_sample")
NAME_COLUMNS = ("name", "pert_iname", "compound_name")
LIBRARY_COLUMNS = ("compound_id", "name", "smiles", "inchikey")
TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
COMMENT_PREFIX = "!"  # Drug Repurposing Hub files start with '!' comment lines

PARALLEL_MIN_ITEMS = 20_000
DEFAULT_CHUNK_SIZE = 5_000
DERIVED_ID_PREFIX = "CPD-"

_CHARGED_ATOM_RE = re.compile(r"\[[^\]]*[+-][^\]]*\]")

# Error list entries: (index or 1-based line number, raw SMILES, reason).
SmilesError = tuple[int, str, str]


# --------------------------------------------------------------------------------------------
# Standardisation
# --------------------------------------------------------------------------------------------

class _Standardizer:
    """RDKit standardisation objects, built once per process."""

    _instance: "_Standardizer | None" = None

    def __init__(self) -> None:
        self.fragment_chooser = rdMolStandardize.LargestFragmentChooser(preferOrganic=True)
        self.uncharger = rdMolStandardize.Uncharger()

    @classmethod
    def get(cls) -> "_Standardizer":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


def _invalid_reason(smiles: str) -> str:
    """Why RDKit cannot sanitise ``smiles`` (called only on failures; logs are blocked)."""
    mol = Chem.MolFromSmiles(smiles, sanitize=False)
    if mol is None:
        return "SMILES syntax error"
    problems = Chem.DetectChemistryProblems(mol)
    if problems:
        return "; ".join(p.Message() for p in problems)
    return "RDKit could not sanitise the molecule"


def _standardize_mol(smiles: str) -> tuple[Chem.Mol | None, str]:
    """-> (standardised mol, '') or (None, reason). RDKit logging must be blocked by the caller."""
    if not isinstance(smiles, str) or not smiles.strip():
        return None, "empty SMILES"
    smiles = smiles.strip()
    mol = Chem.MolFromSmiles(smiles)
    if mol is None and " " in smiles:
        # CXSMILES extensions RDKit cannot read (e.g. '|THB:...|'): keep the plain SMILES part.
        smiles = smiles.split()[0]
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None, _invalid_reason(smiles)
    if mol.GetNumAtoms() == 0:
        return None, "SMILES has no atoms"
    std = _Standardizer.get()
    try:
        if "." in smiles:
            mol = std.fragment_chooser.choose(mol)
        if _CHARGED_ATOM_RE.search(smiles):
            mol = std.uncharger.uncharge(mol)
    except Exception as err:  # RDKit raises assorted exception types
        return None, f"standardisation failed: {err}"
    return mol, ""


def _canonical_smiles(mol: Chem.Mol) -> tuple[str, str]:
    """-> (canonical isomeric SMILES, reason); reason '' on success."""
    try:
        return Chem.MolToSmiles(mol), ""
    except Exception as err:  # one bad molecule must never abort a library import
        return "", f"SMILES/InChI generation failed: {err}"


def _inchikey(mol: Chem.Mol) -> tuple[str, str]:
    """-> (standard InChIKey, reason); reason '' on success."""
    try:
        inchikey = Chem.MolToInchiKey(mol)
    except Exception as err:  # one bad molecule must never abort a library import
        return "", f"SMILES/InChI generation failed: {err}"
    if not inchikey:
        return "", "InChI generation failed"
    return inchikey, ""


def _canonical_and_key(mol: Chem.Mol) -> tuple[str, str, str]:
    """-> (canonical SMILES, InChIKey, reason); reason '' on success."""
    canonical, reason = _canonical_smiles(mol)
    if reason:
        return "", "", reason
    inchikey, reason = _inchikey(mol)
    return canonical, inchikey, reason


def standardize_smiles(smiles: str) -> tuple[str, str]:
    """SMILES -> (canonical SMILES, InChIKey) after salt stripping and neutralisation.

    Raises ValueError with the reason for empty or invalid SMILES.
    """
    with rdBase.BlockLogs():
        mol, reason = _standardize_mol(smiles)
        if mol is not None:
            canonical, inchikey, reason = _canonical_and_key(mol)
    if reason:
        raise ValueError(f"invalid SMILES {smiles!r}: {reason}")
    return canonical, inchikey


def _standardize_chunk(args: tuple[int, Sequence[str]]) -> tuple[list, list, list[SmilesError]]:
    """Worker: standardise one chunk; error indices are global (offset + position)."""
    offset, smiles = args
    canonical: list[str | None] = []
    inchikeys: list[str | None] = []
    errors: list[SmilesError] = []
    with rdBase.BlockLogs():
        for i, smi in enumerate(smiles):
            mol, reason = _standardize_mol(smi)
            if mol is not None:
                can, key, reason = _canonical_and_key(mol)
            if reason:
                canonical.append(None)
                inchikeys.append(None)
                errors.append((offset + i, smi, reason))
            else:
                canonical.append(can)
                inchikeys.append(key)
    return canonical, inchikeys, errors


def _resolve_n_jobs(n_jobs: int | None) -> int:
    if n_jobs is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1 or None, got {n_jobs}")
    return n_jobs


def _chunks(items: Sequence, chunk_size: int) -> Iterator[tuple[int, Sequence]]:
    for start in range(0, len(items), chunk_size):
        yield start, items[start:start + chunk_size]


def _map_chunks(worker, items: Sequence, n_jobs: int | None, chunk_size: int, extra: tuple = ()) -> list:
    """Run ``worker((offset, chunk, *extra))`` over chunks, in a spawn pool when large; in order."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    items = list(items)
    n_jobs = _resolve_n_jobs(n_jobs)
    tasks = [(start, chunk, *extra) for start, chunk in _chunks(items, chunk_size)]
    if n_jobs == 1 or len(items) <= PARALLEL_MIN_ITEMS or len(tasks) == 1:
        return [worker(task) for task in tasks]
    n_procs = min(n_jobs, len(tasks))
    log.debug("processing %d items in %d chunks on %d processes", len(items), len(tasks), n_procs)
    with multiprocessing.get_context("spawn").Pool(n_procs) as pool:
        return list(pool.imap(worker, tasks))


def standardize_many(
    smiles: Sequence[str], n_jobs: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[list[str | None], list[str | None], list[SmilesError]]:
    """Standardise many SMILES -> (canonical, inchikeys, errors).

    ``canonical`` and ``inchikeys`` are aligned with the input (``None`` where it failed);
    ``errors`` lists ``(index, raw_smiles, reason)`` with 0-based input indices.
    Inputs longer than ``PARALLEL_MIN_ITEMS`` run in a pool of ``n_jobs`` processes
    (default: all available cores).
    """
    canonical: list[str | None] = []
    inchikeys: list[str | None] = []
    errors: list[SmilesError] = []
    for can, keys, errs in _map_chunks(_standardize_chunk, smiles, n_jobs, chunk_size):
        canonical.extend(can)
        inchikeys.extend(keys)
        errors.extend(errs)
    return canonical, inchikeys, errors


# --------------------------------------------------------------------------------------------
# Fingerprints and similarity
# --------------------------------------------------------------------------------------------

def _check_fingerprint_args(radius: int, n_bits: int) -> None:
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if n_bits < 8 or n_bits % 8:
        raise ValueError(f"n_bits must be a positive multiple of 8, got {n_bits}")


def _fingerprint_chunk(args: tuple[int, Sequence[str], int, int]) -> tuple[np.ndarray, list[SmilesError]]:
    """Worker: packed Morgan fingerprints of one chunk; invalid SMILES give zero rows + errors."""
    offset, smiles, radius, n_bits = args
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    bits = np.zeros((len(smiles), n_bits), dtype=np.uint8)
    errors: list[SmilesError] = []
    with rdBase.BlockLogs():
        for i, smi in enumerate(smiles):
            mol = Chem.MolFromSmiles(smi) if isinstance(smi, str) and smi else None
            if mol is None:
                errors.append((offset + i, smi, "empty SMILES" if not smi else _invalid_reason(smi)))
                continue
            bits[i] = generator.GetFingerprintAsNumPy(mol)
    return np.packbits(bits, axis=1, bitorder="big"), errors


def morgan_fingerprints(
    smiles: Sequence[str],
    radius: int = 2,
    n_bits: int = 2048,
    n_jobs: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """SMILES (N) -> packed Morgan fingerprints, uint8 ``N x n_bits/8`` (``np.packbits`` big order).

    Raises ValueError naming the first invalid SMILES (pass standardised SMILES).
    """
    _check_fingerprint_args(radius, n_bits)
    if len(smiles) == 0:
        return np.zeros((0, n_bits // 8), dtype=np.uint8)
    parts = _map_chunks(_fingerprint_chunk, smiles, n_jobs, chunk_size, extra=(radius, n_bits))
    errors = [e for _, errs in parts for e in errs]
    if errors:
        index, smi, reason = errors[0]
        raise ValueError(f"cannot fingerprint SMILES #{index} {smi!r}: {reason} ({len(errors)} invalid in total)")
    return np.concatenate([packed for packed, _ in parts], axis=0)


def murcko_scaffold_ids(smiles: Sequence[str], *, strict: bool = True) -> np.ndarray:
    """SMILES (N) -> int64 ``N`` ids of their Bemis–Murcko scaffolds (ring systems and the linkers
    between them, side chains removed; RDKit ``MurckoScaffold``), numbered in order of first
    appearance. Compounds with the same scaffold share an id; an acyclic compound has no
    scaffold and gets an id of its own. For ``SelectionConfig.max_per_scaffold``.

    Raises ValueError naming the first SMILES RDKit cannot parse; with ``strict=False`` such a
    SMILES gets an id of its own instead.
    """
    from rdkit.Chem.Scaffolds import MurckoScaffold

    ids: dict[str, int] = {}
    out = np.empty(len(smiles), dtype=np.int64)
    with rdBase.BlockLogs():
        for i, smi in enumerate(smiles):
            mol = Chem.MolFromSmiles(smi) if isinstance(smi, str) and smi.strip() else None
            if mol is None and strict:
                raise ValueError(f"cannot find the scaffold of SMILES #{i} {smi!r}: RDKit cannot parse it")
            scaffold = MurckoScaffold.MurckoScaffoldSmiles(mol=mol) if mol is not None else ""
            key = scaffold if scaffold else f"no-scaffold#{i}"
            out[i] = ids.setdefault(key, len(ids))
    return out


def unpack_fingerprints(packed: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Packed ``N x B`` uint8 -> ``N x 8B`` 0/1 array of ``dtype`` (float32 by default)."""
    packed = _as_packed(packed, "packed")
    return np.unpackbits(packed, axis=1, bitorder="big").astype(dtype, copy=False)


def _as_packed(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D uint8 array of packed fingerprints, got {x.dtype} {x.shape}")
    return x


def _tanimoto_blocks(a_packed: np.ndarray, b_packed: np.ndarray, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row offset, Tanimoto block ``rows x Nb`` float32) over row blocks of ``a``."""
    a_packed = _as_packed(a_packed, "a_packed")
    b_packed = _as_packed(b_packed, "b_packed")
    if a_packed.shape[1] != b_packed.shape[1]:
        raise ValueError(f"fingerprint widths differ: {a_packed.shape[1]} vs {b_packed.shape[1]} bytes")
    b_bits = unpack_fingerprints(b_packed)  # Nb x D
    b_counts = b_bits.sum(axis=1)  # Nb
    for start in range(0, a_packed.shape[0], block_rows):
        a_bits = unpack_fingerprints(a_packed[start:start + block_rows])  # r x D
        intersection = a_bits @ b_bits.T  # r x Nb (exact integers in float32 up to 2^24)
        union = a_bits.sum(axis=1)[:, None] + b_counts[None, :] - intersection
        with np.errstate(invalid="ignore", divide="ignore"):
            sim = np.where(union > 0, intersection / union, 0.0).astype(np.float32)
        yield start, sim


def tanimoto_matrix(a_packed: np.ndarray, b_packed: np.ndarray, block_rows: int = 4096) -> np.ndarray:
    """Tanimoto similarity of packed fingerprints: ``Na x B``, ``Nb x B`` -> float32 ``Na x Nb``.

    Two empty fingerprints have similarity 0 (as RDKit). Computed in row blocks of ``a``.
    """
    out = np.empty((np.asarray(a_packed).shape[0], np.asarray(b_packed).shape[0]), dtype=np.float32)
    for start, sim in _tanimoto_blocks(a_packed, b_packed, block_rows):
        out[start:start + sim.shape[0]] = sim
    return out


def tanimoto_max(a_packed: np.ndarray, b_packed: np.ndarray, block_rows: int = 4096) -> np.ndarray:
    """Max Tanimoto similarity of each ``a`` row to any ``b`` row -> float32 ``Na`` (0 if Nb = 0)."""
    n_a = np.asarray(a_packed).shape[0]
    out = np.zeros(n_a, dtype=np.float32)
    if np.asarray(b_packed).shape[0] == 0:
        _as_packed(a_packed, "a_packed")
        return out
    for start, sim in _tanimoto_blocks(a_packed, b_packed, block_rows):
        out[start:start + sim.shape[0]] = sim.max(axis=1)
    return out


# --------------------------------------------------------------------------------------------
# Single pass: standardise + fingerprint
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeaturizedSmiles:
    """Result of ``featurize_smiles``: lists aligned with the input, fingerprint rows too.

    ``smiles`` holds the standardised structure's canonical isomeric SMILES, or with
    ``smiles_as_given`` the SMILES as given where it is plainly written and standardisation left the
    structure unchanged (``_given_smiles``).
    Failed inputs have ``None`` SMILES/InChIKey, an all-zero fingerprint row and an entry
    ``(index, raw_smiles, reason)`` in ``errors``.
    """

    smiles: list[str | None]
    inchikeys: list[str | None]
    fingerprints: np.ndarray  # N x n_bits/8 uint8, packed (big bit order)
    errors: list[SmilesError] = field(default_factory=list)


_REWRITTEN_MARKS = ("@", "/", "\\", "[H")  # stereo and explicit hydrogens: RDKit may drop or move them


def _given_smiles(smiles: str) -> str | None:
    """``smiles`` stripped, when it is plain enough that it describes exactly the structure RDKit
    standardises: one fragment, no charged atom, no stereo marks or explicit hydrogens (RDKit drops
    a mark on an atom that is no stereocentre) and nothing after whitespace (a CXSMILES extension can
    set double-bond geometry, chirality or radicals); else None (write the canonical SMILES)."""
    text = smiles.strip()
    if (any(ch.isspace() for ch in text) or "." in text or _CHARGED_ATOM_RE.search(text)
            or any(mark in text for mark in _REWRITTEN_MARKS)):
        return None
    return text


def _featurize_chunk(
    args: tuple[int, Sequence[str], int, int, bool],
) -> tuple[list, list, np.ndarray, list[SmilesError]]:
    """Worker: standardise + fingerprint one chunk, parsing each SMILES once.

    Each RDKit step runs over the whole chunk before the next one starts (parse, InChIKey,
    SMILES, fingerprint): about 5 % faster than every step per molecule, as each step's code stays
    in the CPU caches. The fingerprint is taken from the standardised in-memory molecule; it
    equals the fingerprint of its canonical SMILES (checked on the Drug Repurposing Hub in the
    tests). With ``smiles_as_given`` a plainly written molecule standardisation leaves unchanged
    keeps the SMILES it was given (``_given_smiles``) instead of RDKit's canonical SMILES.
    """
    offset, smiles, radius, n_bits, smiles_as_given = args
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    out_smiles: list[str | None] = [None] * len(smiles)
    inchikeys: list[str | None] = [None] * len(smiles)
    bits = np.zeros((len(smiles), n_bits), dtype=np.uint8)
    reasons: dict[int, str] = {}
    with rdBase.BlockLogs():
        mols = []
        for i, smi in enumerate(smiles):
            mol, reason = _standardize_mol(smi)
            mols.append(mol)
            if reason:
                reasons[i] = reason
        ok = [i for i, mol in enumerate(mols) if mol is not None]
        for i in ok:
            inchikeys[i], reason = _inchikey(mols[i])
            if reason:
                reasons[i] = reason
        ok = [i for i in ok if i not in reasons]
        for i in ok:
            given = _given_smiles(smiles[i]) if smiles_as_given else None
            if given is None:
                given, reason = _canonical_smiles(mols[i])
                if reason:
                    reasons[i] = reason
            out_smiles[i] = given
        for i in ok:
            if i not in reasons:
                bits[i] = generator.GetFingerprintAsNumPy(mols[i])
    for i in reasons:
        out_smiles[i] = inchikeys[i] = None
    errors = [(offset + i, smiles[i], reasons[i]) for i in sorted(reasons)]
    return out_smiles, inchikeys, np.packbits(bits, axis=1, bitorder="big"), errors


def featurize_smiles(
    smiles: Sequence[str],
    radius: int = 2,
    n_bits: int = 2048,
    n_jobs: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    smiles_as_given: bool = False,
) -> FeaturizedSmiles:
    """Standardise and fingerprint in one pass over the pool (what ``library add`` needs).

    Each distinct string is processed once (``distinct_strings``): a library that repeats rows
    costs what its distinct SMILES cost; every repeat gets the same results, and an invalid
    SMILES one error per row it is on. ``smiles_as_given=True`` skips writing canonical SMILES
    for plainly written molecules that standardisation leaves unchanged (``_given_smiles``; about
    a tenth of the time): they keep the SMILES they were given; structures are still identified by
    their InChIKey.
    """
    _check_fingerprint_args(radius, n_bits)
    smiles = list(smiles)
    unique, inverse = distinct_strings(smiles)
    out_smiles: list[str | None] = []
    inchikeys: list[str | None] = []
    errors: list[SmilesError] = []
    packed = [np.zeros((0, n_bits // 8), dtype=np.uint8)]
    extra = (radius, n_bits, smiles_as_given)
    for smi, keys, fps, errs in _map_chunks(_featurize_chunk, unique, n_jobs, chunk_size, extra=extra):
        out_smiles.extend(smi)
        inchikeys.extend(keys)
        packed.append(fps)
        errors.extend(errs)
    fingerprints = np.concatenate(packed, axis=0)
    if inverse is None:
        return FeaturizedSmiles(out_smiles, inchikeys, fingerprints, errors)
    reasons = {i: reason for i, _, reason in errors}
    return FeaturizedSmiles(
        smiles=[out_smiles[j] for j in inverse],
        inchikeys=[inchikeys[j] for j in inverse],
        fingerprints=fingerprints[inverse],
        errors=[(i, smiles[i], reasons[j]) for i, j in enumerate(inverse) if j in reasons],
    )


def distinct_strings(items: list) -> tuple[list, np.ndarray | None]:
    """-> (the distinct items in first-seen order, ``inverse`` with ``items[i] == distinct[inverse[i]]``);
    ``inverse`` is None when every item is distinct (nothing to expand)."""
    first: dict = {}
    inverse = np.fromiter((first.setdefault(item, len(first)) for item in items), dtype=np.int64, count=len(items))
    if len(first) == len(items):
        return items, None
    return list(first), inverse


# --------------------------------------------------------------------------------------------
# Library files
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LibraryReadResult:
    """A compound library read from a file.

    table: one row per unique structure, columns ``compound_id, name, smiles, inchikey``
        (canonical SMILES, or as given with ``smiles_as_given``), in file order.
    errors: ``(line_number, raw_smiles, reason)`` for rows skipped, 1-based line numbers as in
        the file (the CSV/TSV header is its own line; parquet rows count from 2, as if the
        header were line 1).
    n_duplicates: rows dropped because their InChIKey already occurred earlier in the file.
    fingerprints: packed Morgan fingerprints (radius 2, 2048 bits) of ``table`` rows, computed in
        the same pass as the standardisation when ``read_library(..., fingerprints=True)``.
    """

    table: pd.DataFrame
    errors: list[SmilesError]
    n_duplicates: int
    fingerprints: np.ndarray | None = None  # len(table) x n_bits/8 packed, if asked for


@dataclass(frozen=True)
class _RawRows:
    line_numbers: list[int]
    smiles: list[str]
    ids: list[str]
    names: list[str]


def _header_key(name: object) -> str:
    """A header as matched: case, spaces, dots and hyphens ignored ('Compound ID' = 'compound_id')."""
    return re.sub(r"[\s.\-]+", "_", str(name).strip().lower())


def _find_column(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {_header_key(c): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    return None


def _rows_from_records(path: Path, columns: list[str], records: list[list[str]], line_numbers: list[int]) -> _RawRows:
    smiles_col = _find_column(columns, SMILES_COLUMNS)
    if smiles_col is None:
        raise ValueError(
            f"{path}: no SMILES column (looked for {', '.join(SMILES_COLUMNS)}, any case); columns are {columns}"
        )
    index = {c: i for i, c in enumerate(columns)}
    id_col = _find_column(columns, ID_COLUMNS)
    name_col = _find_column(columns, NAME_COLUMNS)
    log.info("%s: SMILES from column %r, ids from %s, names from %s", path, smiles_col,
             repr(id_col) if id_col else f"none found ({', '.join(ID_COLUMNS)}; derived from the InChIKey)",
             repr(name_col) if name_col else f"none found ({', '.join(NAME_COLUMNS)}; the id)")

    def column(col: str | None) -> list[str]:
        if col is None:
            return [""] * len(records)
        j = index[col]
        return [(r[j].strip() if j < len(r) and r[j] is not None else "") for r in records]

    return _RawRows(line_numbers, column(smiles_col), column(id_col), column(name_col))


def _read_delimited(path: Path, sep: str) -> _RawRows:
    """CSV/TSV with a header; '!' comment lines and blank lines are skipped, line numbers kept."""
    columns: list[str] | None = None
    records: list[list[str]] = []
    line_numbers: list[int] = []
    with _text_errors_named(path), open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=sep)
        start = 1
        for record in reader:
            line, start = start, reader.line_num + 1  # the record's first line; the next one's
            if reader.line_num > line and any("\n" in field for field in record):
                raise ValueError(f"{path} line {line}: a quoted field runs to line {reader.line_num} "
                                 "(an unbalanced quote?); nothing was read")
            if not record or all(not field.strip() for field in record):
                continue
            if columns is None:
                if record[0].startswith(COMMENT_PREFIX):
                    continue
                columns = [c.strip() for c in record]
                continue
            records.append(record)
            line_numbers.append(line)
    if columns is None:
        raise ValueError(f"{path}: file is empty (no header line); columns are []")
    return _rows_from_records(path, columns, records, line_numbers)


def _read_smi(path: Path) -> _RawRows:
    """``.smi``: whitespace-separated SMILES then optional id (and name); optional header line."""
    rows = _RawRows([], [], [], [])
    with _text_errors_named(path), open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if not rows.line_numbers and _looks_like_smi_header(parts):
                continue
            smiles, rest = _split_cx_extension(parts)
            rows.line_numbers.append(line_number)
            rows.smiles.append(smiles)
            rows.ids.append(rest[0] if rest else "")
            rows.names.append(" ".join(rest[1:]))
    return rows


def _split_cx_extension(parts: list[str]) -> tuple[str, list[str]]:
    """``['C[C@H](N)C(=O)O', '|&1:1|', 'ALA1', ...]`` -> (SMILES with its CXSMILES block, the rest):
    a ChemAxon extension block is part of the SMILES, not the compound id."""
    if len(parts) > 1 and parts[1].startswith("|"):
        for end in range(1, len(parts)):
            if parts[end].endswith("|") and (end > 1 or len(parts[1]) > 1):
                return " ".join(parts[: end + 1]), parts[end + 1:]
    return parts[0], parts[1:]


@contextlib.contextmanager
def _text_errors_named(path: Path) -> Iterator[None]:
    """Decoding and CSV-syntax errors of a library file become ValueErrors naming the file."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except csv.Error as err:
        raise ValueError(f"{path}: cannot parse ({err}; an unbalanced quote?)") from None


def _looks_like_smi_header(parts: list[str]) -> bool:
    """First line is a header if its first token names a SMILES column and does not parse."""
    if parts[0].strip().lower() not in SMILES_COLUMNS:
        return False
    with rdBase.BlockLogs():
        return Chem.MolFromSmiles(parts[0]) is None


def _read_parquet(path: Path) -> _RawRows:
    frame = pd.read_parquet(path)
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    for col in columns:  # integer ids with a missing value arrive as floats: 101, not 101.0
        values = frame[col]
        if pd.api.types.is_float_dtype(values) and values.notna().any() and (values.dropna() % 1 == 0).all():
            frame[col] = values.astype("Int64")
    records = frame.astype(object).where(frame.notna(), "").astype(str).values.tolist()
    return _rows_from_records(path, columns, records, list(range(2, len(records) + 2)))


def _read_raw_rows(path: Path) -> _RawRows:
    suffix = path.suffix.lower()
    if suffix in TEXT_SEPARATORS:
        return _read_delimited(path, TEXT_SEPARATORS[suffix])
    if suffix == ".smi":
        return _read_smi(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"{path}: unknown library file type {suffix!r} (use .csv, .tsv, .txt, .smi or .parquet)")


def derive_compound_id(inchikey: str) -> str:
    """Stable id from an InChIKey: ``CPD-`` + connectivity block + stereo/isotope hash."""
    return f"{DERIVED_ID_PREFIX}{inchikey[:14]}-{inchikey[15:23]}"


def read_library(path: str | Path, n_jobs: int | None = None, fingerprints: bool = False,
                 smiles_as_given: bool = False) -> LibraryReadResult:
    """Read a compound library (.csv, .tsv/.txt, .smi, .parquet) -> standardised, de-duplicated table.

    Invalid or empty SMILES are reported in ``errors`` and skipped. Missing ids are derived from
    the InChIKey (``derive_compound_id``); missing names default to the id. A row whose id was
    already used by a different structure earlier in the file is reported as an error.
    Raises ValueError (naming the file and the columns it saw) for unknown file types or files
    without a SMILES column. ``fingerprints=True`` also returns the Morgan fingerprints of the
    table rows, parsing each SMILES once (``featurize_smiles``), the fastest way to add a library.
    ``smiles_as_given=True`` keeps each row's SMILES as the file gives it where it is plainly
    written and standardisation leaves the structure unchanged (``_given_smiles``); salts, charged
    molecules, stereo marks, explicit hydrogens and CXSMILES extensions get the canonical SMILES of
    the standardised structure (``featurize_smiles``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: library file not found")
    raw = _read_raw_rows(path)
    if not raw.smiles:
        raise ValueError(f"{path}: no compound rows (only a header, comments or blank lines)")
    packed = None
    if fingerprints or smiles_as_given:
        featurized = featurize_smiles(raw.smiles, n_jobs=n_jobs, smiles_as_given=smiles_as_given)
        stored_smiles, inchikeys, std_errors = featurized.smiles, featurized.inchikeys, featurized.errors
        packed = featurized.fingerprints if fingerprints else None
    else:
        stored_smiles, inchikeys, std_errors = standardize_many(raw.smiles, n_jobs=n_jobs)
    errors: list[SmilesError] = [(raw.line_numbers[i], smi, reason) for i, smi, reason in std_errors]

    keep_rows: list[tuple[str, str, str, str]] = []
    seen_keys: set[str] = set()
    id_owner: dict[str, str] = {}
    kept: list[int] = []
    n_duplicates = 0
    for i, (smi, key) in enumerate(zip(stored_smiles, inchikeys)):
        if key is None:
            continue
        if key in seen_keys:
            n_duplicates += 1
            continue
        if key == DMSO_INCHIKEY:
            errors.append((raw.line_numbers[i], raw.smiles[i], "the solvent DMSO, not a compound (every plate has "
                           "its DMSO wells as the negative control)"))
            continue
        compound_id = raw.ids[i] or derive_compound_id(key)
        if compound_id.strip().upper() == CONTROL_COMPOUND_ID.upper():
            errors.append((raw.line_numbers[i], raw.smiles[i],
                           f"compound id {compound_id!r} is reserved for the negative control wells"))
            continue
        if compound_id.strip() in MISSING_VALUE_TEXT:
            errors.append((raw.line_numbers[i], raw.smiles[i],
                           f"compound id {compound_id!r} reads as a missing value in table readers (pandas, R): "
                           "its wells would read back as empty; give it another id"))
            continue
        owner = id_owner.get(compound_id)
        if owner is not None:
            errors.append((raw.line_numbers[i], raw.smiles[i],
                           f"compound id {compound_id!r} already used for a different structure ({owner})"))
            continue
        seen_keys.add(key)
        id_owner[compound_id] = key
        keep_rows.append((compound_id, raw.names[i] or compound_id, smi, key))
        kept.append(i)
    errors.sort(key=lambda e: e[0])
    table = pd.DataFrame(keep_rows, columns=list(LIBRARY_COLUMNS))
    if errors:
        log.info("%s: %d invalid rows skipped", path, len(errors))
    return LibraryReadResult(table=table, errors=errors, n_duplicates=n_duplicates,
                             fingerprints=None if packed is None else packed[np.asarray(kept, dtype=int)])
