"""How a run stops before its last step: SIGINT/SIGTERM (``StopRequest``: checkpoint at the next step boundary,
then stop; a second signal stops at once) and the error a stopped run raises (``RunStopped``, with the exit code
and the checkpoint to resume from)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.run_folder import RunFolder
from lorafit.training.checkpoint import newest_verified

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

class StopRequest:
    """Installs the handlers while training runs (main thread only). A signal is recorded whenever it arrives (in
    a forward, an evaluation or in the middle of a checkpoint save) and never dropped: the loop checks ``signal`` at
    every step boundary, saves a checkpoint and stops. A second signal stops at once."""

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


class RunStopped(LorafitError):
    """The run stopped before its last step (a signal, or the non-finite guard); ``exit_code`` says why."""

    def __init__(self, what: str, *, exit_code: int, checkpoint: Path | None, **kwargs):
        super().__init__(what, **kwargs)
        self.exit_code = exit_code
        self.checkpoint = checkpoint


def raise_if_stopped(loop, stop: StopRequest, run: RunFolder) -> None:
    guard = loop.parts.guard
    newest = newest_verified(run.checkpoints)
    kept = f"the last good checkpoint is {newest}" if newest else "no checkpoint was written before it"
    if guard.tripped:
        streak = f"{guard.consecutive} step(s) in a row, " if guard.consecutive else ""
        raise RunStopped(
            f"non-finite {guard.reason} at step {guard.tripped_at} "
            f"({streak}train.nan_patience={guard.patience}); the run stopped",
            exit_code=1,
            checkpoint=newest,
            why=f"an update with NaN/Inf would destroy the adapter; {kept}",
            fix="lower train.learning_rate or set train.max_grad_norm, then resume from that checkpoint with "
            "--resume PATH --force-resume, or raise train.nan_patience to skip isolated bad steps",
        )
    if stop.signal is not None:
        import signal

        raise RunStopped(
            f"stopped by {signal.Signals(stop.signal).name} at step {loop.state.step}",
            exit_code=stop.exit_code,
            checkpoint=loop.last_checkpoint or newest,
            why=f"checkpoint saved: {loop.last_checkpoint or newest}",
            fix="run the same command with --resume auto to continue exactly where it stopped",
        )
