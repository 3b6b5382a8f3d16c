"""loop/demo.py removes its previous campaign folder, and nothing else (the rounds are exercised by
``make demo`` and test_end_to_end; here the demo stops right after creating its campaign)."""

import sys

import pytest

import loop.demo
from loop.campaign import CONFIG_FILE, Campaign, CampaignConfig
from loop.demo import DEMO_MARKER, DemoError, run_demo


class Stop(Exception):
    """Raised where the demo would start adding its library."""


@pytest.fixture
def stop_after_init(monkeypatch):
    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(loop.demo, "add_virtual_library", stop)


def test_the_demo_refuses_a_real_campaign_and_leaves_it(tmp_path, stop_after_init):
    root = tmp_path / "my_campaign"
    Campaign.init(root, CampaignConfig(seed=0))  # a lab's campaign: random id, same seed as the demo
    (root / "rounds" / "notes.txt").write_text("two months of plates")
    with pytest.raises(DemoError, match=f"{root} is not a demo campaign"):
        run_demo(root)
    assert (root / CONFIG_FILE).exists() and (root / "rounds" / "notes.txt").exists()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.png").write_bytes(b"x")
    with pytest.raises(DemoError, match="not a demo campaign"):
        run_demo(other)
    assert (other / "a.png").exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DemoError, match="is not a folder"):
        run_demo(tmp_path / "a_file")


def test_the_demo_reruns_over_its_own_campaign(tmp_path, stop_after_init):
    root = tmp_path / "demo_campaign"
    with pytest.raises(Stop):
        run_demo(root)  # a new folder
    assert (root / DEMO_MARKER).is_file() and (root / CONFIG_FILE).exists()
    (root / "rounds" / "left_over.txt").write_text("x")
    with pytest.raises(Stop):
        run_demo(root)  # marked: removed and made again
    assert (root / DEMO_MARKER).is_file() and not (root / "rounds" / "left_over.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Stop):
        run_demo(empty)
    assert (empty / DEMO_MARKER).is_file()


def test_a_demo_campaign_made_before_the_marker_is_known_by_its_configuration(tmp_path, stop_after_init):
    """Demo campaigns made before the marker have the demo's own campaign.json (seed, and an id
    derived from it); a changed one is no longer taken for the demo's."""
    old_demo = tmp_path / "demo_campaign"
    Campaign.init(old_demo, CampaignConfig(seed=0), id_seed=0)  # as the demo made it, no marker
    with pytest.raises(Stop):
        run_demo(old_demo)
    assert (old_demo / DEMO_MARKER).is_file()
    changed = tmp_path / "changed"
    Campaign.init(changed, CampaignConfig(seed=0, dose_um=3.0), id_seed=0)
    with pytest.raises(DemoError, match="changed is not a demo campaign"):
        run_demo(changed)
    assert (changed / CONFIG_FILE).exists()


def test_the_demo_command_names_the_refused_folder(tmp_path, stop_after_init, monkeypatch, capsys):
    root = tmp_path / "real"
    Campaign.init(root, CampaignConfig())
    monkeypatch.setattr(sys, "argv", ["loop.demo", "--campaign", str(root)])
    with pytest.raises(SystemExit) as exit_info:
        loop.demo.main()
    assert exit_info.value.code == 1 and "not a demo campaign" in capsys.readouterr().out
    assert (root / CONFIG_FILE).exists()
