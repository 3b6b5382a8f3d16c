import os
import time
from pathlib import Path

import numpy as np
import pytest
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import regionprops

from lab_io.morphology import (
    TEXTURE_LEVELS,
    TEXTURE_RANGE_QUANTILES,
    cell_feature_names,
    featurize_crops,
    measure_field,
    measure_objects,
    object_feature_names,
    segment_cells,
    segment_nuclei,
)

CHANNELS = ["DNA", "Tubulin", "Actin"]
SHARED = Path(os.environ.get("LOOP_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def disk(shape, cy, cx, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def synthetic_cell_crop(size=68, r_nuc=10, r_cell=22, neighbour=True, seed=0):
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2
    crop = np.full((size, size, 3), 100.0)
    nuc = disk((size, size), c, c, r_nuc)
    cell = disk((size, size), c, c, r_cell)
    crop[..., 0][nuc] = 3000
    crop[..., 1][cell] = 1500
    crop[..., 2][cell & ~disk((size, size), c, c, r_cell - 3)] = 2500
    crop[..., 2][cell] += 300
    if neighbour:  # a second, brighter nucleus in the corner must be ignored
        crop[..., 0][disk((size, size), 4, 4, 6)] = 5000
    crop += rng.normal(0, 20, crop.shape)
    return crop


def test_feature_names_are_compartment_prefixed_and_unique():
    names = cell_feature_names(CHANNELS)
    assert len(names) == len(set(names)) == 3 * len(object_feature_names(CHANNELS))
    assert "Nuclei_AreaShape_Area" in names
    assert "Nuclei_Intensity_MeanIntensity_DNA" in names
    assert "Cells_Intensity_MeanIntensity_Tubulin" in names
    assert "Cells_Texture_Contrast_Actin" in names
    assert all(n.split("_")[0] in ("Nuclei", "Cells", "Cytoplasm") for n in names)


def test_intensity_stats_match_numpy_reference():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(30, 40))
    labels[:, :3] = 0
    image = rng.gamma(2.0, 100.0, size=(1, 30, 40))
    out = measure_objects(labels, image, ["DNA"], n_objects=4)  # label 4 has no pixels
    for k in range(1, 4):
        v = image[0][labels == k]
        assert out["Intensity_MeanIntensity_DNA"][k - 1] == pytest.approx(v.mean())
        assert out["Intensity_StdIntensity_DNA"][k - 1] == pytest.approx(v.std())
        assert out["Intensity_IntegratedIntensity_DNA"][k - 1] == pytest.approx(v.sum())
        assert out["Intensity_MinIntensity_DNA"][k - 1] == pytest.approx(v.min())
        assert out["Intensity_MaxIntensity_DNA"][k - 1] == pytest.approx(v.max())
        for name, q in [("LowerQuartile", 0.25), ("Median", 0.5), ("UpperQuartile", 0.75)]:
            assert out[f"Intensity_{name}Intensity_DNA"][k - 1] == pytest.approx(np.quantile(v, q))
    assert all(v[3] == 0 for v in out.values())  # empty object -> zeros, not NaN


def test_haralick_matches_skimage_graycomatrix():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(24, 24)).cumsum(axis=1)  # correlated along x
    labels = np.ones((24, 24), dtype=int)
    out = measure_objects(labels, image[None], ["Actin"], n_objects=1)
    ranked = np.sort(image.ravel())  # inward ranks, as measure_objects
    lo, hi = ranked[int(np.ceil(575 * TEXTURE_RANGE_QUANTILES[0]))], ranked[int(np.floor(575 * TEXTURE_RANGE_QUANTILES[1]))]
    q = np.clip(np.floor((image - lo) / (hi - lo) * TEXTURE_LEVELS), 0, TEXTURE_LEVELS - 1).astype(np.uint8)
    glcm = graycomatrix(q, [1], [0, np.pi / 2], levels=TEXTURE_LEVELS, symmetric=True)
    pooled = glcm.sum(axis=3, keepdims=True).astype(float)
    assert out["Texture_Contrast_Actin"][0] == pytest.approx(graycoprops(pooled, "contrast")[0, 0])
    assert out["Texture_InverseDifferenceMoment_Actin"][0] == pytest.approx(graycoprops(pooled, "homogeneity")[0, 0])
    assert out["Texture_AngularSecondMoment_Actin"][0] == pytest.approx(graycoprops(pooled, "ASM")[0, 0])
    assert out["Texture_Correlation_Actin"][0] == pytest.approx(graycoprops(pooled, "correlation")[0, 0])
    # smooth texture has lower contrast than white noise
    noise = measure_objects(labels, rng.normal(size=(1, 24, 24)), ["Actin"], n_objects=1)
    smooth = measure_objects(labels, np.add.outer(np.arange(24.0), np.arange(24.0))[None], ["Actin"], 1)
    assert smooth["Texture_Contrast_Actin"][0] < noise["Texture_Contrast_Actin"][0]


