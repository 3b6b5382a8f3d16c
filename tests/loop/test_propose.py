"""Unit tests of loop/propose.py helpers (the whole proposal is exercised in test_end_to_end)."""

import numpy as np
import pandas as pd
import pytest

from acquisition.anchor import on_prediction_scale
from loop.propose import _Measurements, surrogate_labels


def test_surrogate_labels_keep_only_the_campaign_dose(caplog):
    """A compound measured at another dose is no label of its value at the campaign's dose: the
    dose-blind surrogate learns from the conditions at 10 uM (a plate map's rounding included)."""
    measured = pd.DataFrame(dict(compound_id=["a", "b", "a", "c"], dose_um=[10.0, 10.0000001, 1.0, 30.0]))
    fingerprints = np.arange(4 * 256, dtype=np.uint8).reshape(4, 256)
    predicted = np.array([[1.0, 2.0, 0.5, 4.0], [1.5, 2.5, 0.7, 3.0]])
    observed = np.array([3.0, 5.0, 0.1, 9.0])
    measurements = _Measurements(fingerprints, predicted, observed)
    with caplog.at_level("INFO", logger="loop.propose"):
        labels = surrogate_labels(measured, measurements, 10.0, log_scale=True)
    np.testing.assert_array_equal(labels["measured_fingerprints"], fingerprints[:2])
    np.testing.assert_allclose(labels["measured_activity"],
                               on_prediction_scale(predicted[:, :2], observed[:2], log_scale=True))
    assert "2 measured at other doses (1, 30 uM) are left out" in caplog.text
    assert surrogate_labels(measured, measurements, 3.0, log_scale=True) == {}  # none at 3 uM: no labels


def test_surrogate_labels_at_one_dose_are_all_kept(caplog):
    measured = pd.DataFrame(dict(compound_id=["a", "b", "c"], dose_um=[5.0, 5.0, 5.0]))
    measurements = _Measurements(np.zeros((3, 256), np.uint8), np.array([[0.1, -0.2, 0.3]]), np.array([1.0, 2.0, 4.0]))
    with caplog.at_level("INFO", logger="loop.propose"):
        labels = surrogate_labels(measured, measurements, 5.0, log_scale=False)
    assert len(labels["measured_activity"]) == 3 and "left out" not in caplog.text
    assert labels["measured_activity"] == pytest.approx(on_prediction_scale(measurements.predicted,
                                                                            measurements.observed, log_scale=False))
