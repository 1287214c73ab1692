"""Stop signals: the first raises in the training loop, but never inside a deferred unit of work."""

from __future__ import annotations

import os
import signal

import pytest

from utils.preemption import StopRequested, StopSignals


@pytest.fixture
def stop_signals():
    signals = StopSignals().install()
    yield signals
    signals.stop_raising()
    for signum, handler in signals._previous.items():
        signal.signal(signum, handler)


def test_a_signal_inside_a_deferred_block_raises_only_when_the_block_has_finished(stop_signals) -> None:
    finished = []
    with pytest.raises(StopRequested, match="SIGTERM"), stop_signals.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        finished.append("rest of the block")
    assert finished == ["rest of the block"], "a deferred block must run to its end after a stop signal"
    assert stop_signals.received == [signal.SIGTERM]


def test_a_signal_outside_deferred_blocks_raises_at_once_and_later_ones_are_only_recorded(stop_signals) -> None:
    with pytest.raises(StopRequested):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the first stop signal must raise where it arrives")
    os.kill(os.getpid(), signal.SIGTERM)  # while the checkpoint is written: recorded, not raised
    with stop_signals.deferred():
        pass
    assert stop_signals.received == [signal.SIGTERM, signal.SIGTERM]


def test_nested_deferred_blocks_raise_once_at_the_outermost_end(stop_signals) -> None:
    steps = []
    with pytest.raises(StopRequested), stop_signals.deferred():
        with stop_signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
        steps.append("after the inner block")
    assert steps == ["after the inner block"]


def test_a_block_without_a_signal_raises_nothing(stop_signals) -> None:
    with stop_signals.deferred():
        pass
    assert stop_signals.received == []