@pytest.mark.parametrize("radius", [4, 17])  # objects of about 50 and 900 px
def test_one_hot_pixel_barely_moves_texture(radius):
    rng = np.random.default_rng(3)
    image = 1000.0 + 50.0 * rng.normal(size=(40, 40)).cumsum(axis=1) / 6.0
    labels = disk((40, 40), 19.5, 19.5, radius).astype(int)
    hot = image.copy()
    hot[20, 20] = 3.0 * image.max()  # a cosmic ray / decoder artefact
    base = measure_objects(labels, image[None], ["DNA"], n_objects=1)
    moved = measure_objects(labels, hot[None], ["DNA"], n_objects=1)
    for f in ("AngularSecondMoment", "Entropy", "Contrast", "Correlation", "InverseDifferenceMoment"):
        a, b = base[f"Texture_{f}_DNA"][0], moved[f"Texture_{f}_DNA"][0]
        assert abs(b - a) <= 0.1 * max(abs(a), 1e-3), (f, a, b)


def test_shape_features_match_regionprops():
    labels = np.zeros((60, 60), dtype=int)
    yy, xx = np.ogrid[:60, :60]
    labels[((yy - 20) / 12.0) ** 2 + ((xx - 20) / 6.0) ** 2 <= 1] = 1
    labels[disk((60, 60), 45, 45, 8)] = 2
    out = measure_objects(labels, np.ones((1, 60, 60)), ["DNA"], n_objects=2, with_center=True)
    for k, rp in enumerate(regionprops(labels)):
        assert out["AreaShape_Area"][k] == rp.area
        assert out["AreaShape_Eccentricity"][k] == pytest.approx(rp.eccentricity)
        assert out["AreaShape_MajorAxisLength"][k] == pytest.approx(rp.axis_major_length)
        assert out["AreaShape_MinorAxisLength"][k] == pytest.approx(rp.axis_minor_length)
        assert out["AreaShape_Extent"][k] == pytest.approx(rp.extent)
        assert out["AreaShape_Solidity"][k] == pytest.approx(rp.solidity, rel=0.06)
        assert out["AreaShape_Perimeter"][k] == pytest.approx(rp.perimeter)
        assert out["AreaShape_Center_X"][k] == pytest.approx(rp.centroid[1])
        assert out["AreaShape_Center_Y"][k] == pytest.approx(rp.centroid[0])
    assert out["AreaShape_FormFactor"][1] == pytest.approx(
        4 * np.pi * out["AreaShape_Area"][1] / out["AreaShape_Perimeter"][1] ** 2)
    assert out["AreaShape_Eccentricity"][0] > 0.8 > out["AreaShape_Eccentricity"][1]


def test_segment_nuclei_splits_touching_nuclei():
    shape = (80, 80)
    dna = np.zeros(shape)
    dna[disk(shape, 40, 30, 9)] = 1000
    dna[disk(shape, 40, 46, 9)] = 1000  # overlapping pair
    dna[disk(shape, 15, 65, 7)] = 800
    labels = segment_nuclei(dna + np.random.default_rng(0).normal(0, 10, shape))
    assert labels.max() == 3
    areas = np.bincount(labels.ravel())[1:]
    assert areas.sum() == pytest.approx((dna > 0).sum(), rel=0.1)


