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
    """Tokens done, tokens/s and ETA of a long stage, safe to advance from several threads.

    Logs a line at most every `every` seconds (Prefect's log, so it reaches the UI and files);
    on a terminal a rich progress bar is shown as well.
    """

    def __init__(self, name: str, total: int, logger, every: float = 15.0) -> None:
        import sys
        import threading
        import time

        self.name, self.total, self.logger, self.every = name, max(int(total), 0), logger, every
        self.done = 0
        self._lock = threading.Lock()
        self._start = self._last = time.perf_counter()
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(f"{name}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tok"),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=True)
            self._task = self._bar.add_task(name, total=self.total, rate="")
            self._bar.start()

    def line(self) -> str:
        import time

        secs = time.perf_counter() - self._start
        rate = self.done / secs if secs > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else f"{int(left // 60)} min {int(left % 60):02d} s"
        share = self.done / self.total if self.total else 1.0
        return f"{self.name}: {self.done:,}/{self.total:,} tokens ({share:.0%}), {rate:,.0f} tokens/s, ETA {eta}"

    def advance(self, tokens: int) -> None:
        import time

        with self._lock:
            self.done += int(tokens)
            now = time.perf_counter()
            if self._bar is not None:
                secs = now - self._start
                self._bar.update(self._task, completed=self.done,
                                 rate=f"{self.done / secs:,.0f} tok/s" if secs > 0 else "")
            if now - self._last >= self.every:
                self._last = now
                self.logger.info(self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
