import io
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lab_io.ground_truth import GroundTruth
from lab_io.results import (ResultsError, harmony_channel_names, merge_compartments, plate_barcode, plate_fingerprint,
                             read_results, to_16bit_scale)
from lab_io.synthetic_lab import SyntheticLab, SyntheticLabConfig

SHARED = Path(os.environ.get("LOOP_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
BARCODE = "RES0001"


@pytest.fixture(scope="module")
def plate_template(tmp_path_factory):
    """A 3-well synthetic results folder (DMSO in A01, A02; empty A03; DMSO in B01)."""
    root = tmp_path_factory.mktemp("results_template")
    plates = root / "plates"
    plates.mkdir()
    pd.DataFrame({"Assay_Plate_Barcode": [BARCODE], "Plate_Map_Name": ["MAP"]}).to_csv(plates / "barcode_platemap.csv", index=False)
    pd.DataFrame({"plate_map_name": "MAP", "well_position": ["A01", "A02", "A03", "B01"], "broad_sample": "",
                  "solvent": ["DMSO", "DMSO", "", "DMSO"], "dose_um": 0.0,
                  "role": ["negative_control", "negative_control", "empty", "negative_control"]}).to_csv(
        plates / "MAP.txt", sep="\t", index=False)
    pd.DataFrame({"broad_sample": [""], "pert_iname": ["DMSO"], "smiles": ["CS(C)=O"], "InChIKey": [""]}).to_csv(
        plates / "compound_metadata.tsv", sep="\t", index=False)
    lab = SyntheticLab(GroundTruth(world_seed=0), seed=2, config=SyntheticLabConfig(image_size_px=112, cells_per_field=14))
    lab.run_plates(plates, root / "results")
    return root / "results"


@pytest.fixture
def results(tmp_path, plate_template):
    dst = tmp_path / "results"
    shutil.copytree(plate_template, dst)
    return dst


def site(results, well="A02"):
    return results / BARCODE / "analysis" / f"{BARCODE}-{well}-1"


def test_reads_plate_folder_and_folder_of_plates(results):
    plates = read_results(results)
    assert [p.barcode for p in plates] == [BARCODE]
    plate = plates[0]
    assert plate.image_count == 3 and not plate.from_images
    cells = plate.cells
    assert list(cells.columns[:4]) == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]
    assert set(cells["Metadata_Well"]) == {"A01", "A02", "B01"}
    assert (cells["Metadata_Plate"] == BARCODE).all()
    assert {"Nuclei_AreaShape_Area", "Cells_Intensity_MeanIntensity_Actin", "Cytoplasm_Texture_Contrast_Tubulin"} <= set(cells.columns)
    counts = cells.groupby("Metadata_Well").size()
    for well in ("A01", "A02", "B01"):
        assert counts[well] == pd.read_csv(site(results, well) / "Image.csv").loc[0, "Count_Nuclei"]
    single = read_results(results / BARCODE)[0]
    assert single.fingerprint == plate.fingerprint
    pd.testing.assert_frame_equal(single.cells, cells)
    assert len(plate.sources) == 3 * 4 and plate.sources[0].startswith("analysis/")


def test_cells_area_is_nucleus_plus_cytoplasm(results):
    cells = read_results(results)[0].cells
    assert np.allclose(cells["Cells_AreaShape_Area"], cells["Nuclei_AreaShape_Area"] + cells["Cytoplasm_AreaShape_Area"])


def test_fingerprint_is_content_based(results, tmp_path, plate_template):
    a = read_results(results)[0].fingerprint
    assert read_results(plate_template)[0].fingerprint == a  # identical copy elsewhere
    path = site(results) / "Nuclei.csv"
    path.write_bytes(path.read_bytes())  # rewritten (new mtime), same bytes -> same fingerprint
    assert read_results(results)[0].fingerprint == a
    table = pd.read_csv(path)
    table.loc[0, "AreaShape_Area"] += 1
    table.to_csv(path, index=False)
    assert read_results(results)[0].fingerprint != a


def test_merge_links_objects_by_parent_ids():
    image = pd.DataFrame({"ImageNumber": [7], "Metadata_Plate": ["P"], "Metadata_Well": ["A01"], "Metadata_Site": [1]})
    nuclei = pd.DataFrame({"ImageNumber": [7, 7], "ObjectNumber": [1, 2], "AreaShape_Area": [10.0, 20.0]})
    cells = pd.DataFrame({"ImageNumber": [7, 7, 7], "ObjectNumber": [1, 2, 3], "Parent_Nuclei": [2, 1, 9],
                          "AreaShape_Area": [200.0, 100.0, 5.0]})
    cyto = pd.DataFrame({"ImageNumber": [7, 7], "ObjectNumber": [1, 2], "Parent_Cells": [2, 1], "Parent_Nuclei": [1, 2],
                         "AreaShape_Area": [90.0, 180.0]})
    merged = merge_compartments(image, nuclei, cells, cyto)
    assert merged["Metadata_ObjectNumber"].tolist() == [1, 2]  # cell 3 has no nucleus 9: dropped
    assert merged["Cells_AreaShape_Area"].tolist() == [200.0, 100.0]
    assert merged["Nuclei_AreaShape_Area"].tolist() == [20.0, 10.0]
    assert merged["Cytoplasm_AreaShape_Area"].tolist() == [180.0, 90.0]
    assert not any(c.endswith("Parent_Nuclei") or c.endswith("ImageNumber") for c in merged.columns)


def test_stack_sites_is_concat_holding_the_features_once():
    from lab_io.results import FEATURE_DTYPE, stack_sites

    rng = np.random.default_rng(0)

    def site(well, n, order):
        meta = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": well, "Metadata_Site": 1,
                             "Metadata_ObjectNumber": np.arange(1, n + 1)})
        feats = pd.DataFrame(rng.normal(size=(n, 3)).astype(FEATURE_DTYPE), columns=["Nuclei_a", "Cells_b", "Cytoplasm_c"])
        return pd.concat([meta, feats], axis=1)[order]

    first = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber", "Nuclei_a", "Cells_b", "Cytoplasm_c"]
    frames = [site("A01", 4, first), site("A02", 0, first), site("B03", 3, first[::-1])]  # a site in another column order
    expected = pd.concat([f[first] for f in frames], ignore_index=True)
    stacked = stack_sites(frames)
    pd.testing.assert_frame_equal(stacked, expected)
    assert frames == [None, None, None]  # each site's copy is let go as it is stacked
    assert all(stacked[c].dtype == FEATURE_DTYPE for c in ["Nuclei_a", "Cells_b", "Cytoplasm_c"])


