"""``loop``: the command line of the lab-in-the-loop system (typer)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.logging import RichHandler
from rich.table import Table

app = typer.Typer(help="Virtual assays in a closed loop with a Cell Painting lab.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
library_app = typer.Typer(help="Compound libraries.", no_args_is_help=True)
lab_app = typer.Typer(help="The synthetic lab (stands in for the wet lab).", no_args_is_help=True)
app.add_typer(library_app, name="library")
app.add_typer(lab_app, name="lab")
profiles_app = typer.Typer(help="Profile tables (pycytominer style).", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
objective_app = typer.Typer(help="What proposals maximise: activity, or a target phenotype.", no_args_is_help=True)
app.add_typer(objective_app, name="objective")
round_app = typer.Typer(help="Proposed rounds.", no_args_is_help=True)
app.add_typer(round_app, name="round")

console = Console(stderr=True)
out = Console()


class State:
    campaign_dir: Path = Path("campaign")
    db_url: Optional[str] = None


state = State()


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


@app.callback()
def main(
    campaign: Path = typer.Option(Path("campaign"), "--campaign", envvar="LOOP_CAMPAIGN",
                                  help="Campaign folder."),
    db_url: Optional[str] = typer.Option(None, "--db-url", envvar="LOOP_DB_URL",
                                         help="SQLAlchemy URL of the store (default: SQLite in the campaign)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
):
    state.campaign_dir = campaign
    state.db_url = db_url
    if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds like Ctrl-C: clean-up runs
        signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
    for noisy in ("prefect", "httpx", "ray", "botorch", "linear_operator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from loop.runtime import configure_torch_threads

    configure_torch_threads()


@contextmanager
def _cli_errors():
    """Known failures become one red line and exit code 1, not a traceback."""
    from lab_io.results import ResultsError
    from loop.campaign import CampaignError
    from loop.ingest import IngestError
    from loop.train import NothingToTrainOn

    try:
        yield
    # OSError: a missing file, a full disk, a file where a folder should be, no permission (named, no traceback)
    except (CampaignError, IngestError, ResultsError, NothingToTrainOn, ValueError, OSError) as exc:
        console.print("[bold red]error:[/]", escape(str(exc)), soft_wrap=True)  # a path stays on one line
        raise typer.Exit(code=1) from None


def _channel_list(channels: str | None) -> list[str] | None:
    """``--channels DNA,ER,RNA`` -> names; ValueError naming the option for an empty or repeated name
    (compared as crops compare channels, :func:`lab_io.crops.channel_key`: ``dna`` repeats ``DNA``)."""
    from lab_io.crops import channel_key

    if channels is None:
        return None
    names = [name.strip() for name in channels.split(",")]
    keys = [channel_key(name) for name in names]
    if not all(keys) or len(set(keys)) != len(keys):
        raise ValueError(f"--channels {channels!r}: give each channel's name once, comma-separated (DNA,ER,RNA,...); "
                         "names are told apart by their letters and digits, ignoring case")
    return names


def _open():
    from loop.campaign import Campaign

    return Campaign.open(state.campaign_dir, db_url=state.db_url)


@app.command()
def init(
    seed: int = typer.Option(0, help="Campaign seed."),
    dose_um: float = typer.Option(10.0, "--dose-um", help="Dose at which compounds are proposed (uM)."),
    n_controls: int = typer.Option(16, "--n-controls", help="DMSO wells per plate."),
    empty_edge: bool = typer.Option(False, "--empty-edge/--no-empty-edge", help="Leave the outer ring empty."),
    config: Optional[Path] = typer.Option(None, help="A campaign.json to start from."),
):
    """Create a campaign folder and its store."""
    from loop.campaign import Campaign, CampaignConfig

    with _cli_errors():
        if config is not None:
            if not config.is_file():
                raise FileNotFoundError(f"{config}: no such campaign config file")
            try:
                cfg = CampaignConfig.from_json(config.read_text())
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{config}: {exc}") from exc
        else:
            cfg = CampaignConfig(seed=seed, dose_um=dose_um,
                                 layout=dict(n_negative_controls=n_controls, empty_edge=empty_edge))
        campaign = Campaign.init(state.campaign_dir, cfg, db_url=state.db_url,
                                 config_source=str(config) if config is not None else "campaign config")
    out.print(f"initialised campaign at {campaign.root}")


@library_app.command("add")
def library_add(
    file: Optional[Path] = typer.Argument(None, help="CSV/TSV/SMI/Parquet with a SMILES column."),
    virtual: int = typer.Option(0, "--virtual", help="Instead of FILE: register N compounds of the embedded "
                                                     "combinatorial library."),
    seed: int = typer.Option(0, help="Seed of the embedded library."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Worker processes (default: all cores)."),
):
    """Register compounds (RDKit standardisation, InChIKey de-duplication, Morgan fingerprints)."""
    from loop.library import add_library_file, add_virtual_library

    with _cli_errors():
        campaign = _open()
        if (file is None) == (virtual <= 0):
            raise ValueError("give either FILE or --virtual N")
        with console.status("standardising and fingerprinting compounds..."):
            if file is not None:
                if not file.exists():
                    raise FileNotFoundError(f"{file}: no such file")
                report = add_library_file(campaign, file, n_jobs=jobs)
            else:
                report = add_virtual_library(campaign, virtual, seed=seed)
    out.print(f"{report.source}: {report.n_added} added, {report.n_already_registered} already registered, "
              f"{report.n_duplicate_in_file} duplicates in file, {report.n_invalid} invalid (skipped)"
              + (f", {report.n_id_conflicts} skipped (id registered for another structure)"
                 if report.n_id_conflicts else ""))
    for line, raw, reason in report.errors[:10]:
        out.print(f"  line {line}: {raw!r}: {reason}")


@app.command()
def train(
    executor: str = typer.Option("local", help="local | ray"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="Ray cluster to train members on (with --executor ray; "
                                                   "default: a local Ray)."),
    members: Optional[int] = typer.Option(None, "--members", help="Ensemble size (default from config)."),
):
    """Train a new virtual-assay ensemble on everything ingested."""
    from loop.train import train_assay

    with _cli_errors():
        campaign = _open()
        overrides = {} if members is None else {"n_members": members}
        with console.status(f"training the virtual assay ensemble ({executor})..."):
            ensemble = train_assay(campaign, executor=executor, ray_address=ray_address, config_overrides=overrides)
    out.print(f"model version {ensemble.version}: {ensemble.n_members} members")


@app.command("use-assay")
def use_assay(
    model_dir: Path = typer.Argument(..., help="A trained image assay folder (`loop assay train --out ...`)."),
):
    """Make a trained image assay the campaign's virtual assay (`loop train` makes a feature one current again)."""
    from loop.train import register_image_assay

    with _cli_errors():
        campaign = _open()
        assay = register_image_assay(campaign, model_dir)
    out.print(f"virtual assay is now image assay {assay.version} ({assay.n_members} members, {model_dir})")


