"""``loop propose --budget 384``: choose compounds and emit the plate files for the lab.

Reads top to bottom: candidates -> predictions -> selection -> plate layouts -> files -> store.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import numbers
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlmodel import select

from acquisition.anchor import AnchoredBatch, anchored_ucb_batch, on_prediction_scale
from acquisition.funnel import FunnelConfig, funnel_predict, simulate_activity
from acquisition.objectives import ObjectiveConfig
from acquisition.prediction_cache import PredictionCache
from acquisition.select import SELECT_BATCH_FIELDS, SelectionConfig, select_batch, select_cold_start
from lab_io.chem import murcko_scaffold_ids
from lab_io.platemap import PlateLayoutConfig, design_plates, treatment_capacity, write_plate_files
from lab_io.schema import WellRole
from loop import store
from loop.campaign import CONFIG_FILE, Campaign
from loop.library import load_compounds
from loop.objective import campaign_objective, describe, measured_objective_values
from loop.train import latest_model, warn_if_model_behind

log = logging.getLogger(__name__)

ROUND_CONFIG_FILE = "round_config.json"
PROPOSING_FILE = ".proposing.json"  # the journal of a proposal being written (_settle_interrupted_proposal)
DOSE_RTOL = 1e-5  # doses this close (relative) are the same dose (a plate map's rounding, np.isclose's default)

POLICIES = ("loop", "random", "greedy_mean", "ucb_topk", "diversity_only")
# Model-based policies differ only in how the batch is selected from the ensemble's predictions:
#   loop        the campaign's SelectionConfig (default: believer-UCB on a GP over the measurements whose
#               prior mean is the ensemble's prediction weighted by its out-of-bag skill, acquisition.anchor;
#               measurement_anchor=False: qUCB + Tanimoto penalty + exploration fraction)
#   greedy_mean mean predicted activity, top-k (no diversity, no exploration)
#   ucb_topk    qUCB joint greedy without diversity or exploration (saturates after ~K picks)
POLICY_SELECTION = {
    "greedy_mean": dict(acquisition="mean", diversity_penalty=0.0, phenotype_penalty=0.0, exploration_fraction=0.0,
                        measurement_anchor=False),
    "ucb_topk": dict(acquisition="qUCB", diversity_penalty=0.0, phenotype_penalty=0.0, exploration_fraction=0.0,
                     measurement_anchor=False),
}
MODEL_POLICIES = ("loop", "greedy_mean", "ucb_topk")
# The SelectionConfig fields each way of choosing uses (round_config.json records them under `applied`).
COLD_START_FIELDS = ("cold_start_method", "seed")
ANCHOR_FIELDS = ("measurement_anchor", "anchor_beta", "anchor_prior_weight", "anchor_prior_sd", "anchor_attenuation",
                 "max_per_scaffold", "seed")
SELECT_BATCH_IN_FORCE = (*SELECT_BATCH_FIELDS, "max_per_scaffold", "measurement_anchor", "seed")


def diversity_method(cold_start_method: str) -> str:
    """Cold-start method of the model-free ``diversity_only`` baseline, every round: the
    configured one (validated by ``SelectionConfig``) if it is a deterministic diversity method
    (``coverage``, ``maxmin``), else coverage (``random`` is the ``random`` baseline, and
    ``stratified`` is random within coverage strata)."""
    return cold_start_method if cold_start_method in ("coverage", "maxmin") else "coverage"


@dataclass(frozen=True)
class ProposalResult:
    round_index: int
    out_dir: Path
    barcodes: list[str]
    n_treatments: int
    n_wells: int
    policy: str
    model_version: str | None
    files: dict[str, Path]


def next_round_index(campaign: Campaign) -> int:
    with campaign.session() as session:
        last = session.exec(select(store.Round.index).order_by(store.Round.index.desc())).first()
    return 1 if last is None else int(last) + 1


def candidate_table(campaign: Campaign) -> tuple[pd.DataFrame, np.ndarray]:
    """Compounds never measured, with a flag for those on plates still in the lab (pending); the
    plates' positive control is never a candidate (it is on every plate already)."""
    compounds = load_compounds(campaign)
    layout = PlateLayoutConfig(**campaign.config.layout)
    if layout.positive_control_id and layout.n_positive_controls:
        compounds = compounds[compounds["compound_id"] != layout.positive_control_id]
    with campaign.session() as session:
        measured = set(session.exec(select(store.Measurement.compound_id).where(
            store.Measurement.compound_id.is_not(None), store.Measurement.dose_um > 0)).all())
        pending = set(session.exec(
            select(store.Well.compound_id)
            .join(store.Plate, store.Plate.barcode == store.Well.barcode)
            .where(store.Plate.status == "pending", store.Well.role == WellRole.treatment.value)
        ).all())
    candidates = compounds[~compounds["compound_id"].isin(measured)].reset_index(drop=True)
    return candidates, candidates["compound_id"].isin(pending).to_numpy()


