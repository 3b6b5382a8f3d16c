"""Tests for lab_io.chem: standardisation, library files, fingerprints, Tanimoto."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from lab_io import chem

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
HUB_SAMPLES = SHARED / "repurposing_hub" / "repurposing_samples_20200324.txt"

SMILES = ["CC(=O)Oc1ccccc1C(=O)O", "c1ccccc1", "CN1CCN(CC1)c1ccccc1", "O=C(O)c1ccncc1", "CCO",
          "Clc1ccc(cc1)C(=O)NCC", "C[C@H](N)C(=O)O", "OC1CCNCC1"]


def rdkit_reference_bits(smiles, radius=2, n_bits=2048):
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    return [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles]


# ---------------------------------------------------------------- standardisation

@pytest.mark.parametrize("raw, expected", [
    ("[Na+].CC(=O)[O-]", "CC(=O)O"),
    ("CC(=O)[O-].[Na+]", "CC(=O)O"),
    ("C[NH3+].[Cl-]", "CN"),
    ("Cl.CN1CCN(CC1)c1ccccc1", "CN1CCN(c2ccccc2)CC1"),
    ("OC(=O)c1ccccc1", "O=C(O)c1ccccc1"),
])
def test_standardize_strips_salts_and_neutralises(raw, expected):
    canonical, inchikey = chem.standardize_smiles(raw)
    assert canonical == expected
    assert inchikey == Chem.MolToInchiKey(Chem.MolFromSmiles(expected))


def test_standardize_same_structure_same_key():
    a = chem.standardize_smiles("C1=CC=CC=C1C(=O)O")
    b = chem.standardize_smiles("OC(=O)c1ccccc1")
    assert a == b


@pytest.mark.parametrize("bad, reason", [("", "empty"), ("   ", "empty"), ("C1CC(", "syntax"),
                                         ("c1cccc1", "kekulize"), ("C(C)(C)(C)(C)C", "valence")])
def test_standardize_invalid_raises_with_reason(bad, reason, capfd):
    with pytest.raises(ValueError, match=reason):
        chem.standardize_smiles(bad)
    assert "SMILES Parse Error" not in capfd.readouterr().err  # RDKit logging silenced


def test_standardize_many_aligned_with_errors():
    canonical, keys, errors = chem.standardize_many(["CCO", "not a smiles", "[Na+].[O-]C(=O)C"], n_jobs=1)
    assert canonical[0] == "CCO" and canonical[1] is None and canonical[2] == "CC(=O)O"
    assert keys[1] is None and len(keys[0]) == 27
    assert [(i, s) for i, s, _ in errors] == [(1, "not a smiles")]


def test_standardize_many_pool_matches_in_process(monkeypatch):
    smiles = (SMILES + ["C1CC(", ""]) * 30
    serial = chem.standardize_many(smiles, n_jobs=1)
    monkeypatch.setattr(chem, "PARALLEL_MIN_ITEMS", 10)
    pooled = chem.standardize_many(smiles, n_jobs=2, chunk_size=37)
    assert pooled == serial
    assert [e[0] for e in pooled[2]] == [i for i, s in enumerate(smiles) if s in ("C1CC(", "")]


def test_cxsmiles_extension_is_dropped():
    canonical, _ = chem.standardize_smiles("C[C@H](N)C(=O)O |&1:1,THB:0:1:2|")
    assert canonical == "C[C@H](N)C(=O)O"


# ---------------------------------------------------------------- library files

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_csv_line_numbers_dedup_and_ids(tmp_path):
    path = write(tmp_path / "lib.csv",
                 "Compound_ID,SMILES,Name\n"          # line 1
                 "A1,CCO,ethanol\n"                     # 2
                 "A2,C1CC(,broken\n"                    # 3
                 "\n"                                   # 4 blank
                 "A3,OCC,ethanol again\n"               # 5 duplicate of line 2
                 ",[Na+].CC(=O)[O-],sodium acetate\n"   # 6 no id
                 "A5,,empty\n")                         # 7
    result = chem.read_library(path)
    assert list(result.table.columns) == ["compound_id", "name", "smiles", "inchikey"]
    assert result.table["smiles"].tolist() == ["CCO", "CC(=O)O"]
    assert result.table["compound_id"][0] == "A1"
    key = result.table["inchikey"][1]
    assert result.table["compound_id"][1] == f"CPD-{key[:14]}-{key[15:23]}"
    assert result.table["name"].tolist() == ["ethanol", "sodium acetate"]
    assert [(line, raw) for line, raw, _ in result.errors] == [(3, "C1CC("), (7, "")]
    assert "syntax" in result.errors[0][2] and "empty" in result.errors[1][2]
    assert result.n_duplicates == 1
    assert result.fingerprints is None
    with_fps = chem.read_library(path, fingerprints=True)
    pd.testing.assert_frame_equal(with_fps.table, result.table)
    assert with_fps.errors == result.errors and with_fps.n_duplicates == 1
    np.testing.assert_array_equal(with_fps.fingerprints, chem.morgan_fingerprints(result.table["smiles"].tolist()))


def test_read_tsv_with_comment_lines_and_metadata_smiles(tmp_path):
    path = write(tmp_path / "lib.tsv", "!comment\n!another\nbroad_id\tpert_iname\tMetadata_smiles\n"
                 "B1\taspirin\tCC(=O)Oc1ccccc1C(=O)O\nB2\tbad\tC(C)(C)(C)(C)C\n")
    result = chem.read_library(path)
    assert result.table["compound_id"].tolist() == ["B1"]
    assert result.table["name"].tolist() == ["aspirin"]
    assert [(line, raw) for line, raw, _ in result.errors] == [(5, "C(C)(C)(C)(C)C")]


def test_read_txt_is_tab_separated(tmp_path):
    path = write(tmp_path / "lib.txt", "id\tsmiles\nX\tc1ccccc1\n")
    assert chem.read_library(path).table["smiles"].tolist() == ["c1ccccc1"]


def test_read_smi_with_and_without_header(tmp_path):
    plain = write(tmp_path / "a.smi", "CCO ethanol\nC1CC( broken\n\nc1ccccc1\nCCN amine extra words\n")
    result = chem.read_library(plain)
    assert result.table["compound_id"].tolist()[0] == "ethanol"
    assert result.table["compound_id"][1].startswith("CPD-")
    assert result.table["name"].tolist()[2] == "extra words"
    assert [(line, raw) for line, raw, _ in result.errors] == [(2, "C1CC(")]
    headed = write(tmp_path / "b.smi", "SMILES Name\nCCO ethanol\nC1CC( broken\n")
    result = chem.read_library(headed)
    assert result.table["compound_id"].tolist() == ["ethanol"]
    assert [line for line, _, _ in result.errors] == [3]


def test_read_parquet(tmp_path):
    path = tmp_path / "lib.parquet"
    pd.DataFrame({"canonical_smiles": ["CCO", "xyz", "OCC"], "compound_id": ["P1", "P2", "P3"]}).to_parquet(path)
    result = chem.read_library(path)
    assert result.table["compound_id"].tolist() == ["P1"]
    assert [line for line, _, _ in result.errors] == [3]  # rows numbered as if the header were line 1
    assert result.n_duplicates == 1


def test_read_errors_name_file_and_columns(tmp_path):
    no_smiles = write(tmp_path / "lib.csv", "id,structure\nA,CCO\n")
    with pytest.raises(ValueError, match=r"lib\.csv.*structure"):
        chem.read_library(no_smiles)
    unknown = write(tmp_path / "lib.xlsx", "")
    with pytest.raises(ValueError, match=r"lib\.xlsx.*unknown"):
        chem.read_library(unknown)


def test_read_same_id_for_two_structures_is_an_error(tmp_path):
    path = write(tmp_path / "lib.csv", "id,smiles\nA,CCO\nA,CCN\n")
    result = chem.read_library(path)
    assert len(result.table) == 1 and [line for line, _, _ in result.errors] == [3]


@pytest.mark.slow
@pytest.mark.skipif(not HUB_SAMPLES.is_file(), reason=f"shared data absent: {HUB_SAMPLES}")
def test_read_repurposing_hub():
    result = chem.read_library(HUB_SAMPLES)
    table = result.table
    assert 6000 < len(table) < 7000
    assert table["inchikey"].is_unique and table["compound_id"].is_unique
    assert table["compound_id"].str.startswith("BRD-").all()
    assert len(table) + len(result.errors) + result.n_duplicates == 13553
    raw = pd.read_csv(HUB_SAMPLES, sep="\t", comment="!", dtype=str)
    first_data_line = 11  # 9 '!' lines, header on line 10
    for line, smiles, _ in result.errors:
        assert raw["smiles"].fillna("")[line - first_data_line] == smiles
    # our InChIKey agrees with the file's for most compounds (salts, stereo and tautomers differ)
    merged = table.merge(raw.drop_duplicates("broad_id"), left_on="compound_id", right_on="broad_id")
    assert (merged["inchikey"] == merged["InChIKey"]).mean() > 0.8


# ---------------------------------------------------------------- fingerprints and similarity

def test_morgan_fingerprints_match_rdkit_bits():
    packed = chem.morgan_fingerprints(SMILES)
    assert packed.dtype == np.uint8 and packed.shape == (len(SMILES), 256)
    bits = chem.unpack_fingerprints(packed, dtype=np.uint8)
    for row, fp in zip(bits, rdkit_reference_bits(SMILES)):
        assert set(np.flatnonzero(row)) == set(fp.GetOnBits())


def test_fingerprint_bit_order_is_big_endian():
    packed = chem.morgan_fingerprints(["CCO"], radius=1, n_bits=64)
    bit = next(iter(rdkit_reference_bits(["CCO"], radius=1, n_bits=64)[0].GetOnBits()))
    assert packed[0, bit // 8] & (1 << (7 - bit % 8))


def test_morgan_fingerprints_pool_and_errors(monkeypatch):
    monkeypatch.setattr(chem, "PARALLEL_MIN_ITEMS", 10)
    smiles = SMILES * 5
    assert np.array_equal(chem.morgan_fingerprints(smiles, n_jobs=2, chunk_size=7),
                          chem.morgan_fingerprints(smiles, n_jobs=1))
    with pytest.raises(ValueError, match=r"#1 'C1CC\('"):
        chem.morgan_fingerprints(["CCO", "C1CC("], n_jobs=1)


def test_tanimoto_matches_rdkit_bulk():
    a, b = SMILES[:5], SMILES[3:] + ["[He]"]  # [He] has no Morgan bits? it has one; still checks
    sim = chem.tanimoto_matrix(chem.morgan_fingerprints(a), chem.morgan_fingerprints(b), block_rows=2)
    ref_a, ref_b = rdkit_reference_bits(a), rdkit_reference_bits(b)
    expected = np.array([DataStructs.BulkTanimotoSimilarity(fp, ref_b) for fp in ref_a])
    assert sim.dtype == np.float32 and sim.shape == (5, len(b))
    np.testing.assert_allclose(sim, expected, atol=1e-6)
    np.testing.assert_allclose(chem.tanimoto_max(chem.morgan_fingerprints(a), chem.morgan_fingerprints(b)),
                               expected.max(axis=1), atol=1e-6)


def test_tanimoto_empty_fingerprints_and_shapes():
    zeros = np.zeros((2, 4), dtype=np.uint8)
    assert np.array_equal(chem.tanimoto_matrix(zeros, zeros), np.zeros((2, 2), dtype=np.float32))
    assert chem.tanimoto_max(zeros, np.zeros((0, 4), dtype=np.uint8)).shape == (2,)
    with pytest.raises(ValueError, match="widths"):
        chem.tanimoto_matrix(zeros, np.zeros((2, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        chem.tanimoto_matrix(zeros.astype(float), zeros)


def test_tanimoto_large_random_against_popcount():
    rng = np.random.default_rng(0)
    a = (rng.random((3000, 256)) < 0.05).astype(np.uint8) * rng.integers(0, 256, (3000, 256), dtype=np.uint8)
    b = rng.integers(0, 256, (40, 256), dtype=np.uint8) & rng.integers(0, 256, (40, 256), dtype=np.uint8)
    sim = chem.tanimoto_matrix(a, b, block_rows=1000)
    inter = np.bitwise_count(a[:, None, :] & b[None, :, :]).sum(-1)
    union = np.bitwise_count(a[:, None, :] | b[None, :, :]).sum(-1)
    np.testing.assert_allclose(sim, np.where(union > 0, inter / np.maximum(union, 1), 0), atol=1e-6)


def test_featurize_smiles_equals_two_pass():
    smiles = SMILES + ["[Na+].CC(=O)[O-]", "C1CC("]
    result = chem.featurize_smiles(smiles, n_jobs=1)
    canonical, keys, errors = chem.standardize_many(smiles, n_jobs=1)
    assert result.smiles == canonical and result.inchikeys == keys and result.errors == errors
    ok = [i for i, c in enumerate(canonical) if c is not None]
    np.testing.assert_array_equal(result.fingerprints[ok],
                                  chem.morgan_fingerprints([canonical[i] for i in ok], n_jobs=1))
    assert not result.fingerprints[len(smiles) - 1].any()


def test_featurize_smiles_processes_each_distinct_string_once_and_reports_every_row(monkeypatch):
    smiles = ["CCO", "C1CC(", "c1ccccc1O", "CCO", " CCO", "C1CC(", "CCO"]
    seen = []
    featurize_chunk = chem._featurize_chunk
    monkeypatch.setattr(chem, "_featurize_chunk", lambda args: (seen.extend(args[1]), featurize_chunk(args))[1])
    result = chem.featurize_smiles(smiles, n_jobs=1)
    assert seen == ["CCO", "C1CC(", "c1ccccc1O", " CCO"]
    one_by_one = [chem.featurize_smiles([s], n_jobs=1) for s in smiles]
    assert result.smiles == [r.smiles[0] for r in one_by_one]
    assert result.inchikeys == [r.inchikeys[0] for r in one_by_one]
    np.testing.assert_array_equal(result.fingerprints, np.concatenate([r.fingerprints for r in one_by_one]))
    assert [(i, s) for i, s, _ in result.errors] == [(1, "C1CC("), (5, "C1CC(")]
    assert result.errors[0][2] == one_by_one[1].errors[0][2]


def test_distinct_strings_inverse():
    distinct, inverse = chem.distinct_strings(["b", "a", "b", None, None])
    assert distinct == ["b", "a", None] and inverse.tolist() == [0, 1, 0, 2, 2]
    assert chem.distinct_strings(["x", "y"]) == (["x", "y"], None)


@pytest.mark.skipif(not HUB_SAMPLES.is_file(), reason=f"shared data absent: {HUB_SAMPLES}")
def test_featurize_fingerprint_of_standardised_mol_equals_canonical_smiles_fp():
    raw = pd.read_csv(HUB_SAMPLES, sep="\t", comment="!", dtype=str)["smiles"].dropna().tolist()[:3000]
    result = chem.featurize_smiles(raw, n_jobs=1)
    ok = [i for i, c in enumerate(result.smiles) if c is not None]
    np.testing.assert_array_equal(result.fingerprints[ok],
                                  chem.morgan_fingerprints([result.smiles[i] for i in ok], n_jobs=1))


@pytest.mark.skipif(not HUB_SAMPLES.is_file(), reason=f"shared data absent: {HUB_SAMPLES}")
def test_featurize_smiles_as_given_same_structures_as_canonical():
    # every Hub row: salts, charges, stereo, CXSMILES (glecaprevir's '|t:1|' sets a double bond's geometry)
    raw = pd.read_csv(HUB_SAMPLES, sep="\t", comment="!", dtype=str)["smiles"].dropna().drop_duplicates().tolist()
    canonical = chem.featurize_smiles(raw, n_jobs=1)
    given = chem.featurize_smiles(raw, n_jobs=1, smiles_as_given=True)
    assert given.inchikeys == canonical.inchikeys and given.errors == canonical.errors
    np.testing.assert_array_equal(given.fingerprints, canonical.fingerprints)
    kept = [i for i, s in enumerate(given.smiles) if s is not None and s != canonical.smiles[i]]
    assert len(kept) > 1000  # most Hub SMILES are not RDKit's canonical text
    assert all(given.smiles[i] == raw[i].strip() for i in kept)
    again = chem.featurize_smiles([given.smiles[i] for i in kept], n_jobs=1)  # the stored text is the structure
    assert again.inchikeys == [canonical.inchikeys[i] for i in kept]
    np.testing.assert_array_equal(again.fingerprints, canonical.fingerprints[kept])


@pytest.mark.parametrize("smiles", [
    "CC=CC |t:1|", "CC=CC |c:1|", "CCC |^1:2|", "CC(O)F |(0,0,;1,0,;1.5,0.8,;1.5,-0.8,),wU:1.2|",
    "C[C@H](C)O", "C/C=C/C", "[H]OC", "CCO ethanol"])
def test_featurize_smiles_as_given_writes_canonical_smiles_where_the_text_is_not_the_structure(smiles):
    given = chem.featurize_smiles([smiles], n_jobs=1, smiles_as_given=True)
    canonical = chem.featurize_smiles([smiles], n_jobs=1)
    assert given.smiles == canonical.smiles and given.inchikeys == canonical.inchikeys
    assert chem.standardize_smiles(given.smiles[0])[1] == given.inchikeys[0]


def test_featurize_chunk_keeps_rows_apart_when_one_step_fails(monkeypatch):
    inchikey = chem._inchikey
    monkeypatch.setattr(chem, "_inchikey", lambda mol: ("", "InChI generation failed") if mol.GetNumAtoms() == 3
                        else inchikey(mol))
    smiles, keys, fps, errors = chem._featurize_chunk((10, ["CN", "CCO", "C1CC(", "CCCC"], 2, 64, True))
    assert smiles == ["CN", None, None, "CCCC"] and keys[1:3] == [None, None]
    assert keys[0] == chem.standardize_smiles("CN")[1] and keys[3] == chem.standardize_smiles("CCCC")[1]
    assert [(i, s) for i, s, _ in errors] == [(11, "CCO"), (12, "C1CC(")]
    assert errors[0][2] == "InChI generation failed"
    assert not fps[1:3].any() and fps[0].any() and fps[3].any()


# ---------------------------------------------------------------- scaffolds

def test_murcko_scaffold_ids_group_series_and_keep_acyclic_apart():
    smiles = ["Clc1ccc(cc1)C(=O)NCC", "c1ccccc1", "CCO", "OC(=O)c1ccccc1", "CCCO", "CN1CCN(CC1)c1ccccc1",
              "c1ccc(cc1)N1CCNCC1"]
    ids = chem.murcko_scaffold_ids(smiles)
    assert ids.dtype == np.int64 and ids.tolist() == [0, 0, 1, 0, 2, 3, 3]  # benzene, ethanol, propanol, phenylpiperazine
    with pytest.raises(ValueError, match="#1 'C1CC'"):
        chem.murcko_scaffold_ids(["CCO", "C1CC"])
    assert chem.murcko_scaffold_ids(["c1ccccc1", "C1CC", "Cc1ccccc1"], strict=False).tolist() == [0, 1, 0]


def test_library_files_a_spreadsheet_mangles_are_named_not_misread(tmp_path):
    """An unbalanced quote would swallow every later row into one field; a Latin-1 export fails to
    decode; a .smi CXSMILES block is not the compound id; integer ids with a gap stay integers."""
    quote = tmp_path / "quote.csv"
    quote.write_text('id,name,smiles\nX1,"bad name,CCO\nX2,n2,CCN\nX3,n3,CCCN\n')
    with pytest.raises(ValueError, match=r"quote.csv line 2: a quoted field runs to line 4"):
        chem.read_library(quote)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,name,smiles\nX1,caf\xe9ine,CCO\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv: not UTF-8 text \(byte 21"):
        chem.read_library(latin)
    smi = tmp_path / "cx.smi"
    smi.write_text("C[C@H](N)C(=O)O |&1:1| ALA1 alanine\nCCO ETH ethanol\n")
    table = chem.read_library(smi).table
    assert table[["compound_id", "name"]].values.tolist() == [["ALA1", "alanine"], ["ETH", "ethanol"]]
    parquet = tmp_path / "ids.parquet"
    pd.DataFrame({"compound_id": [101, None, 103], "smiles": ["CCO", "CCN", "CCCO"]}).to_parquet(parquet)
    ids = chem.read_library(parquet).table["compound_id"].tolist()
    assert ids[0] == "101" and ids[2] == "103" and ids[1].startswith(chem.DERIVED_ID_PREFIX)


def test_a_library_without_rows_is_an_error(tmp_path):
    header = tmp_path / "header.csv"
    header.write_text("id,smiles\n")
    with pytest.raises(ValueError, match="header.csv: no compound rows"):
        chem.read_library(header)


def test_library_headers_match_with_spaces_and_dmso_is_not_a_compound_id(tmp_path):
    path = tmp_path / "vendor.csv"
    path.write_text("Compound ID,Compound Name,SMILES\n"
                    "ENM-001,amine a,CCN\n"
                    "dmso,the vehicle,CCCCO\n"
                    "ENM-002,amine b,CCCN\n"
                    "BRD-M56212252-001-01-0,DMSO,CS(C)=O.CS(C)=O\n"  # the Repurposing Hub lists the solvent
                    "NA,ethanol,CCO\n")
    result = chem.read_library(path)
    assert result.table[["compound_id", "name"]].values.tolist() == [["ENM-001", "amine a"], ["ENM-002", "amine b"]]
    assert [(line, reason) for line, _, reason in result.errors] == [
        (3, "compound id 'dmso' is reserved for the negative control wells"),
        (5, "the solvent DMSO, not a compound (every plate has its DMSO wells as the negative control)"),
        (6, "compound id 'NA' reads as a missing value in table readers (pandas, R): its wells would read back "
            "as empty; give it another id")]
