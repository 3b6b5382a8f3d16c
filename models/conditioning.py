"""Condition embeddings for the virtual assays: compound, dose, plate, time.

``ConditionEncoder(fingerprints, role, log10_dose_um, plate_index) -> cond: b x d``

* Compound: an MLP on the unpacked 2048-bit Morgan fingerprint, so unseen compounds
  get an embedding. The first layer is evaluated as a sum of weight rows over the
  "on" bits (``embedding_bag``), which is exactly ``Linear(bits)`` but ~50x cheaper on
  sparse fingerprints.
* Role of the compound slot (``role: b`` long):
  ``ROLE_COMPOUND`` uses the fingerprint and the dose;
  ``ROLE_CONTROL`` (DMSO, dose 0) uses a learned control token and a learned null-dose token;
  ``ROLE_NULL`` (label dropout / classifier-free guidance) uses a separate learned null token.
  Control and null are kept apart on purpose: if dropped-out treated cells shared the
  DMSO token, the model's predicted controls would be contaminated by treated cells
  and every predicted profile would be biased toward zero.
* Dose: sinusoidal features of ``log10(dose_um)`` -> MLP.
* Plate: embedding table with index 0 = unknown plate; callers pass ``plate_index`` in
  ``-1 .. n_plates-1`` where ``UNKNOWN_PLATE = -1`` (unseen plate, or dropped at train time).

Fingerprints arrive packed: ``uint8 b x 256`` from ``np.packbits`` (big bit order: the
first bit is the most significant bit of byte 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.virtual_assay import FINGERPRINT_N_BITS, FINGERPRINT_N_BYTES

ROLE_COMPOUND = 0
ROLE_CONTROL = 1
ROLE_NULL = 2
UNKNOWN_PLATE = -1

__all__ = [
    "ROLE_COMPOUND",
    "ROLE_CONTROL",
    "ROLE_NULL",
    "UNKNOWN_PLATE",
    "CompoundEncoder",
    "ConditionEncoder",
    "DoseEmbedding",
    "PlateEmbedding",
    "TimeEmbedding",
    "drop_labels",
    "sinusoidal_features",
    "unpack_fingerprint_bits",
]

_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def unpack_fingerprint_bits(packed: Tensor) -> Tensor:
    """``uint8 b x 256`` packed (np.packbits big bit order) -> ``bool b x 2048`` (same as np.unpackbits)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed fingerprints must be uint8, got {packed.dtype}")
    if packed.ndim != 2 or packed.shape[1] != FINGERPRINT_N_BYTES:
        raise ValueError(
            f"packed fingerprints must be b x {FINGERPRINT_N_BYTES}, got shape {tuple(packed.shape)}"
        )
    shifts = _BIT_SHIFTS.to(packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # b x 256 x 8
    return bits.reshape(packed.shape[0], FINGERPRINT_N_BITS).bool()


def sinusoidal_features(values: Tensor, n_frequencies: int, *, min_period: float, max_period: float) -> Tensor:
    """``b`` -> ``b x 2 n_frequencies``: sin/cos at geometrically spaced periods in [min, max]."""
    k = torch.arange(n_frequencies, device=values.device, dtype=torch.float32)
    if n_frequencies > 1:
        periods = min_period * (max_period / min_period) ** (k / (n_frequencies - 1))
    else:
        periods = torch.full_like(k, max_period)
    angles = 2 * math.pi * values.float()[:, None] / periods[None, :]  # b x n
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class CompoundEncoder(nn.Module):
    """MLP on the 2048 fingerprint bits: ``uint8 b x 256 -> b x d``."""

    def __init__(self, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        # first layer of the MLP, stored as an embedding table: weight[j] = column j of Linear(2048, h)
        self.bit_weight = nn.Parameter(torch.randn(FINGERPRINT_N_BITS, hidden_dim) / math.sqrt(64.0))
        self.bit_bias = nn.Parameter(torch.zeros(hidden_dim))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, out_dim))

    def first_layer(self, packed: Tensor, bit_scale: float = 1.0) -> Tensor:
        """``bit_scale * Linear(unpack(packed))`` evaluated sparsely: ``b x 256 -> b x h``.

        ``bit_scale`` = 1 / (1 - p) when a fraction p of the bits was dropped (inverted dropout).
        """
        bits = unpack_fingerprint_bits(packed)  # b x 2048
        rows, cols = bits.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=bits.shape[0])
        offsets = torch.cumsum(counts, 0) - counts
        summed = F.embedding_bag(cols, self.bit_weight, offsets, mode="sum")  # b x h
        return summed * bit_scale + self.bit_bias

    def forward(self, packed: Tensor, bit_scale: float = 1.0) -> Tensor:
        return self.out(self.first_layer(packed, bit_scale))  # b x d


