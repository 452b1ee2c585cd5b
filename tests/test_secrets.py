"""Secrets never in MLflow params, tags, artifacts, logs or written configs (fusion_core.redaction).

A pipeline config with a password in its database URL and tokens in the environment go through
the functions the pipeline logs and writes with (tasks.tracking, flows.pipeline); every param,
tag, artifact file, written config and captured log line is then searched for the secrets. The
written config still runs: its masked URI is resolved to the real one when connecting.
"""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_tiny_pipeline
from flows.pipeline import log_run_config, write_resolved_config  # (Prefect sets up logging on import)
from fusion_core.config import config_to_yaml, load_config
from fusion_core.errors import FusionError
from fusion_core.redaction import (
    forget_uris, install_log_redaction, is_secret_name, mask_uri, redact, resolve_uri, secret_values,
)
from tasks.tracking import TrackingContext, safe_params, safe_tags, shown_tracking_uri, stage_run, tracking_uri

DB_PASSWORD = "db-pw-S3cret!"
REAL_URI = f"postgresql://fusion:{DB_PASSWORD}@db.example:5432/mlflow"
MASKED_URI = "postgresql://fusion:***@db.example:5432/mlflow"
ENV_SECRETS = {
    "HF_TOKEN": "hf_TokenValue123456",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-987",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCY",
}
SERVER_PASSWORD = "server-pw-555"  # the password of $FUSION_TRACKING_URI


@pytest.fixture(autouse=True)
def _fresh_secrets(monkeypatch):
    forget_uris()
    yield
    forget_uris()


@pytest.fixture
def secret_env(monkeypatch):
    for k, v in ENV_SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FUSION_TRACKING_URI", f"http://svc:{SERVER_PASSWORD}@mlflow.example:5000")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return [DB_PASSWORD, SERVER_PASSWORD, *ENV_SECRETS.values()]


def _leaks(text: str, secrets) -> list[str]:
    return [s for s in secrets if s in text]