@dataclass(frozen=True)
class Choice:
    """What ``choose_compounds`` chose.

    Attributes:
        picks: rows of the candidate table, in pick order.
        summary: per pick, what chose it, its acquisition value and the members' mean and sd.
        model_version: the virtual assay's version (None for model-free batches).
        applied: how the batch was chosen, as the round records it: ``method``, the selection
            settings in force (the campaign's, with the policy's overrides), settings that did
            not apply, the funnel's sizes and timings, the anchor's fit.
    """

    picks: np.ndarray
    summary: pd.DataFrame
    model_version: str | None
    applied: dict[str, Any]


def choose_compounds(
    campaign: Campaign,
    candidates: pd.DataFrame,
    pending: np.ndarray,
    q: int,
    policy: str,
    seed: int,
) -> Choice:
    """Pick up to ``q`` rows of ``candidates`` (``pending``: in the lab, never picked)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    fps = np.asarray(campaign.load_fingerprints())[candidates["fp_row"].to_numpy()]
    eligible = ~pending
    rng = np.random.default_rng(seed)
    model = None if policy in ("random", "diversity_only") else latest_model(campaign)
    if policy == "random":
        picks = rng.choice(np.flatnonzero(eligible), size=q, replace=False)
        settings = SelectionConfig(**{**campaign.config.selection, "seed": seed})
        return Choice(picks, _summary(picks, None, "random"), None,
                      dict(method="random", **_settings_applied(settings, ("seed",))))
    if policy == "diversity_only" or model is None:
        cold_cfg = SelectionConfig(**campaign.config.selection)
        method = cold_cfg.cold_start_method
        if cold_cfg.max_per_scaffold is not None:
            log.warning("max_per_scaffold=%d is not applied to a model-free batch (%s); it caps model-driven "
                        "proposals", cold_cfg.max_per_scaffold,
                        "diversity_only" if policy == "diversity_only" else "cold start")
        if policy == "diversity_only":
            method = diversity_method(method)
        else:
            log.info("no trained virtual assay yet: cold start (%s batch)", method)
        picks = select_cold_start(fps, q, seed=seed, exclude=pending, method=method).indices
        settings = dataclasses.replace(cold_cfg, cold_start_method=method, seed=seed)
        return Choice(picks, _summary(picks, None, method), None,
                      dict(method=f"cold_start:{method}", **_settings_applied(settings, COLD_START_FIELDS)))
    behind = warn_if_model_behind(campaign)
    # Simulate candidates once per member (cached); above FunnelConfig.simulate_all_max a fingerprint
    # surrogate, trained on simulated and measured compounds, prescreens the library to a shortlist
    # first. values: K x n over funnel.indices.
    sel_cfg = SelectionConfig(**{**campaign.config.selection, **POLICY_SELECTION.get(policy, {}), "seed": seed})
    funnel_cfg = FunnelConfig.from_dict({"simulation_seed": campaign.config.seed, **campaign.config.funnel})
    objective_cfg = campaign_objective(campaign)
    objective = _target_objective(objective_cfg, model)  # None: the activity screen
    measured = measured_conditions(campaign)
    anchored = sel_cfg.measurement_anchor and len(measured) > 0
    if objective is not None:  # a target the model cannot predict fails before any candidate is simulated
        objective_cfg.build(model.feature_names)
        log.info("objective: %s", describe(objective_cfg))
    if (sel_cfg.phenotype_penalty > 0 or objective is not None) and funnel_cfg.profile_dims == 0:
        funnel_cfg = dataclasses.replace(funnel_cfg, profile_dims=None)  # both compare whole profiles
    labelled = funnel_cfg.prescreens(int(eligible.sum())) and funnel_cfg.surrogate_measurements
    measurements = None
    if len(measured) and (anchored or labelled or sel_cfg.acquisition in ("qEI", "qLogEI")):
        measurements = _measurements(campaign, model, measured, funnel_cfg, seed, objective_cfg, objective,
                                     observed=anchored or labelled, required=anchored)
    labels = {}
    if labelled and measurements is not None and measurements.observed is not None:  # on the predictions' scale
        labels = surrogate_labels(measured, measurements, campaign.config.dose_um, log_scale=objective is None)
    funnel = funnel_predict(model, fps, candidates["inchikey"].to_numpy(), campaign.config.dose_um,
                            pending=np.flatnonzero(pending), config=funnel_cfg,
                            cache=PredictionCache(campaign.root / "cache"), seed=seed, objective=objective,
                            min_eligible=q, **labels)
    scaffold_ids = None
    if sel_cfg.max_per_scaffold is not None:  # the cap counts Bemis-Murcko scaffolds of the funnel's candidates
        scaffold_ids = murcko_scaffold_ids(candidates["smiles"].iloc[funnel.indices].tolist())
    applied: dict[str, Any] = dict(funnel=_jsonable(funnel.diagnostics))
    if behind:
        applied["plates_not_in_model"] = behind
    if anchored:
        batch = _select_anchored(model, fps, funnel, measured, measurements, q, sel_cfg, scaffold_ids,
                                 campaign.config.dose_um, log_scale=objective is None)
        chosen = batch.indices - len(measured)
        applied.update(method="anchored_gp_ucb", **_settings_applied(sel_cfg, ANCHOR_FIELDS),
                       anchor=dict(weight=batch.anchor.weight, intercept=batch.anchor.intercept,
                                   n_out_of_bag=batch.anchor.n_out_of_bag, dilution=batch.anchor.dilution))
        return Choice(funnel.indices[chosen], _summary(chosen, funnel.values, "anchored_gp_ucb", batch.ucb),
                      model.version, applied)
    best_f = None
    if sel_cfg.acquisition in ("qEI", "qLogEI") and measurements is not None:
        # the incumbent is the best member-mean *predicted* objective of the measured conditions
        # (BoTorch's plug-in incumbent for noisy data): measured wells are robust z against DMSO
        # wells, predictions are in units of the members' generated control cells
        best_f = float(measurements.predicted.astype(np.float64).mean(axis=0).max())
    selection = select_batch(funnel.values, fps[funnel.indices], q, sel_cfg, pending=funnel.pending,
                             scaffold_ids=scaffold_ids, best_f=best_f,
                             profiles=funnel.profiles)
    diagnostics = {k: v for k, v in selection.diagnostics.items() if k not in ("phase", "config")}
    applied.update(method="select_batch", **_settings_applied(sel_cfg, SELECT_BATCH_IN_FORCE), best_f=best_f,
                   selection_diagnostics=_jsonable(diagnostics))
    picks = funnel.indices[selection.indices]  # rows of `candidates`
    return Choice(picks, _summary(selection.indices, funnel.values, _pick_labels(selection, sel_cfg),
                                  selection.acq_values), model.version, applied)


def _settings_applied(settings: SelectionConfig, in_force: tuple[str, ...]) -> dict[str, Any]:
    """The selection settings a method used, and the names of those it did not."""
    values = settings.to_dict()
    return dict(selection={name: values[name] for name in in_force},
                not_applied=[name for name in values if name not in in_force])


def _jsonable(value: Any) -> Any:
    """Diagnostics as plain JSON: numpy numbers as Python ones, NaN and infinities as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (numbers.Integral)):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return value


