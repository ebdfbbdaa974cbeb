"""Stop signals, from a task's first instant to its exit.

Schedulers stop a job at any moment of an attempt: Slurm sends SIGTERM (after SIGCONT) to every
process of a step on preemption, requeue and cancel, and the job's ``--signal`` (USR1/USR2) before
the time limit or, with ``preempt_send_user_signal``, on preemption. Unhandled, each of them
terminates the process, and a task killed that way fails the job instead of requeueing it.

Flow: a task's first code (:mod:`llip_scale.launchers.task`, ``python -m llip_scale.train``)
calls :func:`record_early` before any heavy import -> a stop signal from then on is only
remembered -> the run's :class:`PreemptionFlag` takes over the handlers and counts a remembered
signal as received -> the training loop reads the flag at step boundaries (and once before the
first step), agrees on it with every rank, saves if there is something new to save, and exits
-> :func:`ignore_stop_signals` once the run is over. Only this module's handlers ever run on a
stop signal, so none of them lands on the default action, whatever the moment.

``LLIP_HOLD_DIR`` (for tests of this path) holds a task at a named phase of its start-up, so a
test can deliver a signal at a known point whatever the machine's speed: see :func:`hold`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Iterator, Optional, Sequence

STOP_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")
_early: list[str] = []  # stop signals recorded before the run's flag existed, in arrival order


def lookup(name: str) -> signal.Signals:
    """``SIGTERM``, ``term`` or ``TERM`` -> signal.SIGTERM (ValueError naming the fix otherwise)."""
    upper = name.upper()
    try:
        return signal.Signals[upper if upper.startswith("SIG") else f"SIG{upper}"]
    except KeyError:
        raise ValueError(f"unknown signal '{name}'; use names like SIGUSR1 or SIGTERM") from None


def _record(signum: int, frame: Optional[FrameType]) -> None:
    _early.append(signal.Signals(signum).name)


def is_recorder(handler: object) -> bool:
    """Whether ``handler`` is :func:`record_early`'s (a signal is only remembered)."""
    return handler is _record


def record_early(signals: Sequence[str] = STOP_SIGNALS) -> None:
    """Remember ``signals`` from now on instead of dying of them (until a flag takes over)."""
    for name in signals:
        signal.signal(lookup(name), _record)


def early_signals() -> list[str]:
    """The stop signals recorded by :func:`record_early`'s handlers so far."""
    return list(_early)


def ignore_stop_signals(*_: object) -> None:
    """Ignore the stop signals in this process from now on (also a DataLoader ``worker_init_fn``).

    For processes that must not die of them: DataLoader workers (the training process decides),
    and every task once its run has finished or saved (Python restores the default action,
    termination, while it shuts down; an ignored signal stays ignored).
    """
    stop = {signal.Signals[name] for name in STOP_SIGNALS}
    for sig in stop:
        signal.signal(sig, signal.SIG_IGN)
    # Blocked by stop_signals_blocked() in a parent that forked this process: a signal pending
    # since then is discarded now that it is ignored.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold back the stop signals in this thread while processes are forked from it.

    A child inherits the blocked set, so a stop signal cannot kill it before it has run
    :func:`ignore_stop_signals` (torch's DataLoader workers reset SIGTERM to a handler that dies
    of it before their ``worker_init_fn`` runs). This process gets a signal that arrived meanwhile
    when the block ends: it is delayed, not lost."""
    stop = {signal.Signals[name] for name in STOP_SIGNALS}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PreemptionFlag:
    """Set by a signal (Slurm sends SIGUSR1/2 or SIGTERM ahead of preemption or the time limit).

    The handler only records the signal; the training loop reads :attr:`requested` at each step
    boundary and passes it to the per-step agreement, so the collective checkpoint that follows
    happens on every rank at the same step even when only one rank received the signal. A signal
    that :func:`record_early` remembered before :meth:`install` counts as received.
    """

    def __init__(self, signals: Sequence[str] = STOP_SIGNALS):
        self.signals = [lookup(name) for name in signals]
        self.received: Optional[str] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionFlag":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        # Arrived before this flag existed: the run stops before its first step.
        ours = {sig.name for sig in self.signals}
        early = [name for name in _early if name in ours]
        if early and self.received is None:
            self.received = early[0]
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None


def _attempt() -> int:
    """Which attempt of the job this is: 0, then 1 after the first requeue, ..."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _rank() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def hold(phase: str) -> None:
    """Wait at ``phase`` of the start-up when a test asks for it, else return at once.

    With ``LLIP_HOLD_DIR=DIR`` and a file ``DIR/hold-PHASE-ATTEMPT``, the task writes
    ``DIR/held-PHASE-ATTEMPT-RANK`` and waits until ``DIR/release-PHASE-ATTEMPT`` exists.
    Phases: ``task-start`` (the task's first code: only the recorder is installed),
    ``job-start`` (the job object is unpickled, torch and this package are imported, the
    scheduler library's handlers were installed), ``before-first-step`` (model built, resumed,
    loader ready), and in training ``after-checkpoint`` (after each save of the attempt, the
    checkpoint complete). Signals that arrive while a task waits are recorded as usual.
    """
    folder = os.environ.get("LLIP_HOLD_DIR")
    if not folder:
        return
    name = f"{phase}-{_attempt()}"
    if not (Path(folder) / f"hold-{name}").exists():
        return
    (Path(folder) / f"held-{name}-{_rank()}").write_text(f"{os.getpid()}\n")
    while not (Path(folder) / f"release-{name}").exists():
        time.sleep(0.05)  # a signal interrupts the sleep, runs its handler, and the wait goes on