def expect_error(results, *fragments):
    with pytest.raises(ResultsError) as info:
        read_results(results)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    return str(info.value)


def test_truncated_csv_mid_row(results):
    path = site(results) / "Cells.csv"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])
    expect_error(results, str(path), BARCODE, "well A02", "truncated")


def test_truncated_csv_at_row_boundary_caught_by_counts(results):
    path = site(results) / "Nuclei.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    expect_error(results, str(path), BARCODE, "well A02", "Count_Nuclei")


def test_ragged_rows(results):
    path = site(results) / "Cytoplasm.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].rstrip("\n") + ",42\n"
    path.write_text("".join(lines))
    expect_error(results, str(path), "well A02", "line 2")
    lines[1] = ",".join(lines[1].split(",")[:-3]) + "\n"
    path.write_text("".join(lines))
    expect_error(results, str(path), "well A02", "line 2")


def test_non_numeric_feature(results):
    path = site(results) / "Nuclei.csv"
    table = pd.read_csv(path)
    table["AreaShape_Area"] = table["AreaShape_Area"].astype(object)
    table.loc[1, "AreaShape_Area"] = "abc"
    table.to_csv(path, index=False)
    expect_error(results, str(path), "well A02", "AreaShape_Area", "'abc'", "line 3")


def test_missing_required_column_and_empty_file(results):
    path = site(results) / "Cells.csv"
    pd.read_csv(path).drop(columns=["Parent_Nuclei"]).to_csv(path, index=False)
    expect_error(results, str(path), "Parent_Nuclei")
    path.write_text("")
    expect_error(results, str(path), "empty")


def test_plate_mismatch_and_bad_well(results):
    path = site(results) / "Image.csv"
    table = pd.read_csv(path)
    table.assign(Metadata_Plate="OTHER").to_csv(path, index=False)
    expect_error(results, str(path), BARCODE, "OTHER")
    table.assign(Metadata_Well="Z99").to_csv(path, index=False)
    expect_error(results, str(path), BARCODE, "Z99")


def test_repeated_or_missing_object_keys_are_named(results):
    """A repeated key would merge the wrong objects; an empty one is not an object number."""
    path = site(results) / "Cytoplasm.csv"
    table = pd.read_csv(path)
    pd.concat([table, table.iloc[:1]]).to_csv(path, index=False)
    expect_error(results, str(path), "well A02", f"line {len(table) + 2} repeats", "Parent_Cells")
    table.to_csv(path, index=False)
    path = site(results) / "Nuclei.csv"
    nuclei = pd.read_csv(path)
    nuclei.assign(ObjectNumber=nuclei["ObjectNumber"].astype(float).where(nuclei.index != 1)).to_csv(path, index=False)
    expect_error(results, str(path), "'ObjectNumber' line 3", "not an object number")
    nuclei.to_csv(path, index=False)
    path = site(results) / "Image.csv"
    image = pd.read_csv(path)
    pd.concat([image, image]).to_csv(path, index=False)
    expect_error(results, str(path), "line 3 repeats", "ImageNumber")


def test_a_numeric_barcode_keeps_its_zeros(results, tmp_path):
    """Plate folder 000123 with Metadata_Plate 000123: the column is text, not the number 123."""
    plate = shutil.copytree(results / BARCODE, tmp_path / "numeric" / "000123")
    for site_dir in (plate / "analysis").iterdir():
        image = pd.read_csv(site_dir / "Image.csv", dtype={"Metadata_Plate": str})
        image.assign(Metadata_Plate="000123").to_csv(site_dir / "Image.csv", index=False)
        site_dir.rename(site_dir.with_name(site_dir.name.replace(BARCODE, "000123")))
    assert read_results(tmp_path / "numeric")[0].barcode == "000123"


def test_sites_come_from_the_folders_when_image_csv_has_no_site_column(results):
    """Two site folders of one well whose Image.csv lacks Metadata_Site are two sites, not a clash."""
    expected = read_results(results)[0].cells
    first = site(results, "A01")
    second = first.with_name(first.name[:-1] + "2")
    shutil.copytree(first, second)
    for folder in (first, second):
        image = pd.read_csv(folder / "Image.csv")
        image.drop(columns=["Metadata_Site"]).to_csv(folder / "Image.csv", index=False)
    cells = read_results(results)[0].cells
    a01 = cells[cells["Metadata_Well"] == "A01"]
    assert sorted(a01["Metadata_Site"].unique()) == [1, 2]
    assert len(a01) == 2 * (expected["Metadata_Well"] == "A01").sum()


def test_an_unbalanced_quote_is_named(results):
    path = site(results) / "Nuclei.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = '"' + lines[2]
    path.write_text("".join(lines))
    expect_error(results, str(path), "well A02")