class DoseEmbedding(nn.Module):
    """``log10(dose_um): b -> b x d`` (sinusoidal features of log-dose, then an MLP)."""

    def __init__(self, n_frequencies: int, out_dim: int) -> None:
        super().__init__()
        self.n_frequencies = n_frequencies
        self.mlp = nn.Sequential(
            nn.Linear(2 * n_frequencies + 1, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, log10_dose_um: Tensor) -> Tensor:
        # periods 0.5 .. 16 log10 units cover nM .. mM without wrapping
        feats = sinusoidal_features(log10_dose_um, self.n_frequencies, min_period=0.5, max_period=16.0)
        return self.mlp(torch.cat([log10_dose_um.float()[:, None] / 3.0, feats], dim=-1))


class TimeEmbedding(nn.Module):
    """Flow time ``t: b`` in [0, 1] -> ``b x d`` (sinusoidal features then an MLP)."""

    def __init__(self, n_frequencies: int, out_dim: int) -> None:
        super().__init__()
        self.n_frequencies = n_frequencies
        self.mlp = nn.Sequential(nn.Linear(2 * n_frequencies, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_features(t, self.n_frequencies, min_period=1e-3, max_period=4.0))


class PlateEmbedding(nn.Module):
    """``plate_index: b`` in ``-1 .. n_plates-1`` (``-1`` = unknown) -> ``b x d``."""

    def __init__(self, n_plates: int, out_dim: int) -> None:
        super().__init__()
        if n_plates < 0:
            raise ValueError(f"n_plates must be >= 0, got {n_plates}")
        self.n_plates = n_plates
        self.table = nn.Embedding(n_plates + 1, out_dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, plate_index: Tensor) -> Tensor:
        if plate_index.numel() and (plate_index.min() < UNKNOWN_PLATE or plate_index.max() >= self.n_plates):
            raise ValueError(
                f"plate_index must be in [-1, {self.n_plates - 1}] (-1 = unknown plate), "
                f"got range [{int(plate_index.min())}, {int(plate_index.max())}]"
            )
        return self.table(plate_index + 1)


class ConditionEncoder(nn.Module):
    """``(fingerprints uint8 b x 256, role b, log10_dose_um b, plate_index b) -> cond b x d``."""

    def __init__(self, n_plates: int, cond_dim: int, fp_hidden_dim: int, n_dose_frequencies: int) -> None:
        super().__init__()
        self.cond_dim = cond_dim
        self.compound = CompoundEncoder(fp_hidden_dim, cond_dim)
        self.dose = DoseEmbedding(n_dose_frequencies, cond_dim)
        self.plate = PlateEmbedding(n_plates, cond_dim)
        self.role_tokens = nn.Parameter(torch.randn(2, cond_dim) * 0.02)  # [control (DMSO), null]
        self.null_dose_token = nn.Parameter(torch.zeros(cond_dim))
        self.fuse = nn.Sequential(nn.Linear(3 * cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, fingerprints: Tensor, role: Tensor, log10_dose_um: Tensor, plate_index: Tensor) -> Tensor:
        b = role.shape[0]
        if fingerprints.shape[0] != b or log10_dose_um.shape != (b,) or plate_index.shape != (b,):
            raise ValueError(
                f"condition inputs disagree on b: fingerprints {tuple(fingerprints.shape)}, role {tuple(role.shape)}, "
                f"log10_dose_um {tuple(log10_dose_um.shape)}, plate_index {tuple(plate_index.shape)}"
            )
        return self._encode(lambda idx: self.compound(fingerprints[idx]), role, log10_dose_um, plate_index)

    def forward_indexed(
        self, fingerprint_table: Tensor, compound_index: Tensor, role: Tensor, log10_dose_um: Tensor,
        plate_index: Tensor, *, p_drop_bits: float = 0.0, generator: torch.Generator | None = None,
    ) -> Tensor:
        """Same as ``forward(fingerprint_table[compound_index], ...)`` but embeds each distinct
        compound of the batch once (training batches repeat compounds). ``b x d``.

        ``p_drop_bits`` > 0 (training only) drops each set fingerprint bit with that probability,
        drawn from ``generator``, and rescales the rest: the embedding must then rest on many
        substructures rather than memorise a compound by its rare bits, so it generalises to
        unseen neighbours.
        """
        def embed(idx: Tensor) -> Tensor:
            uniq, inverse = torch.unique(compound_index[idx], return_inverse=True)
            packed = fingerprint_table[uniq]  # u x 256
            if p_drop_bits <= 0:
                return self.compound(packed)[inverse]
            keep = torch.rand((packed.shape[0], packed.shape[1] * 8), generator=generator,
                              device=generator.device if generator is not None else packed.device) >= p_drop_bits
            weights = (2 ** torch.arange(7, -1, -1, device=packed.device, dtype=torch.int32))  # big bit order
            keep_bytes = (keep.to(packed.device).view(packed.shape[0], packed.shape[1], 8).int() * weights).sum(-1)
            dropped = packed & keep_bytes.to(packed.dtype)
            return self.compound(dropped, bit_scale=1.0 / (1.0 - p_drop_bits))[inverse]

        return self._encode(embed, role, log10_dose_um, plate_index)

    def _encode(self, embed_compounds, role: Tensor, log10_dose_um: Tensor, plate_index: Tensor) -> Tensor:
        b = role.shape[0]
        if role.numel() and (role.min() < ROLE_COMPOUND or role.max() > ROLE_NULL):
            raise ValueError("role must be ROLE_COMPOUND (0), ROLE_CONTROL (1) or ROLE_NULL (2)")
        is_compound = role == ROLE_COMPOUND
        d = self.cond_dim
        token_index = (role - 1).clamp(min=0)
        compound_emb = self.role_tokens[token_index]  # b x d
        dose_emb = self.null_dose_token.expand(b, d)  # b x d
        if bool(is_compound.any()):
            idx = is_compound.nonzero(as_tuple=True)[0]
            compound_emb = compound_emb.index_put((idx,), embed_compounds(idx).to(compound_emb.dtype))
            dose_emb = dose_emb.index_put((idx,), self.dose(log10_dose_um[idx]).to(dose_emb.dtype))
        plate_emb = self.plate(plate_index)  # b x d
        return self.fuse(torch.cat([compound_emb, dose_emb, plate_emb], dim=-1))  # b x d


def drop_labels(
    role: Tensor,
    plate_index: Tensor,
    *,
    p_compound: float,
    p_plate: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Label dropout for training: compound slot -> ROLE_NULL with prob ``p_compound``,
    plate -> UNKNOWN_PLATE with prob ``p_plate`` (independently, per row)."""
    b = role.shape[0]
    u = torch.rand(2, b, generator=generator, device=generator.device).to(role.device)
    role = torch.where(u[0] < p_compound, torch.full_like(role, ROLE_NULL), role)
    plate_index = torch.where(u[1] < p_plate, torch.full_like(plate_index, UNKNOWN_PLATE), plate_index)
    return role, plate_index
