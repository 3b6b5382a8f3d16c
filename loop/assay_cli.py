"""``loop assay``: train, sample and evaluate the image virtual assay (thin wrappers over models/).

Intended full commands on the 2-core CPU (defaults: autoencoder <= 12 min, each member 1,000 steps, <= 45 min)::

    # plate hold-out: train on every plate but Week4_27821, evaluate on it
    loop assay train --data ../shared/data/bbbc021 --out runs/holdout --exclude-plate Week4_27821 --members 3 --executor ray
    loop assay evaluate --model runs/holdout --data ../shared/data/bbbc021 --plate Week4_27821 --json runs/holdout/eval.json
    # unseen dose: train without 15 uM (randomized priors: members disagree where no dose was measured)
    loop assay train --data ../shared/data/bbbc021 --out runs/no15 --exclude-dose 15 --members 3 --prior-scale 0.05 --executor ray
    loop assay sample --model runs/no15 --compound cyclohexamide --dose-um 15 --controls Week4_27801 --n 64 --out gen.npz
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

assay_app = typer.Typer(help="Image virtual assay: conditional flow matching on single-cell crops.",
                        no_args_is_help=True)
log = logging.getLogger("loop.assay")


def _setup(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other value must name a usable torch device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...): {err}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA GPU is visible to this process (use --device cpu or auto)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: this process sees {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: only cpu and cuda are supported")
    return str(parsed)


DEVICE_HELP = "auto (a GPU when one is visible, else the CPU), cpu or cuda[:i]: where sampling and Inception run."


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@assay_app.command("train")
def train(
    data: Path = typer.Option(..., "--data", help="Crops folder (crops.npz + crops_metadata.csv), or a folder of "
                              "them such as a campaign's measurements/ (the <barcode>.crops folders `loop ingest "
                              "--crops-px` writes), read as their union."),
    out: Path = typer.Option(..., "--out", help="Model folder (created; an existing one is resumed)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Source of the flow: noise | control (default: control)."),
    members: int = typer.Option(1, "--members", min=1, help="Ensemble size K."),
    executor: str = typer.Option("local", "--executor", help="local | ray (one task per member)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (default: local)."),
    exclude_plate: List[str] = typer.Option([], "--exclude-plate", help="Plate to leave out (repeatable)."),
    exclude_dose: List[float] = typer.Option([], "--exclude-dose", help="Treated dose in uM to leave out (repeatable)."),
    seed: int = typer.Option(0, "--seed"),
    ae_minutes: Optional[float] = typer.Option(None, "--ae-minutes", help="Autoencoder wall-clock budget (default 12)."),
    ae_steps: Optional[int] = typer.Option(None, "--ae-steps", help="Autoencoder steps (default 2000)."),
    decoder_steps: Optional[int] = typer.Option(None, "--decoder-steps", help="Autoencoder stage 2: decoder steps on "
                                                "noisy latents, encoder frozen (default 800; 0: none, as models "
                                                "saved before it; see models.image_autoencoder)."),
    flow_minutes: Optional[float] = typer.Option(None, "--flow-minutes", help="Per-member flow wall-clock budget (default 45)."),
    flow_steps: Optional[int] = typer.Option(None, "--flow-steps", help="Per-member flow steps (default 1000)."),
    hidden_dim: Optional[int] = typer.Option(None, "--hidden-dim", help="DiT width (default 192)."),
    depth: Optional[int] = typer.Option(None, "--depth", help="DiT blocks (default 6)."),
    heads: Optional[int] = typer.Option(None, "--heads", help="DiT attention heads (default 6)."),
    prior_scale: Optional[float] = typer.Option(None, "--prior-scale", help="Randomized prior function amplitude "
                                                "per member (0: none; default 0.1 when --members > 1, else 0; "
                                                "see models.image_dit.RandomizedPrior)."),
    final_conv: Optional[bool] = typer.Option(None, "--final-conv/--no-final-conv", help="3x3 conv on the DiT's "
                                              "unpatchified velocity (smooths patch seams; U-ViT; default on)."),
    dose_gate: Optional[bool] = typer.Option(None, "--dose-gate/--no-dose-gate", help="Blend the control token into "
                                             "the compound embedding along a learned Hill curve of dose, so doses "
                                             "below the trained ones approach the control cells (default on)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale saved with "
                                             "the model for sampling (default 1.6; 1 = none)."),
    plain_decode: bool = typer.Option(False, "--plain-decode", help="Decode without the shot-noise gain on the "
                                      "transferred detail and without the plate's pixel floor (the decoding of "
                                      "models saved before both; see models.image_assay)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Flow batch (default 128; a multiple of "
                                            "--block-size)."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="Cells per plate block of a flow batch, "
                                             "the set each exact OT pairing is solved on (default 32; divides "
                                             "--batch-size)."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="Flow learning rate after warm-up: "
                                              "constant | cosine (decays to 0 at the last step)."),
    time_scheme: Optional[str] = typer.Option(None, "--time-scheme", help="uniform | logit_normal (default)."),
    time_logit_mean: Optional[float] = typer.Option(None, "--time-logit-mean", help="Location of the logit-normal "
                                                    "training times (default 0; below 0 more weight near the "
                                                    "control source)."),
    source_noise: Optional[float] = typer.Option(None, "--source-noise", help="Control mode: sigma of Gaussian noise "
                                                 "added to the source control latents, in training and sampling (default 0)."),
    source_noise_on: Optional[str] = typer.Option(None, "--source-noise-on", help="all (default) | treated: "
                                                  "--source-noise on every source cell, or only on those of "
                                                  "compound conditions (DMSO cells stay a map of the controls)."),
    guidance_gated: Optional[bool] = typer.Option(None, "--guidance-gated/--no-guidance-gated", help="Scale the "
                                                  "guidance with each compound's dose gate (on by default: none "
                                                  "for DMSO or a closed gate); saved with the model."),
    dna_channel: Optional[str] = typer.Option(None, "--dna-channel", help="Channel the nuclei are segmented on, "
                                              "by name or index (default: the one named DNA / DAPI / Hoechst, "
                                              "else channel 0)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Centre crop in px the model works at (multiple of 8; default 64)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
):
    """Train (or resume) an image assay ensemble."""
    _setup(threads)
    from lab_io.crops import CropsError, load_crops
    from models.image_assay import ImageAssayConfig, train_image_assay
    from models.image_dit import ENSEMBLE_PRIOR_SCALE
    from models.ray_executor import check_executor, ray_session

    try:
        check_executor(executor)  # before the crops are read or anything trains
    except ValueError as err:
        _fail(f"--executor: {err}")
    if prior_scale is None and members > 1:  # members then disagree where there are no data
        prior_scale = ENSEMBLE_PRIOR_SCALE
        log.info("%d members: randomized prior functions of scale %g (--prior-scale 0 turns them off)", members,
                 prior_scale)
    try:
        crops = load_crops(data)
        base = ImageAssayConfig()
        dit = _override(base.flow.dit, hidden_dim=hidden_dim, depth=depth, n_heads=heads, prior_scale=prior_scale,
                        final_conv=final_conv, dose_gate=dose_gate)
        flow = _override(base.flow, mode=mode, max_minutes=flow_minutes, max_steps=flow_steps, batch_size=batch_size,
                         block_size=block_size,
                         time_scheme=time_scheme, time_logit_mean=time_logit_mean, lr_schedule=lr_schedule,
                         source_noise=source_noise,
                         source_noise_on=source_noise_on,
                         guidance_scale=guidance, guidance_gated=guidance_gated)
        if plain_decode:
            base = replace(base, detail_shot_noise=False, pixel_floor_percentile=None)
        flow = _keep_stored_sampling(out, flow, guidance=guidance, guidance_gated=guidance_gated)
        config = replace(_override(base, image_size=image_size), n_members=members, seed=seed,
                         dna_channel=_channel_index(dna_channel, crops.channel_names, data),
                         exclude_plates=tuple(exclude_plate), exclude_doses_um=tuple(float(d) for d in exclude_dose),
                         flow=replace(flow, dit=dit),
                         autoencoder=_override(base.autoencoder, max_minutes=ae_minutes, max_steps=ae_steps,
                                                     decoder_steps=decoder_steps))
        with ray_session() if executor == "ray" else nullcontext():  # a local cluster it starts is stopped
            assay = train_image_assay(crops, out, config, executor=executor, ray_address=ray_address,
                                      source=str(data))
    except (CropsError, ValueError, OSError) as err:  # OSError: --out a file, read-only, a full disk
        _fail(str(err))
    typer.echo(f"trained image assay {assay.version} ({assay.n_members} member(s)) in {out}")


def _keep_stored_sampling(out: Path, flow, **given):
    """On resume, the sampling options stored with the model for those not given (``None``):
    rerunning ``train`` to add members must not change how the model samples. They are read from
    ``assay.json``, else from ``training_data.json`` (a training stopped before its record was written)."""
    from models.image_assay import SAMPLING_FIELDS, read_stored_config

    found = read_stored_config(out)
    if found is None:
        return flow
    stored = found[2].flow
    option = {"guidance": "guidance_scale", "guidance_gated": "guidance_gated"}
    given_fields = {option[k] for k, v in given.items() if v is not None}
    return replace(flow, **{f: getattr(stored, f) for f in SAMPLING_FIELDS if f not in given_fields})


def _channel_index(name_or_index: Optional[str], channel_names, source) -> Optional[int]:
    """``--dna-channel``: a channel name (case-insensitive) or index -> index; None stays None."""
    from lab_io.crops import channel_key

    if name_or_index is None:
        return None
    keys = [channel_key(c) for c in channel_names]
    if channel_key(name_or_index) in keys:
        return keys.index(channel_key(name_or_index))
    if name_or_index.strip().isdigit() and int(name_or_index) < len(keys):
        return int(name_or_index)
    raise ValueError(f"--dna-channel {name_or_index!r}: not a channel of {source} (channels: "
                     f"{list(channel_names)}, or an index 0..{len(keys) - 1})")


def _override(config, **values):
    """``config`` with the options the user gave (``None`` = keep the config's default)."""
    return replace(config, **{k: v for k, v in values.items() if v is not None})


def _controls(assay, controls: str, plate: Optional[str]):
    """(PlateControls, plate id, real crops of that plate or None) from a folder or a plate id."""
    from lab_io.crops import load_crops, reorder_channels

    path = Path(controls)
    if path.is_dir():
        crops = reorder_channels(load_crops(path), assay.channel_names, path)
        plates = crops.plates if plate is None else [plate]
        if len(plates) != 1:
            raise ValueError(f"{path}: holds plates {crops.plates}; choose one with --plate")
        if plates[0] not in crops.plates:
            raise ValueError(f"{path}: no plate {plates[0]!r} (plates there: {crops.plates})")
        on_plate = crops.subset((crops.metadata["plate"] == plates[0]).to_numpy())
        ctrl = on_plate.subset(on_plate.is_control)
        if len(ctrl) == 0:
            raise ValueError(f"{path}: plate {plates[0]} has no DMSO cells to condition on")
        return assay.encode_controls(ctrl.images, str(path)), plates[0], on_plate
    if path.exists() or "/" in controls or "\\" in controls or controls.endswith(".npz"):
        raise ValueError(f"{controls}: --controls takes a crops folder (with crops.npz and crops_metadata.csv) "
                         f"or a training plate id ({sorted(assay.control_bank)}); "
                         + ("this is a file, not a folder" if path.exists() else "no such folder"))
    if plate is not None and plate != controls:
        raise ValueError(f"--plate {plate} chooses a plate inside a crops folder, and --controls {controls} is no "
                         "folder (it is read as a training plate id); give a folder with --plate, or a plate id alone")
    return assay.plate_controls(controls), controls, None


@assay_app.command("sample")
def sample(
    model: Path = typer.Option(..., "--model", help="Model folder."),
    compound: str = typer.Option(..., "--compound", help="Compound name known to the model or in the BBBC021 name "
                                 "table, a SMILES, or DMSO."),
    dose_um: float = typer.Option(..., "--dose-um", help="Dose in micromolar (ignored for DMSO)."),
    controls: str = typer.Option(..., "--controls", help="Crops folder with the plate's DMSO cells, or a training plate id."),
    plate: Optional[str] = typer.Option(None, "--plate", help="Plate inside --controls when it holds several."),
    n: int = typer.Option(64, "--n", min=1, help="Cells to generate."),
    out: Path = typer.Option(..., "--out", help="Output FILE.npz (images uint16 n x H x W x C); the montage PNG "
                             "goes beside it as FILE.png."),
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Sampler steps (default: model config)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler | heun."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads"),
):
    """Generate cells for a compound at a dose on a plate, plus a montage next to real cells."""
    _setup(threads)
    from lab_io.crops import CropsError
    from models.image_assay import ImageAssay, applicability, channel_record, dose_support, resolve_compound_source

    try:
        png = _sample_outputs(out)
        if not np.isfinite(dose_um) or dose_um < 0:
            raise ValueError(f"dose_um must be a finite dose >= 0, got {dose_um:g}")
        assay = ImageAssay.load(model).to(resolve_device(device))
        fp, resolved_as = resolve_compound_source(assay, compound)
        compound = compound.strip()
        domain = applicability(assay, compound, fp)  # logs a warning when the compound is no analogue
        if fp is None:
            dose_um = 0.0  # the controls have no dose; do not record one that was not used
        else:
            domain |= dose_support(assay, compound, dose_um)  # logs a warning outside the trained doses
        source = _controls(assay, controls, plate)
        z_ctrl, plate_id, _ = source
        images = assay.generate_ensemble(fp, dose_um, z_ctrl, n, seed, n_steps=steps, sampler=sampler,
                                         guidance_scale=guidance)
    except (CropsError, ValueError, KeyError, FileNotFoundError) as err:
        _fail(err.args[0] if isinstance(err, KeyError) and err.args else str(err))
    flow = assay.config.flow
    stains = channel_record(assay, source[2])  # a positional model outputs the folder's stains
    try:
        _write_npz_atomically(out, images=images, member=assay.member_of_cells(n), compound=compound,
                              compound_resolved_as=resolved_as, dose_um=dose_um, plate=plate_id, seed=seed,
                              model=str(model.resolve()), model_version=assay.version, n_members=assay.n_members,
                              controls=str(Path(controls).resolve()) if Path(controls).is_dir() else controls,
                              channel_names=np.asarray(stains["channel_names"]),
                              channel_names_declared=stains["channel_names_declared"],
                              image_size_px=assay.config.image_size,
                              n_steps=flow.n_steps if steps is None else steps,
                              sampler=flow.sampler if sampler is None else sampler,
                              guidance_scale=flow.guidance_scale if guidance is None else guidance,
                              guidance_gated=flow.guidance_gated,
                              nearest_training_compound=str(domain.get("nearest_training_compound") or ""),
                              nearest_training_tanimoto=float(domain.get("nearest_training_tanimoto", np.nan)),
                              dose_range_um=np.asarray(domain.get("dose_range_um") or [np.nan, np.nan], float),
                              dose_in_training_range=domain.get("dose_in_training_range") is not False)
    except OSError as err:
        _fail(f"cannot write {out}: {err}")
    try:
        _save_sample_montage(assay, images, source, fp, compound, dose_um, png, stains["channel_names"])
    except Exception as err:  # the cells are saved; the picture of them is the lesser loss
        _fail(f"wrote {out} ({len(images)} cells), but not its montage {png}: {err}")
    typer.echo(f"wrote {out} ({len(images)} cells) and {png}")


