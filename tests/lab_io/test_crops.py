import json

import numpy as np
import pandas as pd
import pytest

from lab_io.crops import (
    CropsError, CropSet, centre_crop, compound_smiles, cut_crops, is_control_compound, load_crops, reorder_channels,
    shared_data_dir, write_crops,
)


def _crops(n=8, h=12, c=3, seed=0) -> CropSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60000, (n, h, h, c), dtype=np.uint16)
    meta = pd.DataFrame({
        "plate": ["P1"] * (n // 2) + ["P2"] * (n - n // 2),
        "well": [f"B{i + 2:02d}" for i in range(n)],
        "compound": ["DMSO", "cyclohexamide"] * (n // 2),
        "concentration_um": [0.0, 15.0] * (n // 2),
    })
    return CropSet(images, meta, ("DNA", "Tubulin", "Actin")[:c] if c <= 3 else tuple(f"c{i}" for i in range(c)))


def test_write_load_round_trip(tmp_path):
    crops = _crops()
    write_crops(crops, tmp_path / "c")
    back = load_crops(tmp_path / "c")
    assert np.array_equal(back.images, crops.images)
    assert back.channel_names == crops.channel_names
    assert list(back.metadata["compound"]) == list(crops.metadata["compound"])
    assert back.plates == ["P1", "P2"]
    assert list(back.is_control) == [True, False] * 4


def test_row_column_reorders_metadata(tmp_path):
    crops = _crops()
    write_crops(crops, tmp_path)
    meta = pd.read_csv(tmp_path / "crops_metadata.csv").iloc[::-1]
    meta.to_csv(tmp_path / "crops_metadata.csv", index=False)
    back = load_crops(tmp_path)
    assert list(back.metadata["well"]) == list(crops.metadata["well"])


def test_missing_images_names_file(tmp_path):
    write_crops(_crops(), tmp_path)
    (tmp_path / "crops.npz").unlink()
    with pytest.raises(CropsError, match="crops.npz"):
        load_crops(tmp_path)


def test_wrong_dtype_names_file(tmp_path):
    write_crops(_crops(), tmp_path)
    np.savez(tmp_path / "crops.npz", images=np.zeros((8, 12, 12, 3), np.float32))
    with pytest.raises(CropsError, match=r"crops\.npz.*uint16"):
        load_crops(tmp_path)


def test_missing_key_names_file(tmp_path):
    write_crops(_crops(), tmp_path)
    np.savez(tmp_path / "crops.npz", pixels=np.zeros((8, 12, 12, 3), np.uint16))
    with pytest.raises(CropsError, match="no key 'images'"):
        load_crops(tmp_path)


def test_missing_column_and_row_count(tmp_path):
    write_crops(_crops(), tmp_path)
    meta = pd.read_csv(tmp_path / "crops_metadata.csv")
    meta.drop(columns=["concentration_um"]).to_csv(tmp_path / "crops_metadata.csv", index=False)
    with pytest.raises(CropsError, match=r"crops_metadata\.csv.*concentration_um"):
        load_crops(tmp_path)
    meta.iloc[:5].to_csv(tmp_path / "crops_metadata.csv", index=False)
    with pytest.raises(CropsError, match="5 rows but crops.npz holds 8"):
        load_crops(tmp_path)


def test_bad_dose_names_line(tmp_path):
    write_crops(_crops(), tmp_path)
    meta = pd.read_csv(tmp_path / "crops_metadata.csv")
    meta["concentration_um"] = meta["concentration_um"].astype(object)
    meta.loc[3, "concentration_um"] = "lots"
    meta.to_csv(tmp_path / "crops_metadata.csv", index=False)
    with pytest.raises(CropsError, match="line 5"):
        load_crops(tmp_path)


def test_channels_json_mismatch(tmp_path):
    write_crops(_crops(), tmp_path)
    (tmp_path / "channels.json").write_text(json.dumps({"channel_names": ["DNA"]}))
    with pytest.raises(CropsError, match="channels.json"):
        load_crops(tmp_path)
    n = _crops().images.shape[3]
    for names in (["DNA"] * n, ["DNA", "dna "] + ["x"] * (n - 2), [""] * n):
        (tmp_path / "channels.json").write_text(json.dumps({"channel_names": names[:n]}))
        with pytest.raises(CropsError, match=r"channels.json: channel names must be non-empty and unique"):
            load_crops(tmp_path)


def test_not_a_folder(tmp_path):
    with pytest.raises(CropsError, match="not a folder"):
        load_crops(tmp_path / "nope")


def test_compound_smiles_fallback_and_column():
    meta = pd.DataFrame({"compound": ["DMSO", "cyclohexamide"]})
    table = compound_smiles(meta)
    assert table["DMSO"] == ""
    assert table["cyclohexamide"].startswith("C[C@H]1C[C@H](C)C(=O)")
    meta = pd.DataFrame({"compound": ["mystery", "DMSO"], "smiles": ["CCO", ""]})
    assert compound_smiles(meta)["mystery"] == "CCO"
    with pytest.raises(CropsError, match="x.csv: no SMILES for compound 'unknownium'"):
        compound_smiles(pd.DataFrame({"compound": ["unknownium"]}), "x.csv")
    lenient = compound_smiles(pd.DataFrame({"compound": ["unknownium", "cyclohexamide"]}), strict=False)
    assert set(lenient) == {"cyclohexamide"}


def test_is_control_compound():
    assert list(is_control_compound(["DMSO", "dmso ", "taxol"])) == [True, True, False]


@pytest.mark.skipif(not (shared_data_dir() / "bbbc021" / "crops.npz").is_file(),
                    reason="shared BBBC021 crops absent (../shared/data/bbbc021 or $LOOP_SHARED_DATA)")
def test_loads_real_bbbc021():
    crops = load_crops(shared_data_dir() / "bbbc021")
    assert crops.images.shape == (5873, 68, 68, 3)
    assert crops.channel_names == ("DNA", "Actin", "Tubulin")
    assert "Week4_27821" in crops.plates
    assert int(crops.is_control.sum()) == 842 + 899 + 534 + 1088 + 876


def test_a_failed_write_leaves_the_earlier_folder_whole(tmp_path, monkeypatch):
    """New images are never left beside old metadata: nothing is replaced until every file is written."""
    import pandas as pd

    first = _crops()
    write_crops(first, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = CropSet(first.images[::-1].copy(), first.metadata, first.channel_names)
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_crops(second, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file either


def test_cut_crops_closed_form():
    """Crop i is the field's ``size`` square whose top-left is round(centre) - size // 2, channels last;
    centres whose square would leave the field are not cut."""
    field = np.stack([np.arange(20 * 30).reshape(20, 30), 2 * np.arange(20 * 30).reshape(20, 30)]).astype(np.uint16)
    centres = np.array([[10.4, 15.6], [2.0, 15.0], [10.0, 28.0], [4.0, 4.0]])  # y, x
    crops, kept = cut_crops(field, centres, 8)
    assert kept.tolist() == [True, False, False, True] and crops.shape == (2, 8, 8, 2)
    assert np.array_equal(crops[0], np.moveaxis(field[:, 6:14, 12:20], 0, -1))
    assert np.array_equal(crops[1], np.moveaxis(field[:, 0:8, 0:8], 0, -1))
    with pytest.raises(CropsError, match="C x H x W"):
        cut_crops(field[0], centres, 8)


def test_a_folder_of_crops_folders_loads_as_their_union(tmp_path, caplog):
    a, b = _crops(seed=1), _crops(n=4, seed=2)
    write_crops(a, tmp_path / "m" / "P1.crops")
    write_crops(b, tmp_path / "m" / "P2.crops")
    (tmp_path / "m" / "P1.cells.parquet").write_bytes(b"")  # other files of a campaign's measurements/
    (tmp_path / "m" / "P9.cells.parquet").write_bytes(b"")  # a plate ingested without crops
    with caplog.at_level("WARNING"):
        both = load_crops(tmp_path / "m")
    assert "plate(s) ['P9'] were measured without crops" in caplog.text and "'P1'" not in caplog.text
    assert len(both) == 12 and np.array_equal(both.images, np.concatenate([a.images, b.images]))
    assert both.metadata["well"].tolist() == a.metadata["well"].tolist() + b.metadata["well"].tolist()
    small = _crops(n=2, h=10, seed=3)  # a later round cut at 10 px: every plate centre-cropped to 10
    write_crops(small, tmp_path / "m" / "P3.crops")
    union = load_crops(tmp_path / "m")
    assert union.images.shape == (14, 10, 10, 3)
    assert np.array_equal(union.images[:8], a.images[:, 1:11, 1:11]) and np.array_equal(union.images[12:], small.images)
    write_crops(_crops(n=2, c=2, seed=4), tmp_path / "m" / "P4.crops")  # other channels: no union
    with pytest.raises(CropsError, match="P4.crops: crops"):
        load_crops(tmp_path / "m")


def test_numeric_looking_plates_stay_text(tmp_path):
    crops = _crops()
    crops.metadata["plate"] = ["0101"] * len(crops)
    write_crops(crops, tmp_path)
    assert set(load_crops(tmp_path).metadata["plate"]) == {"0101"}


def test_compound_spellings_unify_and_dmso_may_have_no_dose(tmp_path, caplog):
    write_crops(_crops(), tmp_path)
    meta = pd.read_csv(tmp_path / "crops_metadata.csv")
    meta["compound"] = meta["compound"].astype(object)
    meta.loc[1, "compound"] = "Cyclohexamide"  # 1 of 4 treated rows
    meta.loc[3, "compound"] = " cyclohexamide "
    meta.loc[0, "concentration_um"] = np.nan  # a DMSO well without a concentration
    meta.to_csv(tmp_path / "crops_metadata.csv", index=False)
    back = load_crops(tmp_path)
    assert list(back.metadata["compound"]) == ["DMSO", "cyclohexamide"] * 4
    assert back.metadata.loc[0, "concentration_um"] == 0.0
    assert "'Cyclohexamide' / 'cyclohexamide'; all read as 'cyclohexamide'" in caplog.text
    meta.loc[5, "concentration_um"] = np.nan  # a treated cell without one stays an error, naming it
    meta.to_csv(tmp_path / "crops_metadata.csv", index=False)
    with pytest.raises(CropsError, match=r"line 7 \(P2 B07 cyclohexamide\) has none"):
        load_crops(tmp_path)


def test_reorder_channels_to_a_models_order(tmp_path):
    crops = _crops()
    flipped = CropSet(crops.images[..., ::-1].copy(), crops.metadata, ("actin", "Tubulin", "DNA"))
    back = reorder_channels(flipped, crops.channel_names, "here")
    assert back.channel_names == crops.channel_names and np.array_equal(back.images, crops.images)
    assert reorder_channels(crops, crops.channel_names, "here") is crops
    unnamed = CropSet(crops.images, crops.metadata, crops.channel_names, channels_named=False)  # no channels.json
    assert reorder_channels(unnamed, ("DNA", "ER", "Mito"), "here").channel_names == ("DNA", "ER", "Mito")
    with pytest.raises(CropsError, match=r"here: crops have 3 channels \['DNA', 'Tubulin', 'Actin'\] \(named in its "
                                         r"channels.json\); the model expects \['DNA', 'ER'"):
        reorder_channels(crops, ("DNA", "ER", "Mito"), "here")
    four = _crops(c=4)
    with pytest.raises(CropsError, match="expects"):
        reorder_channels(four, crops.channel_names, "here")


def test_centre_crop():
    img = np.arange(2 * 6 * 6 * 1).reshape(2, 6, 6, 1)
    out = centre_crop(img, 4)
    assert out.shape == (2, 4, 4, 1) and out[0, 0, 0, 0] == img[0, 1, 1, 0]
    with pytest.raises(ValueError, match="my.npz: crops are 6x6"):
        centre_crop(img, 8, "my.npz")


def test_written_crops_keep_whether_their_channels_were_named(tmp_path):
    """A folder read without declared names (no channels.json: BBBC021's defaults) and written again
    reads back as not named, so its defaults never come back as declared stains; declared names
    round-trip as declared, and a channels.json from before "named" was written counts as declared
    unless its names look like a default."""
    crops = _crops()
    write_crops(crops, tmp_path / "bare")
    (tmp_path / "bare" / "channels.json").unlink()
    bare = load_crops(tmp_path / "bare")
    assert bare.channels_named is False and bare.channel_names == ("DNA", "Actin", "Tubulin")
    write_crops(bare.subset(bare.metadata["plate"].eq("P1").to_numpy()), tmp_path / "sub")
    assert json.loads((tmp_path / "sub" / "channels.json").read_text()) == {
        "channel_names": ["DNA", "Actin", "Tubulin"], "named": False}
    sub = load_crops(tmp_path / "sub")
    assert sub.channels_named is False and sub.channel_names == ("DNA", "Actin", "Tubulin")
    write_crops(crops, tmp_path / "named")
    assert load_crops(tmp_path / "named").channels_named is True
    # a channels.json from before "named": declared, unless the names look like a default or ingest's
    # old guess (DNA, Tubulin, Actin for any 3-channel plate), which meant only the order
    (tmp_path / "named" / "channels.json").write_text(json.dumps({"channel_names": ["DNA", "ER", "Mito"]}))
    assert load_crops(tmp_path / "named").channels_named is True
    (tmp_path / "named" / "channels.json").write_text(json.dumps({"channel_names": ["DNA", "Tubulin", "Actin"]}))
    assert load_crops(tmp_path / "named").channels_named is False
    (tmp_path / "named" / "channels.json").write_text(json.dumps({"channel_names": ["DNA", "Tubulin", "Actin"],
                                                                  "named": "no"}))
    with pytest.raises(CropsError, match=r"channels.json: \"named\" must be true or false, got 'no'"):
        load_crops(tmp_path / "named")


def test_a_model_without_declared_names_takes_channels_by_position(caplog):
    """A model whose names are defaults (trained on crops without declared names) takes a folder's
    channels in the folder's order, warning when the folder declares them in another order; a model
    with declared names reorders declared channels by name and takes an unnamed folder by position,
    each with a warning; the synthetic lab's declared DNA, Tubulin, Actin pass silently either way."""
    from lab_io.crops import ChannelNames

    crops = _crops()  # declared DNA, Tubulin, Actin (as the synthetic lab's plates are)
    swapped = CropSet(crops.images[..., [0, 2, 1]].copy(), crops.metadata, ("DNA", "Actin", "Tubulin"))
    positional = ChannelNames(("DNA", "Tubulin", "Actin"), declared=False)
    with caplog.at_level("WARNING", logger="lab_io.crops"):
        assert reorder_channels(crops, positional, "here") is crops
        assert reorder_channels(crops, ChannelNames(crops.channel_names), "here") is crops
        assert not caplog.records
        fed = reorder_channels(swapped, positional, "here")
    assert fed is swapped and fed.channel_names == ("DNA", "Actin", "Tubulin")
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "taken by position" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lab_io.crops"):
        back = reorder_channels(swapped, ChannelNames(("DNA", "Tubulin", "Actin")), "here")
    assert np.array_equal(back.images, crops.images) and back.channel_names == ("DNA", "Tubulin", "Actin")
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "reordered to the model's" in caplog.text
    caplog.clear()
    unnamed = CropSet(swapped.images, crops.metadata, ("DNA", "Actin", "Tubulin"), channels_named=False)
    with caplog.at_level("WARNING", logger="lab_io.crops"):
        fed = reorder_channels(unnamed, ("DNA", "Tubulin", "Actin"), "here")
        assert reorder_channels(unnamed, positional, "here") is unnamed  # both positional: nothing to say
    assert np.array_equal(fed.images, swapped.images) and fed.channel_names == ("DNA", "Tubulin", "Actin")
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "without declared channel names" in caplog.text
    with pytest.raises(CropsError, match="the model expects"):
        reorder_channels(_crops(c=4), positional, "here")


def test_could_be_default_names():
    from lab_io.crops import could_be_default_names

    for names in (("DNA", "Tubulin", "Actin"), ("dna", "actin", "tubulin"), ("ch0", "ch1"), ("DNA", "Ch2", "Ch3"),
                  ("DNA", "Ch4", "Ch5"), ("Ch2", "Ch3", "Ch4")):
        assert could_be_default_names(names), names
    for names in (("DNA", "ER", "Mito"), ("Hoechst", "Tubulin", "Actin"), ("DNA", "Ch2", "AGP"), ()):
        assert not could_be_default_names(names), names


def test_channel_names_compare_by_letters_and_digits(caplog):
    """One normalisation: case, spaces and punctuation are ignored wherever channels are compared,
    and stored names keep letters and digits."""
    from lab_io.crops import channel_key

    crops = CropSet(_crops().images, _crops().metadata, (" DNA", "Hoechst 33342", "actin"))
    model = ("dna", "HOECHST33342", "Actin")
    with caplog.at_level("WARNING", logger="lab_io.crops"):
        assert reorder_channels(crops, model, "here") is crops
    assert not caplog.records
    flipped = CropSet(crops.images[..., ::-1].copy(), crops.metadata, ("Actin ", "hoechst33342", "DNA"))
    assert np.array_equal(reorder_channels(flipped, model, "here").images, crops.images)
    assert channel_key(" DNA") == channel_key("dna") == "dna"
    assert channel_key("Hoechst 33342") == channel_key("HOECHST33342") == channel_key("hoechst-33342")
    from lab_io.crops import channel_display_name

    assert channel_display_name(" Hoechst 33342 ") == "Hoechst33342"


def test_a_folder_of_crops_folders_takes_one_order_of_channels(tmp_path, caplog):
    """Plates whose declared channels differ in order or case are read in the first plate's order (a
    warning); plates that cannot be matched by name are refused naming both, said undeclared when so."""
    crops = _crops()
    write_crops(crops, tmp_path / "all" / "A.crops")
    write_crops(CropSet(crops.images[..., [2, 0, 1]].copy(), crops.metadata, ("actin", "DNA", "TUBULIN")),
                tmp_path / "all" / "B.crops")
    with caplog.at_level("WARNING", logger="lab_io.crops"):
        union = load_crops(tmp_path / "all")
    assert union.channel_names == ("DNA", "Tubulin", "Actin") and union.channels_named
    assert np.array_equal(union.images, np.concatenate([crops.images, crops.images]))
    assert "B.crops: channels ['actin', 'DNA', 'TUBULIN'] reordered to A.crops's" in caplog.text
    bare = CropSet(crops.images[..., [0, 2, 1]].copy(), crops.metadata, ("DNA", "Actin", "Tubulin"),
                   channels_named=False)
    write_crops(bare, tmp_path / "all" / "B.crops")
    with pytest.raises(CropsError, match=r"B.crops: crops .* channels \['DNA', 'Actin', 'Tubulin'\] \(not declared"):
        load_crops(tmp_path / "all")
