import pandas as pd
import pytest

from lab_io.profile_table import read_profile_table, write_profile_table


def _table():
    return pd.DataFrame({"Metadata_Plate": ["P1", "P1"], "Metadata_Well": ["A01", "A02"],
                         "Metadata_compound": ["DMSO", "taxol"], "Metadata_smiles": ["", "CCO"],
                         "Metadata_dose_um": [0.0, 1.0], "Cells_Intensity_Mean": [1.0, 2.5]})


@pytest.mark.parametrize("name", ["t.csv", "t.parquet"])
def test_write_then_read_round_trips(tmp_path, name):
    path = write_profile_table(_table(), tmp_path / "sub" / name)
    table = read_profile_table(path)
    assert table.features == ["Cells_Intensity_Mean"]
    assert table.frame["Cells_Intensity_Mean"].tolist() == [1.0, 2.5]
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temporary file left


def test_failed_write_keeps_the_earlier_file(tmp_path):
    path = write_profile_table(_table(), tmp_path / "t.parquet")
    before = path.read_bytes()
    unwritable = _table().assign(Cells_Intensity_Mean=[object(), object()])  # parquet cannot store it
    with pytest.raises(Exception):
        write_profile_table(unwritable, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_text_columns_are_ignored_and_empty_control_doses_allowed(tmp_path):
    frame = _table().assign(Image_FileName_DNA=["a.tif", "b.tif"])
    frame.loc[0, "Metadata_dose_um"] = None  # a DMSO well without a dose
    frame.to_csv(tmp_path / "t.csv", index=False)
    table = read_profile_table(tmp_path / "t.csv")
    assert table.features == ["Cells_Intensity_Mean"]
    assert pd.isna(table.frame["Metadata_dose_um"].iloc[0]) and table.frame["Metadata_dose_um"].iloc[1] == 1.0


def test_dose_that_is_not_a_number_names_the_row(tmp_path):
    frame = _table().assign(Metadata_dose_um=["0", "10 uM"])
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"t.csv: row 3 \(P1 A02\): Metadata_dose_um '10 uM' is not a number"):
        read_profile_table(tmp_path / "t.csv")
    frame.assign(Cells_Intensity_Mean=["x", "y"], Metadata_dose_um=[0.0, 1.0]).to_csv(tmp_path / "u.csv", index=False)
    with pytest.raises(ValueError, match="u.csv: no numeric feature columns"):
        read_profile_table(tmp_path / "u.csv")


def test_identifiers_are_text_rows_without_them_left_out_and_repeats_kept(tmp_path, caplog):
    frame = _table().assign(Metadata_Plate=["0101", "0101"])
    frame.to_csv(tmp_path / "t.csv", index=False)
    assert read_profile_table(tmp_path / "t.csv").frame["Metadata_Plate"].tolist() == ["0101", "0101"]
    frame.assign(Metadata_compound=["DMSO", None]).to_csv(tmp_path / "empty.csv", index=False)
    with caplog.at_level("WARNING"):
        table = read_profile_table(tmp_path / "empty.csv")
    assert table.frame["Metadata_compound"].tolist() == ["DMSO"] and "1 row(s) without a plate" in caplog.text
    frame.assign(Metadata_compound=[None, None]).to_csv(tmp_path / "none.csv", index=False)
    with pytest.raises(ValueError, match="none.csv: every row lacks"):
        read_profile_table(tmp_path / "none.csv")
    frame.assign(Metadata_Well=["A01", "A01"]).to_csv(tmp_path / "twice.csv", index=False)
    with caplog.at_level("WARNING"):
        assert len(read_profile_table(tmp_path / "twice.csv").frame) == 2
    assert "repeat a plate and well (first: plate 0101 well A01)" in caplog.text
