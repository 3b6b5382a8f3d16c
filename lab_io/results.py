"""Read a lab's results folder into single-cell tables (one :class:`PlateResult` per plate).

Layout (see :mod:`lab_io.schema`)::

    RESULTS_DIR/<barcode>/Images/r..c..f..p..-chN....tiff
    RESULTS_DIR/<barcode>/analysis/<barcode>-<well>-<site>/{Image,Nuclei,Cells,Cytoplasm}.csv

``RESULTS_DIR`` may also be a single plate folder. Plate folders with ``analysis/`` are read from
the CellProfiler tables (real CellProfiler output with ~1,900 columns per compartment works too);
plate folders with only ``Images/`` are measured here with :mod:`lab_io.morphology`
(images-only ingest; Phenix files grouped by well and field, channels in ``chN`` order).
Every image is brought to the 16-bit scale as it is read (:func:`to_16bit_scale`: 8-bit times
257, floating point 0..1 times 65535), so plates imaged at different bit depths measure and crop
alike, as CellProfiler's 0..1 scaling makes them.

Single-cell rows: compartments are merged per object within a field, as pycytominer does:
``Cells.Parent_Nuclei -> Nuclei.ObjectNumber`` and ``Cytoplasm.Parent_Cells -> Cells.ObjectNumber``
(inner joins), every other compartment column prefixed (``Nuclei_AreaShape_Area``,
``Cells_Intensity_MeanIntensity_Actin``, ...), and ``Metadata_Plate``, ``Metadata_Well``
(canonical ``A01``), ``Metadata_Site``, ``Metadata_ObjectNumber`` (the cell) in front.

Validation is strict; every problem raises :class:`ResultsError` naming the file, plate and
well: empty files, a final line without newline (a file cut mid-write), ragged rows, duplicate
or missing required columns, non-numeric values in numeric columns, ``Metadata_Plate`` not equal
to the plate folder's barcode, unparseable wells, object counts that disagree with Image.csv's
``Count_*`` (a file cut at a row boundary), missing object tables, repeated or empty object keys,
unreadable TIFFs, missing channels, several images of one field and channel (focal planes or
time points). Plates and wells are read as text (a barcode ``000123`` stays ``000123``).

With ``crop_px``, single-cell crops are cut from the plate's ``Images/`` at each cell's nucleus
centre (:class:`PlateResult` ``crops``), the input ``loop ingest --crops-px`` stores for the image
assay.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import re
import warnings
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lab_io.crops import CropSet, channel_display_name, channel_key, cut_crops
from lab_io.schema import COMPARTMENTS, META_PLATE, META_SITE, META_WELL, normalize_well

logger = logging.getLogger(__name__)

META_OBJECT = "Metadata_ObjectNumber"
# nucleus centre (y, x) columns crops are cut at: this package's measurements, then CellProfiler's
CENTRE_COLUMNS = (("Nuclei_AreaShape_Center_Y", "Nuclei_AreaShape_Center_X"),
                  ("Nuclei_Location_Center_Y", "Nuclei_Location_Center_X"))
_LINK_COLUMNS = ("ImageNumber", "ObjectNumber", "Parent_Nuclei", "Parent_Cells")
_MERGED_META = (META_PLATE, META_WELL, META_SITE, META_OBJECT)  # the metadata columns merge_compartments writes
# columns that identify one row of each table (a repeated key would merge the wrong objects)
_UNIQUE_KEYS = {"Image": ("ImageNumber",), "Nuclei": ("ImageNumber", "ObjectNumber"),
                "Cells": ("ImageNumber", "ObjectNumber"), "Cytoplasm": ("ImageNumber", "Parent_Cells")}
# columns of the image table that ExportToSpreadsheet may repeat in object tables: not measurements
_IMAGE_COLUMN_PREFIXES = ("Metadata_", "FileName_", "PathName_", "URL_")
_REQUIRED = {
    "Image": ("ImageNumber", META_PLATE, META_WELL),
    "Nuclei": ("ImageNumber", "ObjectNumber"),
    "Cells": ("ImageNumber", "ObjectNumber", "Parent_Nuclei"),
    "Cytoplasm": ("ImageNumber", "ObjectNumber", "Parent_Cells"),
}


class ResultsError(ValueError):
    """A results folder is malformed; the message names the file, plate and well."""


@dataclass(frozen=True)
class PlateResult:
    """One plate's measurements.

    cells: single-cell rows (``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``,
    ``Metadata_ObjectNumber``, then ``Nuclei_*``, ``Cells_*``, ``Cytoplasm_*`` features).
    image_count: number of fields measured (site folders read, or Phenix fields). sources: files
    read, relative to the plate folder. skipped_sites: site folders with only Image.csv, skipped
    because ``allow_missing_objects`` was set.
    fingerprint: sha256 over the relative paths and bytes of those files (idempotent re-import).
    from_images: True when measured here from images (no analysis/ folder).
    """

    barcode: str
    cells: pd.DataFrame
    image_count: int
    sources: tuple[str, ...]
    fingerprint: str
    from_images: bool = False
    skipped_sites: tuple[str, ...] = ()
    crops: CropSet | None = None  # single-cell crops when read with crop_px (plate, well, site, object_number)
    # wells with at least one field read (an Image.csv row with object tables, or a Phenix field),
    # cells or not; None where unknown. A mapped well missing here was not delivered, which is not
    # the same as a well the lab imaged and found no cell in.
    imaged_wells: tuple[str, ...] | None = None
    # every (well, site) the lab delivered: an Image.csv row (object tables or not) or a Phenix field;
    # None where unknown. A well lacking a site its neighbours have may be a copy still in progress.
    imaged_sites: tuple[tuple[str, object], ...] | None = None
    folder: Path | None = None  # the plate folder read (its name may carry Harmony's measurement suffix)


# ----------------------------------------------------------------------------------------------
# merge (shared with the synthetic lab's in-memory path)
# ----------------------------------------------------------------------------------------------

def _keys(image_number: pd.Series, object_number: pd.Series) -> pd.Index:
    return pd.Index(image_number.to_numpy(np.int64) * (1 << 32) + object_number.to_numpy(np.int64))


# Single-cell features are held and stored as float32: CellProfiler's values to 7 significant digits
# (pixel positions to 1/4000 px), in half the memory of float64 (a real 384-well plate's ~500,000
# cells x ~5,700 features: 11 GB instead of 22 GB).
FEATURE_DTYPE = np.float32


def stack_sites(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The sites' single-cell rows (:func:`merge_compartments` frames: the same columns, in any
    order) as one frame, columns in the first frame's order, features ``FEATURE_DTYPE``. Unlike
    ``pd.concat`` it copies the features once into one preallocated block and empties ``frames``
    as it goes, so a plate's cells are held once (plus one site), not twice."""
    columns = list(frames[0].columns)
    meta_cols = [c for c in columns if c in _MERGED_META]
    feature_cols = [c for c in columns if c not in _MERGED_META]
    features = np.empty((sum(len(f) for f in frames), len(feature_cols)), dtype=FEATURE_DTYPE)
    metas, start = [], 0
    for i, frame in enumerate(frames):
        frames[i] = None  # this site's own copy goes once it is in the block
        features[start:start + len(frame)] = frame[feature_cols].to_numpy(dtype=FEATURE_DTYPE)
        metas.append(frame[meta_cols])
        start += len(frame)
    # plate and well as text whatever the sites held (a site without cells has empty object columns)
    meta = pd.concat(metas, ignore_index=True).astype({META_PLATE: str, META_WELL: str})
    return pd.concat([meta, pd.DataFrame(features, columns=feature_cols, copy=False)], axis=1)