@app.command()
def propose(
    budget: int = typer.Option(384, "--budget", help="Wells to fill, controls included."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the plate files "
                                                               "(default: a round folder in the campaign)."),
    policy: str = typer.Option("loop", help="loop | random | greedy_mean | ucb_topk | diversity_only"),
    seed: Optional[int] = typer.Option(None, help="Seed (default: derived from campaign seed and round)."),
):
    """Score candidates with the virtual assay and write plate maps for the lab."""
    from loop.propose import propose as run_propose

    with _cli_errors():
        campaign = _open()
        with console.status("scoring candidates and laying out plates..."):
            result = run_propose(campaign, budget, out_dir=out_dir, policy=policy, seed=seed)
    out.print(f"round {result.round_index}: {result.n_treatments} compounds, {result.n_wells} wells on "
              f"{len(result.barcodes)} plate(s) ({', '.join(result.barcodes)})")
    out.print(f"plate files: {result.out_dir}")
    for name, path in sorted(result.files.items()):
        out.print(f"  {name}: {path}")


@objective_app.command("set")
def objective_set(
    target_compound: Optional[str] = typer.Option(None, "--target-compound",
                                                  help="Compound id or name whose measured wells give the target."),
    target_dose_um: Optional[float] = typer.Option(None, "--target-dose-um",
                                                   help="Only its wells at this dose (default: all doses)."),
    target_profile: Optional[Path] = typer.Option(None, "--target-profile",
                                                  help="Profile table (CSV/Parquet, normalised to controls): "
                                                       "its median row is the target."),
    profile_compound: Optional[str] = typer.Option(None, "--profile-compound",
                                                   help="Only the rows of this Metadata_compound of --target-profile."),
    similarity_weight: Optional[float] = typer.Option(None, "--similarity-weight",
                                                      help="Weight of cosine similarity to the target "
                                                           "(default 1 with a target, else 0)."),
    activity_weight: Optional[float] = typer.Option(None, "--activity-weight",
                                                    help="Weight of phenotypic activity (default 0 with a target, "
                                                         "else 1)."),
):
    """Set the objective of later proposals (no target: back to phenotypic activity)."""
    from loop.objective import describe, measured_target, set_objective, table_target

    with _cli_errors():
        if target_compound is not None and target_profile is not None:
            raise ValueError("give --target-compound or --target-profile, not both")
        if target_dose_um is not None and target_compound is None:
            raise ValueError("--target-dose-um goes with --target-compound")
        if profile_compound is not None and target_profile is None:
            raise ValueError("--profile-compound goes with --target-profile")
        campaign = _open()
        target = None
        if target_compound is not None:
            target = measured_target(campaign, target_compound, target_dose_um)
        elif target_profile is not None:
            target = table_target(target_profile, profile_compound)
        config = set_objective(
            campaign, target=target,
            activity_weight=activity_weight if activity_weight is not None else (0.0 if target else 1.0),
            similarity_weight=similarity_weight if similarity_weight is not None else (1.0 if target else 0.0))
    out.print(f"objective of {campaign.root}: {describe(config)}")


