"""Where does the image assay lose to its own unconditional sample: in the flow or in the decoding?

For one plate and the treated doses on it, with a control-mode image assay (for instance the
plate hold-out model of issue #3), this compares three sets against the plate's real treated
cells of each dose:

* ``model``: cells generated for the compound at the dose (the assay's default guidance);
* ``unconditional``: the same model with the null compound token (guidance 1), as
  ``loop assay evaluate`` draws it;
* the real cells themselves (the reference).

It measures them twice:

1. **in the flow's latent space** (the autoencoder's standardised latents, where the flow
   works): ``trace`` (total variance, the set's spread) and ``mean_sq`` (squared distance of
   the set's mean from the real cells' mean), and ``travel`` (mean latent distance of a
   generated cell from the control cell it was transported from);
2. **in Inception space** (the features of ``loop assay evaluate``'s FID and KID): ``trace``,
   FID and KID against the real cells, once as the assay decodes (``detail``: the source
   control cell's residual added, ``ImageAssay.decode_generated``) and once ``plain`` (the
   decoder's output alone).

If the model is closer than the unconditional in latent space and in plain decoding but
loses with the detail residual, the loss is the decoding's, not the flow's (session 23,
``docs/STATUS_LOG.md``).

    .venv/bin/python benchmarks/bench_decode_gap.py --model MODEL_DIR
        [--data ../shared/data/bbbc021] [--plate Week4_27821] [--n 300] [--seed 0]
        [--threads 2] [--json decode_gap.json]

Takes about 7 minutes on the 2 CPU cores for two doses at n = 300.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab_io.crops import load_crops, shared_data_dir  # noqa: E402
from models.image_assay import ImageAssay  # noqa: E402
from models.image_eval import MIN_REAL_CELLS, channel_scale, fid, inception_features, kid  # noqa: E402
from lab_io.crops import centre_crop  # noqa: E402

log = logging.getLogger("bench_decode_gap")


def latent_stats(z: torch.Tensor, z_real: torch.Tensor) -> dict:
    """``trace`` and ``mean_sq`` of latents ``n x c x h x w`` against the real cells' latents."""
    a, r = z.flatten(1).double(), z_real.flatten(1).double()
    return {"trace": float(a.var(0).sum()), "mean_sq": float(((a.mean(0) - r.mean(0)) ** 2).sum())}


def inception_stats(features: np.ndarray, reference: np.ndarray, seed: int) -> dict:
    return {"trace": float(np.trace(np.cov(features.T))), "fid": fid(features, reference),
            "kid": kid(features, reference, seed=seed)}


def measure_dose(assay: ImageAssay, controls, real: np.ndarray, fingerprint: np.ndarray, dose_um: float,
                 scale: np.ndarray, n: int, seed: int) -> dict:
    """Latent and Inception statistics of the model's and the unconditional cells at one dose."""
    z_real = assay.encode_crops(real, "real")
    reference = inception_features(real, scale)
    sets = {
        "model": assay.generate_latents(0, fingerprint, dose_um, controls, n, seed),
        "unconditional": assay.generate_latents(0, None, 1.0, controls, n, seed + 1, unconditional=True,
                                                guidance_scale=1.0),
    }
    out = {"n_real": int(len(real))}
    for name, (z, idx) in sets.items():
        travel = float((z - controls.z[idx]).flatten(1).norm(dim=1).mean())
        detail = inception_features(assay.decode_generated(z, idx, controls), scale)
        plain = inception_features(assay.decode_generated(z, None, controls), scale)
        out[name] = {"latent": {**latent_stats(z, z_real), "travel": travel},
                     "inception_detail": inception_stats(detail, reference, seed),
                     "inception_plain": inception_stats(plain, reference, seed)}
    out["real"] = {"latent": latent_stats(z_real, z_real),
                   "inception": {"trace": float(np.trace(np.cov(reference.T)))}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=str(shared_data_dir() / "bbbc021"))
    p.add_argument("--plate", default="Week4_27821")
    p.add_argument("--compound", default="cyclohexamide")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="decode_gap.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    assay = ImageAssay.load(args.model)
    if assay.config.flow.mode != "control":
        raise SystemExit(f"{args.model}: a control-mode assay is needed (this one is {assay.config.flow.mode!r})")
    crops = load_crops(args.data)
    meta = crops.metadata
    on_plate = (meta["plate"] == args.plate).to_numpy()
    if not (on_plate & crops.is_control).any():
        raise SystemExit(f"{args.data}: plate {args.plate} has no DMSO cells to condition on")
    fingerprint = assay.training_fingerprint(args.compound)
    if fingerprint is None:
        raise SystemExit(f"{args.model}: {args.compound!r} is not a training compound of this assay")
    size = assay.config.image_size
    scale = channel_scale(centre_crop(crops.images[on_plate], size, args.data))
    controls = assay.encode_controls(crops.images[on_plate & crops.is_control], args.data)
    treated = on_plate & (meta["compound"] == args.compound).to_numpy()
    results = {"model": str(args.model), "model_version": assay.version, "plate": args.plate,
               "compound": args.compound, "n": args.n, "seed": args.seed, "doses": {}}
    for dose in sorted(set(meta.loc[treated, "concentration_um"].astype(float))):
        in_dose = treated & np.isclose(meta["concentration_um"].to_numpy(float), dose)
        if in_dose.sum() < MIN_REAL_CELLS:
            log.warning("plate %s %s %g uM: %d real cells, fewer than %d; skipped", args.plate, args.compound, dose,
                        in_dose.sum(), MIN_REAL_CELLS)
            continue
        real = centre_crop(crops.images[in_dose], size, args.data)
        r = measure_dose(assay, controls, real, fingerprint, dose, scale, args.n, args.seed)
        results["doses"][f"{dose:g}"] = r
        for name in ("model", "unconditional"):
            lat, det, pla = r[name]["latent"], r[name]["inception_detail"], r[name]["inception_plain"]
            log.info("%g uM %-13s latent trace %.0f mean_sq %.0f travel %.1f | detail trace %.1f FID %.2f KID %.4f"
                     " | plain trace %.1f FID %.2f KID %.4f", dose, name, lat["trace"], lat["mean_sq"], lat["travel"],
                     det["trace"], det["fid"], det["kid"], pla["trace"], pla["fid"], pla["kid"])
        log.info("%g uM %-13s latent trace %.0f | Inception trace %.1f (%d cells)", dose, "real",
                 r["real"]["latent"]["trace"], r["real"]["inception"]["trace"], r["n_real"])
    results["seconds"] = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps(results, indent=1))
    log.info("wrote %s (%.0f s)", args.json, results["seconds"])


if __name__ == "__main__":
    main()