def test_segment_cells_grows_from_nuclei_and_contains_them():
    shape = (80, 80)
    nuclei = np.zeros(shape, dtype=int)
    nuclei[disk(shape, 30, 30, 6)] = 1
    nuclei[disk(shape, 30, 55, 6)] = 2
    cyto = (disk(shape, 30, 30, 15) | disk(shape, 30, 55, 15)).astype(float)
    cells = segment_cells(nuclei, cyto)
    assert set(np.unique(cells)) == {0, 1, 2}
    assert np.all(cells[nuclei > 0] == nuclei[nuclei > 0])
    assert (cells == 1).sum() > (nuclei == 1).sum() * 3


def make_field(seed=0):
    shape = (3, 120, 120)
    rng = np.random.default_rng(seed)
    img = np.full(shape, 50.0)
    centres = [(30, 30), (30, 85), (85, 40), (88, 92), (3, 60)]  # the last touches the border
    for cy, cx in centres:
        img[1][disk(shape[1:], cy, cx, 18)] += 800
        img[2][disk(shape[1:], cy, cx, 18) & ~disk(shape[1:], cy, cx, 15)] += 1200
        img[0][disk(shape[1:], cy, cx, 8)] += 2000
    return img + rng.normal(0, 10, shape)


def test_measure_field_tables_follow_cellprofiler_layout():
    tables = measure_field(make_field(), CHANNELS, image_number=7)
    assert set(tables) == {"Nuclei", "Cells", "Cytoplasm"}
    nuc, cells, cyto = tables["Nuclei"], tables["Cells"], tables["Cytoplasm"]
    assert len(nuc) == len(cells) == len(cyto) == 4  # border nucleus discarded
    assert (nuc["ImageNumber"] == 7).all() and list(nuc["ObjectNumber"]) == [1, 2, 3, 4]
    assert list(cells["Parent_Nuclei"]) == [1, 2, 3, 4]
    assert list(cyto["Parent_Cells"]) == [1, 2, 3, 4]
    for t in tables.values():
        for col in ["AreaShape_Area", "AreaShape_Center_X", "AreaShape_Eccentricity", "AreaShape_Solidity",
                    "AreaShape_Perimeter", "Intensity_MeanIntensity_Tubulin", "Intensity_IntegratedIntensity_DNA",
                    "Intensity_StdIntensity_Actin", "Texture_Contrast_DNA"]:
            assert col in t.columns
        assert np.isfinite(t.to_numpy(dtype=float)).all()
    assert nuc["AreaShape_Area"].mean() == pytest.approx(np.pi * 8**2, rel=0.2)
    assert (cells["AreaShape_Area"] > 3 * nuc["AreaShape_Area"]).all()
    assert np.allclose(cells["AreaShape_Area"], nuc["AreaShape_Area"] + cyto["AreaShape_Area"])
    # nuclei are brighter in DNA than the cytoplasm
    assert (nuc["Intensity_MeanIntensity_DNA"] > 5 * cyto["Intensity_MeanIntensity_DNA"]).all()
    keep_all = measure_field(make_field(), CHANNELS, exclude_border=False)
    assert len(keep_all["Nuclei"]) == 5


def test_measure_field_empty_and_bad_input():
    empty = measure_field(np.zeros((3, 50, 50)), CHANNELS)
    assert all(len(t) == 0 for t in empty.values())
    assert "AreaShape_Area" in empty["Nuclei"].columns
    with pytest.raises(ValueError, match="channel names"):
        measure_field(np.zeros((3, 50, 50)), ["DNA"])
    with pytest.raises(ValueError, match="C x H x W"):
        measure_field(np.zeros((50, 50)), CHANNELS)