@pytest.mark.parametrize("uri,masked", [
    (REAL_URI, MASKED_URI),
    ("postgresql://u:p/w:x@h/db", "postgresql://u:***@h/db"),                    # unencoded / and : in it
    ("http://user:tok@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),
    ("postgresql://h/db?user=u&password=s3cr3t&sslmode=require",
     "postgresql://h/db?user=u&password=***&sslmode=require"),
    ("postgresql://fusion:${PGPASS}@h/db", "postgresql://fusion:${PGPASS}@h/db"),  # a reference is no secret
    ("sqlite:////tmp/ws/mlflow/mlflow.db", "sqlite:////tmp/ws/mlflow/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    (MASKED_URI, MASKED_URI),
])
def test_mask_uri(uri, masked):
    assert mask_uri(uri) == masked
    assert redact(f"tracking at {uri} now") == f"tracking at {masked} now"


def test_environment_secrets_are_known_by_name_and_by_uri(secret_env):
    secret = ["HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "OPENAI_API_KEY",
              "AWS_SESSION_TOKEN", "PREFECT_API_KEY"]
    assert all(is_secret_name(n) for n in secret)
    assert not any(is_secret_name(n) for n in ["PWD", "OLDPWD", "TOKENIZERS_PARALLELISM", "SSH_AUTH_SOCK", "HOME"])
    values = secret_values()
    assert set(ENV_SECRETS.values()) | {SERVER_PASSWORD} <= set(values)
    assert "false" not in values                                   # TOKENIZERS_PARALLELISM is no secret
    text = f"token {ENV_SECRETS['HF_TOKEN']}, key={ENV_SECRETS['AWS_SECRET_ACCESS_KEY']}, pw {SERVER_PASSWORD}: false"
    assert redact(text) == "token ***, key=***, pw ***: false"


def test_params_tags_artifacts_written_configs_and_logs_hold_no_secret(tiny_models, tmp_path, secret_env, caplog):
    import mlflow
    from mlflow import MlflowClient

    path = write_tiny_pipeline(tmp_path, tiny_models, **{"tracking.tracking_uri": REAL_URI})
    cfg = load_config(path)
    assert tracking_uri(cfg) == REAL_URI                          # the real one, to connect with
    # A local store stands in for the PostgreSQL one (the config's URI is only logged here).
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    experiment_id = client.create_experiment("secrets", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, tags=safe_tags({"pipeline": cfg.name, "where": REAL_URI,
                                                              "token": ENV_SECRETS["HF_TOKEN"]}))
    run_id = parent.info.run_id
    install_log_redaction()
    logger = logging.getLogger("llm_fusion")
    with caplog.at_level(logging.INFO):
        log_run_config(client, run_id, cfg, tracking_uri(cfg), logger)
        mlflow.set_tracking_uri(store)
        ctx = TrackingContext(uri=store, experiment_id=experiment_id, parent_run_id=run_id)
        with stage_run(ctx, "prepare_data", tags={"source": REAL_URI, "aws": ENV_SECRETS["AWS_SECRET_ACCESS_KEY"]}):
            mlflow.log_params(safe_params({"prepare_data": {"store": REAL_URI,
                                                            "token": ENV_SECRETS["MLFLOW_TRACKING_PASSWORD"]}}))
        # A library's log line (propagated to the root logger's handlers) is masked too.
        logging.getLogger("some.library").warning(f"connecting to {os.environ['FUSION_TRACKING_URI']} "
                                                  f"with {ENV_SECRETS['HF_TOKEN']}")
    client.set_terminated(run_id)

    runs = client.search_runs([experiment_id])
    assert len(runs) == 2
    params = {k: v for r in runs for k, v in r.data.params.items()}
    assert params["tracking.tracking_uri"] == MASKED_URI
    assert params["prepare_data.store"] == MASKED_URI and params["prepare_data.token"] == "***"
    tags = {k: v for r in runs for k, v in r.data.tags.items()}
    assert tags["where"] == tags["source"] == MASKED_URI and tags["token"] == tags["aws"] == "***"
    for name, values in (("params", params), ("tags", tags)):
        leaks = {k: v for k, v in values.items() if _leaks(v, secret_env)}
        assert not leaks, f"secrets in MLflow {name}: {leaks}"
    artifacts = {p: p.read_text(errors="replace") for p in (tmp_path / "artifacts").rglob("*") if p.is_file()}
    assert any(p.name == "resolved.yaml" for p in artifacts)
    assert MASKED_URI in next(t for p, t in artifacts.items() if p.name == "resolved.yaml")
    assert not {str(p): _leaks(t, secret_env) for p, t in artifacts.items() if _leaks(t, secret_env)}

    # The config written to <workspace>/configs/ (what `fusion run --set` and `fusion study` run).
    written = write_resolved_config(cfg)
    text = written.read_text()
    assert MASKED_URI in text and not _leaks(text, secret_env)
    assert not _leaks(config_to_yaml(cfg), secret_env)

    logged = [r.getMessage() for r in caplog.records]
    assert any(f"at {MASKED_URI}" in m for m in logged)          # the line naming the tracking URI
    assert any("connecting to http://svc:***@mlflow.example:5000 with ***" in m for m in logged)
    assert not [m for m in logged if _leaks(m, secret_env)] and not _leaks(caplog.text, secret_env)


def test_a_written_config_connects_with_the_real_uri(tiny_models, tmp_path, monkeypatch):
    monkeypatch.delenv("FUSION_TRACKING_URI", raising=False)
    cfg = load_config(write_tiny_pipeline(tmp_path, tiny_models, **{"tracking.tracking_uri": REAL_URI}))
    written = write_resolved_config(cfg)
    # In the process that loaded the original config (fusion run --set, study, reproduce, rerun CONFIG):
    again = load_config(written)
    assert again.tracking.tracking_uri == MASKED_URI
    assert tracking_uri(again) == REAL_URI and shown_tracking_uri(again) == MASKED_URI
    # ... and in its child processes (Prefect's `serve` runs each flow in one).
    child = subprocess.run([sys.executable, "-c", "import sys; from fusion_core.config import load_config; "
                            "from fusion_core.redaction import resolve_uri; "
                            f"print(resolve_uri(load_config(sys.argv[1]).tracking.tracking_uri) == {REAL_URI!r})",
                            str(written)], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert child.stdout.strip() == "True", child.stderr[-2000:]
    # In a fresh process: refused with what to do, or taken from $FUSION_TRACKING_URI when it is the same.
    forget_uris()
    with pytest.raises(FusionError, match=r"has its password masked .*set FUSION_TRACKING_URI") as err:
        tracking_uri(load_config(written))
    assert DB_PASSWORD not in str(err.value)
    monkeypatch.setenv("FUSION_TRACKING_URI", REAL_URI)
    assert tracking_uri(load_config(written)) == REAL_URI
    monkeypatch.setenv("FUSION_TRACKING_URI", REAL_URI.replace("db.example", "other.example"))
    with pytest.raises(FusionError, match="has its password masked"):
        tracking_uri(load_config(written))


def test_a_password_from_the_environment_stays_a_reference(tiny_models, tmp_path, monkeypatch):
    uri = "postgresql://fusion:${FUSION_DB_PASSWORD}@db.example/mlflow"
    cfg = load_config(write_tiny_pipeline(tmp_path, tiny_models, **{"tracking.tracking_uri": uri}))
    monkeypatch.delenv("FUSION_DB_PASSWORD", raising=False)
    with pytest.raises(FusionError, match=r"names \$\{FUSION_DB_PASSWORD\}, which is not set"):
        tracking_uri(cfg)
    monkeypatch.setenv("FUSION_DB_PASSWORD", DB_PASSWORD)
    assert tracking_uri(cfg) == f"postgresql://fusion:{DB_PASSWORD}@db.example/mlflow"
    assert resolve_uri(uri) == tracking_uri(cfg)
    assert safe_params(cfg.model_dump(mode="json"))["tracking.tracking_uri"] == uri
    written = write_resolved_config(cfg).read_text()
    assert uri in written and DB_PASSWORD not in written
    assert tracking_uri(load_config(write_resolved_config(cfg))) == f"postgresql://fusion:{DB_PASSWORD}@db.example/mlflow"


def test_cli_errors_are_redacted(secret_env, capsys):
    import typer

    from flows.cli import _fail

    with pytest.raises(typer.Exit):
        _fail(FusionError(f"no MLflow run 'x' at {REAL_URI} ({ENV_SECRETS['HF_TOKEN']})"))
    err = capsys.readouterr().err
    assert MASKED_URI in err and not _leaks(err, secret_env)


def test_masking_keeps_the_written_config_runnable(tiny_models, tmp_path):
    cfg = load_config(write_tiny_pipeline(tmp_path, tiny_models, **{"tracking.tracking_uri": REAL_URI}))
    text = config_to_yaml(cfg)
    assert str(cfg.sources[0].model.path) in text and str(cfg.workspace.root) in text   # paths untouched
