"""The anomaly detector (pipeline/anomaly.py): what counts as a spike, its history across a checkpoint, the limit on
rollbacks."""

from __future__ import annotations

import math

import pytest

from pipeline.anomaly import AnomalyDetector, AnomalySettings, OnAnomaly, TooManyRollbacks


def detector(factor: float = 2.0, window: int = 4, max_rollbacks: int = 2, period: int = 100) -> AnomalyDetector:
    return AnomalyDetector(AnomalySettings(OnAnomaly.ROLLBACK, factor, window, 1, max_rollbacks, period))


def test_a_spike_is_judged_against_the_median_of_a_full_window():
    d = detector()
    assert [d.check(s, loss, False) for s, loss in enumerate([9.0, 1.0, 50.0, 1.2], 1)] == [None] * 4  # filling
    assert d.check(5, 2.0 * 1.1, False) is None  # median of (1.0, 50, 1.2, 9.0) is 5.1: 2.2 is no spike
    cause = d.check(6, 11.0, False)  # the window is now (1.0, 50, 1.2, 2.2): median 1.7, 11 > 3.4
    assert cause is not None and cause.startswith("loss spike: 11 > 2 x 1.7")
    assert list(d.losses) == [1.0, 50.0, 1.2, 2.2]  # an anomalous loss does not join the history


def test_non_finite_losses_are_anomalies_and_the_factor_0_turns_spikes_off():
    d = detector(factor=0.0, window=1)
    assert d.check(1, 1.0, False) is None and d.check(2, 1e9, False) is None
    assert d.check(3, math.nan, False) == d.check(4, 1.0, True) == "non-finite loss"


def test_the_history_and_the_rollbacks_travel_in_the_checkpoint():
    d = detector()
    for s, loss in enumerate([3.0, 2.0, 2.5], 1):
        d.check(s, loss, False)
    d.rolled_back(10, "non-finite loss", math.nan, 8)
    e = detector()
    e.load_state_dict(d.state_dict())
    assert list(e.losses) == list(d.losses) and e.rollbacks == d.rollbacks
    e.load_state_dict({"losses": [1.0], "rollbacks": []})  # a checkpoint from before the rollback: it is kept
    assert list(e.losses) == [1.0] and [r["step"] for r in e.rollbacks] == [10]


def test_more_rollbacks_than_allowed_within_the_period_stop_naming_them():
    d = detector(max_rollbacks=2, period=100)
    d.rolled_back(10, "non-finite loss", math.nan, 8)
    d.rolled_back(200, "loss spike: ...", 9.0, 198)  # the first is out of the period by now
    d.rolled_back(250, "non-finite loss", math.nan, 248)
    with pytest.raises(TooManyRollbacks, match=r"3 rollbacks within 100 steps, more than --max-rollbacks 2: step 200"):
        d.rolled_back(260, "non-finite loss", math.nan, 258)