def test_featurize_crops_measures_the_centre_cell():
    crops = np.stack([synthetic_cell_crop(seed=s) for s in range(4)]
                     + [synthetic_cell_crop(r_nuc=14, seed=9)]).astype(np.float32)
    feats, names = featurize_crops(crops, CHANNELS)
    assert feats.dtype == np.float32 and feats.shape == (5, len(names))
    assert names == cell_feature_names(CHANNELS)
    f = dict(zip(names, feats.T))
    assert f["Nuclei_AreaShape_Area"][:4] == pytest.approx(np.pi * 10**2, rel=0.15)
    assert f["Nuclei_AreaShape_Area"][4] > 1.6 * f["Nuclei_AreaShape_Area"][0]
    assert f["Cells_AreaShape_Area"][:4] == pytest.approx(np.pi * 22**2, rel=0.15)
    assert f["Nuclei_Intensity_MeanIntensity_DNA"][:4] == pytest.approx(3000, rel=0.05)  # neighbour (5000) ignored
    assert f["Nuclei_AreaShape_Eccentricity"][0] < 0.4
    # cortical actin: the ring makes the cytoplasm's actin brighter than the nucleus'
    assert (f["Cytoplasm_Intensity_MeanIntensity_Actin"] > f["Nuclei_Intensity_MeanIntensity_Actin"]).all()
    again, _ = featurize_crops(crops, CHANNELS)
    assert np.array_equal(feats, again)
    u16, _ = featurize_crops(np.clip(crops, 0, None).astype(np.uint16), CHANNELS)
    assert np.isfinite(u16).all()


def test_touching_nuclei_specks_and_bright_neighbours_do_not_replace_the_centre_nucleus():
    size, c = 68, 33.5
    base = synthetic_cell_crop(neighbour=False)
    clean = dict(zip(cell_feature_names(CHANNELS), featurize_crops(base[None], CHANNELS)[0][0]))
    touching = base.copy()
    touching[..., 0][disk((size, size), c, c + 20, 10)] = 3000  # an identical nucleus touching it
    speck = base.copy()
    speck[..., 0][disk((size, size), 40, 53, 3)] = 3000  # a micronucleus (29 px) inside the cell
    dim = base.copy()
    dim[..., 0][disk((size, size), c, c, 10)] = 1500  # a dim centre nucleus ...
    dim[..., 0][disk((size, size), c, c + 19, 8)] = 12000  # ... beside a condensed, bright one
    feats, names = featurize_crops(np.stack([touching, speck, dim]), CHANNELS)
    f = dict(zip(names, feats.T))
    assert f["Nuclei_AreaShape_Area"][:2] == pytest.approx(clean["Nuclei_AreaShape_Area"], rel=0.15)
    assert f["Nuclei_AreaShape_Eccentricity"][0] < 0.4
    assert f["Cells_AreaShape_Area"][1] == pytest.approx(clean["Cells_AreaShape_Area"], rel=0.03)
    assert f["Cells_AreaShape_Eccentricity"][1] < 0.2
    assert f["Nuclei_Intensity_MedianIntensity_DNA"][2] == pytest.approx(1500, rel=0.1)  # the centre one


def test_featurize_crops_degenerate_inputs_are_finite_or_rejected(caplog):
    flat = np.zeros((2, 32, 32, 3), dtype=np.uint16)
    feats, names = featurize_crops(flat, CHANNELS)
    assert np.isfinite(feats).all() and feats.shape == (2, len(names))
    noise = np.random.default_rng(0).normal(1000, 50, (1, 48, 48, 3))  # a failed generated cell
    with caplog.at_level("INFO"):
        odd, _ = featurize_crops(noise, CHANNELS)
    assert "1 of 1 crops hold no nucleus above the background floor" in caplog.text
    assert np.isfinite(odd).all() and odd[0, 0] > 0  # measured without the floor, not missing
    assert featurize_crops(np.zeros((0, 32, 32, 3)), CHANNELS)[0].shape == (0, len(names))
    with pytest.raises(ValueError, match="N x H x W x C"):
        featurize_crops(np.zeros((32, 32, 3)), CHANNELS)
    with pytest.raises(ValueError, match="NaN"):
        featurize_crops(np.full((1, 8, 8, 3), np.nan), CHANNELS)
    with pytest.raises(ValueError, match="dna_channel"):
        featurize_crops(np.zeros((1, 8, 8, 3)), CHANNELS, dna_channel=3)


