"""`fusion export`: the model of a pipeline run or of a registered version, as a Hugging Face folder
that plain `AutoModelForCausalLM` / `AutoTokenizer` load, its tokenizer adding the start token,
with its model card (README.md).

A reference is a pipeline run id (the summary's "run"), MODEL/VERSION or MODEL@ALIAS. The weights
come from the workspace's training output when it is here and intact, else from the registered
model's artifacts; the card is the run's (model_card/README.md of its evaluate run) for a run
id, else the version's (README.md at its artifact root, else its description).
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fusion_core.errors import FusionError
from fusion_core.export import CARD_FILE, check_destination, write_model_folder

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# What MLflow keeps at a logged model's root beside the Hugging Face folder: not exported.
MLFLOW_FILES = frozenset({"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "LICENSE.txt",
                          "registered_model_meta", "input_example.json", "serving_input_example.json"})


@dataclass(frozen=True)
class Resolved:
    """A reference resolved to a registered version (and the pipeline run, for a run id)."""

    name: str
    version: str
    source: str  # the version's model URI (models:/m-...)
    tags: dict
    description: str
    run_id: str | None = None  # the pipeline run, when the reference named a run


@dataclass(frozen=True)
class Exported:
    out: Path
    name: str
    version: str
    run_id: str | None
    weights_from: str  # the training output folder, or "the registry"


def parse_reference(reference: str) -> tuple[str, ...]:
    """("run", id) | ("version", name, version) | ("alias", name, alias); FusionError otherwise."""
    ref = reference.strip()
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if name and alias:
            return ("alias", name, alias)
    elif "/" in ref:
        name, _, version = ref.rpartition("/")
        if name and version.isdigit():
            return ("version", name, version)
    elif RUN_ID.match(ref):
        return ("run", ref)
    raise FusionError(f"{reference!r} is not a run id (32 hex digits), MODEL/VERSION (fused-target/3) or "
                      "MODEL@ALIAS (fused-target@candidate)")


def resolve(client, reference: str, tracking_uri: str) -> Resolved:
    """The registered version `reference` names. Raises FusionError naming what was not found."""
    from mlflow.exceptions import MlflowException

    parsed = parse_reference(reference)
    run_id = None
    if parsed[0] == "run":
        run_id = parsed[1]
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise FusionError(f"no MLflow run {run_id} at {tracking_uri}") from None
        tags = run.data.tags
        registered = tags.get("registered_model", "")
        if "/" in registered:  # a pipeline run: name/version
            name, _, version = registered.rpartition("/")
        elif registered and tags.get("registered_version"):  # its evaluate run
            name, version = registered, tags["registered_version"]
            run_id = tags.get("mlflow.parentRunId", run_id)
        else:
            raise FusionError(f"MLflow run {run_id} registered no model (not a finished pipeline run)")
    else:
        name = parsed[1]
        try:
            client.get_registered_model(name)
        except MlflowException:
            raise FusionError(f"no registered model {name!r} at {tracking_uri}") from None
        if parsed[0] == "alias":
            try:
                version = str(client.get_model_version_by_alias(name, parsed[2]).version)
            except MlflowException:
                raise FusionError(f"registered model {name!r} has no alias {parsed[2]!r}") from None
        else:
            version = parsed[2]
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise FusionError(f"registered model {name!r} has no version {version}") from None
    return Resolved(name, str(mv.version), mv.source, dict(mv.tags or {}), mv.description or "", run_id)


def _download(artifact_uri: str, dst: Path, tracking_uri: str) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst),
                                                    tracking_uri=tracking_uri))


def _model_location(client, resolved: Resolved) -> tuple[str, str] | None:
    """(model id, artifact location) of the version's logged model; None for other sources."""
    if not resolved.source.startswith("models:/m-"):
        return None
    model_id = resolved.source.removeprefix("models:/")
    return model_id, client.get_logged_model(model_id).artifact_location.rstrip("/")