@objective_app.command("show")
def objective_show():
    """Print the campaign's objective."""
    from loop.objective import campaign_objective, describe

    with _cli_errors():
        config = campaign_objective(_open())
    out.print(describe(config))


@lab_app.command("run")
def lab_run(
    plates_dir: Path = typer.Argument(..., help="Folder of plate files written by `loop propose`."),
    results_dir: Path = typer.Option(..., "--out", help="Where the lab writes its results."),
    seed: int = typer.Option(0, help="Lab seed (noise, cell placement)."),
    no_images: bool = typer.Option(False, "--no-images", help="Write CellProfiler tables only."),
):
    """Run plates through the synthetic lab: Phenix TIFFs + CellProfiler tables."""
    from loop.lab import run_synthetic_lab

    with _cli_errors():
        campaign = _open() if (state.campaign_dir / "campaign.json").exists() else None
        with console.status("the synthetic lab is imaging plates..."):
            barcodes = run_synthetic_lab(plates_dir, results_dir, campaign=campaign, seed=seed,
                                         write_images=not no_images)
    out.print(f"lab returned {len(barcodes)} plate(s) in {results_dir}: {', '.join(barcodes)}")


@app.command()
def ingest(
    results_dir: Path = typer.Argument(..., help="Results folder returned by the lab."),
    crops_px: Optional[int] = typer.Option(None, "--crops-px", min=8, help="Also cut single-cell crops of this "
                                           "size from the plates' images into measurements/<barcode>.crops "
                                           "(what `loop assay train --data <campaign>/measurements` reads)."),
    crops_per_well: int = typer.Option(64, "--crops-per-well", min=1, help="At most this many crops a well."),
    allow_missing_wells: bool = typer.Option(False, "--allow-missing-wells", help="Import plates some mapped "
                                             "wells of which were not delivered (no image, no Image.csv row), "
                                             "without those wells: their compounds stay candidates. Without it "
                                             "such a plate is an error naming the wells."),
    allow_uneven_fields: bool = typer.Option(False, "--allow-uneven-fields", help="Import wells delivered with "
                                             "fewer fields than the plate's others (a lab imaging a varying number "
                                             "of fields per well). Without it such a plate is an error naming the "
                                             "wells: a copy still in progress looks like this."),
    replace: bool = typer.Option(False, "--replace", help="Import again plates imported before from other "
                                 "files (e.g. the complete copy of a plate imported with --allow-missing-wells): "
                                 "their measurements and files are replaced (crops too: give --crops-px when the "
                                 "plate has crops); a stop half-way is finished by the next ingest."),
    channels: Optional[str] = typer.Option(None, "--channels", help="Stains of an images-only plate's channels "
                                           "ch1,ch2,... in order, e.g. Mito,AGP,RNA,ER,DNA (default: the names "
                                           "in the plate's Harmony Images/Index.idx.xml, else guessed, DNA for "
                                           "ch1 and ChN for chN, with a warning, and taken by position by an "
                                           "image assay)."),
):
    """Import plate results (one transaction per plate; re-imports are no-ops)."""
    from loop.ingest import ingest_results

    with _cli_errors():
        campaign = _open()
        if not results_dir.exists():
            raise FileNotFoundError(f"{results_dir}: no such results folder")
        with console.status("reading and checking results..."):
            reports = ingest_results(campaign, results_dir, crop_px=crops_px, crops_per_well=crops_per_well,
                                     allow_missing_wells=allow_missing_wells,
                                     allow_uneven_fields=allow_uneven_fields, replace=replace,
                                     channel_names=_channel_list(channels))
    table = Table(title="ingest QC")
    for col in ("plate", "status", "wells", "cells", "cells/well (median, min)", "DMSO activity", "hits (profile threshold)",
                "cell-count checks (withdrawn, cell loss)", "wells without cells", "missing wells",
                "edge effect removed (DMSO sd)"):
        table.add_column(col)
    for r in reports:
        if r.status != "imported":  # nothing new was measured: no figures to show
            table.add_row(r.barcode, r.status, *["-"] * 9)
            continue
        table.add_row(r.barcode, r.status, str(r.n_wells), str(r.n_cells),
                      f"{r.cells_per_well_median:.0f}, {r.cells_per_well_min}",
                      f"{r.control_activity_mean:.2f} ± {r.control_activity_sd:.2f}",
                      f"{r.n_hits} (> {r.hit_threshold:.2f})",
                      f"{r.n_hits_withdrawn}, {r.n_hits_cell_loss}" if campaign.config.cell_count_hits else "off",
                      str(len(r.empty_wells)), str(len(r.missing_wells)),
                      "-" if math.isnan(r.edge_offset_sd) else f"{r.edge_offset_sd:.2f}")
    out.print(table)