def merge_compartments(image: pd.DataFrame, nuclei: pd.DataFrame, cells: pd.DataFrame,
                       cytoplasm: pd.DataFrame) -> pd.DataFrame:
    """Per-compartment CellProfiler tables of one site folder -> single-cell rows (see module doc).

    Inner joins: a cell is kept when its parent nucleus, its cytoplasm and its image row exist.
    Compartment columns must be numeric (``read_results`` checks that before merging).
    """
    cell_keys = _keys(cells["ImageNumber"], cells["ObjectNumber"])
    nuc_pos = _keys(nuclei["ImageNumber"], nuclei["ObjectNumber"]).get_indexer(
        _keys(cells["ImageNumber"], cells["Parent_Nuclei"]))
    cyto_pos = pd.Index(_keys(cytoplasm["ImageNumber"], cytoplasm["Parent_Cells"])).get_indexer(cell_keys)
    img_pos = pd.Index(image["ImageNumber"].to_numpy(np.int64)).get_indexer(cells["ImageNumber"].to_numpy(np.int64))
    keep = (nuc_pos >= 0) & (cyto_pos >= 0) & (img_pos >= 0)
    rows = {"Cells": np.flatnonzero(keep), "Nuclei": nuc_pos[keep], "Cytoplasm": cyto_pos[keep]}
    blocks, names = [], []
    for comp, table in (("Nuclei", nuclei), ("Cells", cells), ("Cytoplasm", cytoplasm)):
        cols = [c for c in table.columns if c not in _LINK_COLUMNS]
        blocks.append(table[cols].to_numpy(dtype=FEATURE_DTYPE)[rows[comp]])
        names.extend(f"{comp}_{c}" for c in cols)
    features = pd.DataFrame(np.hstack(blocks) if blocks else None, columns=names, copy=False)
    img_rows = img_pos[keep]
    meta = pd.DataFrame({
        META_PLATE: image[META_PLATE].to_numpy()[img_rows],
        META_WELL: image[META_WELL].to_numpy()[img_rows],
        META_SITE: (image[META_SITE].to_numpy()[img_rows] if META_SITE in image.columns
                    else np.ones(int(keep.sum()), dtype=np.int64)),
        META_OBJECT: cells["ObjectNumber"].to_numpy(np.int64)[keep],
    })
    return pd.concat([meta, features], axis=1)


# ----------------------------------------------------------------------------------------------
# strict CSV reading
# ----------------------------------------------------------------------------------------------

def _where(path: Path, barcode: str, well: str | None) -> str:
    return f"{path} (plate {barcode}, well {well or 'unknown'})"