def _sample_outputs(out: Path) -> Path:
    """The montage path beside ``out`` (FILE.npz -> FILE.png), refusing an ``out`` that is no .npz
    file or a folder, before any sampling is spent."""
    if out.suffix.lower() != ".npz":
        raise ValueError(f"--out {out}: give a FILE.npz (the montage goes beside it as FILE.png)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a FILE.npz")
    return out.with_suffix(".png")


def _write_npz_atomically(out: Path, **arrays) -> None:
    """``np.savez_compressed(out, **arrays)``, whole or not at all (``write_files_atomically``)."""
    from lab_io.tempfiles import write_files_atomically

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a handle: savez given a path would append .npz to it
            np.savez_compressed(handle, **arrays)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_files_atomically({out: write})


def _save_sample_montage(assay, images: np.ndarray, source, fp, compound: str, dose_um: float, png: Path,
                         channel_names, n_cols: int = 8) -> None:
    """The montage: generated cells taken evenly from every member, above real cells of the same
    condition on the plate or, when it has none, the plate's DMSO cells, each row block labelled."""
    from models.image_eval import save_montage

    _, plate_id, real_plate = source
    condition = "DMSO" if fp is None else f"{compound} {dose_um:g} uM"
    member = assay.member_of_cells(len(images))
    rank = np.concatenate([np.arange(c) for c in assay.member_counts(len(images))])
    shown = images[np.lexsort((member, rank))]  # member 0, 1, ..., K-1, then each member's next cell
    real, real_label = _real_reference(assay, source, fp, dose_um)
    save_montage(shown, real, png, title=f"{condition} on {plate_id}", n_cols=n_cols,
                 generated_label=f"generated {condition} ({assay.n_members} members)", real_label=real_label,
                 channel_names=channel_names)