@round_app.command("cancel")
def round_cancel(round_index: int = typer.Argument(..., metavar="N", help="Round number (rounds/round-NNN).")):
    """Cancel a round whose plates will not be run: its compounds become candidates again and its
    results are refused if they come back (the round's files and records stay)."""
    from loop.rounds import cancel_round

    with _cli_errors():
        barcodes = cancel_round(_open(), round_index)
    out.print(f"round {round_index} cancelled: {', '.join(barcodes)}")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Rounds, plates pending, returned and cancelled, compounds, measurements, model versions, hits, objective."""
    from loop.status import campaign_status

    with _cli_errors():
        info = campaign_status(_open())
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    table = Table(title=f"campaign {info['campaign']}", show_header=False)
    for key, value in info.items():
        if key != "campaign":
            table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    out.print(table)


@app.command()
def backtest(
    compounds: int = typer.Option(5000, min=1, help="Library size (synthetic lab)."),
    rounds: int = typer.Option(3, min=1, help="Rounds per seed."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Per round: wells incl. controls (synthetic lab, default 96) "
                                                  "or conditions (--profiles, default 8)."),
    seeds: int = typer.Option(5, min=1, help="Number of seeds."),
    policies: Optional[str] = typer.Option(None, help="Comma-separated policies (default: loop,random for the "
                                                      "synthetic lab; all six with --profiles)."),
    profiles: Optional[Path] = typer.Option(None, "--profiles", help="Real profile table (CSV/Parquet): the lab "
                                                                     "is replaced by looking up its wells."),
    control_label: str = typer.Option("DMSO", "--control-label", help="Metadata_compound of control wells."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the curves as JSON."),
    png_out: Optional[Path] = typer.Option(None, "--png", help="Curves figure (default next to --json)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Keep the simulated campaigns here."),
    world_seed: int = typer.Option(0, "--world-seed", help="Synthetic lab: which hidden world (structure -> "
                                                           "phenotype map) the library is screened in."),
    cold_start: Optional[str] = typer.Option(None, "--cold-start",
                                             help="Cold start (round 1 of the model policies; every round of "
                                                  "diversity_only, which uses coverage unless maxmin): random "
                                                  "(default: a seeded sample, each compound at its top dose), "
                                                  "stratified (one seeded pick per coverage stratum), coverage or "
                                                  "maxmin."),
    selection_json: Optional[str] = typer.Option(None, "--selection",
                                                 help="SelectionConfig fields as a JSON object, e.g. "
                                                      "'{\"anchor_prior_weight\": 0.5, \"anchor_beta\": 2}' "
                                                      "(--cold-start wins over its cold_start_method)."),
):
    """Simulated rounds, the loop's policy against baselines; cumulative fraction of hits found."""
    from loop.backtest import BacktestConfig, plot_curves, run_backtest

    names = None if policies is None else tuple(p.strip() for p in policies.split(",") if p.strip())
    with _cli_errors():
        selection = _selection_options(selection_json, cold_start)  # bad options fail here, before any work
        if profiles is not None:
            from lab_io.profile_table import read_profile_table
            from loop.simulation import LOOKUP_POLICIES, LookupBacktestConfig, run_lookup_backtest

            cfg = LookupBacktestConfig(n_rounds=rounds, batch_size=8 if batch_size is None else batch_size, n_seeds=seeds,
                                       policies=names or LOOKUP_POLICIES, control_label=control_label,
                                       selection=selection)
            with console.status(f"backtesting on {profiles}..."):
                result = run_lookup_backtest(read_profile_table(profiles), cfg)
        else:
            cfg = BacktestConfig(n_compounds=compounds, n_rounds=rounds, batch_wells=96 if batch_size is None else batch_size,
                                 n_seeds=seeds, policies=names or ("loop", "random"), selection=selection,
                                 lab_world_seed=world_seed)
            with console.status("backtesting against the synthetic lab..."):
                result = run_backtest(cfg, work_dir=work_dir)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))
        out.print(f"wrote {json_out}")
    png = png_out or (json_out.with_suffix(".png") if json_out else Path("backtest.png"))
    plot_curves(result, png)
    out.print(f"wrote {png}")
    for name, curve in result["policies"].items():
        means = ", ".join(f"{m:.3f}±{s:.3f}" for m, s in zip(curve["hit_fraction_mean"], curve["hit_fraction_sd"]))
        classes = curve.get("classes_found_mean")
        found = "" if classes is None else "; phenotype classes found " + ", ".join(f"{c:.1f}" for c in classes)
        out.print(f"{name:>15}: {means}{found}")
    if "random_expected_hit_fraction" in result:
        expected = ", ".join(f"{f:.3f}" for f in result["random_expected_hit_fraction"])
        out.print(f"{'random expected':>15}: {expected} (the mean over all random draws)")