def _pick_labels(selection, sel_cfg: SelectionConfig) -> list[str]:
    """What chose each pick, as the proposal records it: the acquisition for the exploitation picks,
    ``qPosteriorStandardDeviation`` (member disagreement) or ``maxmin`` for the exploration ones."""
    explore = {"std": "qPosteriorStandardDeviation", "maxmin": "maxmin"}.get(
        selection.diagnostics.get("exploration_method"), "explore")
    phases = selection.diagnostics.get("phase", ["exploit"] * len(selection.indices))
    return [sel_cfg.acquisition if phase == "exploit" else explore for phase in phases]


def _target_objective(objective_cfg: ObjectiveConfig, model):
    """Predicted profiles ``K x n x F`` -> the target objective ``K x n``; None without a target
    (then the values are the cached phenotypic activity)."""
    if not objective_cfg.uses_target:
        return None
    return functools.partial(objective_cfg.member_values, feature_names=model.feature_names)


def measured_conditions(campaign: Campaign) -> pd.DataFrame:
    """One row per measured (compound, dose): compound_id, dose_um, inchikey, fp_row and the mean
    phenotypic activity of its treatment wells (wells without cells or without a dose are left out)."""
    with campaign.session() as session:  # joined in SQL: the library (up to 10^6 rows) is not read again
        rows = session.exec(
            select(store.Measurement.compound_id, store.Measurement.dose_um, store.Measurement.activity,
                   store.Compound.inchikey, store.Compound.fp_row)
            .join(store.Compound, store.Compound.compound_id == store.Measurement.compound_id)
            .where(store.Measurement.role == WellRole.treatment.value, store.Measurement.activity.is_not(None),
                   store.Measurement.dose_um > 0)).all()
    wells = pd.DataFrame(rows, columns=["compound_id", "dose_um", "activity", "inchikey", "fp_row"])
    return wells.groupby(["compound_id", "dose_um", "inchikey", "fp_row"], as_index=False)["activity"].mean()