def test_missing_object_tables(results):
    (site(results) / "Cells.csv").unlink()
    expect_error(results, "Cells.csv", "well A02", "missing")
    (site(results) / "Nuclei.csv").unlink()
    (site(results) / "Cytoplasm.csv").unlink()
    expect_error(results, "well A02", "missing")
    plate = read_results(results, allow_missing_objects=True)[0]
    assert plate.skipped_sites == (f"{BARCODE}-A02-1",)
    assert set(plate.cells["Metadata_Well"]) == {"A01", "B01"}


def test_plate_fingerprint_is_the_reads_from_the_bytes_alone(results, monkeypatch):
    """The fingerprint a read gives, without parsing a table or segmenting an image; None where the
    read would fail (it then says why)."""
    import lab_io.morphology

    def no_parsing(patch):
        patch.setattr(lab_io.morphology, "measure_field", None)
        patch.setattr("lab_io.results._read_csv_strict", None)
        patch.setattr("lab_io.results._parse_batch", None)

    tables = read_results(results)[0].fingerprint
    with monkeypatch.context() as patch:
        no_parsing(patch)
        assert plate_fingerprint(results / BARCODE) == tables
    (site(results) / "Nuclei.csv").unlink()
    assert plate_fingerprint(results / BARCODE) is None  # some object tables but not all: the read refuses it
    (site(results) / "Cells.csv").unlink()
    (site(results) / "Cytoplasm.csv").unlink()
    assert plate_fingerprint(results / BARCODE) == read_results(results, allow_missing_objects=True)[0].fingerprint
    shutil.rmtree(results / BARCODE / "analysis")
    from_images = read_results(results)[0].fingerprint
    with monkeypatch.context() as patch:
        no_parsing(patch)
        assert plate_fingerprint(results / BARCODE) == from_images != tables
    sorted((results / BARCODE / "Images").glob("*.tif*"))[-1].unlink()  # a field without one of its channels
    assert plate_fingerprint(results / BARCODE) is None
    assert plate_fingerprint(results / "nope") is None


def test_images_only_ingest_matches_the_tables(results):
    expected = read_results(results)[0]
    shutil.rmtree(results / BARCODE / "analysis")
    plate = read_results(results)[0]
    assert plate.from_images and plate.image_count == 3
    assert all(s.startswith("Images/") for s in plate.sources)
    # Same cells and nuclei; the cell bodies differ only by the cell threshold: the synthetic lab's
    # pipeline uses plain Otsu, image-only ingest the log-Otsu that real Cell Painting fields need.
    same = [c for c in expected.cells.columns if not c.startswith(("Cells_", "Cytoplasm_"))]
    pd.testing.assert_frame_equal(plate.cells[same], expected.cells[same], check_dtype=False, rtol=1e-9)
    assert list(plate.cells.columns) == list(expected.cells.columns)
    assert (plate.cells["Cells_AreaShape_Area"] >= expected.cells["Cells_AreaShape_Area"] - 1e-9).mean() > 0.9


def test_crops_are_cut_at_the_nuclei_whichever_way_the_plate_is_read(results):
    """From the CellProfiler tables' centres (analysis/ + Images/) and from the images alone the same
    cells are cropped; the per-well cap holds; a plate read without crop_px has none."""
    assert read_results(results)[0].crops is None
    with_tables = read_results(results, crop_px=24, crops_per_well=4)[0].crops
    shutil.rmtree(results / BARCODE / "analysis")
    from_images = read_results(results, crop_px=24, crops_per_well=4)[0].crops
    assert with_tables.images.shape[1:] == (24, 24, 3) and with_tables.channel_names == ("DNA", "Tubulin", "Actin")
    assert with_tables.metadata.groupby("well").size().max() <= 4
    pd.testing.assert_frame_equal(with_tables.metadata, from_images.metadata)
    assert np.array_equal(with_tables.images, from_images.images)
    dna = with_tables.images[..., 0].astype(float)  # a nucleus sits in the middle of its crop
    assert dna[:, 8:16, 8:16].mean() > 1.5 * dna.mean()


def test_crop_channels_are_named_from_the_image_tables(results, caplog):
    """Crops cut from a plate's images take their channel names from Image.csv's FileName_<name>
    columns (chN -> name), so a lab that names its stains differently gets its own names."""
    for image_csv in (results / BARCODE / "analysis").glob("*/Image.csv"):
        table = pd.read_csv(image_csv)
        table = table.rename(columns={"FileName_DNA": "FileName_OrigHoechst", "FileName_Tubulin": "FileName_OrigER",
                                      "FileName_Actin": "FileName_OrigMito"})
        table.to_csv(image_csv, index=False)
    crops = read_results(results, crop_px=24, crops_per_well=4)[0].crops
    assert crops.channel_names == ("Hoechst", "ER", "Mito")
    for image_csv in (results / BARCODE / "analysis").glob("*/Image.csv"):
        pd.read_csv(image_csv).drop(columns=["FileName_OrigMito"]).to_csv(image_csv, index=False)
    with caplog.at_level("WARNING"):
        crops = read_results(results, crop_px=24, crops_per_well=4)[0].crops
    assert crops.channel_names == ("DNA", "Tubulin", "Actin") and "crops get default channel names" in caplog.text


def _swap_channels(images, a: int, b: int) -> None:
    """Exchange the files of channels ``a`` and ``b`` (as a lab imaging the stains in another order)."""
    for old, new in ((f"-ch{a}sk", "-chXsk"), (f"-ch{b}sk", f"-ch{a}sk"), ("-chXsk", f"-ch{b}sk")):
        for path in images.glob(f"*{old}*"):
            path.rename(path.with_name(path.name.replace(old, new)))


