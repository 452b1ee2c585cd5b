"""Environment defaults set before Prefect, MLflow or transformers are imported.

Everything stays local and quiet unless the user's environment says otherwise: no hub
downloads at run time, no telemetry, and Prefect's home inside the workspace so the embedded
mode needs no server.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # A fresh Prefect home migrates its database on first start: 20 s is too short on 2 cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR_QUIET": "1",
}


def apply_defaults(workspace: Path | None = None) -> None:
    """Set the defaults that the user has not set; with a workspace, keep Prefect's state in it."""
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
    if workspace is not None:
        workspace = Path(workspace)
        os.environ.setdefault("PREFECT_HOME", str(workspace / "prefect"))
        os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(workspace / "prefect" / "results"))
        # Prefect creates its home without parents; the workspace may not exist yet.
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        # While `fusion server start` runs for this workspace, talk to its servers.
        from flows.servers import server_environment

        for k, v in server_environment(workspace).items():
            os.environ.setdefault(k, v)