@dataclass(frozen=True)
class _Measurements:
    """The measured conditions as the selection sees them: fingerprints ``n x 256``, the members'
    predictions ``K x n`` (activity, or the objective) and, when asked for, the lab's values ``n``
    (mean activity of the treatment wells, or the objective of their median profile)."""

    fingerprints: np.ndarray
    predicted: np.ndarray
    observed: np.ndarray | None


def _measurements(campaign: Campaign, model, measured: pd.DataFrame, funnel_cfg: FunnelConfig, seed: int,
                  objective_cfg: ObjectiveConfig, objective, *, observed: bool, required: bool) -> _Measurements:
    """Predictions of the measured conditions, simulated with the funnel's settings (cached), and the
    lab's values when ``observed``. A target objective reads the measured profiles, which can fail
    (another pipeline's features): ``required`` re-raises; otherwise the values are left out, logged."""
    fps = np.asarray(campaign.load_fingerprints())[measured["fp_row"].to_numpy()]
    predicted = simulate_activity(model, fps, measured["inchikey"].to_numpy(), measured["dose_um"].to_numpy(),
                                  config=funnel_cfg, cache=PredictionCache(campaign.root / "cache"), seed=seed,
                                  objective=objective)
    values = None
    if observed:
        values = measured["activity"].to_numpy(float)
        if objective is not None:
            try:
                values = measured_objective_values(campaign, measured, objective_cfg, model.feature_names)
            except ValueError as err:
                if required:
                    raise
                log.warning("the funnel's surrogate learns from simulated compounds only: %s", err)
                values = None
    return _Measurements(fps, np.asarray(predicted), values)