def test_harmony_index_names_the_channels_and_its_folder_name_gives_the_barcode(results, caplog):
    """An images-only plate with DNA on channel 3: Harmony's Index.idx.xml names the channels, so the
    nuclei are segmented on DNA wherever it is; without an index the names are guessed (DNA for ch1,
    ChN for chN), with a warning; ``channel_names`` overrides both. Harmony's export folder name,
    ``<barcode>__<timestamp>-Measurement 1``, reads as the barcode."""
    shutil.rmtree(results / BARCODE / "analysis")
    expected = read_results(results)[0].cells  # measured from the images, channels in place
    images = results / BARCODE / "Images"
    assert harmony_channel_names(images) == {1: "DNA", 2: "Tubulin", 3: "Actin"}  # the synthetic lab's index
    _swap_channels(images, 1, 3)
    index = images / "Index.idx.xml"
    text = index.read_text().replace(">DNA<", ">TMP<").replace(">Actin<", ">DNA<").replace(">TMP<", ">Actin<")
    index.write_text(text.replace(">DNA<", ">HOECHST 33342<"))  # a fluorophore's name, as Harmony gives it
    assert harmony_channel_names(images) == {1: "Actin", 2: "Tubulin", 3: "HOECHST33342"}
    cells = read_results(results)[0].cells
    renamed = {c: c.replace("HOECHST33342", "DNA") for c in cells.columns}
    pd.testing.assert_frame_equal(cells.rename(columns=renamed)[expected.columns], expected, check_dtype=False,
                                  rtol=1e-9)
    given = read_results(results, channel_names=["Actin", "Tubulin", "DNA"])[0].cells
    pd.testing.assert_frame_equal(given[expected.columns], expected, check_dtype=False, rtol=1e-9)
    index.unlink()
    with caplog.at_level("WARNING", logger="lab_io.results"):
        guessed = read_results(results)[0].cells
    assert "guessed {1: 'DNA', 2: 'Ch2', 3: 'Ch3'}" in caplog.text and "--channels" in caplog.text
    assert not np.allclose(guessed["Nuclei_AreaShape_Area"].median(), expected["Nuclei_AreaShape_Area"].median())

    harmony = results / f"{BARCODE}__2021-04-07T17_28_38-Measurement 1"
    (results / BARCODE).rename(harmony)
    assert plate_barcode(harmony.name) == BARCODE and plate_barcode("P1__notes") == "P1__notes"
    plate = read_results(results, channel_names=["Actin", "Tubulin", "DNA"])[0]
    assert plate.barcode == BARCODE and (plate.cells["Metadata_Plate"] == BARCODE).all()
    assert plate_fingerprint(harmony) == plate.fingerprint
    (harmony / "Images" / "Index.idx.xml").write_text(text.replace(">Actin<", ">Alexa 488<").replace(
        ">Tubulin<", ">Alexa-488<"))  # two channels whose names differ only by punctuation
    with pytest.raises(ResultsError, match="distinct names.*--channels"):
        read_results(results)


def test_images_only_errors(results):
    shutil.rmtree(results / BARCODE / "analysis")
    images = results / BARCODE / "Images"
    bad = images / "r01c02f01p01-ch2sk1fk1fl1.tiff"
    bad.write_bytes(b"II*\x00garbage")
    expect_error(results, str(bad), BARCODE, "well A02", "TIFF")
    bad.unlink()
    expect_error(results, BARCODE, "well A02", "lacks channels [2]")
    (images / "notes.tiff").write_bytes(b"")
    expect_error(results, "notes.tiff", "Phenix")
    (images / "notes.tiff").unlink()
    shutil.copy(images / "r01c01f01p01-ch1sk1fk1fl1.tiff", images / "r01c01f01p02-ch1sk1fk1fl1.tiff")
    expect_error(results, "well A01", "field 1 channel 1 has several images", "p02", "maximum projection")


def test_not_a_results_folder(tmp_path):
    with pytest.raises(ResultsError, match="no plate folders"):
        read_results(tmp_path)
    with pytest.raises(ResultsError, match="does not exist"):
        read_results(tmp_path / "nope")


def test_real_cellprofiler_output():
    plate_dir = SHARED / "cellprofiler" / "BR00121431"
    if not plate_dir.exists():
        pytest.skip(f"real CellProfiler output not found at {plate_dir} (set LOOP_SHARED_DATA)")
    # The shipped sites -2 hold only Image.csv: strict reading refuses, the opt-in skips them.
    with pytest.raises(ResultsError, match="BR00121431-A01-2.*plate BR00121431, well A01"):
        read_results(plate_dir)
    plate = read_results(plate_dir, allow_missing_objects=True)[0]
    assert plate.barcode == "BR00121431" and plate.image_count == 2
    assert plate.skipped_sites == ("BR00121431-A01-2", "BR00121431-A02-2")
    cells = plate.cells
    assert cells.groupby("Metadata_Well").size().to_dict() == {"A01": 89, "A02": 36}  # = Count_Nuclei
    assert cells.shape[1] > 5000
    for comp in ("Nuclei", "Cells", "Cytoplasm"):
        assert f"{comp}_AreaShape_Area" in cells.columns
    assert "Cells_Intensity_MeanIntensity_DNA" in cells.columns
    assert (cells["Cells_AreaShape_Area"] > cells["Nuclei_AreaShape_Area"]).mean() > 0.95
    again = read_results(plate_dir.parent, allow_missing_objects=True)[0]
    assert again.fingerprint == plate.fingerprint


