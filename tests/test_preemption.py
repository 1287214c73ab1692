"""Stop signals: the first raises in the training loop, but never inside a deferred unit of work; a stop that a
library wrapped or swallowed still saves the run."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
from pathlib import Path
from typing import Any

import pytest

import utils.train
from tests.runs import train_in_process
from utils.checkpoint import load_checkpoint
from utils.preemption import StopRequested, StopSignals, is_stop


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


def test_a_stop_is_recognised_through_the_exceptions_a_library_wraps_it_in() -> None:
    def wrapped(stop: BaseException) -> RuntimeError:
        try:
            try:
                raise stop
            except BaseException as inner:
                raise RuntimeError("Shape mismatch") from inner  # TorchRL's spec.encode does this
        except RuntimeError as outer:
            try:
                raise ValueError("while handling it") from None  # context only, no cause
            except ValueError as last:
                assert last.__context__ is outer
                return last

    assert is_stop(StopRequested("SIGTERM")) and is_stop(KeyboardInterrupt())
    assert is_stop(wrapped(StopRequested("SIGTERM"))) and is_stop(wrapped(KeyboardInterrupt()))
    assert not is_stop(wrapped(OSError("disk full"))) and not is_stop(RuntimeError("Shape mismatch"))


def test_a_safe_point_raises_for_a_signal_whose_exception_was_swallowed(stop_signals) -> None:
    stop_signals.check()  # nothing received: nothing raised
    with contextlib.suppress(StopRequested):  # a library's broad except
        os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(StopRequested, match="SIGTERM"):
        stop_signals.check()
    stop_signals.stop_raising()
    stop_signals.check()  # saving the checkpoint: no longer raised


def _stopping_evaluation(swallow: bool, calls: list[int]):
    """``evaluate_policy`` that receives SIGTERM inside (as inside TorchRL's env step), then either re-raises the
    stop wrapped in a ``RuntimeError`` or swallows it and evaluates normally."""
    evaluate = utils.train.evaluate_policy

    def evaluation(*args: Any, **kwargs: Any):
        calls.append(1)
        if len(calls) == 1:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except StopRequested as stop:
                if not swallow:
                    raise RuntimeError("Shape mismatch") from stop
        return evaluate(*args, **kwargs)

    return evaluation


@pytest.mark.parametrize("swallow", [False, True], ids=["wrapped", "swallowed"])
def test_a_stop_signal_inside_library_code_during_evaluation_saves_and_the_resume_evaluates_again(
    tmp_path: Path, swallow: bool
) -> None:
    """The CI failure this guards: SIGTERM inside TorchRL's evaluation rollout came back as a ``RuntimeError`` and
    the run died without its checkpoint."""
    run_dir = tmp_path / "run"
    calls: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils.train, "evaluate_policy", _stopping_evaluation(swallow, calls))
        train_in_process(run_dir)
    counters = load_checkpoint(run_dir)["counters"]
    assert counters["frames"] == 80, "the run must stop (and save) at the evaluation the signal cut"
    # the cut evaluation is not counted: the resumed run makes it first (a swallowed one was finished, and counted)
    assert counters["next_eval"] == (160 if swallow else 80)
    train_in_process(run_dir, (), resume=True)
    with open(run_dir / "metrics.csv", newline="") as metrics:
        evaluations = [row["frames"] for row in csv.DictReader(metrics) if row["eval/return"]]
    assert evaluations == ["80", "160"]
