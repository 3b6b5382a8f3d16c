"""loop/objective.py: target profiles from profile tables, and the objective saved with the campaign."""

import numpy as np
import pandas as pd
import pytest

from acquisition.objectives import ObjectiveConfig
from loop.campaign import Campaign
from loop.objective import Target, campaign_objective, describe, set_objective, table_target
from loop.status import campaign_status


def _table(tmp_path, suffix=".csv"):
    frame = pd.DataFrame({
        "Metadata_Plate": ["P1"] * 4, "Metadata_Well": ["A01", "A02", "A03", "A04"],
        "Metadata_compound": ["taxol", "taxol", "taxol", "DMSO"],
        "Cells_AreaShape_Area": [1.0, 3.0, 5.0, 0.0], "Nuclei_Intensity_MeanIntensity_DNA": [2.0, np.nan, -4.0, 0.0],
        "Image_Count_Cells": [7.0, 8.0, 9.0, 10.0],  # not a compartment feature
    })
    path = tmp_path / f"profiles{suffix}"
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_target_is_the_median_row_of_the_chosen_compound(tmp_path, suffix):
    path = _table(tmp_path, suffix)
    target = table_target(path, "taxol")
    assert target.features == ("Cells_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA")
    assert target.values == pytest.approx((3.0, -1.0))  # medians; the missing value is skipped
    assert "taxol" in target.label and "3 row(s)" in target.label
    assert table_target(path).values == pytest.approx((3.0, -1.0))  # every row but the DMSO one


def test_table_target_refuses_a_control_like_profile_and_warns_on_pooling_and_raw_units(tmp_path, caplog):
    frame = pd.DataFrame({"Metadata_compound": ["DMSO", "DMSO", "a", "b"], "Cells_x": [1e-14, -1e-14, 5.0, 9.0],
                          "Cells_y": [0.0, 2e-14, -4.0, -2.0]})
    frame.to_csv(tmp_path / "plate.csv", index=False)
    with pytest.raises(ValueError, match="control-like"):
        table_target(tmp_path / "plate.csv", "DMSO")
    with caplog.at_level("WARNING"):
        target = table_target(tmp_path / "plate.csv")
    assert target.values == pytest.approx((7.0, -3.0)) and "pools 2 compounds" in caplog.text
    raw = pd.DataFrame({"Metadata_compound": ["x"], "Cells_AreaShape_Area": [850.0], "Cells_Intensity_Mean": [0.05],
                        "Nuclei_AreaShape_Area": [310.0]})
    raw.to_csv(tmp_path / "raw.csv", index=False)
    caplog.clear()
    with caplog.at_level("WARNING"):
        table_target(tmp_path / "raw.csv")
    assert "raw measurements" in caplog.text


def test_huge_weights_are_refused_when_set_and_a_unit_norm_target_is_accepted(tmp_path, caplog):
    campaign = Campaign.init(tmp_path / "c")
    target = Target(("Cells_A", "Cells_B"), (1.0, -2.0), "ref wells")
    with pytest.raises(ValueError, match="only the weights' ratio matters"):
        set_objective(campaign, target=target, activity_weight=1e39, similarity_weight=1.0)
    assert not campaign_objective(Campaign.open(tmp_path / "c")).uses_target
    ObjectiveConfig(activity_weight=1e7, similarity_weight=1.0, target_features=("Cells_a",),
                    target_values=(2.0,))  # a campaign.json saved with one still loads
    unit = pd.DataFrame({"Metadata_compound": ["ref"], **{f"Cells_f{i}": [v] for i, v in enumerate([0.6, -0.8, 0.0])}})
    unit.to_csv(tmp_path / "unit.csv", index=False)
    with caplog.at_level("WARNING"):
        assert table_target(tmp_path / "unit.csv").values == pytest.approx((0.6, -0.8, 0.0))  # cosine ignores scale
    assert "activity is 0.58" in caplog.text


def test_table_target_errors_name_the_file(tmp_path):
    path = _table(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        table_target(tmp_path / "nope.csv")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="broken.parquet: cannot read"):
        table_target(broken)
    with pytest.raises(ValueError, match=f"{path}.*'aspirin'"):
        table_target(path, "aspirin")
    bare = tmp_path / "bare.csv"
    pd.DataFrame({"Metadata_compound": ["x"], "Image_Count_Cells": [1.0]}).to_csv(bare, index=False)
    with pytest.raises(ValueError, match="no feature columns"):
        table_target(bare)


def test_objective_is_saved_with_the_campaign_and_validated(tmp_path):
    campaign = Campaign.init(tmp_path / "c")
    assert campaign_objective(campaign) == ObjectiveConfig() and describe(ObjectiveConfig()) == "phenotypic activity"
    target = Target(("Cells_A", "Cells_B"), (1.0, -2.0), "ref wells")
    config = set_objective(campaign, target=target, activity_weight=0.5, similarity_weight=1.0)
    reopened = Campaign.open(tmp_path / "c")
    assert campaign_objective(reopened) == config and config.target_values == (1.0, -2.0)
    assert describe(config) == "0.5 x activity + 1 x similarity to ref wells (2 features)"
    assert campaign_status(reopened)["objective"] == describe(config)
    with pytest.raises(ValueError, match="cannot both be 0"):
        set_objective(reopened, target=target, activity_weight=0.0, similarity_weight=0.0)
    assert campaign_objective(Campaign.open(tmp_path / "c")) == config  # a refused objective changes nothing
    set_objective(reopened, target=None, activity_weight=1.0, similarity_weight=0.0)
    assert not campaign_objective(Campaign.open(tmp_path / "c")).uses_target