def test_object_tables_may_repeat_image_metadata_and_every_site_measures_the_same(results):
    """ExportToSpreadsheet's "add image metadata to object tables" is read as the plain export;
    a site exported with other columns is an error naming its folder."""
    plain = read_results(results)[0].cells
    for path in (results / BARCODE / "analysis").glob("*/Nuclei.csv"):
        table = pd.read_csv(path)
        table.insert(1, "Metadata_Plate", BARCODE)
        table["FileName_DNA"] = "x.tiff"
        table.to_csv(path, index=False)
    pd.testing.assert_frame_equal(read_results(results)[0].cells, plain)
    path = site(results, "B01") / "Cytoplasm.csv"
    pd.read_csv(path).drop(columns=["AreaShape_Area"]).to_csv(path, index=False)
    expect_error(results, str(site(results, "B01")), "measured other columns than", "Cytoplasm_AreaShape_Area")


def test_images_of_any_bit_depth_are_read_on_the_16_bit_scale():
    """8-bit x 257, floating point 0..1 x 65535, counts as they are; what cannot be intensities is
    refused naming the file."""
    where = "plate P, well A01"
    assert to_16bit_scale(np.array([[0, 1, 255]], np.uint8), where).tolist() == [[0, 257, 65535]]
    assert to_16bit_scale(np.array([[0.0, 0.5, 1.0]], np.float32), where).tolist() == [[0, 32768, 65535]]
    assert to_16bit_scale(np.array([[0.0, 2.4, 4000.0]], np.float64), where).tolist() == [[0, 2, 4000]]
    overshoot = np.array([[0.5, 1.0001]], np.float32)  # flat-field corrected: a little past 1 saturates
    assert to_16bit_scale(overshoot, where).tolist() == [[32768, 65535]]
    assert to_16bit_scale(np.array([[7, 65535]], np.int32), where).dtype == np.uint16
    plane = np.array([[3, 4]], np.uint16)
    assert to_16bit_scale(plane, where) is plane
    for bad, message in ((np.array([[-1, 5]], np.int16), "span -1..5"), (np.array([[70000]], np.uint32), "span"),
                         (np.array([[np.nan]], np.float32), "NaN"), (np.array([[True]]), "bool")):
        with pytest.raises(ResultsError, match=message) as err:
            to_16bit_scale(bad, where)
        assert where in str(err.value)


def test_an_8_bit_plate_measures_and_crops_like_its_16_bit_original(results):
    """The same fields saved at 16 bits, at 8 bits and as floating-point 0..1 TIFFs: crops and
    intensities land on the 16-bit scale (within one 8-bit step), so the plates sit side by side."""
    import tifffile

    shutil.rmtree(results / BARCODE / "analysis")
    for path in (results / BARCODE / "Images").glob("*.tiff"):  # use the range, as an 8-bit camera would
        tifffile.imwrite(path, np.minimum(tifffile.imread(path).astype(np.int64) * 20, 65535).astype(np.uint16))
    reference = read_results(results, crop_px=24, crops_per_well=4)[0]
    to_8_bit = lambda p: np.rint(p / 257).astype(np.uint8)  # noqa: E731
    to_fraction = lambda p: (p / 65535).astype(np.float32)  # noqa: E731
    for convert, step in ((to_8_bit, 129), (to_fraction, 1)):
        copy = results.parent / f"converted_{step}"
        shutil.copytree(results, copy)
        for path in (copy / BARCODE / "Images").glob("*.tiff"):
            tifffile.imwrite(path, convert(tifffile.imread(path)))
        plate = read_results(copy, crop_px=24, crops_per_well=4)[0]
        diff = np.abs(plate.crops.images.astype(int) - reference.crops.images.astype(int))
        assert plate.crops.images.dtype == np.uint16 and diff.max() <= step
        assert len(plate.cells) == len(reference.cells)
        for column in ("Cells_Intensity_MeanIntensity_Actin", "Nuclei_Intensity_IntegratedIntensity_DNA"):
            assert np.allclose(plate.cells[column], reference.cells[column], rtol=0.02), column


def test_an_empty_metadata_site_is_taken_from_the_site_folder(tmp_path):
    plate_dir = SHARED / "cellprofiler" / "BR00121431"
    if not plate_dir.exists():
        pytest.skip(f"real CellProfiler output not found at {plate_dir} (set LOOP_SHARED_DATA)")
    copy = shutil.copytree(plate_dir, tmp_path / "BR00121431")
    image_csv = copy / "analysis" / "BR00121431-A01-1" / "Image.csv"
    table = pd.read_csv(image_csv)
    assert "Metadata_Site" in table.columns
    table.assign(Metadata_Site=np.nan).to_csv(image_csv, index=False)
    plate = read_results(copy, allow_missing_objects=True)[0]
    assert plate.cells.groupby("Metadata_Well").size().to_dict() == {"A01": 89, "A02": 36}
    assert plate.cells.loc[plate.cells["Metadata_Well"] == "A01", "Metadata_Site"].eq(1).all()


def _drop_index(results):
    shutil.rmtree(results / BARCODE / "analysis")
    (results / BARCODE / "Images" / "Index.idx.xml").unlink()
    return results / BARCODE / "Images"


def _write_index(images, names: dict):
    """A Harmony index naming the images' channels ``names`` (channel -> name; others left out)."""
    from lab_io.phenix import harmony_index_xml, parse_phenix_name

    entries = [(p.name, k.row, k.col, k.field, k.plane, k.channel, names[k.channel])
               for p, k in ((p, parse_phenix_name(p.name)) for p in sorted(images.glob("*.tiff")))
               if k.channel in names]
    (images / "Index.idx.xml").write_text(harmony_index_xml(BARCODE, entries))