def surrogate_labels(measured: pd.DataFrame, measurements: _Measurements, dose_um: float, *,
                     log_scale: bool) -> dict[str, np.ndarray]:
    """The funnel's ``measured_fingerprints`` / ``measured_activity``: the measured conditions at the
    campaign's dose (within ``DOSE_RTOL``), put on the predictions' scale. The surrogate is dose-blind
    and ranks every candidate at that dose, so a compound measured at another (imported, or before a
    ``dose_um`` change) is left out rather than taken as its value there; how many is logged."""
    doses = measured["dose_um"].to_numpy(float)
    at_dose = np.isclose(doses, dose_um, rtol=DOSE_RTOL, atol=0.0)
    if not at_dose.all():
        other = ", ".join(f"{d:g}" for d in np.unique(doses[~at_dose]))
        log.info("the funnel's surrogate learns from the %d measured conditions at the campaign's %g uM; %d "
                 "measured at other doses (%s uM) are left out", int(at_dose.sum()), dose_um,
                 int((~at_dose).sum()), other)
    if not at_dose.any():
        return {}
    return dict(measured_fingerprints=measurements.fingerprints[at_dose],
                measured_activity=on_prediction_scale(measurements.predicted[:, at_dose],
                                                      measurements.observed[at_dose], log_scale=log_scale))


def _select_anchored(model, fps, funnel, measured: pd.DataFrame, measurements: _Measurements, q: int,
                     sel_cfg: SelectionConfig, scaffold_ids: np.ndarray | None, dose_um: float,
                     log_scale: bool) -> AnchoredBatch:
    """Believer-UCB on the anchored GP (``acquisition.anchor``) over the measured conditions (first)
    and the funnel's candidates; each pick's UCB is in log activity, or in the target objective (then
    the measured values are the objective of the measured profiles). The scaffold cap counts the
    funnel's candidates, pending ones included."""
    n_measured, n_candidates = len(measured), len(funnel.indices)
    dose_um = np.concatenate([measured["dose_um"].to_numpy(float), np.full(n_candidates, float(dose_um))])
    is_measured = np.arange(n_measured + n_candidates) < n_measured
    pending = np.zeros(n_measured + n_candidates, dtype=bool)
    pending[n_measured + funnel.pending] = True
    if scaffold_ids is not None:  # measured conditions are never picked nor counted
        scaffold_ids = np.concatenate([np.full(n_measured, -1, dtype=np.int64), scaffold_ids])
    out_of_bag = model.out_of_bag(measured["compound_id"].tolist()) if hasattr(model, "out_of_bag") else None
    if out_of_bag is None or not out_of_bag.any():
        log.warning("model %s reports no out-of-bag member for any measured compound (no bootstrap, or trained "
                    "before bags were recorded): its weight stays at the prior %.2f, untested on the measurements; "
                    "the next model `loop train` makes (after the next ingest) records its bags",
                    model.version, sel_cfg.anchor_prior_weight)
    batch = anchored_ucb_batch(
        np.concatenate([measurements.predicted, funnel.values], axis=1),
        np.concatenate([measurements.fingerprints, fps[funnel.indices]]),
        np.log10(dose_um), is_measured, measurements.observed, q, out_of_bag=out_of_bag,
        pending=pending, beta=sel_cfg.anchor_beta, prior_weight=sel_cfg.anchor_prior_weight,
        prior_sd=sel_cfg.anchor_prior_sd, attenuation=sel_cfg.anchor_attenuation, log_scale=log_scale,
        scaffold_ids=scaffold_ids, max_per_scaffold=sel_cfg.max_per_scaffold)
    log.info("anchored GP over %d measured conditions: ensemble weight %.2f (%d out-of-bag conditions, "
             "slope dilution-corrected x%.2f)", n_measured, batch.anchor.weight, batch.anchor.n_out_of_bag,
             batch.anchor.dilution)
    if len(batch.indices) < q:
        why = (f"max_per_scaffold={sel_cfg.max_per_scaffold} closed the rest" if sel_cfg.max_per_scaffold is not None
               else "fewer are eligible")
        message = f"requested q={q} but only {len(batch.indices)} candidates could be selected ({why})"
        warnings.warn(message, stacklevel=3)
        log.warning(message)
    return batch


