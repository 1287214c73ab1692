"""The constant-action phase read from metrics rows, against phases written out by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from utils.saturation import EXIT_DIAGNOSTICS, ConstantActionPhase, constant_action_phase


def table(rows: list[tuple[int, float]], **columns: list[float]) -> pd.DataFrame:
    """Rows of (frames, saturated fraction), with an evaluation row (no training values) after every 2000 frames."""
    records = []
    for index, (frames, fraction) in enumerate(rows):
        record = {"frames": frames, "actor/saturated_fraction": fraction}
        record.update({name: values[index] for name, values in columns.items()})
        records.append(record)
        if frames % 2000 == 0:
            records.append({"frames": frames, "eval/return": 135.0})
    return pd.DataFrame.from_records(records)


def test_a_run_that_falls_back_leaves_the_phase_only_after_its_last_saturated_row() -> None:
    rows = [(5000, 0.70), (5000, 0.95), (6000, 1.00), (7000, 0.50), (8000, 0.92), (9000, 0.30), (9000, 0.10)]
    grads = [1.0, 0.01, 0.001, 0.5, 0.02, 0.4, 0.6]
    phase = constant_action_phase(table(rows, **{"grad_norm/actor": grads}))
    assert (phase.entered, phase.left, phase.relapses) == (5000, 9000, 1)
    # the exit's diagnostics: the mean over the two rows logged at 9000 frames; absent columns are left out
    assert phase.at_exit == pytest.approx({"actor/saturated_fraction": 0.20, "grad_norm/actor": 0.5})


def test_the_exit_rows_are_those_after_the_last_saturated_row_at_the_same_frame_count() -> None:
    phase = constant_action_phase(table([(5000, 1.0), (6000, 0.95), (6000, 0.40), (6000, 0.20), (7000, 0.1)]))
    assert (phase.entered, phase.left, phase.relapses) == (5000, 6000, 0)
    assert phase.at_exit["actor/saturated_fraction"] == pytest.approx(0.30)


def test_never_entered_still_inside_and_a_v3_run() -> None:
    assert constant_action_phase(table([(5000, 0.5), (6000, 0.89)])) == ConstantActionPhase(None, None, 0, {})
    assert constant_action_phase(table([(5000, 0.5), (6000, 0.95), (7000, 0.1), (8000, 0.99)])) == (
        ConstantActionPhase(entered=6000, left=None, relapses=1, at_exit={})
    )
    assert constant_action_phase(pd.DataFrame({"frames": [5000], "loss/actor": [1.0]})) is None


def test_the_threshold_decides_what_counts_as_saturated() -> None:
    rows = table([(5000, 0.85), (6000, 0.80), (7000, 0.40)], **{"kl/above_free_nats": [0.0, 0.1, 0.3]})
    assert constant_action_phase(rows).entered is None
    strict = constant_action_phase(rows, threshold=0.8)
    assert (strict.entered, strict.left) == (5000, 7000)
    assert math.isclose(strict.at_exit["kl/above_free_nats"], 0.3)
    assert set(strict.at_exit) <= set(EXIT_DIAGNOSTICS)
    with pytest.raises(ValueError, match=r"threshold=1\.5 is not a fraction"):
        constant_action_phase(rows, threshold=1.5)