def _selection_options(selection_json: str | None, cold_start: str | None) -> dict:
    """``--selection`` JSON merged with ``--cold-start``, checked by building the SelectionConfig."""
    from acquisition.select import SelectionConfig

    try:
        selection = {} if selection_json is None else json.loads(selection_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--selection is not valid JSON ({exc}): {selection_json}") from None
    if not isinstance(selection, dict):
        raise ValueError(f"--selection must be a JSON object of SelectionConfig fields, got {selection_json}")
    if cold_start is not None:
        selection["cold_start_method"] = cold_start
    defaults = {f.name: f.default for f in dataclasses.fields(SelectionConfig) if f.name != "seed"}  # --seeds
    unknown = sorted(set(selection) - set(defaults))
    if unknown:
        raise ValueError(f"--selection: unknown field(s) {unknown}; valid: {', '.join(sorted(defaults))}")
    for name, value in selection.items():
        _check_selection_value(name, value, defaults[name])
    SelectionConfig(**selection)
    return selection


def _check_selection_value(name: str, value, default) -> None:
    """A ``--selection`` value must have its field's type (JSON's true is not a weight, "inf" not a
    number) and be finite (the saved configs stay plain JSON: use 1e6 for a flat prior)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)) or name == "max_per_scaffold":
        ok = (is_number and math.isfinite(value)) or (value is None and default is None)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        if isinstance(default, bool):
            expected = "true or false"
        elif isinstance(default, str):
            expected = f"a string like {default!r}"
        else:
            expected = "a finite number" + ("" if default is None else f" like {default}")
        raise ValueError(f"--selection: {name} must be {expected}, got {value!r}")


@profiles_app.command("convert-bbbc021")
def convert_bbbc021_cmd(
    data_dir: Path = typer.Argument(..., help="The bbbc021 folder (per-well profiles, image table, SMILES)."),
    out_file: Path = typer.Option(..., "--out", help="Profile table to write (.csv or .parquet)."),
):
    """BBBC021 per-well CellProfiler profiles -> a pycytominer-style profile table for backtests."""
    from lab_io.profile_table import convert_bbbc021, write_profile_table

    with _cli_errors():
        table = convert_bbbc021(data_dir)
        write_profile_table(table, out_file)
    out.print(f"wrote {out_file}: {len(table)} wells, {table['Metadata_smiles'].ne('').sum()} with SMILES")


def _mount_assay_app() -> None:
    from loop.assay_cli import assay_app

    app.add_typer(assay_app, name="assay")


_mount_assay_app()

if __name__ == "__main__":  # pragma: no cover
    app()