def registry_model_folder(client, resolved: Resolved, dst: Path, tracking_uri: str) -> Path:
    """Download the version's model into `dst`: the Hugging Face folder at its artifact root, or
    (registered before it had one) MLflow's transformers flavor's model/ and components/tokenizer/."""
    location = _model_location(client, resolved)
    if location is None:
        raise FusionError(f"{resolved.name} version {resolved.version} is not a logged model ({resolved.source}): "
                          "export it from the workspace that trained it")
    model_id, base = location
    root = client.list_logged_model_artifacts(model_id)
    names = {Path(a.path).name: a for a in root}
    dst.mkdir(parents=True, exist_ok=True)
    if "config.json" in names:
        for name, info in names.items():
            if not info.is_dir and name not in MLFLOW_FILES:
                _download(f"{base}/{name}", dst, tracking_uri)
        return dst
    for sub in ("model", "components/tokenizer"):  # the flavor's layout
        folder = _download(f"{base}/{sub}", dst / "download", tracking_uri)
        for path in folder.iterdir():
            path.replace(dst / path.name)
    selector = "fusion/fusion_strategy.safetensors"
    if any(a.path == selector for a in client.list_logged_model_artifacts(model_id, "fusion")):
        _download(f"{base}/{selector}", dst, tracking_uri)
    return dst


def model_card_text(client, resolved: Resolved, tmp: Path, tracking_uri: str) -> str:
    """The run's card (a run id), else the version's README.md, else its description, else a stub."""
    from mlflow.exceptions import MlflowException

    if resolved.run_id:
        parent = client.get_run(resolved.run_id)
        runs = client.search_runs([parent.info.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{resolved.run_id}' and tags.stage = 'evaluate'"))
        for run in runs:
            try:
                path = client.download_artifacts(run.info.run_id, f"model_card/{CARD_FILE}", str(tmp))
                return Path(path).read_text(encoding="utf-8")
            except (MlflowException, OSError):
                continue
    location = _model_location(client, resolved)
    if location is not None and any(a.path == CARD_FILE for a in client.list_logged_model_artifacts(location[0])):
        return _download(f"{location[1]}/{CARD_FILE}", tmp / "card", tracking_uri).read_text(encoding="utf-8")
    if resolved.description.strip():
        return resolved.description
    t = resolved.tags
    return (f"# {resolved.name} version {resolved.version}\n\nRegistered without a model card. Pipeline "
            f"`{t.get('pipeline', '?')}`, strategy `{t.get('strategy', '?')}`, sources: {t.get('sources', '?')}.\n")


def export_model(reference: str, out: Path, *, tracking_uri: str, workspace: Path | None, force: bool = False
                 ) -> Exported:
    """Write the model `reference` names into `out` (fusion_core.export.write_model_folder)."""
    from mlflow import MlflowClient

    from fusion_core.workspace import StageOutput

    parse_reference(reference)
    check_destination(out, force=force)  # before anything is downloaded
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise FusionError(f"no MLflow tracking store at {tracking_uri}: no pipeline has run with this config")
    client = MlflowClient(tracking_uri=tracking_uri)
    resolved = resolve(client, reference, tracking_uri)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.download-", dir=Path(out).parent) as tmp:
        tmp = Path(tmp)
        key = resolved.tags.get("training_key")
        stage = StageOutput(Path(workspace), "fusion_training", key) if workspace and key else None
        if stage is not None and (stage.path / "model" / "config.json").is_file() and stage.complete():
            model_dir, weights_from = stage.path / "model", str(stage.path / "model")
        else:
            model_dir = registry_model_folder(client, resolved, tmp / "model", tracking_uri)
            weights_from = "the registry"
        card = model_card_text(client, resolved, tmp, tracking_uri)
        write_model_folder(model_dir, out, card=card, force=force)
    return Exported(Path(out), resolved.name, resolved.version, resolved.run_id, weights_from)
