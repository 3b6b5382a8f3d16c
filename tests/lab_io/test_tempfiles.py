"""Plate files and crops renamed into place get the modes mkdir / open would give, not tempfile's
owner-only 0700 / 0600, so a technician's or a pipeline's account can read them."""

import os
import stat

import numpy as np
import pandas as pd

from lab_io import platemap as pm
from lab_io.crops import CropSet, write_crops
from lab_io.tempfiles import make_temp_dir, make_temp_file


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_temporaries_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert _mode(make_temp_dir(tmp_path, "d")) == 0o750
        fd, path = make_temp_file(tmp_path, "f", ".tmp")
        os.close(fd)
        assert _mode(path) == 0o640
    finally:
        os.umask(old)


def test_plate_folders_and_crops_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        layouts = pm.design_plates([("C1", 10.0), ("C2", 10.0)], pm.PlateLayoutConfig(), seed=0, campaign_tag="T-")
        compounds = pd.DataFrame({"compound_id": ["C1", "C2"], "name": ["a", "b"], "smiles": ["CCO", "CCN"],
                                  "inchikey": ["K1", "K2"]})
        out = tmp_path / "plates"
        files = pm.write_plate_files(layouts, compounds, out)
        assert _mode(out) == 0o755 and all(_mode(path) == 0o644 for path in files.values())
        meta = pd.DataFrame({"plate": "P1", "well": "A01", "compound": ["DMSO", "C1"], "concentration_um": [0.0, 1.0]})
        write_crops(CropSet(np.zeros((2, 4, 4, 1), np.uint16), meta, ("DNA",)), tmp_path / "crops")
        assert all(_mode(path) == 0o644 for path in (tmp_path / "crops").iterdir())
    finally:
        os.umask(old)


def test_a_shared_group_folder_keeps_its_setgid_bit(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o2775)
    old = os.umask(0o002)
    try:
        plain = parent / "plain"
        plain.mkdir()
        assert _mode(make_temp_dir(parent, "d")) == _mode(plain) == 0o2775
    finally:
        os.umask(old)