def test_guessed_channel_names_are_the_phenix_numbers_and_not_declared(results, caplog):
    """Without names given or a Harmony index, ch1 is guessed DNA and chN ``ChN`` (a plate lacking
    ch2 gives ``Ch3`` for ch3, not ``Ch2``); the crops record the guesses as not declared and the
    warning says how to name the stains. A plate with a Harmony index has declared names."""
    named = read_results(results, crop_px=24, crops_per_well=2)[0].crops
    assert named.channel_names == ("DNA", "Tubulin", "Actin") and named.channels_named
    images = _drop_index(results)
    with caplog.at_level("WARNING", logger="lab_io.results"):
        plate = read_results(results, crop_px=24, crops_per_well=2)[0]
    assert plate.crops.channel_names == ("DNA", "Ch2", "Ch3") and not plate.crops.channels_named
    assert "Cells_Intensity_MeanIntensity_Ch3" in plate.cells.columns
    assert "guessed {1: 'DNA', 2: 'Ch2', 3: 'Ch3'}, recorded as guesses" in caplog.text
    assert "loop ingest --channels" in caplog.text and "Harmony index" in caplog.text
    for path in images.glob("*-ch2sk*"):
        path.unlink()
    gap = read_results(results, crop_px=24, crops_per_well=2)[0]
    assert gap.crops.channel_names == ("DNA", "Ch3") and "Cells_Intensity_MeanIntensity_Ch3" in gap.cells.columns
    for path in images.glob("*-ch1sk*"):  # channels 3 and 5: no ch1, so no channel is guessed DNA
        path.rename(path.with_name(path.name.replace("-ch1sk", "-ch5sk")))
    assert read_results(results, crop_px=24, crops_per_well=2)[0].crops.channel_names == ("Ch3", "Ch5")


def test_a_harmony_index_naming_some_of_the_channels_is_refused(results):
    """An index that names ch1 and ch2 of a plate imaged in ch1..ch3 is an error saying which channels
    it names and which the images hold (nothing is guessed beside declared names)."""
    _write_index(_drop_index(results), {1: "DNA", 2: "Tubulin"})
    with pytest.raises(ResultsError, match=r"Index.idx.xml \(plate RES0001\): the Harmony index names channels "
                                           r"\{1: 'DNA', 2: 'Tubulin'\}, but the images hold channels \[1, 2, 3\] "
                                           r"\(\[3\] unnamed\); name every channel with loop ingest --channels"):
        read_results(results)
    assert read_results(results, channel_names=["DNA", "Tubulin", "Actin"])[0].from_images  # names given win


def test_channel_names_differing_only_in_case_are_refused_at_ingest(results):
    """Names that crops would later refuse as the same channel (case, spaces, punctuation ignored)
    are refused when read, given or from a Harmony index."""
    with pytest.raises(ResultsError, match=r"channel names \['dna', 'DNA', 'Actin'\] must be non-empty and distinct"):
        read_results(results, channel_names=["dna", "DNA", "Actin"], crop_px=24)
    shutil.rmtree(results / BARCODE / "analysis")
    index = results / BARCODE / "Images" / "Index.idx.xml"
    index.write_text(index.read_text().replace(">Tubulin<", ">dna<"))
    with pytest.raises(ResultsError, match="distinct names.*ignoring case.*--channels"):
        read_results(results)


def test_given_channel_names_are_stored_as_harmony_names_are(results, caplog):
    """``--channels "Hoechst 33342,..."`` and a Harmony index's ``HOECHST 33342`` give feature names
    and crop channels of letters and digits alike (no space in a feature column)."""
    images = _drop_index(results)
    given = read_results(results, channel_names=["Hoechst 33342", "Tubulin", "Actin"], crop_px=24)[0]
    assert given.crops.channel_names == ("Hoechst33342", "Tubulin", "Actin") and given.crops.channels_named
    assert "Nuclei_Intensity_MeanIntensity_Hoechst33342" in given.cells.columns
    assert not [c for c in given.cells.columns if " " in c]
    _write_index(images, {1: "Hoechst 33342", 2: "Tubulin", 3: "Actin"})
    indexed = read_results(results, crop_px=24)[0]
    assert indexed.crops.channel_names == given.crops.channel_names
    assert list(indexed.cells.columns) == list(given.cells.columns)


@pytest.mark.skipif(not (SHARED / "jump" / "fields" / "BR00123947" / "Images").is_dir(),
                    reason="shared JUMP field absent (../shared/data/jump or $LOOP_SHARED_DATA)")
def test_a_real_cell_painting_plate_with_three_unnamed_channels_is_not_fed_as_tubulin_and_actin(tmp_path, caplog):
    """The real JUMP field's ch1 (DNA), ch4 (AGP) and ch5 (Mito) alone, no index: named DNA, Ch4, Ch5,
    not declared, so a model trained on declared DNA, Tubulin, Actin takes them by position with a
    warning instead of silently as its tubulin and actin."""
    from lab_io.crops import ChannelNames, CropSet, load_crops, reorder_channels, write_crops

    images = tmp_path / "results" / "BR00123947" / "Images"
    images.mkdir(parents=True)
    for channel in (1, 4, 5):
        name = f"r07c01f01p01-ch{channel}sk1fk1fl1.tiff"
        shutil.copy(SHARED / "jump" / "fields" / "BR00123947" / "Images" / name, images / name)
    with caplog.at_level("WARNING", logger="lab_io.results"):
        plate = read_results(tmp_path / "results", crop_px=32, crops_per_well=8)[0]
    assert "guessed {1: 'DNA', 4: 'Ch4', 5: 'Ch5'}" in caplog.text
    assert plate.crops.channel_names == ("DNA", "Ch4", "Ch5") and not plate.crops.channels_named
    meta = plate.crops.metadata.assign(compound="DMSO", concentration_um=0.0)  # as ingest adds from the map
    folder = write_crops(CropSet(plate.crops.images, meta, plate.crops.channel_names, plate.crops.channels_named),
                         tmp_path / "crops")
    crops = load_crops(folder)
    assert crops.channel_names == ("DNA", "Ch4", "Ch5") and not crops.channels_named
    caplog.clear()
    with caplog.at_level("WARNING", logger="lab_io.crops"):
        fed = reorder_channels(crops, ChannelNames(("DNA", "Tubulin", "Actin")), folder)
    assert np.array_equal(fed.images, crops.images)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "without declared channel names" in caplog.text


