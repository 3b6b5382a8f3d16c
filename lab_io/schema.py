"""Names shared by everything that reads or writes lab files.

One place for plate geometry, well naming, well roles and the column names of
profile tables (pycytominer conventions: ``Metadata_*`` columns, features
prefixed by compartment, e.g. ``Nuclei_AreaShape_Area``).

Results folder layout (what a lab returns, what ``loop ingest`` reads)::

    RESULTS_DIR/
      <barcode>/
        Images/r{RR}c{CC}f{FF}p{PP}-ch{N}sk1fk1fl1.tiff     Phenix/Opera names
        analysis/<barcode>-<well>-<site>/Image.csv         one row per field
        analysis/<barcode>-<well>-<site>/Nuclei.csv        one row per object
        analysis/<barcode>-<well>-<site>/Cells.csv
        analysis/<barcode>-<well>-<site>/Cytoplasm.csv

This is the layout CellProfiler writes with ``ExportToSpreadsheet`` per site,
as in the Cell Painting Gallery and pycytominer's test data.
"""

from __future__ import annotations

import re
from enum import Enum

N_ROWS = 16
N_COLS = 24
N_WELLS = N_ROWS * N_COLS
ROW_LETTERS = "ABCDEFGHIJKLMNOP"

CONTROL_COMPOUND_ID = "DMSO"
SOLVENT = "DMSO"
DMSO_SMILES = "CS(C)=O"
DMSO_INCHIKEY = "IAZDPXIOMUYVGZ-UHFFFAOYSA-N"
#: Text that pandas (``read_csv``'s default ``na_values``) and most table readers take for a missing
#: value: an id spelled so would read back as an empty well.
MISSING_VALUE_TEXT = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                                "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})

COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
CHANNELS = ("DNA", "Tubulin", "Actin")  # synthetic lab channel order: ch1, ch2, ch3

# Metadata columns of single-cell and per-well profile tables.
META_PLATE = "Metadata_Plate"
META_WELL = "Metadata_Well"
META_SITE = "Metadata_Site"
META_COMPOUND = "Metadata_compound"
META_SMILES = "Metadata_smiles"
META_DOSE = "Metadata_dose_um"
META_ROLE = "Metadata_role"
META_MOA = "Metadata_moa"


class WellRole(str, Enum):
    """What a well is for on a plate map."""

    treatment = "treatment"
    negative_control = "negative_control"
    positive_control = "positive_control"
    empty = "empty"


_WELL_RE = re.compile(r"^([A-Pa-p])0*([1-9][0-9]?)$")


def well_name(row: int, col: int) -> str:
    """Zero-based (row, col) -> zero-padded well id ``A01`` .. ``P24``."""
    if not (0 <= row < N_ROWS and 0 <= col < N_COLS):
        raise ValueError(f"well ({row}, {col}) is outside a {N_ROWS}x{N_COLS} plate")
    return f"{ROW_LETTERS[row]}{col + 1:02d}"


def parse_well(well: str) -> tuple[int, int]:
    """``A01``/``A1``/``a1`` -> zero-based (row, col); ValueError naming the well if invalid."""
    m = _WELL_RE.match(str(well).strip())
    if not m:
        raise ValueError(f"invalid well id {well!r}: expected a letter A-P and a column 1-24")
    row = ROW_LETTERS.index(m.group(1).upper())
    col = int(m.group(2)) - 1
    if col >= N_COLS:
        raise ValueError(f"invalid well id {well!r}: column {col + 1} > {N_COLS}")
    return row, col


def normalize_well(well: str) -> str:
    """Any accepted spelling -> canonical ``A01``."""
    return well_name(*parse_well(well))


def echo_well(well: str) -> str:
    """``A01`` -> ``A1`` (Echo picklists use unpadded column numbers)."""
    row, col = parse_well(well)
    return f"{ROW_LETTERS[row]}{col + 1}"


def is_feature_column(name: str) -> bool:
    """Compartment-prefixed numeric feature column (pycytominer convention)."""
    return name.split("_", 1)[0] in COMPARTMENTS and "_" in name


def feature_columns(columns) -> list[str]:
    return [c for c in columns if is_feature_column(c)]
