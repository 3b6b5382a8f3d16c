"""loop/library.py: registering compounds and the report a user reads."""

import numpy as np
from sqlmodel import select

from lab_io import chem
from loop import store
from loop.campaign import Campaign
from loop.library import add_library_file


def test_report_counts_each_skipped_row_once_and_for_its_reason(tmp_path):
    campaign = Campaign.init(tmp_path / "c")
    first = tmp_path / "first.csv"
    first.write_text("id,smiles\nX1,CCO\nX2,CCN\n")
    report = add_library_file(campaign, first, n_jobs=1)
    assert (report.n_added, report.n_already_registered, report.n_id_conflicts) == (2, 0, 0)
    second = tmp_path / "second.csv"
    # X1 again as ethanol (registered), X1 as propanol (an in-file id clash: an error), X3 new, C1CC invalid
    second.write_text("id,smiles\nX1,OCC\nX1,CCCO\nX3,CCCC\nX4,C1CC\n")
    report = add_library_file(campaign, second, n_jobs=1)
    assert (report.n_added, report.n_already_registered, report.n_id_conflicts, report.n_invalid) == (1, 1, 0, 2)
    third = tmp_path / "third.csv"
    third.write_text("id,smiles\nX2,CCCCO\n")  # X2 is ethylamine's id
    report = add_library_file(campaign, third, n_jobs=1)
    assert (report.n_added, report.n_already_registered, report.n_id_conflicts) == (0, 0, 1)


def test_library_add_keeps_given_smiles_unless_standardisation_changed_the_structure(tmp_path):
    campaign = Campaign.init(tmp_path / "c")
    path = tmp_path / "lib.csv"
    # as given (not RDKit's canonical 'CCO' / 'Oc1ccccc1'); a salt; a charged amine; a CXSMILES
    # extension; another spelling of ethanol (a duplicate by InChIKey)
    path.write_text("id,smiles\nA,OCC\nB,c1ccccc1O\nC,CC(=O)[O-].[Na+]\nD,[NH3+]CC\n"
                    "E,\"C[C@H](N)C(=O)O |&1:1|\"\nF,C(O)C\n")
    report = add_library_file(campaign, path, n_jobs=1)
    assert (report.n_added, report.n_duplicate_in_file) == (5, 1)
    with campaign.session() as session:
        stored = {c.compound_id: c.smiles for c in session.exec(select(store.Compound)).all()}
    assert stored == {"A": "OCC", "B": "c1ccccc1O", "C": "CC(=O)O", "D": "CCN", "E": "C[C@H](N)C(=O)O"}
    canonical = chem.read_library(path, fingerprints=True)
    given = chem.read_library(path, fingerprints=True, smiles_as_given=True)
    assert canonical.table["smiles"].tolist() == ["CCO", "Oc1ccccc1", "CC(=O)O", "CCN", "C[C@H](N)C(=O)O"]
    assert given.table["inchikey"].tolist() == canonical.table["inchikey"].tolist()
    np.testing.assert_array_equal(given.fingerprints, canonical.fingerprints)