def _read_both_ways(results, monkeypatch, batch_max: int, **kwargs):
    """The plate read in batches of at most ``batch_max`` sites, and read site by site."""
    import lab_io.results

    with monkeypatch.context() as patch:
        patch.setattr(lab_io.results, "SITE_BATCH_MAX", batch_max)
        batched = read_results(results, **kwargs)[0]
    with monkeypatch.context() as patch:
        patch.setattr(lab_io.results, "BATCHED_READING", False)
        one_by_one = read_results(results, **kwargs)[0]
    return batched, one_by_one


def _vary_the_exports(results):
    """Sites written the ways real exports differ: CRLF line ends, a fully quoted table, an empty
    value, a site without cells (its table written with LF under CRLF neighbours) and a site with
    only Image.csv."""
    import csv

    for path in site(results, "A02").glob("*.csv"):
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    cells = site(results, "B01") / "Cells.csv"
    table = pd.read_csv(cells)
    table.iloc[0, 5] = np.nan
    table.to_csv(cells, index=False, quoting=csv.QUOTE_ALL)
    empty = shutil.copytree(site(results, "A01"), site(results, "C01"))
    image = pd.read_csv(empty / "Image.csv", dtype={"Metadata_Plate": str})
    image = image.assign(Metadata_Well="C01", ImageNumber=7, **{f"Count_{c}": 0 for c in ("Nuclei", "Cells", "Cytoplasm")})
    image.to_csv(empty / "Image.csv", index=False)
    for comp in ("Nuclei", "Cells", "Cytoplasm"):
        pd.read_csv(empty / f"{comp}.csv").iloc[:0].to_csv(empty / f"{comp}.csv", index=False)
    only_image = shutil.copytree(site(results, "A01"), site(results, "C02"))
    image.assign(Metadata_Well="C02", ImageNumber=8).to_csv(only_image / "Image.csv", index=False)
    for comp in ("Nuclei", "Cells", "Cytoplasm"):
        (only_image / f"{comp}.csv").unlink()


@pytest.mark.parametrize("batch_max", [1, 2, 64])
def test_batched_reading_gives_the_site_by_site_rows(results, monkeypatch, batch_max):
    """Reading many sites' tables in one parse gives exactly the rows, fields and fingerprint of
    reading each site on its own, whatever the batch size and however the exports differ."""
    _vary_the_exports(results)
    batched, one_by_one = _read_both_ways(results, monkeypatch, batch_max, allow_missing_objects=True)
    pd.testing.assert_frame_equal(batched.cells, one_by_one.cells, check_exact=True)
    assert batched.skipped_sites == one_by_one.skipped_sites == (f"{BARCODE}-C02-1",)
    for field in ("image_count", "sources", "fingerprint", "imaged_wells", "imaged_sites"):
        assert getattr(batched, field) == getattr(one_by_one, field), field
    assert batched.image_count == 4 and "C01" in batched.imaged_wells and "C01" not in set(batched.cells["Metadata_Well"])
    b01 = pd.read_csv(site(results, "B01") / "Cells.csv")
    emptied = batched.cells[(batched.cells["Metadata_Well"] == "B01")
                            & (batched.cells["Metadata_ObjectNumber"] == b01["ObjectNumber"].iloc[0])]
    assert emptied[f"Cells_{b01.columns[5]}"].isna().all() and len(emptied) == 1


def test_batches_read_on_threads_give_the_rows_and_errors_of_one_after_the_other(results, monkeypatch):
    """Batches read at once on threads (``READ_THREADS``) are handed on in site order: the same
    rows, sources and fingerprint as one batch after the other, the same error for a faulty site
    with later batches in flight, and no reading thread left behind."""
    import threading

    import lab_io.results

    _vary_the_exports(results)
    monkeypatch.setattr(lab_io.results, "SITE_BATCH_MAX", 1)
    reads = {}
    for threads in (1, 3):
        monkeypatch.setattr(lab_io.results, "READ_THREADS", threads)
        reads[threads] = read_results(results, allow_missing_objects=True)[0]
    pd.testing.assert_frame_equal(reads[3].cells, reads[1].cells, check_exact=True)
    for field in ("sources", "fingerprint", "skipped_sites", "imaged_sites"):
        assert getattr(reads[3], field) == getattr(reads[1], field), field
    path = site(results, "A02") / "Nuclei.csv"
    lines = path.read_bytes().decode().splitlines(keepends=True)
    lines[2] = lines[2].replace(",", ",x", 1)
    path.write_text("".join(lines))
    errors = {}
    for threads in (1, 3):
        monkeypatch.setattr(lab_io.results, "READ_THREADS", threads)
        with pytest.raises(ResultsError) as err:
            read_results(results, allow_missing_objects=True)
        errors[threads] = str(err.value)
    assert errors[3] == errors[1] and "well A02" in errors[1] and "line 3" in errors[1]
    assert not [t for t in threading.enumerate() if t.name.startswith("read-sites")]


