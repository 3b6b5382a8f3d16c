import dataclasses
import json

import pytest

from models.config import FeatureAssayConfig, config_hash


def test_json_round_trip_and_frozen():
    config = FeatureAssayConfig(n_members=5, hidden_dim=64, time_scheme="logit_normal")
    again = FeatureAssayConfig.from_dict(json.loads(config.to_json()))
    assert again == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_members = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown FeatureAssayConfig keys"):
        FeatureAssayConfig.from_dict({**config.to_dict(), "n_layers": 3})


def test_hash_depends_on_config_and_data():
    a = FeatureAssayConfig()
    assert config_hash(a, "data1") == config_hash(FeatureAssayConfig(), "data1")
    assert config_hash(a, "data1") != config_hash(a, "data2")
    assert config_hash(a, "data1") != config_hash(FeatureAssayConfig(n_steps=999), "data1")
    assert len(config_hash(a)) == 12


def test_logging_and_checkpoint_cadence_name_no_new_version():
    a = FeatureAssayConfig()
    cadence = dataclasses.replace(a, checkpoint_every=10, log_every=1, write_loss_plot=False)
    assert config_hash(cadence, "data1") == config_hash(a, "data1")
    assert set(FeatureAssayConfig.RUN_ONLY_FIELDS) <= {f.name for f in dataclasses.fields(a)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_members": 0}, "n_members"),
        ({"hidden_dim": 1.5}, "hidden_dim"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"p_drop_plate": 1.0}, "p_drop_plate"),
        ({"time_scheme": "cosine"}, "time_scheme"),
        ({"sampler": "rk4"}, "sampler"),
        ({"guidance_scale": 2.0, "p_drop_compound": 0.0}, "guidance_scale"),
        ({"learning_rate": 0.0}, "learning_rate"),
    ],
)
def test_invalid_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureAssayConfig(**kwargs)
