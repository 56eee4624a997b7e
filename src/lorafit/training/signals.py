"""SIGINT/SIGTERM during training: checkpoint at the next step boundary and stop; a second signal stops at once."""

from __future__ import annotations

import signal
import sys
import threading

from transformers import TrainerCallback

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest(TrainerCallback):
    """Installs the handlers while training runs (main thread only) and, at the first step end after a signal,
    asks Trainer to save a checkpoint and stop. ``signal`` holds the first signal received, or None."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            # Second signal: the user does not want to wait for the step. A save cut short here leaves only a
            # staging folder, which is never resumed from and is removed by the next run.
            raise KeyboardInterrupt
        self.signal = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signal or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True