def test_reading_on_threads_leaves_the_callers_warning_filters_as_they_were(results, monkeypatch):
    """pandas enters ``warnings.catch_warnings()`` for every column it types, which before Python
    3.14 swaps the process's one list of filters: two reading threads left pandas' ``always``
    filter in front of a caller's ``error`` one (a review's finding, after a few reads of real
    tables). Here two batches leave their ``catch_warnings`` in the order that leaks, every time;
    the caller's filters are back after the read."""
    import itertools
    import threading
    import warnings

    import lab_io.results

    real_read_batch = lab_io.results._read_batch
    order, entered, first_out = threading.Lock(), threading.Barrier(2), threading.Event()
    tickets = itertools.count()

    def racing_read_batch(*args, **kwargs):
        with order:
            swap = warnings.catch_warnings()
            swap.__enter__()
            warnings.simplefilter("always", DeprecationWarning)
            ticket = next(tickets)
        if ticket < 2:  # the first two batches, in flight together: the first in leaves first
            entered.wait(timeout=10)
            if ticket == 1:
                first_out.wait(timeout=10)
        swap.__exit__(None, None, None)
        if ticket == 0:
            first_out.set()
        return real_read_batch(*args, **kwargs)

    monkeypatch.setattr(lab_io.results, "_read_batch", racing_read_batch)
    monkeypatch.setattr(lab_io.results, "SITE_BATCH_MAX", 1)
    monkeypatch.setattr(lab_io.results, "READ_THREADS", 2)
    warnings.simplefilter("error", DeprecationWarning)  # the caller's policy (pytest restores the filters)
    before = list(warnings.filters)
    read_results(results)
    assert next(tickets) > 2 and warnings.filters == before
    with pytest.raises(DeprecationWarning):
        warnings.warn("old API", DeprecationWarning)


def test_plain_sites_are_parsed_in_one_batch(results, monkeypatch):
    """Plain exports (CRLF or LF, quoted or not, sites with and without cells) never take the
    site-by-site path, which is what made a 384-well plate of 9 sites take about 26 minutes."""
    import lab_io.results

    _vary_the_exports(results)
    expected = read_results(results, allow_missing_objects=True)[0].cells
    calls = []
    monkeypatch.setattr(lab_io.results, "_read_site", lambda *a, **k: calls.append(a) or None)
    pd.testing.assert_frame_equal(read_results(results, allow_missing_objects=True)[0].cells, expected)
    assert calls == []


@pytest.mark.parametrize("batch_max", [1, 64])
def test_a_problem_inside_a_batch_is_named_as_site_by_site(results, monkeypatch, batch_max):
    """A fault in one site of a batch is reported by the strict site-by-site reading: the file,
    plate, well and line, and a later batch measuring other columns names its site."""
    import lab_io.results

    monkeypatch.setattr(lab_io.results, "SITE_BATCH_MAX", batch_max)
    path = site(results, "B01") / "Nuclei.csv"
    original = path.read_bytes()
    lines = original.decode().splitlines(keepends=True)
    lines[2] = lines[2].replace(",", ",x", 1)
    path.write_text("".join(lines))
    expect_error(results, str(path), "well B01", "line 3", "non-numeric")
    path.write_bytes(original)
    cyto = site(results, "B01") / "Cytoplasm.csv"
    pd.read_csv(cyto).drop(columns=["AreaShape_Area"]).to_csv(cyto, index=False)
    expect_error(results, str(site(results, "B01")), "measured other columns than", "Cytoplasm_AreaShape_Area")


def _same_either_way(results, monkeypatch):
    """Both readings give the same rows, or refuse with the same message; returns that message."""
    import lab_io.results

    outcomes = []
    for batched in (True, False):
        with monkeypatch.context() as patch:
            patch.setattr(lab_io.results, "BATCHED_READING", batched)
            try:
                outcomes.append(read_results(results)[0].cells)
            except ResultsError as err:
                outcomes.append(str(err))
    if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
        assert outcomes[0] == outcomes[1]
        return outcomes[0]
    pd.testing.assert_frame_equal(outcomes[0], outcomes[1], check_exact=True)
    return None


def test_what_the_strict_reading_refuses_the_batched_one_does_not_accept(results, monkeypatch):
    """A review's cases: lone carriage returns under a quoted header, a value longer than csv's
    field limit, whole numbers above 2**53 in one site beside decimals in another, and a table
    that cannot be read after a site with an earlier fault."""
    import csv

    nuclei = site(results) / "Nuclei.csv"
    original = nuclei.read_bytes()
    lines = original.decode().splitlines()
    nuclei.write_bytes(("\r".join(['"' + lines[0].replace(",", '","') + '"'] + lines[1:]) + "\n").encode())
    assert "cannot parse" in _same_either_way(results, monkeypatch)
    table = pd.read_csv(io.BytesIO(original))
    table["AreaShape_Area"] = table["AreaShape_Area"].astype(str)
    table.loc[0, "AreaShape_Area"] = "0." + "6" * (csv.field_size_limit() + 10)
    table.to_csv(nuclei, index=False)
    assert "field larger than field limit" in _same_either_way(results, monkeypatch)
    nuclei.write_bytes(original)
    for well, value in (("A01", str((1 << 60) + (1 << 36) + 1)), ("A02", "0.5")):
        path = site(results, well) / "Cytoplasm.csv"
        table = pd.read_csv(path)
        table["Extra_Feature"] = value
        table.to_csv(path, index=False)
    b01 = site(results, "B01") / "Cytoplasm.csv"
    pd.read_csv(b01).assign(Extra_Feature=1).to_csv(b01, index=False)
    assert _same_either_way(results, monkeypatch) is None
    (site(results, "A01") / "Image.csv").write_bytes(b"")
    (site(results) / "Cells.csv").unlink()
    (site(results) / "Cells.csv").mkdir()  # not a file: unreadable
    assert "A01-1/Image.csv" in _same_either_way(results, monkeypatch)