def _summary(picks: np.ndarray, values: np.ndarray | None, acquisition: str | list[str],
             acq_values: np.ndarray | None = None) -> pd.DataFrame:
    """Per pick: what chose it (one name for all, or one per pick), its acquisition value and the
    members' mean and sd of the predicted value."""
    n = len(picks)
    labels = [acquisition] * n if isinstance(acquisition, str) else list(acquisition)
    if values is None:
        return pd.DataFrame(dict(acquisition=labels, acq_value=np.full(n, np.nan),
                                 pred_mean=np.full(n, np.nan), pred_sd=np.full(n, np.nan)))
    member_values = np.asarray(values)[:, picks]
    return pd.DataFrame(dict(
        acquisition=labels,
        acq_value=np.asarray(acq_values, dtype=float) if acq_values is not None else np.full(n, np.nan),
        pred_mean=member_values.mean(axis=0),
        pred_sd=member_values.std(axis=0, ddof=1) if member_values.shape[0] > 1 else np.zeros(n),
    ))


def propose(
    campaign: Campaign,
    budget_wells: int,
    *,
    out_dir: Path | None = None,
    policy: str = "loop",
    seed: int | None = None,
) -> ProposalResult:
    """Pick compounds for ``budget_wells`` wells (controls included) and write plate files (under the
    campaign's write lock: a concurrent proposal would take the same round number and pending set)."""
    if budget_wells <= 0:
        raise ValueError(f"the budget (--budget) must be a positive number of wells, got {budget_wells}")
    campaign.config.validate(str(campaign.root / CONFIG_FILE))  # a hand edit of campaign.json fails here, named
    with campaign.writing("propose"):
        return _propose(campaign, budget_wells, out_dir, policy, seed)


