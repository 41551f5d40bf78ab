"""engine.step_trace: the summary of a step timeline."""

import pytest

from engine.step_trace import StepRecord, StepTrace


def test_summary_splits_step_kinds_and_names_the_slowest_step():
    trace = StepTrace([StepRecord(0.0, 0.010, 0.004, 130, 2), StepRecord(0.010, 0.002, 0.001, 2, 2),
                       StepRecord(0.020, 0.250, 0.0, 2, 2)], arrivals=[0.0, 0.0])
    summary = trace.summary()
    assert (summary["steps"], summary["prefill_steps"], summary["decode_steps"]) == (3, 1, 2)
    assert summary["slowest_step_ms"] == pytest.approx(250.0)
    assert summary["in_steps_s"] == pytest.approx(0.262) and summary["device_wait_s"] == pytest.approx(0.005)
    assert summary["between_steps_s"] == pytest.approx(0.008)
    assert summary["decode_step_median_ms"] == pytest.approx(126.0)
