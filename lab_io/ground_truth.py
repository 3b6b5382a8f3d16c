"""The synthetic lab's hidden truth: what each compound does to cells, as a function of structure.

Used by :mod:`lab_io.synthetic_lab` to render cells and by backtests to score a campaign; models
never see it (it is never written into a results folder).

Construction (all drawn from ``np.random.default_rng(world_seed)``, so one ``world_seed`` is one
fixed "biology"):

1. **Structure.** Each SMILES is parsed with RDKit, reduced to its largest fragment (salts and
   solvents do not change activity) and encoded as a Morgan bit vector ``x`` (radius 2, 2048
   bits, ``rdFingerprintGenerator``; computed here so the world does not change if the project's
   fingerprint settings do).
2. **Class scores.** For each phenotype class ``k`` a dense Gaussian weight vector ``w_k`` over
   the bits; bits set in more than 20 % of a built-in panel of diverse drugs (generic atom
   environments such as aromatic CH) get weight 0, so the score reflects distinctive
   substructures, not "has carbon". ``s_k(x) = w_k . x / sqrt(n(x))`` with ``n(x)`` the number of
   weighted bits set (at least 1): over draws of the world this is N(0, 1) for every molecule, and molecules sharing most bits (high
   Tanimoto) have close scores — the structure-activity relationship is smooth and linear in the
   fingerprint, so a model trained on fingerprints can learn it.
3. **Activity.** ``a(x) = max_k s_k(x)``; the compound is active when ``a(x) > threshold`` and its
   phenotype class is ``argmax_k s_k(x)``. The threshold is the ``1 - active_fraction`` quantile
   of ``a`` over ``reference_smiles`` when given (pass the campaign's library to get exactly the
   wanted hit rate on it), otherwise the analytic quantile of the maximum of ``K`` independent
   standard normals, ``Phi^-1((1 - active_fraction)^(1/K))``.
4. **Potency and efficacy** (smooth in ``x`` too, via further weight vectors ``w_p, w_h, w_e``,
   ``z_* = w_* . x / sqrt(n(x))``; ``margin = a(x) - threshold``)::

       log10 ec50_um = clip(0.6 - 0.5 * margin + 0.35 * z_p, -2, 2.5)
       hill_n        = 1 + 1.5 * sigmoid(z_h)                  (1 .. 2.5)
       emax          = (0.6 + 0.4 * sigmoid(z_e)) * (0.5 + 0.5 * (1 - exp(-margin / 0.4)))

   for actives; inactive compounds have ``emax = 0`` (their ec50/hill are still reported).
5. **Response** at dose ``d`` (uM): the Hill curve ``emax * d^n / (ec50^n + d^n)``, a fraction in
   ``[0, emax]`` that the synthetic lab maps onto the class's morphological changes.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
from rdkit import Chem, RDLogger
from rdkit.Chem import rdFingerprintGenerator
from scipy.special import expit
from scipy.stats import norm

logger = logging.getLogger(__name__)

PHENOTYPE_CLASSES = ("nuclear_enlargement", "cytoskeletal_disruption", "actin_disruption", "toxicity")
INACTIVE = "inactive"
FP_RADIUS = 2
FP_BITS = 2048
COMMON_BIT_FRACTION = 0.2

# A small panel of diverse, well-known drugs; only used to find generic fingerprint bits.
_PANEL_SMILES = (
    "CC(=O)Oc1ccccc1C(=O)O",  # aspirin
    "Cn1cnc2c1c(=O)n(C)c(=O)n2C",  # caffeine
    "CC(C)Cc1ccc(cc1)C(C)C(=O)O",  # ibuprofen
    "CC(=O)Nc1ccc(O)cc1",  # paracetamol
    "CN1CCC[C@H]1c1cccnc1",  # nicotine
    "CN(C)CCCN1c2ccccc2CCc2ccccc21",  # imipramine
    "Clc1ccc2c(c1)C(=NCC(=O)N2C)c1ccccc1",  # diazepam
    "CC(C)NCC(O)COc1cccc2ccccc12",  # propranolol
    "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc21",  # diazepam tautomer-like analogue
    "OC(=O)c1ccccc1O",  # salicylic acid
    "NC(=O)c1cccnc1",  # nicotinamide
    "C[C@]12CC[C@H]3[C@@H](CCc4cc(O)ccc43)[C@@H]1CC[C@@H]2O",  # estradiol
    "CC(C)(C)NCC(O)c1ccc(O)c(CO)c1",  # salbutamol
    "CN1CCN(CC1)c1ccc2nc(-c3ccccc3)sc2c1",  # benzothiazole piperazine
    "O=C(O)CCCc1ccc(N(CCCl)CCCl)cc1",  # chlorambucil
    "Nc1ncnc2c1ncn2[C@@H]1O[C@H](CO)[C@@H](O)[C@H]1O",  # adenosine
    "CC1=C(C(=O)Nc2ccccn2)N(C)S(=O)(=O)c2ccccc21",  # piroxicam-like
    "COc1ccc2[nH]cc(CCNC(C)=O)c2c1",  # melatonin
    "CN1CCC23c4c5ccc(O)c4OC2C(O)C=CC3C1C5",  # morphine (flat)
    "Cc1ccc(cc1)S(=O)(=O)NC(=O)NN1CCCCCC1",  # tolazamide
    "CCOC(=O)C1=C(C)NC(C)=C(C(=O)OC)C1c1cccc(c1)[N+](=O)[O-]",  # nitrendipine
    "Fc1ccc(cc1)C(=O)CCCN1CCC(O)(CC1)c1ccc(Cl)cc1",  # haloperidol
    "CC(=O)OCC(=O)[C@@]1(O)CC[C@H]2[C@@H]3CCC4=CC(=O)C=C[C@]4(C)[C@H]3[C@@H](O)C[C@@]21C",  # prednisolone acetate
    "Cc1onc(c1C(=O)N[C@@H]1C(=O)N2[C@@H]1SC(C)(C)[C@@H]2C(=O)O)-c1ccccc1",  # oxacillin
    "COc1cc2ncnc(Nc3ccc(F)c(Cl)c3)c2cc1OCCCN1CCOCC1",  # gefitinib
    "Cc1ccc(NC(=O)c2ccc(CN3CCN(C)CC3)cc2)cc1Nc1nccc(-c2cccnc2)n1",  # imatinib
    "CS(=O)(=O)CCNCc1ccc(o1)-c1ccc2ncnc(Nc3ccc(OCc4cccc(F)c4)c(Cl)c3)c2c1",  # lapatinib
    "O=C1NC(=O)C(N1)(c1ccccc1)c1ccccc1",  # phenytoin
    "CCN(CC)CC(=O)Nc1c(C)cccc1C",  # lidocaine
    "OC(CCN1CCCCC1)(C1CCCCC1)c1ccccc1",  # trihexyphenidyl
    "COC1=CC=C2C(=CC1=O)[C@@H](CCc1cc(OC)c(OC)c(OC)c12)NC(C)=O",  # colchicine
    "CC1=C2[C@@]([C@]([C@H]([C@@H]3[C@]4([C@H](OC4)C[C@@H]([C@]3(C(=O)[C@@H]2OC(=O)C)C)O)OC(=O)C)OC(=O)c5ccccc5)(C[C@@H]1OC(=O)[C@H](O)[C@@H](NC(=O)c6ccccc6)c7ccccc7)O)(C)C",  # paclitaxel
    "CCC1(O)CC2CN(C1)CCc1c([nH]c3ccccc13)C(c1cc3c(cc1OC)N(C)C1C34CCN3CC=CC(CC)(C43)C(OC(C)=O)C1(O)C(=O)OC)(C2)C(=O)OC",  # vinblastine-like
    "O=C(NC1CCCCC1)N(CCCl)N=O",  # lomustine-like
    "Nc1nc(=O)n(cc1)[C@@H]1O[C@H](CO)[C@@H](O)[C@@H]1O",  # cytarabine
    "COC(=O)Nc1nc2cc(ccc2[nH]1)C(=O)c1ccccc1",  # mebendazole
    "CN(C)C(=N)NC(=N)N",  # metformin
    "OC(=O)CC(O)(CC(=O)O)C(=O)O",  # citric acid
    "c1ccc2c(c1)ccc1ccccc12",  # phenanthrene
    "CCCCCCCCO",  # 1-octanol
)


def hill_response(dose_um, ec50_um, hill_n, emax):
    """Hill curve ``emax * d^n / (ec50^n + d^n)`` (broadcasts; 0 at d <= 0)."""
    d = np.maximum(np.asarray(dose_um, dtype=np.float64), 0.0)
    ec50 = np.asarray(ec50_um, dtype=np.float64)
    n = np.asarray(hill_n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d > 0, (ec50 / np.where(d > 0, d, 1.0)) ** n, np.inf)
    return np.asarray(emax, dtype=np.float64) / (1.0 + ratio)


def _largest_fragment(mol: Chem.Mol) -> Chem.Mol:
    frags = Chem.GetMolFrags(mol, asMols=True)
    return max(frags, key=lambda m: m.GetNumHeavyAtoms()) if len(frags) > 1 else mol


def fingerprint_bits(smiles: Sequence[str]) -> np.ndarray:
    """SMILES -> ``N x 2048`` uint8 Morgan bits (radius 2) of the largest fragment; ValueError names bad SMILES."""
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=FP_RADIUS, fpSize=FP_BITS)
    bits = np.zeros((len(smiles), FP_BITS), dtype=np.uint8)
    RDLogger.DisableLog("rdApp.*")
    try:
        for i, smi in enumerate(smiles):
            mol = Chem.MolFromSmiles(smi) if isinstance(smi, str) and smi.strip() else None
            if mol is None:
                raise ValueError(f"ground truth: cannot parse SMILES #{i} {smi!r}")
            bits[i] = generator.GetFingerprintAsNumPy(_largest_fragment(mol))
    finally:
        RDLogger.EnableLog("rdApp.*")
    return bits


class GroundTruth:
    """Deterministic structure -> phenotype map of one simulated world (see module docstring).

    Args:
        world_seed: seeds every weight vector; same seed, same biology.
        active_fraction: wanted fraction of actives (on ``reference_smiles`` exactly, else about).
        n_phenotype_classes: how many of :data:`PHENOTYPE_CLASSES` exist in this world (1..4).
        reference_smiles: library whose ``1 - active_fraction`` score quantile is the threshold.
    """

    def __init__(self, world_seed: int = 0, active_fraction: float = 0.08, n_phenotype_classes: int = 4,
                 reference_smiles: Sequence[str] | None = None):
        if not 0.0 < active_fraction < 1.0:
            raise ValueError(f"active_fraction must be in (0, 1), got {active_fraction}")
        if not 1 <= n_phenotype_classes <= len(PHENOTYPE_CLASSES):
            raise ValueError(f"n_phenotype_classes must be 1..{len(PHENOTYPE_CLASSES)}, got {n_phenotype_classes}")
        self.world_seed = int(world_seed)
        self.active_fraction = float(active_fraction)
        self.classes = PHENOTYPE_CLASSES[:n_phenotype_classes]
        rng = np.random.default_rng([self.world_seed, 0x6A7])
        weights = rng.standard_normal((n_phenotype_classes + 3, FP_BITS))
        common = fingerprint_bits(_PANEL_SMILES).mean(axis=0) > COMMON_BIT_FRACTION
        weights[:, common] = 0.0
        self._informative = ~common
        self._w_class = weights[:n_phenotype_classes]
        self._w_potency, self._w_hill, self._w_emax = weights[n_phenotype_classes:]
        if reference_smiles is not None and len(reference_smiles) > 0:
            scores = self._class_scores(fingerprint_bits(list(reference_smiles))).max(axis=1)
            self.threshold = float(np.quantile(scores, 1.0 - self.active_fraction))
        else:
            self.threshold = float(norm.ppf((1.0 - self.active_fraction) ** (1.0 / n_phenotype_classes)))
        self._cache: dict[str, tuple] = {}

    def _scale(self, x: np.ndarray) -> np.ndarray:
        """sqrt of the number of informative (weighted) bits set, at least 1."""
        return np.sqrt(np.maximum(x[:, self._informative].sum(axis=1), 1.0))

    def _class_scores(self, bits: np.ndarray) -> np.ndarray:
        x = bits.astype(np.float64)
        return x @ self._w_class.T / self._scale(x)[:, None]

    def scores(self, smiles: Sequence[str]) -> np.ndarray:
        """Class scores ``N x K`` (``s_k(x)``); activity is ``max_k`` of these."""
        return self._class_scores(fingerprint_bits(list(smiles)))

    def _rows(self, smiles: list[str]) -> list[tuple]:
        todo = [s for s in dict.fromkeys(smiles) if s not in self._cache]
        if todo:
            bits = fingerprint_bits(todo).astype(np.float64)
            scale = self._scale(bits)
            s = bits @ self._w_class.T / scale[:, None]
            z_p, z_h, z_e = (bits @ w / scale for w in (self._w_potency, self._w_hill, self._w_emax))
            activity = s.max(axis=1)
            margin = activity - self.threshold
            active = margin > 0
            log_ec50 = np.clip(0.6 - 0.5 * np.maximum(margin, 0.0) + 0.35 * z_p, -2.0, 2.5)
            hill_n = 1.0 + 1.5 * expit(z_h)
            emax = (0.6 + 0.4 * expit(z_e)) * (0.5 + 0.5 * (1.0 - np.exp(-np.maximum(margin, 0.0) / 0.4)))
            emax = np.where(active, emax, 0.0)
            cls = np.asarray(self.classes)[s.argmax(axis=1)]
            for i, smi in enumerate(todo):
                self._cache[smi] = (bool(active[i]), str(cls[i]) if active[i] else INACTIVE,
                                    float(10.0 ** log_ec50[i]), float(hill_n[i]), float(emax[i]), float(activity[i]))
        return [self._cache[s] for s in smiles]

    def for_smiles(self, smiles: Sequence[str]) -> pd.DataFrame:
        """Hidden truth per SMILES: ``smiles, is_active, phenotype_class, ec50_um, hill_n, emax, activity_score``."""
        smiles = [str(s) for s in smiles]
        rows = self._rows(smiles)
        table = pd.DataFrame(rows, columns=["is_active", "phenotype_class", "ec50_um", "hill_n", "emax", "activity_score"])
        table.insert(0, "smiles", smiles)
        return table

    def response(self, smiles: Sequence[str], dose_um) -> np.ndarray:
        """Effect fraction (0..emax) of each compound at its dose (``dose_um`` scalar or length N)."""
        table = self.for_smiles(smiles)
        return hill_response(dose_um, table["ec50_um"].to_numpy(), table["hill_n"].to_numpy(), table["emax"].to_numpy())

    def __repr__(self) -> str:
        return (f"GroundTruth(world_seed={self.world_seed}, active_fraction={self.active_fraction}, "
                f"classes={list(self.classes)}, threshold={self.threshold:.3f})")
