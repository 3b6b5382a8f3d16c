"""Tests for lab_io.virtual_library: building blocks, determinism, validity, uniqueness, size."""

from __future__ import annotations

import pytest
from rdkit import Chem
from rdkit.Chem import rdChemReactions

from lab_io import chem
from lab_io import virtual_library as vl


def n_matches(smiles: str, smarts: str) -> int:
    return len(Chem.MolFromSmiles(smiles).GetSubstructMatches(Chem.MolFromSmarts(smarts)))


@pytest.mark.parametrize("blocks, once, never", [
    (vl.ACIDS, [vl.ACID_SMARTS], [vl.AMINE_SMARTS]),
    (vl.AMINES, [vl.AMINE_SMARTS], [vl.ACID_SMARTS, vl.SULFONYL_CHLORIDE_SMARTS]),
    (vl.SULFONYL_CHLORIDES, [vl.SULFONYL_CHLORIDE_SMARTS], [vl.AMINE_SMARTS]),
    (vl.LINKERS, [vl.ACID_SMARTS, vl.AMINE_SMARTS], []),
    (vl.BROMOARYL_ACIDS, [vl.ACID_SMARTS, vl.ARYL_BROMIDE_SMARTS], [vl.AMINE_SMARTS]),
    (vl.BORONIC_ACIDS, [vl.BORONIC_ACID_SMARTS], [vl.ARYL_BROMIDE_SMARTS, vl.ACID_SMARTS]),
])
def test_building_blocks_react_exactly_once(blocks, once, never):
    names = [name for name, _ in blocks]
    assert len(set(names)) == len(names)
    assert all("+" not in name and ":" not in name for name in names)
    canonical = {Chem.MolToSmiles(Chem.MolFromSmiles(s)) for _, s in blocks}
    assert len(canonical) == len(blocks)
    for name, smiles in blocks:
        for smarts in once:
            assert n_matches(smiles, smarts) == 1, (name, smarts)
        for smarts in never:
            assert n_matches(smiles, smarts) == 0, (name, smarts)


def test_reachable_size_is_at_least_100k():
    expected = (len(vl.ACIDS) * len(vl.AMINES) + len(vl.SULFONYL_CHLORIDES) * len(vl.AMINES)
                + len(vl.ACIDS) * len(vl.LINKERS) * len(vl.AMINES)
                + len(vl.BROMOARYL_ACIDS) * len(vl.BORONIC_ACIDS) * len(vl.AMINES))
    assert vl.max_library_size() == expected >= 100_000


def test_enumerate_deterministic_valid_unique():
    a = vl.enumerate_library(400, seed=7)
    assert a.equals(vl.enumerate_library(400, seed=7))
    assert not a["smiles"].equals(vl.enumerate_library(400, seed=8)["smiles"])
    assert list(a.columns) == ["compound_id", "name", "smiles"]
    assert a["compound_id"].tolist()[:2] == ["VL-000001", "VL-000002"] and a["compound_id"].is_unique
    assert a["smiles"].is_unique and a["name"].is_unique
    canonical, keys, errors = chem.standardize_many(a["smiles"].tolist(), n_jobs=1)
    assert errors == []
    assert canonical == a["smiles"].tolist()  # already canonical and neutral
    assert len(set(keys)) == len(keys)
    assert set(a["name"].str.split(":").str[0]) <= {s.name for s in vl.SCHEMES}


def test_prefix_property_and_names_match_products():
    small, large = vl.enumerate_library(50, seed=1), vl.enumerate_library(400, seed=1)
    assert small.equals(large.iloc[:50])
    # rebuild the amides by hand from their names
    amides = large[large["name"].str.startswith("amide:")]
    assert len(amides) > 0
    rxn = rdChemReactions.ReactionFromSmarts(vl.AMIDE_COUPLING)
    for name, smiles in zip(amides["name"], amides["smiles"]):
        acid_name, amine_name = name.split(":")[1].split("+")
        acid, amine = dict(vl.ACIDS)[acid_name], dict(vl.AMINES)[amine_name]
        product = rxn.RunReactants((Chem.MolFromSmiles(acid), Chem.MolFromSmiles(amine)))[0][0]
        Chem.SanitizeMol(product)
        assert Chem.MolToSmiles(product) == smiles


def test_every_scheme_produces_expected_bonds():
    lib = vl.enumerate_library(600, seed=3)
    amide = Chem.MolFromSmarts("C(=O)N")
    sulfonamide = Chem.MolFromSmarts("S(=O)(=O)N")
    biaryl = Chem.MolFromSmarts("a-a")
    for name, smiles in zip(lib["name"], lib["smiles"]):
        mol = Chem.MolFromSmiles(smiles)
        scheme = name.split(":")[0]
        assert not mol.HasSubstructMatch(Chem.MolFromSmarts("[Cl,Br]S(=O)=O")), name
        assert not mol.HasSubstructMatch(Chem.MolFromSmarts("B(O)O")), name
        if scheme == "sulfonamide":
            assert mol.HasSubstructMatch(sulfonamide)
        else:
            assert mol.HasSubstructMatch(amide)
        if scheme == "suzuki_amide":
            assert mol.HasSubstructMatch(biaryl)
        if scheme == "amide3":
            assert len(mol.GetSubstructMatches(amide)) >= 2
    assert set(lib["name"].str.split(":").str[0]) == {s.name for s in vl.SCHEMES}


def test_too_many_compounds_names_the_maximum():
    maximum = vl.max_library_size()
    with pytest.raises(ValueError, match=str(maximum)):
        vl.enumerate_library(maximum + 1, seed=0)
    with pytest.raises(ValueError):
        vl.enumerate_library(-1, seed=0)
    assert len(vl.enumerate_library(0, seed=0)) == 0