def _read_csv_strict(path: Path, raw: bytes, barcode: str, well: str | None, kind: str) -> pd.DataFrame:
    where = _where(path, barcode, well)
    if not raw.strip():
        raise ResultsError(f"{where}: empty file")
    if not raw.endswith(b"\n"):
        raise ResultsError(f"{where}: truncated (the last line has no newline; file cut mid-row?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ResultsError(f"{where}: not UTF-8 text ({err})") from None
    reader = csv.reader(io.StringIO(text))
    line_no = 1
    try:
        header = next(reader)
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise ResultsError(f"{where}: duplicate columns {dup[:5]}")
        for line_no, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ResultsError(f"{where}: line {line_no} has {len(row)} fields, the header has {len(header)}")
    except csv.Error as err:  # e.g. an unbalanced quote swallowing the rest of the file into one field
        raise ResultsError(f"{where}: cannot parse near line {line_no + 1} ({err}; an unbalanced quote?)") from None
    try:  # plate and well are text: a barcode 000123 stays 000123
        table = pd.read_csv(io.StringIO(text), on_bad_lines="error", low_memory=False,
                            dtype={META_PLATE: str, META_WELL: str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ResultsError(f"{where}: cannot parse ({err})") from None
    return _checked_table(table, where, kind)


def _checked_table(table: pd.DataFrame, where: str, kind: str, file_of_row: np.ndarray | None = None) -> pd.DataFrame:
    """A parsed table checked and made numeric (see the module doc); ResultsError naming ``where``
    and the line. ``file_of_row``: each row's file where the table holds several files' rows (the
    batched reading), whose keys need only be unique within their own file."""
    missing = [c for c in _REQUIRED[kind] if c not in table.columns]
    if missing:
        raise ResultsError(f"{where}: missing required columns {missing}")
    if kind != "Image":  # ExportToSpreadsheet can copy image metadata and file names into object tables
        copied = [c for c in table.columns if str(c).startswith(_IMAGE_COLUMN_PREFIXES)]
        if copied:
            table = table.drop(columns=copied)
    numeric = set(table.columns) if kind != "Image" else {
        c for c in table.columns if c in ("ImageNumber", META_SITE) or c.startswith("Count_")}
    text_columns = [c for c, dtype in table.dtypes.items() if c in numeric and not pd.api.types.is_numeric_dtype(dtype)]
    for col in text_columns:
        values = pd.to_numeric(table[col], errors="coerce")
        bad = values.isna() & table[col].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ResultsError(f"{where}: column {col!r} line {i + 2}: non-numeric value {table[col].iloc[i]!r}")
        table[col] = values
    if kind == "Image" and table.empty:
        raise ResultsError(f"{where}: no image rows")
    for col in (c for c in _LINK_COLUMNS if c in table.columns):  # object links must be whole numbers
        values = table[col].to_numpy(np.float64)
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ResultsError(f"{where}: column {col!r} line {i + 2}: {table[col].iloc[i]!r} is not an object number")
    key = _UNIQUE_KEYS.get(kind)
    if key and all(c in table.columns for c in key):
        keys = table[list(key)] if file_of_row is None else table[list(key)].assign(_file=file_of_row)
        dup = keys.duplicated()
        if dup.any():
            i = int(np.flatnonzero(dup.to_numpy())[0])
            raise ResultsError(f"{where}: line {i + 2} repeats {dict(zip(key, table.loc[dup, list(key)].iloc[0]))} "
                               f"({', '.join(key)} must identify one row)")
    return table


# ----------------------------------------------------------------------------------------------
# plate folders
# ----------------------------------------------------------------------------------------------

# Harmony (Phenix / Opera) names the folder a measurement is exported to
# ``<barcode>__<yyyy-mm-ddThh_mm_ss>-Measurement <n>``: the barcode is the part before ``__``.
_HARMONY_FOLDER_RE = re.compile(r"^(?P<barcode>.+?)__\d{4}-\d{2}-\d{2}T\d{2}[_:.]\d{2}[_:.]\d{2}\S*-Measurement ?\d+$")
# Harmony's index of an export's images (ChannelID -> ChannelName), in ``Images/``
HARMONY_INDEX_FILES = ("Index.idx.xml", "Index.xml", "Index.ref.xml")


def plate_barcode(folder_name: str) -> str:
    """The plate barcode a results folder is named for: the folder name, or its part before ``__``
    when Harmony named it (``BR00121431__2021-04-07T17_28_38-Measurement 1`` -> ``BR00121431``)."""
    match = _HARMONY_FOLDER_RE.match(folder_name)
    return match["barcode"] if match else folder_name


def harmony_index_file(images_dir: Path) -> Path | None:
    """The Harmony index beside the images (``Index.idx.xml``, ``Index.xml`` or ``Index.ref.xml``), if any."""
    return next((images_dir / name for name in HARMONY_INDEX_FILES if (images_dir / name).is_file()), None)


def harmony_channel_names(images_dir: Path) -> dict[int, str] | None:
    """``{channel number: name}`` from the Harmony index beside the images (:func:`harmony_index_file`:
    ``Image`` entries, or ``Map`` ``Entry`` elements, with a ``ChannelID`` and a ``ChannelName``),
    names stored as :func:`lab_io.crops.channel_display_name` gives them (``HOECHST 33342`` ->
    ``HOECHST33342``, a feature-name part); None without a readable index naming channels.
    ResultsError, naming the index and ``--channels``, when it gives one channel two names or two
    channels one name (compared by :func:`lab_io.crops.channel_key`: case ignored too)."""
    import xml.etree.ElementTree as ElementTree

    path = harmony_index_file(images_dir)
    if path is None:
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as err:
        logger.warning("%s: unreadable Harmony index (%s); channel names not taken from it", path, err)
        return None
    local = lambda element: element.tag.rsplit("}", 1)[-1]  # noqa: E731 (namespaces differ by Harmony version)
    named: dict[int, str] = {}
    for element in root.iter():
        children = {local(child): (child.text or "").strip() for child in element}
        channel = element.get("ChannelID") or children.get("ChannelID")
        name = channel_display_name(children.get("ChannelName", ""))
        if not channel or not name or not channel.strip().isdigit():
            continue
        if named.setdefault(int(channel), name) != name:
            raise ResultsError(f"{path}: channel {channel} is named both {named[int(channel)]!r} and {name!r}; "
                               "name the channels with loop ingest --channels")
    if len({channel_key(n) for n in named.values()}) != len(named):
        raise ResultsError(f"{path}: channels {named} do not have distinct names (letters and digits, ignoring "
                           "case); name them with loop ingest --channels")
    return named or None


def _is_plate_dir(path: Path) -> bool:
    return (path / "analysis").is_dir() or (path / "Images").is_dir()


def plate_dirs(results_dir: str | Path) -> list[Path]:
    """Plate folders of a results folder (or the folder itself if it is one); hidden ones skipped."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ResultsError(f"{results_dir}: results folder does not exist")
    if _is_plate_dir(results_dir):
        return [results_dir]
    plates = sorted(p for p in results_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_plate_dir(p))
    if not plates:
        raise ResultsError(f"{results_dir}: no plate folders (expected <barcode>/analysis or <barcode>/Images)")
    return plates


def _site_well_hint(site_dir: Path, barcode: str) -> str | None:
    rest = site_dir.name[len(barcode) + 1:] if site_dir.name.startswith(barcode + "-") else site_dir.name
    try:
        return normalize_well(rest.rsplit("-", 1)[0])
    except ValueError:
        return None


def _read_file(path: Path, plate_dir: Path, hasher, sources: list[str], raw: bytes | None = None) -> bytes:
    """The file's bytes (``raw`` when already read), hashed into ``hasher`` with its path."""
    raw = path.read_bytes() if raw is None else raw
    rel = path.relative_to(plate_dir).as_posix()
    hasher.update(rel.encode() + b"\0" + raw + b"\0")
    sources.append(rel)
    return raw


def _check_image(image: pd.DataFrame, image_path: Path, barcode: str, hint: str | None) -> pd.DataFrame:
    plates = set(image[META_PLATE].astype(str).str.strip())
    if plates != {barcode}:
        raise ResultsError(f"{_where(image_path, barcode, hint)}: Metadata_Plate {sorted(plates)} does not match "
                           f"the plate folder barcode {barcode!r}")
    wells = []
    for w in image[META_WELL].astype(str):
        try:
            wells.append(normalize_well(w))
        except ValueError as err:
            raise ResultsError(f"{_where(image_path, barcode, w)}: unparseable Metadata_Well ({err})") from None
    return image.assign(**{META_WELL: wells, META_PLATE: barcode})


def _check_counts(image: pd.DataFrame, tables: dict[str, pd.DataFrame], site_dir: Path, barcode: str) -> None:
    """Count_<compartment> in Image.csv must equal the object rows (catches files cut at a row end)."""
    for comp in COMPARTMENTS:
        col = f"Count_{comp}"
        if col not in image.columns:
            continue
        found = tables[comp].groupby("ImageNumber").size()
        for number, expected, well in zip(image["ImageNumber"], image[col], image[META_WELL]):
            got = int(found.get(number, 0))
            if np.isfinite(expected) and got != int(expected):
                raise ResultsError(f"{_where(site_dir / f'{comp}.csv', barcode, well)}: {got} objects for image "
                                   f"{number} but Image.csv {col} = {int(expected)} (truncated file?)")


def _read_site(site_dir: Path, barcode: str, hasher, sources: list[str], plate_dir: Path,
               allow_missing_objects: bool, imaged: set[str], sites: set[tuple[str, int]],
               raws: dict[str, object] | None = None) -> pd.DataFrame | None:
    """One site folder -> single-cell rows, or None when it has only Image.csv and that is allowed;
    its (well, site) pairs join ``sites`` once Image.csv is read, its wells ``imaged`` once its object
    tables are. ``raws``: the tables as :func:`_site_raws` read them (bytes are used, the rest read here)."""
    raws = {kind: raw for kind, raw in (raws or {}).items() if isinstance(raw, bytes)}  # others read again here
    hint = _site_well_hint(site_dir, barcode)
    image_path = site_dir / "Image.csv"
    if not image_path.exists():
        raise ResultsError(f"{_where(image_path, barcode, hint)}: missing")
    image = _read_csv_strict(image_path, _read_file(image_path, plate_dir, hasher, sources, raws.get("Image")),
                             barcode, hint, "Image")
    image = _check_image(image, image_path, barcode, hint)
    if META_SITE not in image.columns:
        image = image.assign(**{META_SITE: _sites_without_column(image, site_dir)})
    elif image[META_SITE].isna().any():  # an export that left Metadata_Site empty: as if it had none
        image = image.assign(**{META_SITE: image[META_SITE].fillna(
            pd.Series(_sites_without_column(image, site_dir), index=image.index))})
    well = image[META_WELL].iloc[0]
    sites.update(zip(image[META_WELL].astype(str), image[META_SITE]))
    missing = [c for c in COMPARTMENTS if not (site_dir / f"{c}.csv").exists()]
    if missing:
        if allow_missing_objects and len(missing) == len(COMPARTMENTS):
            logger.warning("%s: no object tables (only Image.csv); site skipped", _where(site_dir, barcode, well))
            return None
        raise ResultsError(f"{_where(site_dir / (missing[0] + '.csv'), barcode, well)}: missing "
                           f"(Image.csv is there; object tables {missing} are not)")
    tables = {}
    for comp in COMPARTMENTS:
        path = site_dir / f"{comp}.csv"
        tables[comp] = _read_csv_strict(path, _read_file(path, plate_dir, hasher, sources, raws.get(comp)),
                                        barcode, well, comp)
    _check_counts(image, tables, site_dir, barcode)
    imaged.update(image[META_WELL].astype(str))
    return merge_compartments(image, tables["Nuclei"], tables["Cells"], tables["Cytoplasm"])


def _sites_without_column(image: pd.DataFrame, site_dir: Path) -> np.ndarray:
    """Sites of an Image.csv without ``Metadata_Site``: the folder's ``<barcode>-<well>-<site>`` number
    when the table holds one image per well, else each image's ``ImageNumber`` (distinct within it)."""
    _, _, suffix = site_dir.name.rpartition("-")
    if suffix.isdigit() and not image[META_WELL].duplicated().any():
        return np.full(len(image), int(suffix), dtype=np.int64)
    return image["ImageNumber"].to_numpy(np.int64)


def _site_sort_key(site_dir: Path) -> tuple:
    """``<barcode>-<well>-<site>`` sorts by name with a numeric site (``-2`` before ``-10``)."""
    head, _, site = site_dir.name.rpartition("-")
    return (head, int(site)) if site.isdigit() else (site_dir.name, 0)


def _site_dirs(plate_dir: Path) -> list[Path]:
    """The plate's ``analysis/`` site folders in reading order (hidden ones, e.g. .ipynb_checkpoints, are not sites)."""
    return sorted((p for p in (plate_dir / "analysis").iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=_site_sort_key)


def _read_analysis(plate_dir: Path, barcode: str, allow_missing_objects: bool) -> PlateResult:
    hasher = hashlib.sha256()
    sources: list[str] = []
    frames, skipped, imaged, sites = [], [], set(), set()
    n_read = 0  # sites read with object tables
    site_dirs = _site_dirs(plate_dir)
    if not site_dirs:
        raise ResultsError(f"{plate_dir / 'analysis'} (plate {barcode}, well unknown): no site folders")
    first: tuple[Path, set] | None = None
    for batch, read in _batches_read(site_dirs, barcode, allow_missing_objects):
        if read is not None and first is not None and read.cells is not None and set(read.cells.columns) != first[1]:
            read = None  # the site-by-site reading names the site that differs
        if read is not None:
            for site_dir, raws in batch:  # the same files hashed in the same order as site by site
                for kind in ("Image", *COMPARTMENTS):
                    if raws[kind] is not None:
                        _read_file(site_dir / f"{kind}.csv", plate_dir, hasher, sources, raws[kind])
            for site_dir, well in read.skipped:
                logger.warning("%s: no object tables (only Image.csv); site skipped", _where(site_dir, barcode, well))
                skipped.append(site_dir.name)
            imaged |= read.imaged
            sites |= read.sites
            if read.cells is not None:
                first = first or (read.first_site, set(read.cells.columns))
                frames.append(read.cells)
                n_read += read.n_sites
            continue
        for site_dir, raws in batch:
            cells = _read_site(site_dir, barcode, hasher, sources, plate_dir, allow_missing_objects, imaged, sites,
                               raws)
            if cells is None:
                skipped.append(site_dir.name)
                continue
            if first is None:
                first = (site_dir, set(cells.columns))
            elif set(cells.columns) != first[1]:  # a concat would leave the difference missing for every other site
                lacks, extra = sorted(first[1] - set(cells.columns)), sorted(set(cells.columns) - first[1])
                raise ResultsError(f"{site_dir} (plate {barcode}): measured other columns than {first[0].name}: "
                                   f"lacks {len(lacks)} ({', '.join(lacks[:3])}), has {len(extra)} more "
                                   f"({', '.join(extra[:3])}); export every site with one CellProfiler pipeline")
            frames.append(cells)
            n_read += 1
    if not n_read:
        raise ResultsError(f"{plate_dir / 'analysis'} (plate {barcode}, well unknown): no site has object tables")
    cells = stack_sites(frames)
    _check_unique_sites(cells, plate_dir, barcode)
    return PlateResult(barcode, cells, n_read, tuple(sources), hasher.hexdigest(), from_images=False,
                       skipped_sites=tuple(skipped), imaged_wells=tuple(sorted(imaged)),
                       imaged_sites=tuple(sorted(sites, key=str)))


# ----------------------------------------------------------------------------------------------
# batched reading of plain site folders
# ----------------------------------------------------------------------------------------------
# pandas pays a fixed cost for every column it parses, about 0.08 s for a real CellProfiler
# table's ~1,900 columns whether the file holds one row or a hundred: read site by site, a real
# site of 89 cells took 0.6 s (a 384-well plate of 9 sites: about 35 minutes). Sites are therefore
# read in batches: each kind of table of up to SITE_BATCH_MAX sites (or about SITE_BATCH_BYTES of
# text) is parsed in one read_csv, checked and merged at once (0.1 s a site: that plate in 6
# minutes, pandas' parsing of its 33 GB of text being most of it). Only a batch whose files are all plain is
# read this way: every site with Image.csv and all or none of its object tables, the same column
# names in every table of a kind (quoted or not), every row with as many fields as the header,
# every table readable, and none of the problems the strict reading looks for. Any other batch is read site by site (:func:`_read_site`), which names
# the file, plate, well and line of the first problem. Both readings give the same rows.
# Two batches are read at once, on threads: pandas' parser lets go of the interpreter lock for much
# of its work, so two parses on 2 cores take about 0.7 of the time of one after the other.
SITE_BATCH_MAX = 256
SITE_BATCH_BYTES = 256 << 20
READ_THREADS = 2  # batches read at once (1: one after the other)
BATCHED_READING = True  # False reads every site on its own (the reference the tests compare with)
_MAX_IMAGE_KEY = 1 << 31  # merge_compartments keys objects by image * 2**32 + object number
_EXACT_INTEGERS = float(1 << 53)  # float64 holds every whole number below this exactly


@dataclass(frozen=True)
class _BatchRead:
    cells: pd.DataFrame | None  # merged single-cell rows of the sites with object tables (None: none has)
    n_sites: int  # sites with object tables
    first_site: Path | None
    skipped: list[tuple[Path, str]]  # (site folder, well) of sites with only Image.csv
    imaged: set[str]
    sites: set[tuple[str, object]]


def _batches_read(site_dirs: list[Path], barcode: str, allow_missing_objects: bool):
    """Yield ``(batch, read)`` in site order: each batch's ``(site_dir, raws)`` and its
    :func:`_read_batch` (None: not plain; with batched reading off, no raws and no read)."""
    if not BATCHED_READING:
        for site_dir in site_dirs:
            yield [(site_dir, None)], None
        return

    def read(group: list[Path]):
        batch = [(site_dir, _site_raws(site_dir)) for site_dir in group]
        return batch, _read_batch(batch, barcode, allow_missing_objects)

    # pandas enters warnings.catch_warnings() for every column it types, and before Python 3.14 that
    # swaps the process's one list of warning filters: two threads doing it at once can leave a
    # filter of pandas' behind, or drop one of the caller's. The caller's filters are therefore
    # saved here and put back once every reading thread has stopped.
    with warnings.catch_warnings():
        pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="read-sites")
        pending = deque()
        try:  # up to READ_THREADS batches in flight, handed on in site order
            for group in _site_groups(site_dirs):
                pending.append(pool.submit(read, group))
                if len(pending) >= READ_THREADS:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a site's error ends the reading (after the batch being parsed): batches not started are dropped
            pool.shutdown(wait=True, cancel_futures=True)


def _site_groups(site_dirs: list[Path]) -> list[list[Path]]:
    """The site folders in order, in groups of at most SITE_BATCH_MAX sites and about
    SITE_BATCH_BYTES of tables."""
    groups, group, size = [], [], 0
    for site_dir in site_dirs:
        group.append(site_dir)
        for kind in ("Image", *COMPARTMENTS):
            try:
                size += (site_dir / f"{kind}.csv").stat().st_size
            except OSError:  # absent (or unreadable: the site-by-site reading says so in its turn)
                pass
        if len(group) >= SITE_BATCH_MAX or size >= SITE_BATCH_BYTES:
            groups.append(group)
            group, size = [], 0
    return groups + [group] if group else groups


_UNREADABLE = object()  # a table that exists but could not be read (a folder, an I/O error)


def _site_raws(site_dir: Path) -> dict[str, object]:
    """A site folder's tables as bytes; None where a file is absent, ``_UNREADABLE`` where reading
    it failed (the batch is then read site by site, which raises in order of the sites)."""
    raws = {}
    for kind in ("Image", *COMPARTMENTS):
        path = site_dir / f"{kind}.csv"
        try:
            raws[kind] = path.read_bytes()
        except FileNotFoundError:
            raws[kind] = None
        except OSError:  # a folder, an I/O error
            raws[kind] = _UNREADABLE
    return raws


def _plain_rows(body: bytes, n_fields: int) -> int | None:
    """The number of rows of a table's body (the text after its header) when every row has
    ``n_fields`` fields, else None."""
    if b"\r" in body and body.count(b"\r") != body.count(b"\r\n"):  # `in`: one fast scan for most files
        return None  # a lone carriage return ends a row for csv and pandas
    if b'"' in body:  # quoted fields may hold commas and line ends: let csv split them
        try:
            rows = list(csv.reader(io.StringIO(body.decode("utf-8"))))
        except (csv.Error, UnicodeDecodeError):
            return None
        return len(rows) if all(len(row) == n_fields for row in rows) else None
    data = np.frombuffer(body, dtype=np.uint8)
    is_end, is_comma = data == ord("\n"), data == ord(",")
    ends = np.flatnonzero(is_end)
    if not np.all(np.diff(np.searchsorted(np.flatnonzero(is_comma), ends), prepend=0) == n_fields - 1):
        return None
    longest = np.diff(np.flatnonzero(is_comma | is_end), prepend=-1).max(initial=0) - 1
    return len(ends) if longest < csv.field_size_limit() else None  # csv refuses longer fields


def _header_names(line: bytes) -> list[str] | None:
    """A header line's column names (quoted or not); None where they repeat, a quoted name spans
    lines or the line is not UTF-8."""
    if line.startswith(b"\xef\xbb\xbf"):
        return None  # a byte order mark: the strict reading names the first column it hides
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if '"' not in text:
        names = text.rstrip("\r\n").split(",")
        if max(len(name) for name in names) > csv.field_size_limit():
            return None  # the strict reading's csv refuses a field this long
    elif text.count('"') % 2:
        return None
    else:
        try:
            names = next(csv.reader([text.rstrip("\r\n")]))
        except csv.Error:  # e.g. lone carriage returns, or a name over csv's field size limit
            return None
    return names if len(set(names)) == len(names) else None


def _parse_batch(raws: list[bytes], kind: str) -> tuple[pd.DataFrame, np.ndarray] | None:
    """Tables of one kind -> (one table of all their rows, each file's row count), or None unless
    every file is plain (the same column names, every row complete, no field over csv's size
    limit) and passes every check of :func:`_checked_table`."""
    header, names, bodies, counts = None, None, [], []
    for raw in raws:
        if not raw.strip() or not raw.endswith(b"\n"):
            return None
        end = raw.index(b"\n") + 1
        file_names = _header_names(raw[:end])
        if file_names is None or (names is not None and file_names != names):
            return None
        header, names = header or raw[:end], file_names
        rows = _plain_rows(raw[end:], len(names))
        if rows is None or (kind == "Image" and rows == 0):
            return None
        bodies.append(raw[end:])
        counts.append(rows)
    data = b"".join([header, *bodies])
    try:
        if not data.isascii():
            data.decode("utf-8")  # the strict reading refuses a file that is not UTF-8
        table = pd.read_csv(io.BytesIO(data), on_bad_lines="error", low_memory=False,  # bytes: twice as fast as text
                            dtype={META_PLATE: str, META_WELL: str})
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    counts = np.asarray(counts, dtype=np.int64)
    if len(table) != counts.sum():
        return None
    try:
        return _checked_table(table, "batch", kind, np.repeat(np.arange(len(counts)), counts)), counts
    except ResultsError:
        return None


def _read_batch(batch: list[tuple[Path, dict[str, object]]], barcode: str,
                allow_missing_objects: bool) -> _BatchRead | None:
    """Sites read at once (see above); None where the batch is not plain, to be read site by site."""
    with_objects = []
    for i, (_, raws) in enumerate(batch):
        if any(raw is _UNREADABLE for raw in raws.values()):
            return None
        present = [raws[c] is not None for c in COMPARTMENTS]
        if raws["Image"] is None or (not all(present) and (any(present) or not allow_missing_objects)):
            return None
        if all(present):
            with_objects.append(i)
    parsed = _parse_batch([raws["Image"] for _, raws in batch], "Image")
    if parsed is None:
        return None
    image, counts = parsed
    image = image[[c for c in image.columns if c in ("ImageNumber", META_PLATE, META_WELL, META_SITE)
                   or c.startswith("Count_")]]
    try:
        image = _check_image(image, Path("batch"), barcode, None)
    except ResultsError:
        return None
    site_of_image = np.repeat(np.arange(len(batch)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    if META_SITE not in image.columns:
        ids = image[[META_WELL, "ImageNumber"]]
        image[META_SITE] = np.concatenate([_sites_without_column(ids.iloc[starts[i]:starts[i + 1]], site_dir)
                                           for i, (site_dir, _) in enumerate(batch)])
    elif not pd.api.types.is_integer_dtype(image[META_SITE].dtype):
        return None  # empty or fractional sites: the site-by-site reading decides per file
    sites = set(zip(image[META_WELL].astype(str), image[META_SITE]))
    skipped = [(site_dir, image[META_WELL].iloc[starts[i]])
               for i, (site_dir, _) in enumerate(batch) if i not in set(with_objects)]
    if not with_objects:
        return _BatchRead(None, 0, None, skipped, set(), sites)
    tables = {}
    for comp in COMPARTMENTS:
        parsed = _parse_batch([batch[i][1][comp] for i in with_objects], comp)
        if parsed is None:
            return None
        tables[comp] = (parsed[0], np.repeat(with_objects, parsed[1]))
    image = image[np.isin(site_of_image, with_objects)].reset_index(drop=True)
    site_of_image = site_of_image[np.isin(site_of_image, with_objects)]
    if not _renumber_images(image, site_of_image, tables):
        return None
    try:  # on image numbers made unique per site
        _check_counts(image, {comp: table for comp, (table, _) in tables.items()}, Path("batch"), barcode)
    except ResultsError:
        return None
    cells = merge_compartments(image, *(tables[comp][0] for comp in ("Nuclei", "Cells", "Cytoplasm")))
    features = cells.iloc[:, len(_MERGED_META):].to_numpy()
    if np.any(features >= _EXACT_INTEGERS) or np.any(features <= -_EXACT_INTEGERS):
        return None  # a whole number column of one site read as float with another's would round twice
    return _BatchRead(cells, len(with_objects), batch[with_objects[0]][0], skipped,
                      set(image[META_WELL].astype(str)), sites)


def _renumber_images(image: pd.DataFrame, site_of_image: np.ndarray,
                     tables: dict[str, tuple[pd.DataFrame, np.ndarray]]) -> bool:
    """Make image numbers unique across the batch's sites (site * span + ImageNumber) in place, so
    one count check and one merge see each object with its own site's image; False where numbers
    are out of range."""
    numbers = [image["ImageNumber"].to_numpy(np.int64)] + [t["ImageNumber"].to_numpy(np.int64)
                                                            for t, _ in tables.values()]
    objects = [t[c].to_numpy(np.int64) for t, _ in tables.values() for c in _LINK_COLUMNS[1:] if c in t.columns]
    low = min(int(n.min()) for n in numbers + objects if len(n))
    span = max(int(n.max()) for n in numbers if len(n)) + 1
    top = max((int(o.max()) for o in objects if len(o)), default=0)
    if low < 0 or span * (int(site_of_image.max()) + 1) >= _MAX_IMAGE_KEY or top >= 1 << 32:
        return False
    image["ImageNumber"] = site_of_image * span + numbers[0]
    for (table, site_of_row), number in zip(tables.values(), numbers[1:]):
        table["ImageNumber"] = site_of_row * span + number
    return True


def _check_unique_sites(cells: pd.DataFrame, plate_dir: Path, barcode: str) -> None:
    dup = cells.duplicated([META_WELL, META_SITE, META_OBJECT])
    if dup.any():
        row = cells[dup].iloc[0]
        raise ResultsError(f"{plate_dir} (plate {barcode}, well {row[META_WELL]}): site {row[META_SITE]} "
                           f"appears in more than one analysis folder")


def guessed_channel_names(channels: Sequence[int]) -> list[str]:
    """Names for Phenix channels nobody named: ``DNA`` for ch1 (Cell Painting and most screens image
    the nuclear stain first), ``Ch<N>`` for channel N otherwise (``Ch4`` is ``ch4``'s images, whatever
    channels the plate lacks). Guesses: crops record them as not declared."""
    return ["DNA" if c == 1 else f"Ch{c}" for c in channels]


def _given_channel_names(names: Sequence[str], all_channels: list[int], where: str) -> list[str]:
    """Names given for the plate's channels (``loop ingest --channels``), stored as
    :func:`lab_io.crops.channel_display_name` gives them; ResultsError naming ``where`` when they
    are not one per channel or not distinct (:func:`lab_io.crops.channel_key`)."""
    stored = [channel_display_name(n) for n in names]
    if len(stored) != len(all_channels):
        raise ResultsError(f"{where}: {len(all_channels)} channels {all_channels} but {len(stored)} channel names "
                           f"{list(names)}")
    keys = [channel_key(n) for n in stored]
    if not all(keys) or len(set(keys)) != len(keys):
        raise ResultsError(f"{where}: channel names {list(names)} must be non-empty and distinct ignoring case, "
                           "spaces and punctuation (they name feature columns and crop channels)")
    if stored != [str(n) for n in names]:
        logger.info("%s: channel names %s stored as %s (letters and digits, as Harmony's are)", where, list(names),
                    stored)
    return stored


def _phenix_groups(plate_dir: Path, barcode: str) -> dict[tuple[str, int], dict[int, Path]]:
    """``Images/`` Phenix TIFFs grouped by (well, field) then channel; one image per field and channel."""
    from lab_io.phenix import parse_phenix_name

    images_dir = plate_dir / "Images"
    groups: dict[tuple[str, int], dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in (".tif", ".tiff"):
            continue
        try:
            key = parse_phenix_name(path.name)
        except ValueError as err:
            raise ResultsError(f"{_where(path, barcode, None)}: {err}") from None
        chans = groups.setdefault((key.well, key.field), {})
        if key.channel in chans:  # another focal plane or time point: one image per channel is measured
            raise ResultsError(f"{_where(path, barcode, key.well)}: field {key.field} channel {key.channel} has "
                               f"several images ({chans[key.channel].name} and {path.name}: focal planes or time "
                               "points); export one image per field and channel, e.g. a maximum projection")
        chans[key.channel] = path
    if not groups:
        raise ResultsError(f"{images_dir} (plate {barcode}, well unknown): no Phenix TIFF files")
    return groups


def _channel_layout(groups: dict[tuple[str, int], dict[int, Path]], channel_names: Sequence[str] | None,
                    plate_dir: Path, barcode: str) -> tuple[list[int], list[str], bool]:
    """The plate's Phenix channel numbers (sorted), their names and whether the names are declared:
    those given (one per channel), else the Harmony index's (:func:`harmony_channel_names`; an index
    that leaves some of the images' channels unnamed is an error), else guessed
    (:func:`guessed_channel_names`, not declared) with a warning: the stains cannot be told from the images."""
    all_channels = sorted({c for chans in groups.values() for c in chans})
    where = f"{plate_dir / 'Images'} (plate {barcode})"
    if channel_names is not None:
        return all_channels, _given_channel_names(channel_names, all_channels, where), True
    indexed = harmony_channel_names(plate_dir / "Images")
    if indexed is not None:
        unnamed = [c for c in all_channels if c not in indexed]
        if unnamed:
            raise ResultsError(f"{harmony_index_file(plate_dir / 'Images')} (plate {barcode}): the Harmony index "
                               f"names channels {indexed}, but the images hold channels {all_channels} ({unnamed} "
                               "unnamed); name every channel with loop ingest --channels (ch1,ch2,... in order of "
                               "the images' channels) or export the plate's complete index")
        names = [indexed[c] for c in all_channels]
        logger.info("plate %s: channels %s named by its Harmony index", barcode, dict(zip(all_channels, names)))
        return all_channels, names, True
    names = guessed_channel_names(all_channels)
    logger.warning("%s: no channel names given (loop ingest --channels) and no Harmony index (Images/%s) naming "
                   "them; guessed %s, recorded as guesses (not declared stains: an image assay takes these crops by "
                   "position, with a warning). Name the stains with loop ingest --channels NAME,NAME,... (one per "
                   "channel %s, in that order; with --replace once imported) or deliver the plate with its Harmony "
                   "index", where, HARMONY_INDEX_FILES[0], dict(zip(all_channels, names)),
                   ",".join(f"ch{c}" for c in all_channels))
    return all_channels, names, False


FLOAT_FRACTION_MAX = 2.0  # a floating-point image whose brightest pixel is at most this is a 0..1 fraction


def to_16bit_scale(plane: np.ndarray, where: str) -> np.ndarray:
    """One image plane -> uint16 on the 16-bit scale, whatever bit depth the microscope wrote.

    CellProfiler reads every image as a fraction of its type's full range, so an 8-bit and a
    16-bit image of the same cells measure alike; this does the same on the 16-bit scale that
    crops are stored in: uint16 as is, uint8 times 257 (255 -> 65535), other integer types as
    counts (they must lie in 0..65535), and floating point as CellProfiler's fraction 0..1 when its
    maximum is at most ``FLOAT_FRACTION_MAX`` (times 65535, an overshoot past 1 from illumination
    correction saturating at 65535), else as counts (0..65535, rounded). Anything else (NaN,
    negative values, counts above 65535) is refused, naming ``where``."""
    plane = np.asarray(plane)
    if plane.dtype == np.uint16:
        return plane
    if plane.dtype == np.uint8:
        return plane.astype(np.uint16) * np.uint16(257)
    if plane.dtype.kind not in "uif":
        raise ResultsError(f"{where}: image pixels are {plane.dtype}; expected integer or floating-point intensities")
    if plane.dtype.kind == "f" and not np.isfinite(plane).all():
        raise ResultsError(f"{where}: image holds NaN or infinite pixels")
    low, high = (float(plane.min()), float(plane.max())) if plane.size else (0.0, 0.0)
    if low < 0 or high > 65535:
        raise ResultsError(f"{where}: {plane.dtype} image pixels span {low:g}..{high:g}; expected intensities in "
                           "0..65535 (or 0..1 for floating point)")
    if plane.dtype.kind == "f":
        scaled = plane.astype(np.float64) * (65535.0 if high <= FLOAT_FRACTION_MAX else 1.0)
        return np.rint(np.minimum(scaled, 65535.0)).astype(np.uint16)
    return plane.astype(np.uint16)


def _read_field(plate_dir: Path, barcode: str, well: str, site: int, chans: dict[int, Path],
                all_channels: list[int], read_bytes) -> np.ndarray:
    """One field's channels -> ``C x H x W`` (``read_bytes(path)`` returns a file's bytes)."""
    import tifffile

    missing = [c for c in all_channels if c not in chans]
    if missing:
        raise ResultsError(f"{plate_dir / 'Images'} (plate {barcode}, well {well}): field {site} lacks channels "
                           f"{missing}")
    planes = []
    for c in all_channels:
        path = chans[c]
        try:
            plane = tifffile.imread(io.BytesIO(read_bytes(path)))
        except Exception as err:  # tifffile raises several types for corrupt files
            raise ResultsError(f"{_where(path, barcode, well)}: cannot read TIFF ({type(err).__name__}: {err})") from None
        if plane.ndim != 2:
            raise ResultsError(f"{_where(path, barcode, well)}: cannot read TIFF as a single-plane image "
                               f"(got shape {plane.shape})")
        planes.append(to_16bit_scale(plane, _where(path, barcode, well)))
    if len({p.shape for p in planes}) != 1:
        raise ResultsError(f"{plate_dir / 'Images'} (plate {barcode}, well {well}): field {site} channels differ "
                           "in size")
    return np.stack(planes)


def _read_images(plate_dir: Path, barcode: str, channel_names: Sequence[str] | None,
                 crops: "_CropCollector | None" = None) -> PlateResult:
    from lab_io.morphology import measure_field

    groups = _phenix_groups(plate_dir, barcode)
    all_channels, names, declared = _channel_layout(groups, channel_names, plate_dir, barcode)
    if crops is not None:
        crops.name_channels(names, declared)
    hasher = hashlib.sha256()
    sources: list[str] = []
    frames = []
    for (well, site), chans in sorted(groups.items()):
        field = _read_field(plate_dir, barcode, well, site, chans, all_channels,
                            lambda path: _read_file(path, plate_dir, hasher, sources))
        tables = measure_field(field, names)
        image = pd.DataFrame([{"ImageNumber": 1, META_PLATE: barcode, META_WELL: well, META_SITE: site}])
        frames.append(merge_compartments(image, tables["Nuclei"], tables["Cells"], tables["Cytoplasm"]))
        if crops is not None:
            crops.add(well, site, field, frames[-1])
    cells = stack_sites(frames)
    return PlateResult(barcode, cells, len(groups), tuple(sources), hasher.hexdigest(), from_images=True,
                       crops=None if crops is None else crops.result(),
                       imaged_wells=tuple(sorted({well for well, _ in groups})),
                       imaged_sites=tuple(sorted((well, int(site)) for well, site in groups)))


def _crops_from_images(plate_dir: Path, barcode: str, cells: pd.DataFrame, channel_names: Sequence[str] | None,
                       crops: "_CropCollector") -> CropSet | None:
    """Crops of a plate read from its CellProfiler tables, cut from its ``Images/`` at the tables'
    nucleus centres (site = Phenix field); None without an ``Images/`` folder."""
    if not (plate_dir / "Images").is_dir():
        return None
    groups = _phenix_groups(plate_dir, barcode)
    if channel_names is None:
        channel_names = _channel_names_from_tables(plate_dir, barcode, groups)
    all_channels, names, declared = _channel_layout(groups, channel_names, plate_dir, barcode)
    crops.name_channels(names, declared)
    for (well, site), field_cells in cells.groupby([META_WELL, META_SITE], sort=True):
        chans = groups.get((well, int(site)))
        if chans is None:
            raise ResultsError(f"{plate_dir / 'Images'} (plate {barcode}, well {well}): no images of field {site}, "
                               "whose cells the tables hold")
        field = _read_field(plate_dir, barcode, well, int(site), chans, all_channels, Path.read_bytes)
        crops.add(well, int(site), field, field_cells)
    return crops.result()


def _channel_names_from_tables(plate_dir: Path, barcode: str,
                               groups: dict[tuple[str, int], dict[int, Path]]) -> list[str] | None:
    """Names of the plate's Phenix channels as its CellProfiler tables give them: an ``Image.csv``
    column ``FileName_<name>`` (``Orig<name>`` preferred, ``Orig`` dropped) holding a Phenix image
    name maps channel N to ``<name>``; None (default names) unless every channel is named once."""
    from lab_io.phenix import parse_phenix_name

    image_csv = next(iter(sorted((plate_dir / "analysis").glob("*/Image.csv"))), None)
    if image_csv is None:
        return None
    header = pd.read_csv(image_csv, nrows=1)
    named: dict[int, str] = {}
    for col in (c for c in header.columns if str(c).startswith("FileName_")):
        try:
            channel = parse_phenix_name(str(header[col].iloc[0])).channel
        except (ValueError, IndexError):
            continue
        name = col[len("FileName_"):]
        if channel not in named or name.startswith("Orig"):
            named[channel] = name[len("Orig"):] if name.startswith("Orig") and len(name) > len("Orig") else name
    channels = sorted({c for chans in groups.values() for c in chans})
    names = [named.get(c) for c in channels]
    if None in names or len({channel_key(n) for n in names}) != len(names):
        logger.warning("%s (plate %s): its Image.csv names channels %s, not each of the images' channels %s "
                       "once; crops get default channel names", image_csv, barcode, named, channels)
        return None
    logger.info("plate %s: crop channels %s named from %s", barcode, dict(zip(channels, names)), image_csv.name)
    return names


class _CropCollector:
    """Single-cell crops of a plate, cut field by field and kept to ``per_well`` cells a well (a seeded
    draw per well, so a plate's crops fit in memory whatever its size)."""

    def __init__(self, barcode: str, size_px: int, per_well: int):
        if size_px < 8 or per_well < 1:
            raise ValueError(f"crop size must be >= 8 px and crops per well >= 1, got {size_px}, {per_well}")
        self.barcode, self.size_px, self.per_well = barcode, size_px, per_well
        self.images: list[np.ndarray] = []
        self.meta: list[pd.DataFrame] = []
        self.channel_names: tuple[str, ...] | None = None
        self.channels_named = True
        self._well: str | None = None
        self._buffer: list[tuple[np.ndarray, pd.DataFrame]] = []
        self.n_cells = self.n_at_border = 0  # cells seen, and those too close to a field's border to cut

    def name_channels(self, names: Sequence[str], declared: bool) -> None:
        """The crops' channel names, and whether they were declared (False: guesses)."""
        self.channel_names, self.channels_named = tuple(names), declared

    def add(self, well: str, site: int, field: np.ndarray, field_cells: pd.DataFrame) -> None:
        if well != self._well:
            self._flush()
            self._well = well
        centre = next((c for c in CENTRE_COLUMNS if all(k in field_cells.columns for k in c)), None)
        if centre is None:
            raise ResultsError(f"plate {self.barcode}, well {well}: no nucleus centre columns "
                               f"({' or '.join('/'.join(c) for c in CENTRE_COLUMNS)}) to cut crops at")
        cut, kept = cut_crops(field, field_cells[list(centre)].to_numpy(np.float64), self.size_px)
        self.n_cells += len(field_cells)
        self.n_at_border += len(field_cells) - len(cut)
        meta = pd.DataFrame({"plate": self.barcode, "well": well, "site": site,
                             "object_number": field_cells[META_OBJECT].to_numpy(np.int64)[kept]})
        self._buffer.append((cut, meta))

    def _flush(self) -> None:
        if not self._buffer:
            return
        images = np.concatenate([b[0] for b in self._buffer])
        meta = pd.concat([b[1] for b in self._buffer], ignore_index=True)
        self._buffer = []
        if len(images) > self.per_well:
            rng = np.random.default_rng([zlib.crc32(f"{self.barcode}/{self._well}".encode()), self.per_well])
            keep = np.sort(rng.choice(len(images), self.per_well, replace=False))
            images, meta = images[keep], meta.iloc[keep].reset_index(drop=True)
        self.images.append(images)
        self.meta.append(meta)

    def result(self) -> CropSet | None:
        self._flush()
        if not self.images or self.channel_names is None:
            return None
        n_crops = sum(len(i) for i in self.images)
        logger.info("plate %s: %d crops of %d px from %d cells (%d too close to a field's border to cut, the rest "
                    "drawn to at most %d a well)", self.barcode, n_crops, self.size_px, self.n_cells,
                    self.n_at_border, self.per_well)
        return CropSet(np.concatenate(self.images), pd.concat(self.meta, ignore_index=True), self.channel_names,
                       self.channels_named)


def plate_fingerprint(plate_dir: str | Path) -> str | None:
    """The ``fingerprint`` :func:`read_plate` gives a plate folder, from its files' bytes alone: no
    table is parsed and no image segmented, so a scheduled re-read of a drop folder finds a plate
    imported before (same fingerprint) without measuring it again. The same files are hashed in the
    same order as the read: the tables of ``analysis/`` when it is there, else the ``Images/``.
    None where the read would fail (a site without ``Image.csv``, some but not all object tables,
    a field lacking a channel, unreadable files): :func:`read_plate` then says why."""
    plate_dir = Path(plate_dir)
    hasher, sources = hashlib.sha256(), []
    try:
        if (plate_dir / "analysis").is_dir():
            for site_dir in _site_dirs(plate_dir):
                present = [site_dir / f"{c}.csv" for c in COMPARTMENTS if (site_dir / f"{c}.csv").exists()]
                if not (site_dir / "Image.csv").exists() or 0 < len(present) < len(COMPARTMENTS):
                    return None
                for path in [site_dir / "Image.csv", *present]:
                    _read_file(path, plate_dir, hasher, sources)
        elif (plate_dir / "Images").is_dir():
            groups = _phenix_groups(plate_dir, plate_barcode(plate_dir.name))
            all_channels = sorted({c for chans in groups.values() for c in chans})
            for _, chans in sorted(groups.items()):
                if any(c not in chans for c in all_channels):
                    return None
                for c in all_channels:
                    _read_file(chans[c], plate_dir, hasher, sources)
        else:
            return None
    except (OSError, ResultsError):
        return None
    return hasher.hexdigest()


def read_plate(plate_dir: str | Path, *, channel_names: Sequence[str] | None = None,
               allow_missing_objects: bool = False, crop_px: int | None = None,
               crops_per_well: int = 64) -> PlateResult:
    """One plate folder -> :class:`PlateResult` (barcode: :func:`plate_barcode` of the folder name);
    see :func:`read_results`."""
    plate_dir = Path(plate_dir)
    barcode = plate_barcode(plate_dir.name)
    crops = None if crop_px is None else _CropCollector(barcode, crop_px, crops_per_well)
    if (plate_dir / "analysis").is_dir():
        result = _read_analysis(plate_dir, barcode, allow_missing_objects)
        if crops is not None:
            result = dataclasses.replace(result, crops=_crops_from_images(plate_dir, barcode, result.cells,
                                                                          channel_names, crops))
    elif (plate_dir / "Images").is_dir():
        result = _read_images(plate_dir, barcode, channel_names, crops)
    else:
        raise ResultsError(f"{plate_dir} (plate {barcode}, well unknown): neither analysis/ nor Images/ present")
    logger.info("read plate %s: %d cells in %d fields", barcode, len(result.cells), result.image_count)
    return dataclasses.replace(result, folder=plate_dir)


def read_results(results_dir: str | Path, *, channel_names: Sequence[str] | None = None,
                 allow_missing_objects: bool = False, crop_px: int | None = None,
                 crops_per_well: int = 64) -> list[PlateResult]:
    """A results folder (folder of plate folders, or one plate folder) -> one PlateResult per plate.

    ``channel_names`` names the Phenix channels ``ch1..chN`` for images-only plates (default: the
    names in the plate's Harmony index, ``Images/Index.idx.xml``, else guessed with a warning:
    ``DNA`` for ch1, ``Ch<N>`` for chN, :func:`guessed_channel_names`, and the crops record them as
    not declared); names are stored as :func:`lab_io.crops.channel_display_name` gives them and must
    differ as :func:`lab_io.crops.channel_key` compares them. Nuclei are segmented on the channel
    named as a DNA stain (:func:`lab_io.morphology.dna_channel_index`).
    A plate folder Harmony named (``<barcode>__<timestamp>-Measurement 1``) is read as ``<barcode>``.
    ``allow_missing_objects``: a site folder with only ``Image.csv`` is skipped (logged, listed in
    ``skipped_sites``) instead of raising; a folder missing only some object tables always raises.
    ``crop_px``: also cut ``crop_px`` square single-cell crops from the plate's ``Images/`` at each
    cell's nucleus centre (at most ``crops_per_well`` a well, a seeded draw; cells whose crop would
    leave the field are not cut) into ``PlateResult.crops``; None when the plate has no images.
    """
    return [read_plate(p, channel_names=channel_names, allow_missing_objects=allow_missing_objects,
                       crop_px=crop_px, crops_per_well=crops_per_well)
            for p in plate_dirs(results_dir)]