def _real_reference(assay, source, fp, dose_um: float) -> tuple[np.ndarray | None, str]:
    """Real crops to show beside generated ones, and their label: the plate's cells of the same
    compound (matched by fingerprint, so a SMILES finds its named cells) and dose, else its DMSO
    cells (from the folder, or the model's stored controls for a training plate id)."""
    from lab_io.crops import centre_crop
    from models.image_assay import compound_fingerprints

    z_ctrl, plate_id, real_plate = source
    size = assay.config.image_size
    if real_plate is None:
        stored = None if z_ctrl is None else z_ctrl.images
        return stored, f"real DMSO on {plate_id} (the model's stored controls)"
    meta = real_plate.metadata
    if fp is not None:
        fps, _ = compound_fingerprints(assay, meta, f"plate {plate_id}")
        names = {name for name, f in fps.items() if f is not None and np.array_equal(f, fp)}
        same = (meta["compound"].astype(str).isin(names) & np.isclose(meta["concentration_um"], dose_um)).to_numpy()
        if same.any():
            return centre_crop(real_plate.subset(same).images, size), f"real, same compound and dose on {plate_id}"
    label = "real DMSO" if fp is None else f"real DMSO (no cells of this compound at this dose on {plate_id})"
    return centre_crop(real_plate.subset(real_plate.is_control).images, size), label


