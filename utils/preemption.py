"""Stopping a training run cleanly on a signal, then handing the signal on (a cluster's requeue).

While training, SIGTERM (``kill``, ``scancel``) and submitit's preemption/time-limit signal (``SIGUSR2``, or
``$SUBMITIT_PREEMPT_SIGNAL``) raise :class:`StopRequested` in the training loop, which then saves
``checkpoints/last.pt``. Inside :meth:`StopSignals.deferred` blocks (storing a collected batch, one update,
writing a checkpoint) the exception waits until the block ends, so a signal never leaves a unit of work half done.
Signals that arrive after the first are only recorded, so they cannot cut the checkpoint.

The exception is raised wherever the signal finds the program, library code included, and a library may wrap it
(TorchRL re-raises errors inside a spec's ``encode`` as ``RuntimeError("Shape mismatch ...")``) or swallow it. So
the training loop also counts an exception whose ``__cause__``/``__context__`` chain holds a
:class:`StopRequested` as a stop (:func:`is_stop`), and calls :meth:`StopSignals.check` at its safe points, which
raises for a signal whose exception was swallowed.

:meth:`StopSignals.restore_and_forward` then calls, for each signal received, the handler installed before
training: in a submitit job (SLURM, or submitit's local executor) that is submitit's requeue handler, which calls
the launcher's ``checkpoint()`` (the same job arguments, ``resume=auto`` among them), requeues the job and exits;
the requeued job continues from ``last.pt``. Outside submitit the previous handlers are the defaults, and the run
just returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType

PREEMPT_SIGNAL_VARIABLE = "SUBMITIT_PREEMPT_SIGNAL"


class StopRequested(Exception):
    """Raised in the training loop by the first stop signal; the run saves ``last.pt`` and returns."""


def preemption_signal() -> signal.Signals:
    """submitit's preemption and time-limit signal: ``SIGUSR2`` unless ``$SUBMITIT_PREEMPT_SIGNAL`` names another."""
    return signal.Signals[f"SIG{os.environ.get(PREEMPT_SIGNAL_VARIABLE, 'USR2')}"]


class StopSignals:
    """Handlers of SIGTERM and the preemption signal for one training run (see the module docstring)."""

    def __init__(self) -> None:
        self.signals = tuple(dict.fromkeys((signal.SIGTERM, preemption_signal())))
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        self._raising = False
        self._stopping = False

    def install(self) -> StopSignals:
        """Installs the handlers; the first signal from now on raises :class:`StopRequested`."""
        self._raising = True
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.signals}
        return self

    def stop_raising(self) -> None:
        """From now on signals are only recorded (the run is saving its checkpoint)."""
        self._raising = False
        self._stopping = True

    def check(self) -> None:
        """A safe point of the loop: raises :class:`StopRequested` if a stop signal has arrived, also one whose
        exception a library caught and dropped (nothing is raised once :meth:`stop_raising` was called)."""
        if self.received and not self._stopping:
            self._raising = False
            raise StopRequested(signal.Signals(self.received[0]).name)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A stop signal received inside the block raises :class:`StopRequested` when the block has finished."""
        raising, self._raising = self._raising, False
        already_received = len(self.received)
        try:
            yield
        finally:
            self._raising = raising
        if raising and len(self.received) > already_received:
            self._raising = False
            raise StopRequested(signal.Signals(self.received[already_received]).name)

    def restore_and_forward(self) -> None:
        """Puts the previous handlers back, then calls them for each signal received (in order, each once)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(self.received):
            handler = self._previous.get(signum)
            if callable(handler):
                handler(signum, None)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self._raising:
            self._raising = False
            raise StopRequested(signal.Signals(signum).name)


def is_stop(error: BaseException) -> bool:
    """True for Ctrl-C and :class:`StopRequested`, also when a library re-raised them as another exception
    (found in the ``__cause__``/``__context__`` chain)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (KeyboardInterrupt, StopRequested)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
