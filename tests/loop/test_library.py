"""loop/library.py: registering compounds and the report a user reads."""

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
