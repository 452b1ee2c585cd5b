"""Small helpers the stage tasks share."""
from __future__ import annotations

import logging


def run_logger():
    """Prefect's run logger inside a flow/task run, a plain logger elsewhere (task.fn in tests)."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError outside a run
        return logging.getLogger("llm_fusion")


class TokenProgress:
    """Work done (tokens, steps), rate and ETA of a long stage, safe to advance from several threads.

    At most every `every` seconds: a log line (Prefect's log, so it reaches the UI and files)
    and, inside a Prefect run, an update of the run's progress artifact (the UI's progress bar);
    on a terminal a rich progress bar is shown as well.
    """

    def __init__(self, name: str, total: int, logger, every: float = 15.0, unit: str = "tokens") -> None:
        import sys
        import threading
        import time

        self.name, self.total, self.logger, self.every, self.unit = name, max(int(total), 0), logger, every, unit
        self.done = 0
        self._lock = threading.Lock()
        self._start = self._last = time.perf_counter()
        self._bar = None
        self._artifact = self._prefect_artifact()
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(f"{name}"), BarColumn(),
                                 TextColumn("{task.completed:,}/{task.total:,} " + unit[:3]),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=True)
            self._task = self._bar.add_task(name, total=self.total, rate="")
            self._bar.start()

    def _prefect_artifact(self):
        """A progress artifact of the current Prefect task run, or None outside one."""
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import TaskRunContext

            if TaskRunContext.get() is None:
                return None
            return create_progress_artifact(0.0, description=f"{self.name}: {self.unit} done")
        except Exception:  # noqa: BLE001 - progress is never worth failing a stage for
            return None

    def _update_artifact(self, final: bool = False) -> None:
        if self._artifact is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            share = 100.0 if final else min(100.0, 100.0 * self.done / self.total if self.total else 100.0)
            update_progress_artifact(self._artifact, share, description=self.line())
        except Exception:  # noqa: BLE001
            self._artifact = None

    def line(self) -> str:
        import time

        secs = time.perf_counter() - self._start
        rate = self.done / secs if secs > 0 else 0.0
        left = max(0, self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else f"{int(left // 60)} min {int(left % 60):02d} s"
        share = min(1.0, self.done / self.total) if self.total else 1.0
        return (f"{self.name}: {self.done:,}/{self.total:,} {self.unit} ({share:.0%}), {rate:,.{0 if rate >= 10 else 2}f} "
                f"{self.unit}/s, ETA {eta}")

    def advance(self, tokens: int) -> None:
        import time

        with self._lock:
            self.done += int(tokens)
            if self.done > self.total:
                # the total was an estimate (teacher tokens are estimated from a sample) and it was
                # low: grow it, so the share never passes 100 % nor the ETA goes negative
                self.total = self.done
                if self._bar is not None:
                    self._bar.update(self._task, total=self.total)
            now = time.perf_counter()
            if self._bar is not None:
                secs = now - self._start
                self._bar.update(self._task, completed=self.done,
                                 rate=f"{self.done / secs:,.0f} tok/s" if secs > 0 else "")
            if now - self._last >= self.every:
                self._last = now
                self.logger.info(self.line())
                self._update_artifact()

    def close(self) -> None:
        self._update_artifact(final=True)
        self._artifact = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
