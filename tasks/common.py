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
