import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lab_io.ground_truth import GroundTruth
from lab_io.morphology import measure_field
from lab_io.phenix import parse_phenix_name
from lab_io.results import harmony_channel_names, read_results
from lab_io.schema import CHANNELS, well_name
from lab_io.synthetic_lab import PIPELINE, SyntheticLab, SyntheticLabConfig, wells_from_layouts

SMILES = {"CMP-1": "CCN(CC)CC(=O)Nc1c(C)cccc1C", "CMP-2": "COc1cc2ncnc(Nc3ccc(F)c(Cl)c3)c2cc1OCCCN1CCOCC1",
          "CMP-3": "O=C(NCc1ccccc1)c1ccc(Cl)cc1"}


def write_plates(folder: Path, barcode: str, wells: list[tuple[str, str, float, str]]) -> Path:
    """Plates folder in the lab_io.platemap format: wells = (well, compound or '', dose_um, role)."""
    folder.mkdir(parents=True, exist_ok=True)
    map_name = f"{barcode}-MAP"
    pd.DataFrame({"Assay_Plate_Barcode": [barcode], "Plate_Map_Name": [map_name]}).to_csv(
        folder / "barcode_platemap.csv", index=False)
    pd.DataFrame({"plate_map_name": map_name, "well_position": [w[0] for w in wells],
                  "broad_sample": [w[1] for w in wells], "solvent": ["" if w[3] == "empty" else "DMSO" for w in wells],
                  "dose_um": [w[2] for w in wells], "role": [w[3] for w in wells]}).to_csv(
        folder / f"{map_name}.txt", sep="\t", index=False)
    pd.DataFrame({"broad_sample": ["", *SMILES], "pert_iname": ["DMSO", *SMILES],
                  "smiles": ["CS(C)=O", *SMILES.values()], "InChIKey": ["IAZDPXIOMUYVGZ-UHFFFAOYSA-N", "", "", ""]}).to_csv(
        folder / "compound_metadata.tsv", sep="\t", index=False)
    return folder


def small_layout():
    """24 wells of row A and B: DMSO, three compounds at two doses, a positive control, empty wells."""
    wells = []
    for col in range(12):
        for row in range(2):
            w = well_name(row, col)
            if col < 3:
                wells.append((w, "", 0.0, "negative_control"))
            elif col < 9:
                cid = f"CMP-{(col - 3) // 2 + 1}"
                wells.append((w, cid, 1.0 if col % 2 else 10.0, "treatment"))
            elif col == 9:
                wells.append((w, "CMP-1", 10.0, "positive_control"))
            else:
                wells.append((w, "", 0.0, "empty"))
    return wells


CFG = SyntheticLabConfig(image_size_px=128, cells_per_field=18)


@pytest.fixture(scope="module")
def lab():
    return SyntheticLab(GroundTruth(world_seed=0), seed=5, config=CFG)


@pytest.fixture(scope="module")
def plate_run(tmp_path_factory, lab):
    root = tmp_path_factory.mktemp("lab")
    plates = write_plates(root / "plates", "SYN0001", small_layout())
    barcodes = lab.run_plates(plates, root / "results")
    return root, barcodes


