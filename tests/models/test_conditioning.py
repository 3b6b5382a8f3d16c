import numpy as np
import pytest
import torch

from models.conditioning import (
    ROLE_COMPOUND,
    ROLE_CONTROL,
    ROLE_NULL,
    UNKNOWN_PLATE,
    ConditionEncoder,
    PlateEmbedding,
    drop_labels,
    unpack_fingerprint_bits,
)


def _packed(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.packbits(rng.random((n, 2048)) < 0.03, axis=1)


def _encoder(n_plates: int = 3) -> ConditionEncoder:
    torch.manual_seed(0)
    return ConditionEncoder(n_plates=n_plates, cond_dim=16, fp_hidden_dim=8, n_dose_frequencies=4)


def test_unpack_matches_numpy_unpackbits_big_bit_order():
    packed = _packed(5)
    packed[0, 0] = 0b1000_0001  # bit 0 (MSB of byte 0) and bit 7
    bits = unpack_fingerprint_bits(torch.from_numpy(packed))
    assert bits.shape == (5, 2048) and bits.dtype == torch.bool
    assert np.array_equal(bits.numpy(), np.unpackbits(packed, axis=1).astype(bool))
    assert bits[0, 0] and bits[0, 7] and not bits[0, 1:7].any()
    with pytest.raises(ValueError, match="b x 256"):
        unpack_fingerprint_bits(torch.zeros(2, 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        unpack_fingerprint_bits(torch.zeros(2, 256, dtype=torch.int64))


def test_compound_first_layer_equals_dense_linear_on_bits():
    enc = _encoder()
    packed = _packed(7, seed=1)
    packed[3] = 0  # an all-zero fingerprint gives the bias
    bits = torch.from_numpy(np.unpackbits(packed, axis=1).astype(np.float32))
    dense = bits @ enc.compound.bit_weight + enc.compound.bit_bias
    sparse = enc.compound.first_layer(torch.from_numpy(packed))
    assert torch.allclose(sparse, dense, atol=1e-5)
    assert torch.allclose(sparse[3], enc.compound.bit_bias)


def test_condition_shapes_tokens_and_doses():
    enc = _encoder()
    b = 6
    fps = torch.from_numpy(_packed(b))
    role = torch.tensor([ROLE_COMPOUND, ROLE_COMPOUND, ROLE_CONTROL, ROLE_NULL, ROLE_CONTROL, ROLE_COMPOUND])
    log_dose = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    plate = torch.tensor([0, 0, 1, 2, 1, UNKNOWN_PLATE])
    cond = enc(fps, role, log_dose, plate)
    assert cond.shape == (b, 16)
    # control rows ignore fingerprint and dose: rows 2 and 4 (same plate) are identical
    assert torch.allclose(cond[2], cond[4])
    other = enc(torch.from_numpy(_packed(b, seed=9)), role, torch.full((b,), 2.0), plate)
    assert torch.allclose(other[2], cond[2]) and torch.allclose(other[3], cond[3])
    assert not torch.allclose(other[0], cond[0])  # compound rows depend on the fingerprint
    # dose matters for compounds
    dosed = enc(fps, role, log_dose + 1.0, plate)
    assert not torch.allclose(dosed[0], cond[0])
    # control token != null token on the same plate
    same_plate = torch.tensor([1, 1])
    tokens = enc(fps[:2], torch.tensor([ROLE_CONTROL, ROLE_NULL]), torch.zeros(2), same_plate)
    assert not torch.allclose(tokens[0], tokens[1])
    # indexed path (training) equals the direct path
    table = fps[:3]
    ci = torch.tensor([2, 0, 0, 1, 2, 2])
    assert torch.allclose(enc.forward_indexed(table, ci, role, log_dose, plate), enc(table[ci], role, log_dose, plate),
                          atol=1e-6)


def test_condition_narrow_errors():
    enc = _encoder(n_plates=2)
    fps = torch.from_numpy(_packed(2))
    with pytest.raises(ValueError, match="disagree on b"):
        enc(fps, torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="plate_index must be in"):
        enc(fps, torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="role"):
        enc(fps, torch.tensor([0, 3]), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_plate_embedding_unknown_token_is_row_zero():
    emb = PlateEmbedding(n_plates=2, out_dim=4)
    out = emb(torch.tensor([UNKNOWN_PLATE, 0, 1]))
    assert torch.equal(out[0], emb.table.weight[0]) and torch.equal(out[2], emb.table.weight[2])


def test_drop_labels_rates_and_seed():
    n = 20_000
    role = torch.where(torch.arange(n) % 4 == 0, ROLE_CONTROL, ROLE_COMPOUND)
    plate = torch.arange(n) % 3
    r, p = drop_labels(role, plate, p_compound=0.1, p_plate=0.3, generator=torch.Generator().manual_seed(0))
    assert float((r == ROLE_NULL).float().mean()) == pytest.approx(0.1, abs=0.01)
    assert float((p == UNKNOWN_PLATE).float().mean()) == pytest.approx(0.3, abs=0.015)
    kept = r != ROLE_NULL
    assert torch.equal(r[kept], role[kept]) and torch.equal(p[p >= 0], plate[p >= 0])
    r2, p2 = drop_labels(role, plate, p_compound=0.1, p_plate=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r, r2) and torch.equal(p, p2)
    r0, p0 = drop_labels(role, plate, p_compound=0.0, p_plate=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(r0, role) and torch.equal(p0, plate)


def test_fingerprint_bit_dropout_is_seeded_unbiased_and_off_by_default():
    enc = _encoder()
    table = torch.from_numpy(_packed(4, seed=2))
    index = torch.tensor([0, 1, 2, 3, 0])
    role = torch.full((5,), ROLE_COMPOUND)
    dose, plate = torch.zeros(5), torch.zeros(5, dtype=torch.long)
    plain = enc(table[index], role, dose, plate)
    assert torch.equal(enc.forward_indexed(table, index, role, dose, plate), plain)

    def dropped(seed):
        return enc.forward_indexed(table, index, role, dose, plate, p_drop_bits=0.3,
                                   generator=torch.Generator().manual_seed(seed))

    assert torch.equal(dropped(1), dropped(1)) and not torch.equal(dropped(1), plain)
    # different seeds drop different bits
    assert not torch.equal(dropped(1), dropped(2))