def _propose(campaign: Campaign, budget_wells: int, out_dir: Path | None, policy: str,
             seed: int | None) -> ProposalResult:
    _settle_interrupted_proposal(campaign)
    round_index = next_round_index(campaign)
    seed = campaign.config.seed * 1000 + round_index if seed is None else seed
    layout_cfg = PlateLayoutConfig(**campaign.config.layout)
    candidates, pending = candidate_table(campaign)
    n_eligible = int((~pending).sum())
    if n_eligible == 0:
        raise ValueError(f"{campaign.root}: no unmeasured, non-pending compounds left to propose")
    q = min(treatment_capacity(budget_wells, layout_cfg), n_eligible)
    if q <= 0:
        raise ValueError(f"a budget of {budget_wells} wells cannot hold one treatment plus the plate's controls")

    out_dir = Path(out_dir) if out_dir is not None else campaign.round_dir(round_index) / "plates"
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # before minutes of scoring
        raise FileExistsError(f"--out {out_dir}: already exists and is not an empty folder; "
                              "choose another --out folder")
    blocking = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise FileExistsError(f"--out {out_dir}: {blocking} is a file, not a folder; choose another --out folder")
    _warn_pending_rounds(campaign)
    choice = choose_compounds(campaign, candidates, pending, q, policy, seed)
    if len(choice.picks) == 0:  # only the scaffold cap leaves nothing of what is eligible
        cap = choice.applied.get("selection", {}).get("max_per_scaffold")
        raise ValueError(f"{campaign.root}: nothing could be proposed: max_per_scaffold={cap} (campaign.json "
                         f"'selection') closes the scaffold of every compound left to pick from ({n_eligible} "
                         "eligible), counting the compounds of rounds still in the lab; raise it, or release a "
                         "round that will not be run (`loop round cancel N`)")
    model_version, summary = choice.model_version, choice.summary
    chosen = candidates.iloc[choice.picks].reset_index(drop=True)
    treatments = [(cid, float(campaign.config.dose_um)) for cid in chosen["compound_id"]]
    with campaign.session() as session:
        n_plates = store.count(session, store.Plate)
    layouts = design_plates(treatments, layout_cfg, seed=seed, plate_index_start=n_plates + 1,
                           budget_wells=budget_wells, campaign_tag=campaign.config.barcode_tag)

    token = uuid.uuid4().hex  # ties the plate files to this proposal's journal
    config_json = json.dumps(dict(round_index=round_index, proposal_token=token,
                                  campaign=json.loads(campaign.config.to_json()),
                                  policy=policy, seed=seed,
                                  budget_wells=budget_wells, model_version=model_version,
                                  layout=dataclasses.asdict(layout_cfg),  # every setting the plates used
                                  applied=choice.applied))  # how the batch was chosen, funnel sizes included
    written = False
    try:
        # a journal first: a proposal killed before its round is recorded leaves files the next settles
        journal = _write_journal(campaign, round_index, out_dir, token)
        files = write_plate_files(layouts, _plate_compounds(campaign, chosen, layout_cfg), out_dir,
                                  extra_files={ROUND_CONFIG_FILE: config_json})  # all at once, with the token
        written = True
        _record_round(campaign, round_index, policy, model_version, out_dir, config_json, layouts, chosen, summary)
    except BaseException:  # Ctrl-C and SIGTERM (loop.cli) too: no plate files of this proposal without its round
        if written:  # the folder holds this proposal's files (not, e.g., another campaign's that took --out)
            _settle_interrupted_proposal(campaign)
        else:
            (campaign.root / PROPOSING_FILE).unlink(missing_ok=True)
        raise
    journal.unlink()
    n_wells = sum(int((lay.wells["role"] != WellRole.empty.value).sum()) for lay in layouts)
    log.info("round %d: %d compounds on %d plate(s), %d wells -> %s", round_index, len(chosen), len(layouts),
             n_wells, out_dir)
    return ProposalResult(round_index, out_dir, [lay.barcode for lay in layouts], len(chosen), n_wells, policy,
                          model_version, files)


