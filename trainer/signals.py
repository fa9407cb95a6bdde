"""Preemption: SIGTERM/SIGINT ask the loop to stop after the current step and save.

The handler only sets a flag; the loop reads it once per optimizer update and agrees on it
across processes (one rank may receive the signal a moment before the others), so every rank
stops at the same step and the checkpoint is written collectively. A second SIGINT (Ctrl-C
twice) raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    """Installed as the SIGTERM/SIGINT handler for the duration of training (`with StopRequest() as stop`)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
