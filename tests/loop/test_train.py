"""Pure parts of `loop train`: which features and cells the feature assay trains on."""

import numpy as np
import pandas as pd

from loop.train import MAX_MISSING_FRACTION, training_features


def _cells(n_plates=4, wells=3, per_well=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = [dict(Metadata_Plate=f"P{p}", Metadata_Well=f"A{w:02d}") for p in range(n_plates) for w in range(wells)
            for _ in range(per_well)]
    cells = pd.DataFrame(rows)
    for name in ("Cells_a", "Cells_b", "Nuclei_c", "Cytoplasm_d"):
        cells[name] = rng.normal(size=len(cells))
    return cells


def test_scattered_missing_values_drop_cells_not_features():
    cells = _cells()
    cells.loc[[3, 100], "Cells_a"] = np.nan
    features, kept = training_features(cells)
    assert features == ["Cells_a", "Cells_b", "Nuclei_c", "Cytoplasm_d"] and len(kept) == len(cells) - 2


def test_a_feature_one_plate_does_not_measure_is_left_out_not_the_plate():
    cells = _cells(n_plates=25)  # that plate holds 4 % of the cells: under the 5 % overall
    cells.loc[cells["Metadata_Plate"] == "P0", "Nuclei_c"] = np.nan
    assert cells["Nuclei_c"].isna().mean() < MAX_MISSING_FRACTION
    features, kept = training_features(cells)
    assert "Nuclei_c" not in features and len(kept) == len(cells)
    assert (kept["Metadata_Plate"] == "P0").sum() == 90


def test_a_feature_one_well_lacks_stays_and_that_wells_cells_go():
    """A feature NaN in every cell of one well (a toxic well's few cells) costs that well's cells,
    not the feature for the whole campaign; only a plate lacking it in most cells costs the feature."""
    cells = _cells(n_plates=30)
    well = (cells["Metadata_Plate"] == "P3") & (cells["Metadata_Well"] == "A01")
    cells.loc[well, "Cytoplasm_d"] = np.inf
    features, kept = training_features(cells)
    assert "Cytoplasm_d" in features and len(kept) == len(cells) - int(well.sum())
    plate = cells["Metadata_Plate"] == "P7"
    cells.loc[plate & (cells["Metadata_Well"] != "A02"), "Cells_b"] = np.nan  # 2 of P7's 3 wells
    features, kept = training_features(cells)
    assert "Cells_b" not in features and (kept["Metadata_Plate"] == "P7").sum() == 90