def _fmt(v) -> str:
    return "    n/a" if v is None else f"{v:8.4g}"


def _write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` whole or not at all (a temporary beside it, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def _partial_path(json_out: Path) -> Path:
    """Where a running evaluation keeps the plates it scored (``OUT.json.partial``; the --json file
    itself is written once, complete)."""
    return json_out.with_name(json_out.name + ".partial")


def _partial_evaluation(json_out: Path, resume: bool) -> dict | None:
    """The partial evaluation ``--resume`` continues (None: start afresh); a stopped run's partial
    file left without ``--resume`` is named before it is replaced."""
    partial_path = _partial_path(json_out)
    if not resume:
        if partial_path.is_file():
            typer.echo(f"{partial_path} holds a stopped evaluation; starting afresh (--resume continues it)", err=True)
        return None
    if not partial_path.is_file():
        if json_out.is_file():
            _fail(f"{json_out}: nothing to resume, it holds a complete evaluation (choose another --json)")
        typer.echo(f"{partial_path} does not exist: nothing to resume, starting afresh", err=True)
        return None
    try:
        previous = json.loads(partial_path.read_text())
    except (OSError, ValueError) as err:
        _fail(f"{partial_path}: cannot resume ({err})")
    if not (isinstance(previous, dict) and previous.get("complete") is False
            and isinstance(previous.get("plates_done"), list)):
        _fail(f"{partial_path}: cannot resume (not a partial evaluation)")
    typer.echo(f"resuming {partial_path}: plates {', '.join(previous['plates_done']) or 'none'} already scored",
               err=True)
    return previous


@assay_app.command("evaluate")
def evaluate(
    model: Path = typer.Option(..., "--model", help="Model folder."),
    data: Path = typer.Option(..., "--data", help="Crops folder (any; plates unseen in training are fine)."),
    json_out: Path = typer.Option(..., "--json", help="Output JSON."),
    plate: List[str] = typer.Option([], "--plate", help="Evaluate only these plates (repeatable)."),
    dose: List[float] = typer.Option([], "--dose", help="Evaluate only these doses in uM (repeatable)."),
    n_per_condition: int = typer.Option(200, "--n", min=4, help="Generated (and copy-control) cells per condition "
                                        "(at least 4, the fewest KID and its sampling noise take)."),
    max_real: Optional[int] = typer.Option(None, "--max-real", help="Subsample real treated cells per condition (default: all)."),
    min_real: int = typer.Option(10, "--min-real", help="Skip (and list) conditions with fewer real cells."),
    cross_doses: bool = typer.Option(False, "--cross-doses", help="Also score cells generated at the other doses."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: model config)."),
    inception: bool = typer.Option(True, "--inception/--no-inception", help="Inception metrics (slow on CPU); off: null."),
    ceiling: bool = typer.Option(False, "--ceiling", help="Also score autoencoder_ceiling: half the real treated "
                                 "cells encoded and decoded as generated cells are, against the other half."),
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Sampler steps (default: model config)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler | heun (default: model config); "
                                          "model and unconditional are sampled alike."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads"),
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped run with the same options: the plates "
                                "it scored are kept in OUT.json.partial as it goes ('complete': false)."),
):
    """FID / KID (Inception and morphology) per treated condition, next to the baselines."""
    _setup(threads)
    from lab_io.crops import CropsError, load_crops
    from models.image_assay import ImageAssay
    from models.image_eval import evaluate_assay

    previous = _partial_evaluation(json_out, resume)

    def keep_partial(partial: dict) -> None:  # a stopped run keeps the plates it scored; --resume continues it
        if partial["conditions"]:
            _write_json(_partial_path(json_out), partial)

    try:
        assay = ImageAssay.load(model).to(resolve_device(device))
        crops = load_crops(data)
        result = evaluate_assay(assay, crops, n_per_condition=n_per_condition, seed=seed, plates=plate or None,
                                doses_um=dose or None, n_steps=steps, sampler=sampler, source=str(data), max_real=max_real,
                                cross_doses=cross_doses, guidance_scale=guidance,
                                inception=inception, min_real=min_real, ceiling=ceiling, resume=previous,
                                on_plate=keep_partial)
    except (CropsError, ValueError, KeyError, FileNotFoundError) as err:
        _fail(err.args[0] if isinstance(err, KeyError) and err.args else str(err))
    _write_json(json_out, result)
    _partial_path(json_out).unlink(missing_ok=True)
    for cond in result["conditions"]:
        typer.echo(f"{cond['plate']} {cond['compound']} {cond['dose_um']:g} uM (n_real={cond['n_real']}):")
        rows = [(name, cond[name]) for name in ("model", "copy_control", "unconditional", "real_floor",
                                                "autoencoder_ceiling") if name in cond]
        rows += [(f"{name}@floor n={m['n']}", m) for name, m in cond.get("at_floor_sizes", {}).items()
                 if isinstance(m, dict)]
        rows += [(f"model@{d}uM", m) for d, m in cond.get("model_at_dose", {}).items()]
        rows += [(f"real@{d}uM", m) for d, m in cond.get("real_at_dose", {}).items()]
        for name, m in rows:
            typer.echo(f"  {name:>19}: " + "  ".join(f"{k} {_fmt(m[k])}" for k in
                                                      ("fid_inception", "kid_inception", "fid_morph", "kid_morph")))
        for base, spaces in cond.get("kid_difference", {}).items():
            typer.echo(f"  KID model - {base}: " + "  ".join(
                f"{space} {d['model_minus_baseline']:+.5f} (sd {d['sd']:.5f})"
                for space, d in spaces.items() if d is not None))
        if "ensemble_disagreement" in cond:
            typer.echo(f"  ensemble disagreement (mean member-profile variance): {cond['ensemble_disagreement']:.4f}")
    for s in result["skipped"]:
        where = " ".join(str(x) for x in (s["plate"], s["compound"]) if x)
        dose_text = "" if s["dose_um"] is None else f" {s['dose_um']:g} uM"
        typer.echo(f"skipped {where}{dose_text} (n_real={s['n_real']}): {s['reason']}")
    typer.echo(f"wrote {json_out}")