def _settle_interrupted_proposal(campaign: Campaign) -> None:
    """Finish what a proposal killed (SIGKILL, power loss) after it started writing left behind.

    ``_propose`` writes a journal (``.proposing.json``: round, plate folder, a token that its
    ``round_config.json`` carries too) before its plate files and removes it once the round is
    recorded. Under the write lock, the next proposal finds a journal only when that proposal
    stopped on the way: if its round was recorded the files are the round's and stay; if not,
    no round holds them, and the folder is removed when its ``round_config.json`` has the
    journal's token (that proposal's files, nothing else). Then the journal goes."""
    journal = campaign.root / PROPOSING_FILE
    if not journal.exists():
        return
    try:
        entry = json.loads(journal.read_text())
        round_index, out_dir, token = int(entry["round_index"]), campaign.absolute(entry["out_dir"]), entry["token"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: unreadable journal of an interrupted proposal; removing it", journal)
        journal.unlink(missing_ok=True)
        return
    with campaign.session() as session:
        recorded = session.exec(select(store.Round.id).where(store.Round.index == round_index)).first() is not None
    if not recorded:
        try:
            written = json.loads((out_dir / ROUND_CONFIG_FILE).read_text())
        except (OSError, ValueError):
            written = None
        if isinstance(written, dict) and written.get("proposal_token") == token:
            log.warning("%s: plate files of a proposal of round %d that stopped before the round was recorded; "
                        "removing them (no round of the campaign holds these plates)", out_dir, round_index)
            shutil.rmtree(out_dir)
    journal.unlink()


def _write_journal(campaign: Campaign, round_index: int, out_dir: Path, token: str) -> Path:
    """``.proposing.json`` (``_settle_interrupted_proposal``), whole or not at all."""
    journal = campaign.root / PROPOSING_FILE
    tmp = journal.with_name(journal.name + ".tmp")
    tmp.write_text(json.dumps(dict(round_index=round_index, out_dir=campaign.relative(out_dir.absolute()),
                                   token=token)))
    os.replace(tmp, journal)
    return journal


def _plate_compounds(campaign: Campaign, chosen: pd.DataFrame, layout_cfg: PlateLayoutConfig) -> pd.DataFrame:
    """``compound_id, name, smiles, inchikey`` of everything on the plates: the picks and the
    positive control, from the library when it is registered there, else by its id alone (a
    reference compound the lab keeps; no SMILES or InChIKey to write)."""
    columns = ["compound_id", "name", "smiles", "inchikey"]
    positive_id = layout_cfg.positive_control_id
    if not positive_id or layout_cfg.n_positive_controls == 0:
        return chosen[columns]
    with campaign.session() as session:
        record = session.exec(select(store.Compound).where(store.Compound.compound_id == positive_id)).first()
    row = ({c: getattr(record, c) for c in columns} if record is not None
           else dict(compound_id=positive_id, name=positive_id, smiles="", inchikey=""))
    return pd.concat([chosen[columns], pd.DataFrame([row])], ignore_index=True)


def _warn_pending_rounds(campaign: Campaign) -> None:
    """A proposal while earlier plates are still in the lab is allowed (their compounds count as
    pending), but a second `propose` by mistake would block its compounds until the plates come back."""
    with campaign.session() as session:
        rounds = sorted(set(session.exec(select(store.Plate.round_index).where(store.Plate.status == "pending")).all()))
    if rounds:
        log.warning("round(s) %s still have plates in the lab: their compounds are left out of this proposal; "
                    "`loop round cancel N` releases a round that will not be run", ", ".join(map(str, rounds)))


def _record_round(campaign, round_index, policy, model_version, out_dir, config_json, layouts, chosen, summary):
    """Round, plates, wells and proposals in one transaction."""
    with campaign.session() as session:
        where = campaign.relative(out_dir.absolute())  # inside the campaign: relative to it; else absolute
        session.add(store.Round(index=round_index, policy=policy, model_version=model_version,
                                out_dir=where, config_json=config_json))
        for lay in layouts:
            session.add(store.Plate(barcode=lay.barcode, plate_map_name=lay.plate_map_name, round_index=round_index,
                                    layout_path=where))
        session.flush()
        well_rows = [
            dict(barcode=lay.barcode, well=w["well"], role=w["role"], compound_id=(w["compound_id"] or None),
                 dose_um=float(w["dose_um"]))
            for lay in layouts for w in lay.wells.to_dict("records")
        ]
        store.bulk_insert(session, store.Well, well_rows)
        proposal_rows = [
            dict(round_index=round_index, rank=i + 1, compound_id=cid, dose_um=float(campaign.config.dose_um),
                 acquisition=s["acquisition"], acq_value=_none_if_nan(s["acq_value"]),
                 pred_mean=_none_if_nan(s["pred_mean"]), pred_sd=_none_if_nan(s["pred_sd"]),
                 model_version=model_version)
            for i, (cid, s) in enumerate(zip(chosen["compound_id"], summary.to_dict("records")))
        ]
        store.bulk_insert(session, store.Proposal, proposal_rows)
        session.commit()


def _none_if_nan(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value
