import numpy as np
import pytest
import torch

from models.virtual_assay import (
    CONTROL_STD_FLOOR,
    VirtualAssay,
    check_doses,
    check_fingerprints,
    profiles_from_cells,
)


class _ConstantAssay:
    """Minimal closed-form assay: every compound shifts all features by log10(dose)."""

    n_members = 2
    feature_names = ["Cells_a", "Cells_b"]
    version = "test"

    def predict_profiles(self, fingerprints, dose_um, *, n_cells=32, seed=0, plate_id=None, batch_size=256):
        fps = check_fingerprints(fingerprints)
        doses = check_doses(dose_um, len(fps))
        cells = torch.from_numpy(np.log10(doses))[:, None, None].expand(len(fps), n_cells, 2)
        prof = profiles_from_cells(cells, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
        return np.stack([prof.numpy().astype(np.float32)] * self.n_members)

    def predict_cells(self, fingerprint, dose_um, *, n_cells=32, seed=0, plate_id=None):
        return np.zeros((self.n_members, n_cells, 2), np.float32)


def test_protocol_is_runtime_checkable():
    assay = _ConstantAssay()
    assert isinstance(assay, VirtualAssay)
    out = assay.predict_profiles(np.zeros((3, 256), np.uint8), np.array([1.0, 10.0, 100.0]))
    assert out.shape == (2, 3, 2) and np.allclose(out[:, :, 0], [0, 1, 2])
    assert not isinstance(object(), VirtualAssay)


def test_profiles_from_cells_closed_form():
    cells = torch.tensor([[[1.0, 4.0], [3.0, 8.0]], [[0.0, 0.0], [0.0, 2.0]]])  # b=2, n=2, F=2
    mean, std = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0])
    out = profiles_from_cells(cells, mean, std)
    assert torch.allclose(out, torch.tensor([[(2 - 1) / 0.5, (6 - 2) / 2], [(0 - 1) / 0.5, (1 - 2) / 2]]))
    # a zero control std is floored, not a division by zero
    floored = profiles_from_cells(cells, mean, torch.zeros(2))
    assert torch.allclose(floored[0], torch.tensor([1.0, 4.0]) / CONTROL_STD_FLOOR)
    with pytest.raises(ValueError, match="b x n x F"):
        profiles_from_cells(cells[0], mean, std)


def test_check_fingerprints_and_doses():
    ok = check_fingerprints(np.zeros((2, 256), dtype=np.int64))
    assert ok.dtype == np.uint8
    with pytest.raises(ValueError, match="looks unpacked"):
        check_fingerprints(np.zeros((2, 2048), np.uint8))
    with pytest.raises(ValueError, match="N x 256"):
        check_fingerprints(np.zeros(256, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        check_fingerprints(np.full((1, 256), 300))
    with pytest.raises(ValueError, match="uint8"):
        check_fingerprints(np.zeros((1, 256), np.float32))
    assert check_doses([1, 2.5], 2).dtype == np.float64
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        check_doses([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="entry 1 is nan"):
        check_doses([1.0, np.nan], 2)
    with pytest.raises(ValueError, match="scalar"):
        check_doses(1.0, 1)