def test_featurize_real_bbbc021_crops_fast_and_finite():
    path = SHARED / "bbbc021" / "crops.npz"
    if not path.exists():
        pytest.skip(f"real BBBC021 crops not found at {path} (set LOOP_SHARED_DATA)")
    crops = np.load(path)["images"][:300]
    t0 = time.process_time()
    feats, names = featurize_crops(crops, CHANNELS)
    elapsed = time.process_time() - t0
    assert feats.shape == (300, len(names)) and np.isfinite(feats).all()
    assert elapsed < 10.0  # ~1-2 s on one core; generous for shared CI
    area = feats[:, names.index("Nuclei_AreaShape_Area")]
    cell_area = feats[:, names.index("Cells_AreaShape_Area")]
    assert np.median(area) > 100 and (cell_area >= area).all()


def test_perimeter_and_solidity_of_touching_objects_match_regionprops():
    from skimage.segmentation import watershed

    rng = np.random.default_rng(5)
    markers = np.zeros((70, 70), dtype=int)
    for k, (y, x) in enumerate(rng.integers(5, 65, size=(12, 2)), start=1):
        markers[y, x] = k
    mask = ndi_binary_blob(rng)
    labels = watershed(np.zeros((70, 70)), markers, mask=mask)
    n = int(labels.max())
    out = measure_objects(labels, np.ones((1, 70, 70)), ["DNA"], n_objects=n)
    for rp in regionprops(labels):
        k = rp.label - 1
        assert out["AreaShape_Perimeter"][k] == pytest.approx(rp.perimeter)
        assert out["AreaShape_Solidity"][k] == pytest.approx(rp.solidity, rel=0.06)


def ndi_binary_blob(rng):
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(rng.normal(size=(70, 70)), 4) > -0.02


def test_dna_channel_found_by_name(caplog):
    from lab_io.morphology import dna_channel_index

    assert dna_channel_index(["DNA", "Tubulin", "Actin"]) == 0
    assert dna_channel_index(["ER", "RNA", "AGP", "Mito", "DNA"]) == 4
    assert dna_channel_index(["Actin", "Hoechst 33342", "Tubulin"]) == 1
    assert dna_channel_index(["OrigER", "OrigDNA"]) == 1
    assert dna_channel_index(["Tubulin", "dapi"]) == 1
    assert dna_channel_index(["DNA-damage marker", "Hoechst"]) == 1  # an exact stain name first
    assert dna_channel_index(["NucleusGFP", "DAPI"]) == 1
    assert dna_channel_index(["ER", "DNA_ch1"]) == 1
    assert dna_channel_index(["Nucleolin", "DNase"], "other") == 0  # neither is a DNA stain: channel 0
    with caplog.at_level("WARNING"):
        assert dna_channel_index(["ch0", "ch1"], "my/crops") == 0
    assert "my/crops: no channel named as a DNA stain" in caplog.text and "channel 0 ('ch0')" in caplog.text
    # featurize_crops finds it (measure_field resolves dna_channel=None the same way)
    rng = np.random.default_rng(0)
    crop = rng.integers(100, 200, (1, 24, 24, 3)).astype(np.uint16)
    yy, xx = np.mgrid[:24, :24]
    crop[0, ..., 2] += (3000 * ((yy - 12) ** 2 + (xx - 12) ** 2 < 25)).astype(np.uint16)  # a nucleus in channel 2
    by_name, _ = featurize_crops(crop, ("Tubulin", "Actin", "DNA"))
    explicit, _ = featurize_crops(crop, ("Tubulin", "Actin", "DNA"), dna_channel=2)
    assert np.array_equal(by_name, explicit) and 60 < by_name[0, 0] < 120  # about pi 5^2, blurred by the smoothing


