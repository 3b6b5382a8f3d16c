import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from lab_io.ground_truth import INACTIVE, PHENOTYPE_CLASSES, GroundTruth, fingerprint_bits, hill_response

SHARED = Path(os.environ.get("LOOP_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))

ACIDS = ["OC(=O)c1ccccc1", "OC(=O)c1ccc(Cl)cc1", "OC(=O)c1ccncc1", "OC(=O)C1CCCCC1", "OC(=O)c1ccc2ccccc2c1",
         "OC(=O)c1cccs1", "OC(=O)Cc1ccccc1", "OC(=O)c1ccc(OC)cc1", "OC(=O)c1cc(F)cc(F)c1", "OC(=O)c1ccc(N(C)C)cc1",
         "OC(=O)c1ccc(C(F)(F)F)cc1", "OC(=O)c1c[nH]c2ccccc12"]
AMINES = ["NCc1ccccc1", "C1COCCN1", "CN1CCNCC1", "Nc1ccc(F)cc1", "NC1CC1", "NCCc1c[nH]c2ccccc12", "Nc1nccs1",
          "C1CCNC1", "NCc1ccco1", "Nc1ccc2OCOc2c1", "NCC(=O)OC", "Nc1ccc(S(N)(=O)=O)cc1"]


@pytest.fixture(scope="module")
def amide_library():
    """144 amides (12 acids x 12 amines): a small combinatorial library with near neighbours."""
    rxn = AllChem.ReactionFromSmarts("[C:1](=O)[OH].[N;!H0:2]>>[C:1](=O)[N:2]")
    out = []
    for a in ACIDS:
        for b in AMINES:
            prod = rxn.RunReactants((Chem.MolFromSmiles(a), Chem.MolFromSmiles(b)))[0][0]
            Chem.SanitizeMol(prod)
            out.append(Chem.MolToSmiles(prod))
    return out


def tanimoto(bits):
    b = bits.astype(np.float64)
    inter = b @ b.T
    counts = b.sum(axis=1)
    return inter / (counts[:, None] + counts[None, :] - inter)


def test_hill_response_closed_form():
    assert hill_response(2.0, 2.0, 1.7, 0.8) == pytest.approx(0.4)
    assert hill_response(0.0, 2.0, 1.0, 0.8) == 0.0
    assert hill_response(1e6, 2.0, 1.0, 0.8) == pytest.approx(0.8, rel=1e-5)
    d, ec, n, e = 3.0, 1.5, 2.2, 0.9
    assert hill_response(d, ec, n, e) == pytest.approx(e * d**n / (ec**n + d**n))
    doses = np.logspace(-3, 3, 30)
    y = hill_response(doses, 1.0, 1.3, 1.0)
    assert np.all(np.diff(y) > 0)


def test_deterministic_and_seeded(amide_library):
    a = GroundTruth(world_seed=1).for_smiles(amide_library)
    b = GroundTruth(world_seed=1).for_smiles(amide_library)
    c = GroundTruth(world_seed=2).for_smiles(amide_library)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["activity_score"], c["activity_score"])
    assert list(a.columns[:6]) == ["smiles", "is_active", "phenotype_class", "ec50_um", "hill_n", "emax"]


def test_table_is_consistent(amide_library):
    gt = GroundTruth(world_seed=0, active_fraction=0.3, reference_smiles=amide_library)
    t = gt.for_smiles(amide_library)
    assert ((t["phenotype_class"] == INACTIVE) == ~t["is_active"]).all()
    assert set(t.loc[t["is_active"], "phenotype_class"]) <= set(PHENOTYPE_CLASSES)
    assert (t.loc[~t["is_active"], "emax"] == 0).all()
    assert t.loc[t["is_active"], "emax"].between(0.3, 1.0).all()
    assert t["ec50_um"].between(0.01, 10**2.5).all() and t["hill_n"].between(1.0, 2.5).all()
    assert (t["is_active"] == (t["activity_score"] > gt.threshold)).all()
    r = gt.response(amide_library, 3.0)
    assert r == pytest.approx(hill_response(3.0, t["ec50_um"], t["hill_n"], t["emax"]))
    two = GroundTruth(world_seed=0, n_phenotype_classes=2, active_fraction=0.3, reference_smiles=amide_library)
    assert set(two.for_smiles(amide_library)["phenotype_class"]) <= {INACTIVE, *PHENOTYPE_CLASSES[:2]}


def test_active_fraction_calibrated_on_reference(amide_library):
    for seed in range(3):
        gt = GroundTruth(world_seed=seed, active_fraction=0.08, reference_smiles=amide_library)
        frac = gt.for_smiles(amide_library)["is_active"].mean()
        assert frac == pytest.approx(0.08, abs=1.5 / len(amide_library))


def test_default_calibration_on_real_drug_library():
    path = SHARED / "repurposing_hub" / "repurposing_samples_20200324.txt"
    if not path.exists():
        pytest.skip(f"Drug Repurposing Hub not found at {path} (set LOOP_SHARED_DATA)")
    table = pd.read_csv(path, sep="\t", comment="!", usecols=["smiles"])
    smiles = table["smiles"].dropna().drop_duplicates().sample(600, random_state=0)
    smiles = [s for s in smiles if Chem.MolFromSmiles(s) is not None]
    fractions = [GroundTruth(world_seed=s).for_smiles(smiles)["is_active"].mean() for s in range(3)]
    assert 0.04 <= np.mean(fractions) <= 0.13, fractions


def test_structure_activity_relationship_is_smooth(amide_library):
    gt = GroundTruth(world_seed=0)
    scores = gt.scores(amide_library)
    sim = tanimoto(fingerprint_bits(amide_library))
    iu = np.triu_indices(len(amide_library), k=1)
    diff = np.abs(scores[iu[0]] - scores[iu[1]]).mean(axis=1)
    s = sim[iu]
    near, far = diff[s >= 0.55], diff[s < 0.3]
    assert len(near) > 20 and len(far) > 100
    assert near.mean() < 0.75 * far.mean()


def test_activity_is_learnable_from_fingerprints(amide_library):
    gt = GroundTruth(world_seed=0)
    x = fingerprint_bits(amide_library).astype(np.float64)
    y = gt.for_smiles(amide_library)["activity_score"].to_numpy()
    rng = np.random.default_rng(0)
    test = rng.permutation(len(y))[:30]
    train = np.setdiff1d(np.arange(len(y)), test)
    xm = x[train].mean(0)
    a = x[train] - xm
    w = np.linalg.solve(a.T @ a + 1.0 * np.eye(x.shape[1]), a.T @ (y[train] - y[train].mean()))
    pred = (x[test] - xm) @ w + y[train].mean()
    assert np.corrcoef(pred, y[test])[0, 1] > 0.6


def test_salts_and_bad_smiles():
    gt = GroundTruth(world_seed=0)
    t = gt.for_smiles(["CCN(CC)CC(=O)Nc1c(C)cccc1C", "CCN(CC)CC(=O)Nc1c(C)cccc1C.Cl"])
    assert t.loc[0, "activity_score"] == t.loc[1, "activity_score"]
    with pytest.raises(ValueError, match="not_a_smiles"):
        gt.for_smiles(["CCO", "not_a_smiles"])
    with pytest.raises(ValueError, match="active_fraction"):
        GroundTruth(active_fraction=0.0)
    with pytest.raises(ValueError, match="n_phenotype_classes"):
        GroundTruth(n_phenotype_classes=5)
