import os
from pathlib import Path

import pytest

from lab_io.phenix import PhenixKey, parse_phenix_name, phenix_name

SHARED = Path(os.environ.get("LOOP_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def test_phenix_name_format():
    assert phenix_name(7, 1, 1, 1, 1) == "r07c01f01p01-ch1sk1fk1fl1.tiff"
    assert phenix_name(16, 24, 3, 2, 5) == "r16c24f03p02-ch5sk1fk1fl1.tiff"


def test_round_trip_all_wells():
    for row in range(1, 17):
        for col in range(1, 25):
            key = parse_phenix_name(phenix_name(row, col, 2, 1, 3))
            assert (key.row, key.col, key.field, key.plane, key.channel) == (row, col, 2, 1, 3)
    assert parse_phenix_name(phenix_name(1, 1, 1, 1, 1)).well == "A01"
    assert parse_phenix_name(phenix_name(16, 24, 1, 1, 1)).well == "P24"


def test_parse_accepts_paths_and_tif():
    key = parse_phenix_name("/some/plate/Images/r03c12f09p01-ch2sk1fk1fl1.tif")
    assert key == PhenixKey(row=3, col=12, field=9, plane=1, channel=2, well="C12")


@pytest.mark.parametrize("bad", ["r07c01f01p01-ch1.tiff", "foo.tiff", "r17c01f01p01-ch1sk1fk1fl1.tiff",
                                 "r01c25f01p01-ch1sk1fk1fl1.tiff", "r00c01f01p01-ch1sk1fk1fl1.tiff",
                                 "r01c01f01p01-ch0sk1fk1fl1.tiff", "r01c01f01p01-ch1sk1fk1fl1.png"])
def test_parse_rejects_bad_names_naming_the_file(bad):
    with pytest.raises(ValueError, match=bad.split("/")[-1].replace(".", r"\.")):
        parse_phenix_name(bad)


def test_phenix_name_rejects_out_of_range():
    with pytest.raises(ValueError, match="row"):
        phenix_name(0, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="column"):
        phenix_name(1, 25, 1, 1, 1)


def test_real_jump_phenix_names():
    images = SHARED / "jump" / "fields" / "BR00123947" / "Images"
    if not images.exists():
        pytest.skip(f"real JUMP field not found at {images} (set LOOP_SHARED_DATA)")
    names = sorted(p.name for p in images.glob("*.tiff"))
    assert len(names) == 5
    keys = [parse_phenix_name(n) for n in names]
    assert {k.well for k in keys} == {"G01"}
    assert [k.channel for k in keys] == [1, 2, 3, 4, 5]
    assert all(k.field == 1 and k.plane == 1 for k in keys)
    assert [phenix_name(k.row, k.col, k.field, k.plane, k.channel) for k in keys] == names