def test_run_plates_writes_results_layout(plate_run):
    root, barcodes = plate_run
    assert barcodes == ["SYN0001"]
    plate = root / "results" / "SYN0001"
    assert sorted(p.name for p in (root / "results").iterdir()) == ["SYN0001"]  # no temp folders left
    images = sorted(p.name for p in (plate / "Images").iterdir() if p.suffix == ".tiff")
    assert len(images) == 20 * 3  # 20 non-empty wells x 3 channels, empty wells skipped
    # Harmony's index beside them names each channel's stain
    assert harmony_channel_names(plate / "Images") == {1: "DNA", 2: "Tubulin", 3: "Actin"}
    assert sorted(p.name for p in (plate / "Images").iterdir()) == sorted(images + ["Index.idx.xml"])
    keys = [parse_phenix_name(n) for n in images]
    assert {k.channel for k in keys} == {1, 2, 3} and {k.field for k in keys} == {1}
    assert "A11" not in {k.well for k in keys} and "B12" not in {k.well for k in keys}
    sites = sorted(p.name for p in (plate / "analysis").iterdir())
    assert len(sites) == 20 and sites[0] == "SYN0001-A01-1"
    image = pd.read_csv(plate / "analysis" / "SYN0001-A04-1" / "Image.csv")
    assert image.loc[0, "Metadata_Plate"] == "SYN0001" and image.loc[0, "Metadata_Well"] == "A04"
    assert image.loc[0, "Metadata_Site"] == 1
    assert image.loc[0, "FileName_DNA"] == "r01c04f01p01-ch1sk1fk1fl1.tiff"
    nuclei = pd.read_csv(plate / "analysis" / "SYN0001-A04-1" / "Nuclei.csv")
    assert image.loc[0, "Count_Nuclei"] == len(nuclei) > 3
    # images are numbered through the plate, as CellProfiler numbers them: site tables concatenate
    numbers = [pd.read_csv(plate / "analysis" / site / "Image.csv").loc[0, "ImageNumber"] for site in sites]
    assert sorted(numbers) == list(range(1, 21)) and (nuclei["ImageNumber"] == image.loc[0, "ImageNumber"]).all()


def test_no_ground_truth_in_results(plate_run):
    root, _ = plate_run
    for path in (root / "results").rglob("*.csv"):
        header = path.read_text().splitlines()[0].lower()
        for secret in ("phenotype", "is_active", "ec50", "emax", "hill", "smiles", "activity"):
            assert secret not in header, (path, secret)


def test_tables_are_a_measurement_of_the_images(plate_run):
    import tifffile

    root, _ = plate_run
    plate = root / "results" / "SYN0001"
    image = np.stack([tifffile.imread(plate / "Images" / f"r02c05f01p01-ch{c}sk1fk1fl1.tiff") for c in (1, 2, 3)])
    assert image.dtype == np.uint16 and image.shape == (3, 128, 128)
    stored = pd.read_csv(plate / "analysis" / "SYN0001-B05-1" / "Nuclei.csv")
    remeasured = measure_field(image, CHANNELS, image_number=int(stored["ImageNumber"].iloc[0]), **PIPELINE)["Nuclei"]
    pd.testing.assert_frame_equal(remeasured, stored, check_dtype=False, rtol=1e-9)


def test_measure_plates_matches_written_results(plate_run, lab):
    root, _ = plate_run
    written = read_results(root / "results")[0].cells
    wells = pd.DataFrame(small_layout(), columns=["well", "compound_id", "dose_um", "role"]).assign(barcode="SYN0001")
    memory = lab.measure_plates(wells, pd.DataFrame({"compound_id": list(SMILES), "smiles": list(SMILES.values())}))
    assert list(memory.columns) == list(written.columns)
    pd.testing.assert_frame_equal(memory, written, check_dtype=False, rtol=1e-9)


def test_reproducible_and_refuses_overwrite(tmp_path, lab):
    plates = write_plates(tmp_path / "plates", "SYN0001", small_layout()[:6])
    assert lab.run_plates(plates, tmp_path / "first") == ["SYN0001"]
    again = SyntheticLab(GroundTruth(world_seed=0), seed=5, config=CFG).run_plates(plates, tmp_path / "again")
    assert again == ["SYN0001"]
    a = read_results(tmp_path / "first")[0]
    b = read_results(tmp_path / "again")[0]
    assert a.fingerprint == b.fingerprint
    with pytest.raises(FileExistsError, match="SYN0001"):
        lab.run_plates(plates, tmp_path / "again")
    other = SyntheticLab(GroundTruth(world_seed=0), seed=6, config=CFG)
    other.run_plates(plates, tmp_path / "again", overwrite=True)
    c = read_results(tmp_path / "again")[0]
    assert c.fingerprint != a.fingerprint
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["SYN0001"]


def counts_and_medians(lab, cls, effect, n_sites=6, well="C05", barcode="PHENO"):
    frames = [measure_field(lab.render_condition(barcode, well, s, cls, effect), CHANNELS, **PIPELINE)
              for s in range(1, n_sites + 1)]
    tables = {k: pd.concat([f[k] for f in frames]) for k in frames[0]}
    return sum(len(f["Nuclei"]) for f in frames), tables


