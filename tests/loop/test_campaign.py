import pytest

from loop.campaign import Campaign, CampaignConfig, CampaignError, new_campaign_id, resolve_db_url
from loop import store


def test_config_json_round_trip():
    cfg = CampaignConfig(seed=3, dose_um=5.0, layout={"n_negative_controls": 24}, selection={"beta": 4.0})
    assert CampaignConfig.from_json(cfg.to_json()) == cfg


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown campaign config keys"):
        CampaignConfig.from_json('{"seed": 1, "budgett": 3}')


def test_init_open_and_refuse_reinit(tmp_path):
    root = tmp_path / "c"
    Campaign.init(root, CampaignConfig(seed=7))
    assert Campaign.open(root).config.seed == 7
    with pytest.raises(CampaignError, match="already exists"):
        Campaign.init(root)


def test_open_missing_campaign_names_folder(tmp_path):
    with pytest.raises(CampaignError, match=str(tmp_path / "nope")):
        Campaign.open(tmp_path / "nope")


def test_db_url_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("LOOP_DB_URL", raising=False)
    assert resolve_db_url(tmp_path, None).endswith("campaign.db")
    monkeypatch.setenv("LOOP_DB_URL", "sqlite:///env.db")
    assert resolve_db_url(tmp_path, None) == "sqlite:///env.db"
    assert resolve_db_url(tmp_path, "sqlite:///flag.db") == "sqlite:///flag.db"


def test_any_sqlalchemy_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    campaign = Campaign.init(tmp_path / "c", db_url=url)
    assert (tmp_path / "elsewhere.db").exists()
    assert not (tmp_path / "c" / "campaign.db").exists()
    with campaign.session() as session:
        assert store.count(session, store.Compound) == 0



