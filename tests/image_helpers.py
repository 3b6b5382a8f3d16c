"""Tiny synthetic crops and a tiny image-assay config shared by the image-assay tests."""

from dataclasses import replace

import numpy as np
import pandas as pd

from lab_io.crops import CropSet
from models.image_assay import ImageAssayConfig
from models.image_dit import DiTConfig


def _cell(rng, radius, size=20):
    yy, xx = np.mgrid[:size, :size]
    d2 = (yy - size / 2 + rng.normal()) ** 2 + (xx - size / 2 + rng.normal()) ** 2
    dna = 3000 * np.exp(-d2 / (2 * radius**2)) + 200
    cyto = 1500 * np.exp(-d2 / (2 * (2 * radius) ** 2)) + 150
    img = np.stack([dna, cyto, 0.5 * cyto], -1) + rng.normal(0, 20, (size, size, 3))
    return np.clip(img, 0, 65535).astype(np.uint16)


def tiny_crops(seed=0) -> CropSet:
    """24 synthetic 20 px cells: plate P1 (DMSO, 5 and 50 uM), plate P2 (DMSO, 15 uM); dose grows nuclei."""
    rng = np.random.default_rng(seed)
    rows = [("P1", 0.0), ("P1", 5.0), ("P1", 50.0), ("P2", 0.0), ("P2", 15.0)]
    counts = [6, 4, 4, 6, 4]
    images, meta = [], []
    for (plate, dose), n in zip(rows, counts):
        for i in range(n):
            images.append(_cell(rng, 2.0 + 0.5 * np.log10(1 + dose)))
            meta.append({"plate": plate, "well": f"C{i + 1:02d}", "compound": "DMSO" if dose == 0 else "cyclohexamide",
                         "concentration_um": dose})
    return CropSet(np.stack(images), pd.DataFrame(meta), ("DNA", "Tubulin", "Actin"))


def tiny_config(**kw) -> ImageAssayConfig:
    base = ImageAssayConfig(image_size=16, control_bank_size=4)
    cfg = replace(
        base, n_members=2,
        autoencoder=replace(base.autoencoder, base_channels=8, latent_channels=4, batch_size=8, max_steps=3,
                            decoder_steps=3),
        flow=replace(base.flow, mode="noise", batch_size=8, block_size=4, control_set_size=4, max_steps=3, n_steps=2,
                     checkpoint_every=2, dit=DiTConfig(hidden_dim=16, depth=2, n_heads=2)),
    )
    return replace(cfg, **kw)