def test_phenotype_classes_change_the_intended_features(lab):
    n0, base = counts_and_medians(lab, "inactive", 0.0)
    med = lambda t, comp, col: float(t[comp][col].median())  # noqa: E731
    _, ne = counts_and_medians(lab, "nuclear_enlargement", 0.9)
    assert med(ne, "Nuclei", "AreaShape_Area") > 1.5 * med(base, "Nuclei", "AreaShape_Area")
    assert med(ne, "Nuclei", "Intensity_IntegratedIntensity_DNA") > 1.5 * med(base, "Nuclei", "Intensity_IntegratedIntensity_DNA")
    _, cd = counts_and_medians(lab, "cytoskeletal_disruption", 0.9)
    assert med(cd, "Cytoplasm", "Intensity_MeanIntensity_Tubulin") > 1.2 * med(base, "Cytoplasm", "Intensity_MeanIntensity_Tubulin")
    assert med(cd, "Cells", "AreaShape_Area") < 0.9 * med(base, "Cells", "AreaShape_Area")
    assert med(cd, "Cells", "Texture_Contrast_Tubulin") < 0.7 * med(base, "Cells", "Texture_Contrast_Tubulin")
    _, ad = counts_and_medians(lab, "actin_disruption", 0.9)
    assert med(ad, "Cells", "Intensity_MeanIntensity_Actin") < 0.9 * med(base, "Cells", "Intensity_MeanIntensity_Actin")
    assert med(ad, "Cells", "Texture_Entropy_Actin") < 0.7 * med(base, "Cells", "Texture_Entropy_Actin")
    assert med(ad, "Cells", "AreaShape_Area") < 0.85 * med(base, "Cells", "AreaShape_Area")
    assert abs(med(ad, "Nuclei", "AreaShape_Area") / med(base, "Nuclei", "AreaShape_Area") - 1) < 0.15
    n_tox, tox = counts_and_medians(lab, "toxicity", 0.9)
    assert n_tox < 0.5 * n0
    assert med(tox, "Nuclei", "Intensity_MeanIntensity_DNA") > 1.2 * med(base, "Nuclei", "Intensity_MeanIntensity_DNA")


class FixedTruth:
    """Stand-in ground truth: every compound enlarges nuclei with ec50 1 uM (checks the lab's dose path)."""

    def for_smiles(self, smiles):
        return pd.DataFrame({"smiles": list(smiles), "is_active": True, "phenotype_class": "nuclear_enlargement",
                             "ec50_um": 1.0, "hill_n": 1.5, "emax": 1.0})

    def response(self, smiles, dose_um):
        return np.full(len(smiles), float(dose_um) ** 1.5 / (1.0 + float(dose_um) ** 1.5))


def test_dose_response_follows_the_hill_curve():
    lab = SyntheticLab(FixedTruth(), seed=1, config=CFG)
    doses = [0.0, 0.1, 1.0, 30.0]
    wells = pd.DataFrame({"barcode": "DOSE", "well": [well_name(2 + r, 2 + c) for c in range(4) for r in range(3)],
                          "compound_id": "CMP-1", "smiles": SMILES["CMP-1"],
                          "dose_um": [d for d in doses for _ in range(3)], "role": "treatment"})
    cells = lab.measure_plates(wells)
    area = cells.groupby("Metadata_Well")["Nuclei_AreaShape_Area"].median()
    by_dose = [area[wells.loc[wells["dose_um"] == d, "well"]].mean() for d in doses]
    assert by_dose[0] < by_dose[2] < by_dose[3]
    assert by_dose[3] > 1.6 * by_dose[0]
    assert abs(by_dose[1] / by_dose[0] - 1) < 0.15  # 0.1 uM: ~3% effect


