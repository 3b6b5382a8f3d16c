"""Benchmark of the image virtual assay at its default CPU config.

Measures, on 64 px 3-channel crops (real BBBC021 crops when ``../shared/data`` is present, else
synthetic uint16 noise — speed does not depend on the pixels):

1. autoencoder training throughput (images / s, batch ``AutoencoderConfig.batch_size``);
2. flow (DiT) training throughput (cells / s, batch ``FlowConfig.batch_size``, control mode with
   per-plate OT pairing, i.e. the most expensive mode);
3. sampling throughput (cells / s, including decoding to uint16 crops) at 8, 20 and 50 Euler
   steps (and Heun at 20), for a batch of ``--n-cells`` cells from one member, without guidance
   and, as the assay samples by default, with classifier-free guidance (``FlowConfig.guidance_scale``:
   a second, unconditional velocity per step).

Times are medians over repeated steps / runs; the 1-minute load average before and after is
saved with the results because the CPU is shared.

Weights are freshly initialised unless ``--model`` points to a trained assay (throughput does
not depend on the weights).

    nice -n 10 .venv/bin/python benchmarks/bench_image_assay.py [--out bench_out/image_assay]
        [--threads 2] [--train-steps 5] [--n-cells 64] [--hidden-dim 192 --depth 6 --heads 6]
        [--device cuda]

With ``--device cuda`` the networks run on the GPU; batches are still drawn (and OT-paired) on
the CPU, as in training, and the device is synchronised around every timed call.

Writes ``results.json`` in ``--out`` and logs a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab_io.crops import load_crops, shared_data_dir  # noqa: E402
from models.image_assay import ImageAssay, ImageAssayConfig, LatentNorm, _latent_data  # noqa: E402
from models.image_autoencoder import ImageAutoencoder, _augment, decode_all, finetune_decoder  # noqa: E402
from models.image_dit import ImageDiT  # noqa: E402
from models.image_flow import (  # noqa: E402
    BlockSampler, ChannelNorm, sample_latents, sampling_condition, source_latents,
)
from lab_io.crops import centre_crop  # noqa: E402
from models.flow_matching import cfm_loss, sample_time  # noqa: E402

log = logging.getLogger("bench_image_assay")


def load_images(n: int, seed: int) -> tuple[np.ndarray, object]:
    path = shared_data_dir() / "bbbc021"
    if (path / "crops.npz").is_file():
        crops = load_crops(path)
        idx = np.random.default_rng(seed).choice(len(crops), min(n, len(crops)), replace=False)
        return crops.subset(np.sort(idx)), "bbbc021"
    log.warning("shared data absent: benchmarking on synthetic crops")
    raise SystemExit("the benchmark needs crops (../shared/data/bbbc021 or $LOOP_SHARED_DATA)")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(fn, n_steps: int, n_warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds per call over ``n_steps`` calls after ``n_warmup`` (robust to a shared, busy CPU;
    CUDA work is synchronised before each clock read)."""
    for _ in range(n_warmup):
        fn()
    times = []
    for _ in range(n_steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_autoencoder(x: torch.Tensor, config: ImageAssayConfig, n_steps: int, device: str) -> dict:
    cfg = replace(config.autoencoder, in_channels=x.shape[1])
    model = ImageAutoencoder(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        loss, _ = model.loss(_augment(x[idx], gen).to(device), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()

    sec = time_steps(step, n_steps, device=device)
    return {"batch_size": cfg.batch_size, "sec_per_step": sec, "images_per_s": cfg.batch_size / sec,
            "n_params": sum(p.numel() for p in model.parameters())}


def bench_decoder_stage(x: torch.Tensor, config: ImageAssayConfig, n_steps: int, device: str) -> dict:
    """Stage 2 of the autoencoder (decoder alone on noisy latents; models.image_autoencoder.finetune_decoder)."""
    cfg = replace(config.autoencoder, in_channels=x.shape[1], decoder_steps=n_steps)
    model = ImageAutoencoder(cfg)
    _sync(device)
    t0 = time.perf_counter()
    finetune_decoder(model, x, torch.ones(cfg.latent_channels), seed=0, device=device)
    _sync(device)
    sec = (time.perf_counter() - t0) / n_steps
    return {"batch_size": cfg.batch_size, "sec_per_step": sec, "images_per_s": cfg.batch_size / sec,
            "default_steps": config.autoencoder.decoder_steps,
            "default_minutes": config.autoencoder.decoder_steps * sec / 60}


def bench_flow(data, config: ImageAssayConfig, n_steps: int, device: str) -> dict:
    cfg = replace(config.flow, mode="control")
    model = ImageDiT(cfg.dit).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sampler = BlockSampler(data, cfg, np.ones(len(data.compounds)))
    state = {"s": 0}

    def step():
        s = state["s"]
        gen, rng = torch.Generator().manual_seed(s), np.random.default_rng(s)
        x_0, x_1, cond = sampler.draw(gen, rng)  # drawn (and OT-paired) on the CPU, as in training
        t = sample_time(len(x_0), gen, cfg.time_scheme).to(device)
        loss = cfm_loss(model, x_0.to(device), x_1.to(device), t, cond.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        state["s"] += 1

    sec = time_steps(step, n_steps, device=device)
    return {"batch_size": cfg.batch_size, "sec_per_step": sec, "cells_per_s": cfg.batch_size / sec,
            "n_params": sum(p.numel() for p in model.parameters())}


def bench_sampling(model: ImageDiT, ae: ImageAutoencoder, latent_norm: LatentNorm, norm: ChannelNorm,
                   z_ctrl: torch.Tensor, fp_bits: torch.Tensor, n_cells: int, mode: str, repeats: int = 3,
                   device: str = "cpu", guidance_scale: float = 1.0) -> dict:
    out = {}
    model, ae = model.to(device).eval(), ae.to(device).eval()
    dit = model.config
    shape = (dit.latent_channels, dit.latent_size, dit.latent_size)
    scales = [1.0] if guidance_scale == 1.0 else [1.0, guidance_scale]
    runs = [(sampler, steps, w) for w in scales for sampler, steps in (("euler", 8), ("euler", 20), ("euler", 50),
                                                                       ("heun", 20))]
    for sampler, steps, w in runs:
        cond = sampling_condition(fp_bits, 15.0, z_ctrl, n_cells, dit.latent_channels).to(device)

        def run():
            x_0 = source_latents(mode, n_cells, shape, z_ctrl, torch.Generator().manual_seed(0)).to(device)
            z = sample_latents(model, cond, x_0, n_steps=steps, sampler=sampler, guidance_scale=w)
            with torch.no_grad():
                norm.denormalize(decode_all(ae, latent_norm.invert(z)))

        sec = time_steps(run, repeats, n_warmup=1, device=device)
        name = f"{sampler}_{steps}" + ("" if w == 1.0 else f"_guidance{w:g}")
        out[name] = {"n_cells": n_cells, "seconds": sec, "cells_per_s": n_cells / sec, "guidance_scale": w}
        log.info("sampling %s %d steps, guidance %g: %.1f cells/s", sampler, steps, w, n_cells / sec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out/image_assay"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--n-cells", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed sampling runs per setting (median)")
    ap.add_argument("--n-images", type=int, default=1024)
    ap.add_argument("--hidden-dim", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--model", type=Path, default=None, help="trained assay folder (optional)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU timings synchronise the device)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    torch.set_num_threads(args.threads)
    config = ImageAssayConfig()
    dit = config.flow.dit
    dit = replace(dit, hidden_dim=args.hidden_dim or dit.hidden_dim, depth=args.depth or dit.depth,
                  n_heads=args.heads or dit.n_heads)
    config = replace(config, flow=replace(config.flow, dit=dit))

    crops, source = load_images(args.n_images, seed=0)
    norm = ChannelNorm.fit(centre_crop(crops.images, config.image_size))
    x = norm.normalize(centre_crop(crops.images, config.image_size))
    results = {"threads": args.threads, "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(),
               "data": source, "image_size": config.image_size, "channels": int(x.shape[1])}
    results["device"] = args.device
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(args.device)
    results["autoencoder_train"] = bench_autoencoder(x, config, args.train_steps, args.device)
    log.info("autoencoder training: %.1f images/s", results["autoencoder_train"]["images_per_s"])
    results["decoder_stage_train"] = bench_decoder_stage(x, config, args.train_steps, args.device)
    log.info("decoder stage 2: %.1f images/s, %.1f min for the default %d steps",
             results["decoder_stage_train"]["images_per_s"], results["decoder_stage_train"]["default_minutes"],
             config.autoencoder.decoder_steps)

    if args.model is not None:
        assay = ImageAssay.load(args.model)
        ae, latent_norm, norm, model = assay.autoencoder, assay.latent_norm, assay.norm, assay.members[0]
        config = assay.config
    else:
        ae = ImageAutoencoder(replace(config.autoencoder, in_channels=x.shape[1])).eval()
        with torch.no_grad():
            z_raw = torch.cat([ae.encode(x[i:i + 256]) for i in range(0, len(x), 256)])
        latent_norm = LatentNorm.fit(z_raw)
        dit = replace(config.flow.dit, latent_channels=z_raw.shape[1], latent_size=z_raw.shape[2])
        config = replace(config, flow=replace(config.flow, dit=dit))
        model = ImageDiT(dit).eval()
    with torch.no_grad():
        z = latent_norm.apply(torch.cat([ae.encode(x[i:i + 256]) for i in range(0, len(x), 256)]))
    from lab_io.crops import compound_smiles
    from lab_io.chem import morgan_fingerprints, unpack_fingerprints

    smiles = {k: v for k, v in compound_smiles(crops.metadata).items() if v}
    names = sorted(smiles)
    fps = morgan_fingerprints([smiles[n] for n in names])
    data = _latent_data(z, crops, names, fps)
    results["flow_train"] = bench_flow(data, config, args.train_steps, args.device)
    log.info("flow training: %.1f cells/s (%d params)", results["flow_train"]["cells_per_s"],
             results["flow_train"]["n_params"])
    ctrl_rows = data.controls_of_plate(0)
    z_ctrl = z[ctrl_rows[:256]]
    bits = torch.from_numpy(unpack_fingerprints(fps[:1])[0])
    results["sampling"] = bench_sampling(model, ae, latent_norm, norm, z_ctrl, bits, args.n_cells, "control",
                                        repeats=args.repeats, device=args.device,
                                        guidance_scale=config.flow.guidance_scale)
    results["load_avg_end"] = os.getloadavg()
    results["config"] = config.to_dict()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    log.info("wrote %s", args.out / "results.json")


if __name__ == "__main__":
    main()
