"""Dose response of a trained image assay, including doses it never saw (below, between, above).

For one plate of a crops folder, its DMSO cells are split at random into two halves: the
*source* half conditions the model (as `loop assay evaluate` conditions on a plate's DMSO
cells) and the *reference* half is the real control set. For every requested dose the assay
generates ``--n`` cells of ``--compound`` (split over its members) and each set is scored
(FID on standardised morphology features, `models.image_eval`) against the real reference
DMSO cells and against the real treated cells of every dose the plate has. The source half
itself is the copy-control row: how close real DMSO cells come to the reference half. With
K > 1 members, each dose also gets the members' disagreement (`models.image_eval.member_disagreement`,
as `loop assay evaluate` reports it).

A sound dose response starts at the control (far below the trained doses the generated cells
score like the copy-control row against DMSO) and moves towards the real cells of each dose.

    nice .venv/bin/python benchmarks/bench_dose_response.py --model MODEL_DIR
        [--data ../shared/data/bbbc021] [--plate Week4_27801] [--compound cyclohexamide]
        [--doses 0.015,0.15,1.5,5,15,50] [--n 240] [--seed 7] [--threads 2] [--json OUT.json]

Logs a table (rows: the copy-control and each generated dose; columns: the real sets) and
writes it with the settings to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab_io.crops import load_crops  # noqa: E402
from models.image_assay import ImageAssay  # noqa: E402
from models.image_eval import (  # noqa: E402
    channel_scale, compare, featurize_set, member_disagreement, morph_standardisation,
)
from lab_io.crops import centre_crop  # noqa: E402

log = logging.getLogger("bench_dose_response")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", type=Path, default=Path("../shared/data/bbbc021"))
    p.add_argument("--plate", default="Week4_27801")
    p.add_argument("--compound", default="cyclohexamide")
    p.add_argument("--doses", default="0.015,0.15,1.5,5,15,50", help="comma-separated doses in uM")
    p.add_argument("--n", type=int, default=240, help="cells per set (generated, and at most this many real)")
    p.add_argument("--disagreement-cells", type=int, default=64, help="cells per member for the disagreement "
                   "(as `loop assay evaluate`)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def real_sets(crops, plate: str, compound: str, size: int, n: int, rng: np.random.Generator):
    """(source DMSO indices, {name: real crops}, per-channel scale) for the plate: the reference DMSO
    half and each treated dose, and the plate's intensity scale (``models.image_eval.channel_scale``)."""
    meta = crops.metadata
    on_plate = (meta["plate"] == plate).to_numpy()
    if not on_plate.any():
        raise ValueError(f"no crops of plate {plate!r}")
    control = np.flatnonzero(on_plate & crops.is_control)
    if len(control) < 4:
        raise ValueError(f"plate {plate!r} has {len(control)} DMSO cells; at least 4 are needed")
    control = rng.permutation(control)
    source, reference = control[: len(control) // 2], control[len(control) // 2:]
    sets = {"DMSO": reference[:n]}
    treated = on_plate & (meta["compound"].astype(str) == compound).to_numpy()
    for dose in sorted(meta.loc[treated, "concentration_um"].unique()):
        sets[f"{dose:g} uM"] = np.flatnonzero(treated & np.isclose(meta["concentration_um"], dose))[:n]
    plate_crops = centre_crop(crops.images[on_plate], size)
    positions = np.cumsum(on_plate) - 1  # crop index -> row of plate_crops
    real = {name: plate_crops[positions[idx]] for name, idx in sets.items()}
    return source, real, channel_scale(plate_crops)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    assay = ImageAssay.load(args.model)
    fingerprint = assay.training_fingerprint(args.compound)
    if fingerprint is None:
        raise SystemExit(f"{args.model}: {args.compound!r} is not a training compound of this assay")
    crops = load_crops(args.data)
    size, names, dna = assay.config.image_size, assay.channel_names, assay.config.dna_channel
    source, real, scale = real_sets(crops, args.plate, args.compound, size, args.n, np.random.default_rng(args.seed))
    real_feats = {name: featurize_set(x, scale, names, dna, inception=False) for name, x in real.items()}
    controls = assay.encode_controls(crops.images[source])
    rows = {"copy_control": featurize_set(centre_crop(crops.images[source[: args.n]], size), scale, names, dna,
                                          inception=False)}
    disagreement = {}
    for dose in (float(d) for d in args.doses.split(",")):
        log.info("generating %d cells at %g uM", args.n, dose)
        cells = assay.generate_ensemble(fingerprint, dose, controls, args.n, args.seed)
        rows[f"generated {dose:g} uM"] = featurize_set(cells, scale, names, dna, inception=False)
        if assay.n_members > 1:
            spread = member_disagreement(assay, fingerprint, dose, controls, args.disagreement_cells, args.seed)
            disagreement[f"{dose:g}"] = round(spread, 4)
    table = {}
    for real_name, r in real_feats.items():
        mean, std = morph_standardisation(r.morph)
        for row, g in rows.items():
            table.setdefault(row, {})[real_name] = round(compare(g, r, mean, std, seed=args.seed)["fid_morph"], 2)
    log.info("fid_morph against the real cells of plate %s (n %d per set)", args.plate, args.n)
    log.info("%-22s %s", "", "  ".join(f"{name:>9s}" for name in real_feats))
    for row, scores in table.items():
        log.info("%-22s %s", row, "  ".join(f"{scores[name]:9.1f}" for name in real_feats))
    if disagreement:
        log.info("member disagreement by dose (uM): %s", disagreement)
    result = {"model": str(args.model), "model_version": assay.version, "plate": args.plate,
              "compound": args.compound, "n": args.n, "seed": args.seed, "fid_morph": table,
              "member_disagreement": disagreement}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