def test_plate_and_edge_effects(lab):
    a = lab.render_condition("PLATE-A", "C05", 1, "inactive", 0.0)
    assert np.array_equal(a, lab.render_condition("PLATE-A", "C05", 1, "inactive", 0.0))
    b = lab.render_condition("PLATE-B", "C05", 1, "inactive", 0.0)
    assert not np.array_equal(a, b)
    edge = [well_name(0, c) for c in range(4, 12)] + [well_name(r, 23) for r in range(4, 12)]
    inner = [well_name(5 + r, 3 + c) for r in range(2) for c in range(8)]
    count = lambda ws: np.mean([len(measure_field(lab.render_condition("EDGE", w, 1, "inactive", 0.0), CHANNELS)["Nuclei"])  # noqa: E731
                                for w in ws])
    assert count(edge) < 0.9 * count(inner)


def test_positive_control_and_layout_errors(lab):
    wells = pd.DataFrame({"barcode": "PC", "well": ["A01", "A02"], "compound_id": ["", "UNKNOWN"], "dose_um": [0.0, 1.0],
                          "role": ["negative_control", "positive_control"]})
    no_compounds = pd.DataFrame({"compound_id": [], "smiles": []})
    table = wells_from_layouts(wells, no_compounds)
    assert table.loc[1, "role"] == "positive_control"
    assert CFG.positive_control_class == "cytoskeletal_disruption"
    cells = lab.measure_plates(wells, no_compounds)  # positive control: tubulin up whatever the compound
    tub = cells.groupby("Metadata_Well")["Cells_Intensity_MeanIntensity_Tubulin"].median()
    assert tub["A02"] > 1.3 * tub["A01"]
    bad = wells.assign(role=["negative_control", "treatment"])
    with pytest.raises(ValueError, match="PC, well A02"):
        wells_from_layouts(bad, pd.DataFrame({"compound_id": [], "smiles": []}))
    with pytest.raises(ValueError, match="plate PC, well Z99"):
        wells_from_layouts(wells.assign(well=["A01", "Z99"]), None)
    with pytest.raises(ValueError, match="channels"):
        SyntheticLabConfig(channels=("DNA", "ER"))


def test_measure_plates_96_wells_is_fast():
    lab = SyntheticLab(GroundTruth(world_seed=0), seed=0)  # default config (160 px fields)
    wells = pd.DataFrame({"barcode": "FAST", "well": [well_name(r, c) for r in range(4) for c in range(6)],
                          "compound_id": "", "dose_um": 0.0, "role": "negative_control"})
    t0 = time.process_time()
    cells = lab.measure_plates(wells, None)
    elapsed = time.process_time() - t0
    assert cells["Metadata_Well"].nunique() == 24 and len(cells) > 24 * 8
    assert elapsed < 24 * 0.5  # CPU time: ~0.07 s per well


def test_tables_only_mode(tmp_path):
    from dataclasses import replace

    plates = write_plates(tmp_path / "plates", "SYN0002", small_layout()[:4])
    lab = SyntheticLab(GroundTruth(world_seed=0), seed=5, config=replace(CFG, write_images=False))
    lab.run_plates(plates, tmp_path / "results")
    plate_dir = tmp_path / "results" / "SYN0002"
    assert not (plate_dir / "Images").exists()
    image = pd.read_csv(plate_dir / "analysis" / "SYN0002-A01-1" / "Image.csv", keep_default_na=False)
    assert image.loc[0, "FileName_DNA"] == ""
    assert read_results(tmp_path / "results")[0].image_count == 4


def test_wells_without_cells_round_trip(tmp_path):
    from dataclasses import replace

    plates = write_plates(tmp_path / "plates", "SYN0003", small_layout()[:2])
    lab = SyntheticLab(GroundTruth(world_seed=0), seed=5, config=replace(CFG, cells_per_field=0.0))
    lab.run_plates(plates, tmp_path / "results")
    plate = read_results(tmp_path / "results")[0]
    assert plate.image_count == 2 and len(plate.cells) == 0
    assert "Nuclei_AreaShape_Area" in plate.cells.columns
    memory = lab.measure_plates(pd.DataFrame(small_layout()[:2], columns=["well", "compound_id", "dose_um", "role"])
                                .assign(barcode="SYN0003"), None)
    assert len(memory) == 0 and list(memory.columns) == list(plate.cells.columns)