def test_a_second_writer_waits_for_the_lock_and_then_fails_naming_the_campaign(tmp_path):
    """Two processes writing one campaign would interleave (fingerprint rows, round numbers, plate
    status); the lock makes the second wait, then refuse by name. Nested blocks of one process run."""
    import subprocess
    import sys
    import time

    campaign = Campaign.init(tmp_path / "c")
    code = ("import sys\nfrom loop.campaign import Campaign\n"
            "with Campaign.open(sys.argv[1]).writing('test holder'):\n"
            "    print('held', flush=True)\n    sys.stdin.readline()\n")  # holds the lock until told to let go
    holder = subprocess.Popen([sys.executable, "-c", code, str(campaign.root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(CampaignError, match="another loop command is writing.*propose did not start"):
            with campaign.writing("propose", timeout_s=0.5):
                pass
        assert time.monotonic() - started >= 0.5
    finally:
        holder.stdin.close()
        holder.wait(60)
    with campaign.writing("ingest"), campaign.writing("nested"):  # free again; nesting is fine
        pass


def test_another_thread_waits_for_the_lock(tmp_path):
    import threading

    campaign = Campaign.init(tmp_path / "c")
    outcome = []

    def second_writer():
        try:
            with campaign.writing("ingest", timeout_s=0.3):
                outcome.append("ran")
        except CampaignError as err:
            outcome.append(str(err))

    with campaign.writing("propose"):
        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()  # it gave up while the lock was still held
    assert len(outcome) == 1 and "ingest did not start" in outcome[0]


def test_init_gives_each_campaign_its_own_id_and_barcode_tag(tmp_path):
    """A campaign.json copied from another campaign does not carry its identity over."""
    first = Campaign.init(tmp_path / "a")
    second = Campaign.init(tmp_path / "b", CampaignConfig.from_json((tmp_path / "a" / "campaign.json").read_text()))
    assert len(first.config.campaign_id) == 12 and first.config.campaign_id != second.config.campaign_id
    assert first.config.barcode_tag == first.config.campaign_id[:4].upper() + "-"
    assert CampaignConfig().barcode_tag == ""  # campaigns made before ids keep LP0001
    assert Campaign.open(tmp_path / "a").config.campaign_id == first.config.campaign_id
    # a simulated campaign (backtest, demo) gets its id from its seed: same plates on every run
    seeded = [Campaign.init(tmp_path / name, id_seed=7).config.campaign_id for name in ("s1", "s2")]
    assert seeded[0] == seeded[1] == new_campaign_id(7) != new_campaign_id(8)
    assert len(new_campaign_id(7)) == 12 and int(new_campaign_id(7), 16) >= 0
    assert len({new_campaign_id() for _ in range(20)}) == 20  # a lab campaign: uuid4


def test_opening_with_another_store_is_refused_and_creates_nothing(tmp_path, monkeypatch):
    """Created with --db-url; opened without it (or with another campaign's store): refused, where it
    used to start an empty store and overwrite the shared fingerprint file."""
    monkeypatch.delenv("LOOP_DB_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    Campaign.init(tmp_path / "c", db_url=url)
    with pytest.raises(CampaignError, match="does not exist.*--db-url"):
        Campaign.open(tmp_path / "c")
    assert not (tmp_path / "c" / "campaign.db").exists()
    Campaign.init(tmp_path / "other")
    with pytest.raises(CampaignError, match="not this campaign's"):
        Campaign.open(tmp_path / "c", db_url=f"sqlite:///{tmp_path / 'other' / 'campaign.db'}")
    assert Campaign.open(tmp_path / "c", db_url=url).config.campaign_id


@pytest.mark.parametrize("url, match", [("foo", "cannot open the store foo"),
                                        ("sqlite:////no/such/folder/x.db", "cannot open the store")])
def test_a_store_url_that_cannot_be_opened_is_one_clear_error(tmp_path, url, match):
    with pytest.raises(CampaignError, match=match):
        Campaign.init(tmp_path / "c", db_url=url)
    assert not (tmp_path / "c" / "campaign.json").exists()


@pytest.mark.parametrize("config, match", [
    (CampaignConfig(dose_um=-5.0), "'dose_um': must be a number > 0"),
    (CampaignConfig(dose_um="ten"), "'dose_um': must be a number > 0, got 'ten'"),
    (CampaignConfig(layout={"n_negative_controls": 0}), "'layout': n_negative_controls must be >= 1"),
    (CampaignConfig(selection={"bta": 2}), "'selection'"),
])
def test_init_refuses_a_config_a_later_command_would_fail_on(tmp_path, config, match):
    with pytest.raises(CampaignError, match=match):
        Campaign.init(tmp_path / "c", config)
    assert not (tmp_path / "c" / "campaign.json").exists()


def test_init_refuses_a_store_that_already_holds_a_campaign(tmp_path):
    """LOOP_DB_URL left pointing at campaign A's store: `init` of B would have shared it."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    Campaign.init(tmp_path / "a", db_url=url)
    with pytest.raises(CampaignError, match="already holds a campaign"):
        Campaign.init(tmp_path / "b", db_url=url)
    assert not (tmp_path / "b").exists()  # no half-made campaign folder


def test_a_campaign_made_before_ids_is_refused_without_its_store_too(tmp_path, monkeypatch):
    import json
    monkeypatch.delenv("LOOP_DB_URL", raising=False)
    Campaign.init(tmp_path / "c")
    config = json.loads((tmp_path / "c" / "campaign.json").read_text())
    del config["campaign_id"]
    (tmp_path / "c" / "campaign.json").write_text(json.dumps(config))
    assert Campaign.open(tmp_path / "c").config.barcode_tag == ""
    (tmp_path / "c" / "campaign.db").unlink()
    with pytest.raises(CampaignError, match="does not exist"):
        Campaign.open(tmp_path / "c")
    assert not (tmp_path / "c" / "campaign.db").exists()


def test_sqlite_urls_with_options_are_read_as_files(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    Campaign.init(tmp_path / "c", db_url=url)
    assert Campaign.open(tmp_path / "c", db_url=url + "?timeout=30").config.campaign_id
    with pytest.raises(CampaignError, match="does not exist"):
        Campaign.open(tmp_path / "c", db_url=f"sqlite+pysqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()
