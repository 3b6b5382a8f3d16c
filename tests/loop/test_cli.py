import json

import pytest

from typer.testing import CliRunner

from loop.cli import app

runner = CliRunner()


def _loop(campaign, *args):
    return runner.invoke(app, ["--campaign", str(campaign), *args], catch_exceptions=False)


def test_init_library_propose_status(tmp_path):
    campaign = tmp_path / "c"
    assert _loop(campaign, "init", "--seed", "4").exit_code == 0
    library = tmp_path / "lib.csv"
    library.write_text("id,smiles\nA,CCO\nB,not_a_smiles\nC,c1ccccc1C(=O)O\nD,OCC\n")
    result = _loop(campaign, "library", "add", str(library))
    assert result.exit_code == 0, result.output
    assert "2 added" in result.output and "1 invalid" in result.output and "line 3" in result.output
    assert _loop(campaign, "library", "add", "--virtual", "30").exit_code == 0
    result = _loop(campaign, "propose", "--budget", "40", "--out", str(tmp_path / "plates"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plates" / "barcode_platemap.csv").exists()
    status = json.loads(_loop(campaign, "status", "--json").stdout)
    assert status["compounds"] == 32 and status["rounds"] == 1 and status["plates"]["pending"] == 1


def test_errors_exit_nonzero_with_a_message(tmp_path):
    result = _loop(tmp_path / "missing", "status")
    assert result.exit_code == 1 and "loop init" in result.output
    campaign = tmp_path / "c"
    _loop(campaign, "init")
    result = _loop(campaign, "ingest", str(tmp_path / "nowhere"))
    assert result.exit_code == 1 and "nowhere" in result.output
    result = _loop(campaign, "propose", "--budget", "0")
    assert result.exit_code == 1 and "budget" in result.output
    result = _loop(campaign, "backtest", "--profiles", str(tmp_path / "nowhere.csv"), "--cold-start", "kmeans")
    assert result.exit_code == 1 and "cold_start_method" in result.output and "kmeans" in result.output
    for bad, message in [("{not json", "not valid JSON"), ("[1]", "JSON object"),
                          ('{"anchor_prior_wieght": 0.5}', "anchor_prior_wieght"),
                          ('{"anchor_prior_sd": -1}', "anchor_prior_sd"),
                          ('{"anchor_prior_sd": "inf"}', "finite number"), ('{"anchor_prior_sd": Infinity}', "finite"),
                          ('{"measurement_anchor": "false"}', "true or false"),
                          ('{"anchor_prior_weight": true}', "finite number")]:
        result = _loop(campaign, "backtest", "--profiles", str(tmp_path / "nowhere.csv"), "--selection", bad)
        assert result.exit_code == 1 and message in result.output, result.output


def test_os_errors_name_the_path_without_a_traceback(tmp_path):
    """A file where a campaign folder should be, or a full disk, is one error line naming the path."""
    from lab_io.tempfiles import naming_path

    campaign = tmp_path / "c"
    _loop(campaign, "init")
    library = campaign / "library"
    if library.is_dir():
        library.rmdir()  # empty after init
    library.write_text("not a folder")
    result = _loop(campaign, "library", "add", "--virtual", "20")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error:" in result.output and "library" in result.output, result.output
    full = naming_path(OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device"),
                       tmp_path / "P1.wells.parquet")
    assert "P1.wells.parquet" in str(full) and full.errno == 28
    assert "P1.wells.parquet" in str(naming_path(OSError("no errno"), tmp_path / "P1.wells.parquet"))


def test_channels_option_is_a_list_of_distinct_names():
    from loop.cli import _channel_list

    assert _channel_list(None) is None and _channel_list(" Mito, AGP ,DNA") == ["Mito", "AGP", "DNA"]
    for bad in ("DNA,,ER", "DNA,DNA"):
        with pytest.raises(ValueError, match="--channels"):
            _channel_list(bad)


def test_channels_option_refuses_names_crops_would_take_for_one():
    """Names differing only in case, spaces or punctuation name one channel for the crops folder
    ingest writes (load_crops would refuse it later): refused at once, naming the option."""
    from loop.cli import _channel_list

    for bad in ("dna,DNA,Actin", "Hoechst 33342,hoechst-33342,ER", "DNA,-,ER"):
        with pytest.raises(ValueError, match=r"--channels .*ignoring case"):
            _channel_list(bad)
    assert _channel_list("Hoechst 33342,ER") == ["Hoechst 33342", "ER"]  # stored as Hoechst33342 by the reader