def test_cells_on_a_real_cell_painting_field_reach_their_cell_body():
    fields = SHARED / "jump" / "fields" / "BR00123947" / "Images"
    if not fields.exists():
        pytest.skip(f"real JUMP field not found at {fields} (set LOOP_SHARED_DATA)")
    import tifffile

    image = np.stack([tifffile.imread(fields / f"r07c01f01p01-ch{c}sk1fk1fl1.tiff") for c in range(1, 6)])
    names = ["DNA", "ER", "RNA", "AGP", "Mito"]
    tables = measure_field(image, names)
    ratio = float(np.median(tables["Cells"]["AreaShape_Area"] / tables["Nuclei"]["AreaShape_Area"]))
    assert 4.0 < ratio < 9.0  # CellProfiler on the same assay (BR00121431): 5.75 and 6.72
    plain = measure_field(image, names, cell_threshold="otsu", max_cell_expansion_px=20)
    assert np.median(plain["Cells"]["AreaShape_Area"] / plain["Nuclei"]["AreaShape_Area"]) < 3.0  # the ring only
    scaled = measure_field(image / 65535.0, names)  # the same field on a 0..1 scale
    np.testing.assert_allclose(scaled["Nuclei"]["AreaShape_Area"], tables["Nuclei"]["AreaShape_Area"], rtol=0.02)
    with pytest.raises(ValueError, match="cell_threshold"):
        measure_field(image, names, cell_threshold="triangle")


def _skimage_texture(block: np.ndarray) -> tuple[np.ndarray, dict]:
    """Reference: ``block`` (one whole rectangular object) quantised as measure_objects does (inward
    ranks), its symmetric GLCM over offsets (0, 1) and (1, 0) pooled and normalised, and graycoprops."""
    m = block.size
    ranked = np.sort(block.ravel())
    lo = ranked[int(np.ceil((m - 1) * TEXTURE_RANGE_QUANTILES[0]))]
    hi = ranked[int(np.floor((m - 1) * TEXTURE_RANGE_QUANTILES[1]))]
    q = np.clip(np.floor((block - lo) / (hi - lo) * TEXTURE_LEVELS), 0, TEXTURE_LEVELS - 1).astype(np.uint8)
    pooled = graycomatrix(q, [1], [0, np.pi / 2], levels=TEXTURE_LEVELS, symmetric=True).sum(axis=3, keepdims=True)
    p = pooled[:, :, 0, 0].astype(float) / pooled.sum()
    return p, {"Contrast": graycoprops(pooled.astype(float), "contrast")[0, 0],
               "AngularSecondMoment": graycoprops(pooled.astype(float), "ASM")[0, 0],
               "Correlation": graycoprops(pooled.astype(float), "correlation")[0, 0]}


def test_haralick_entropy_is_the_base_2_entropy_of_the_glcm():
    """Reference: ``-sum p log2 p`` of the pooled, normalised symmetric GLCM (CellProfiler's entropy)."""
    rng = np.random.default_rng(4)
    image = rng.normal(size=(24, 24)).cumsum(axis=1)
    out = measure_objects(np.ones((24, 24), dtype=int), image[None], ["Actin"], n_objects=1)
    p, _ = _skimage_texture(image)
    nz = p[p > 0]
    assert out["Texture_Entropy_Actin"][0] == pytest.approx(-(nz * np.log2(nz)).sum(), rel=1e-9)


def test_haralick_of_touching_objects_counts_only_pixel_pairs_inside_each_object():
    """Two rectangles sharing a border: each object's texture equals skimage's on its own pixels alone,
    whatever its neighbour holds (a pair across the border belongs to neither object's GLCM)."""
    rng = np.random.default_rng(5)
    labels = np.zeros((20, 30), dtype=int)
    labels[:, :14], labels[:, 14:] = 1, 2
    for neighbour_scale in (1.0, -30.0):
        image = rng.normal(size=(20, 30)).cumsum(axis=0)
        image[:, 14:] *= neighbour_scale
        out = measure_objects(labels, image[None], ["Actin"], n_objects=2)
        for k, block in enumerate((image[:, :14], image[:, 14:])):
            _, expected = _skimage_texture(block)
            for name, value in expected.items():
                assert out[f"Texture_{name}_Actin"][k] == pytest.approx(value, rel=1e-9, abs=1e-12), (k, name)
