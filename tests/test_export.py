"""The fused model, out: `fusion export` writes a Hugging Face folder that plain transformers loads,
its tokenizer adding the start token the model was trained with, with a model card; the registered
version carries the same card and its headline scores, and its artifact root loads the same way."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_tiny_pipeline
from typer.testing import CliRunner

from flows.cli import app
from fusion_core.config import load_config
from fusion_core.export import (ExportError, check_destination, start_post_processor, write_model_folder)
from fusion_core.model_card import CONFIG_HEADING, CardFacts, card_description, headline_scores, model_card
from fusion_core.tokenization import encode_document, start_token_id

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
         "12 + 35 = 47", "café naïve résumé — unicode", " x ", ""]


def _logits(folder: Path, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", ["byte_level", "metaspace", "wordpiece"])
def test_exported_tokenizer_adds_the_start_token(tiny_models, tiny_tokenizers, tmp_path, family):
    """tokenizer(text).input_ids of the exported folder == encode_document(...).ids (start token
    first, as every stage encodes a document); without special tokens, the text's tokens alone; the
    model loads with plain transformers and gives the trained folder's logits."""
    import torch
    from transformers import AutoTokenizer

    out = write_model_folder(tiny_models[family], tmp_path / "out", card="# card\n")
    original = tiny_tokenizers[family]
    assert tiny_tokenizers[family]("hello").input_ids[0] != start_token_id(original)  # the trained folder's does not
    exported = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        want = encode_document(original, text).ids.tolist()
        assert want[0] == start_token_id(original)
        assert exported(text).input_ids == want, text
        assert exported(text, add_special_tokens=False).input_ids == want[1:], text
        assert encode_document(exported, text).ids.tolist() == want, text  # the pipeline's own encoding unchanged
    batch = exported(TEXTS[:2], padding=True, return_tensors="pt")
    assert batch.input_ids[:, 0].tolist() == [start_token_id(original)] * 2
    ids = encode_document(original, TEXTS[1]).ids.tolist()
    assert torch.equal(_logits(out, ids), _logits(tiny_models[family], ids))
    assert (out / "README.md").read_text() == "# card\n"
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_a_tokenizer_class_that_builds_its_own_post_processor_is_replaced(tiny_models, tiny_tokenizers, tmp_path):
    """A folder whose tokenizer_config names BertTokenizer ([CLS] text [SEP]): the export names the
    generic fast class instead, so that the tokenizer adds the start token and nothing after."""
    from transformers import AutoTokenizer

    src = tmp_path / "bert-class"
    shutil.copytree(tiny_models["wordpiece"], src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "BertTokenizer"}))
    out = write_model_folder(src, tmp_path / "out", card="x")
    exported = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert exported(text).input_ids == encode_document(tiny_tokenizers["wordpiece"], text).ids.tolist()


def test_start_post_processor_keeps_byte_level_and_drops_what_adds_tokens():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    seq = start_post_processor(byte_level, "<s>", 1)
    assert seq["type"] == "Sequence" and seq["processors"][0] == byte_level
    assert seq["processors"][1]["special_tokens"] == {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    bert = {"type": "BertProcessing", "sep": ["[SEP]", 2], "cls": ["[CLS]", 1]}
    assert start_post_processor(bert, "[CLS]", 1)["type"] == "TemplateProcessing"
    mixed = {"type": "Sequence", "processors": [byte_level, {"type": "TemplateProcessing", "single": []}]}
    assert [p["type"] for p in start_post_processor(mixed, "<s>", 1)["processors"]] == ["ByteLevel",
                                                                                         "TemplateProcessing"]
    assert start_post_processor(None, "<s>", 1)["single"][0] == {"SpecialToken": {"id": "<s>", "type_id": 0}}


def test_a_non_empty_destination_is_refused_unless_forced(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    with pytest.raises(ExportError, match="is not empty.*--force"):
        write_model_folder(tiny_models["metaspace"], out, card="x")
    assert (out / "stale.bin").is_file() and not (out / "config.json").exists()
    write_model_folder(tiny_models["metaspace"], out, card="x", force=True)
    assert not (out / "stale.bin").exists() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".out.partial-*"))
    (tmp_path / "empty").mkdir()
    write_model_folder(tiny_models["metaspace"], tmp_path / "empty", card="x")  # an empty folder is fine
    monkeypatch.chdir(out)
    with pytest.raises(ExportError, match="current folder"):
        check_destination(tmp_path, force=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        check_destination(tmp_path / "a-file", force=True)


def _facts(tmp_path, tiny_models, **overrides) -> CardFacts:
    cfg = load_config(write_tiny_pipeline(tmp_path, tiny_models, **{"fusion.strategy": "adaptive"}))
    metrics = {"ppl.all.bits_per_byte": 2.5, "ppl.code.bits_per_byte": 1.25, "ppl.prose.bits_per_byte": 3.75,
               "eval.fusion_arith_mc.acc_norm": 0.5, "eval.fusion_arith_mc.acc_norm_stderr": 0.1,
               "ppl.all.tokens": 900.0, "interference.bpb": 0.031, "interference.bpb.lo": 0.012,
               "interference.bpb.hi": 0.052, "interference.bpb.tasks_hurt": 1.0, "interference.bpb.tasks": 2.0}
    report = {
        "candidate": "candidate", "missing_references": [],
        "models": {"candidate": {"role": "candidate", "metrics": metrics},
                   "clm": {"role": "reference", "metrics": {"ppl.all.bits_per_byte": 2.4}}},
        "scores": {"candidate": {"ppl.code.bits_per_byte": 1.25, "eval.fusion_arith_mc.acc_norm": 0.5},
                   "clm": {"ppl.code.bits_per_byte": 1.2, "eval.fusion_arith_mc.acc_norm": 0.25}},
        "interference": {"candidate": {"units": {"bpb": {"value": 0.031, "lo": 0.012, "hi": 0.052}},
                                       "references": ["clm", "single:bytes"], "tasks_hurt": 1,
                                       "tasks": [{"task": "ppl.code.bits_per_byte", "unit": "bpb", "hurt": True},
                                                 {"task": "ppl.prose.bits_per_byte", "unit": "bpb", "hurt": False}]}},
        "bootstrap": {"resamples": 1000, "level": 0.95, "rng_seed": 0},
    }
    facts = dict(config=cfg, registered_model="tiny-target", version="3", run_id="a" * 32, training_key="k123",
                 source_keys={"bytes": "key-bytes"}, data_metrics={"train_documents.prose": 17.0,
                                                                   "validation_documents.code": 6.0,
                                                                   "train_chunks": 40.0},
                 training_metrics={"steps": 4.0, "train_seconds": 12.5, "tokens_seen": 640.0, "loss": 3.2},
                 metrics=metrics, report=report, start_token=("<s>", 1), has_selector=True)
    return CardFacts(**{**facts, **overrides})


def test_model_card_says_what_the_model_is(tmp_path, tiny_models):
    """Sources with their model references, strategy and options, data per split, training, scores
    beside the references, interference with its interval, the selector file and the config."""
    card = model_card(_facts(tmp_path, tiny_models))
    assert card.startswith("# tiny-target version 3\n")
    assert "| bytes | `hf: " in card and "key-bytes" in card and "| words | `hf: " in card
    assert "| strategy | adaptive |" in card and "| adaptive.objective | likelihood |" in card
    assert "| prose | prose | `" in card and "| train | 17 | 0 | 17 | 40 |" in card
    assert "| optimizer steps | 4 |" in card and "| learning rate | 0.001 " in card and "| seed | 0 |" in card
    assert "12.5 s" in card
    assert "| ppl.all.bits_per_byte ↓ | 2.5000 | 2.4000 ★ |" in card  # this model beside the clm reference
    assert "| eval.fusion_arith_mc.acc_norm ↑ | 0.5000 ★ | 0.2500 |" in card
    assert "R = {clm, single:bytes}" in card and "| 3.10 % [1.20, 5.20] | 1 of 2 |" in card
    assert "`<s>` (id 1)" in card and "`fusion_strategy.safetensors`: the trained selection network" in card
    assert "not needed to run it" in card
    config = card.split(CONFIG_HEADING, 1)[1]
    assert "```yaml" in config and "strategy: adaptive" in config and "registered_model: tiny-target" in config

    plain = model_card(_facts(tmp_path / "b", tiny_models, report=None, metrics={"ppl.all.bits_per_byte": 2.5},
                              has_selector=False))
    assert "Not measured" in plain and "fusion_strategy.safetensors" not in plain and "| 2.5000 |" in plain


def test_card_description_fits_the_registry_column(tmp_path, tiny_models):
    card = model_card(_facts(tmp_path, tiny_models))
    assert card_description(card, limit=len(card)) == card
    short = card_description(card, limit=len(card) - 10)
    assert len(short) <= len(card) - 10 and "```yaml" not in short and short.startswith("# tiny-target version 3")
    assert "README.md of the registered model's artifacts" in short
    assert len(card_description(card, limit=500)) <= 500


def test_headline_scores_are_the_compared_ones():
    metrics = {"ppl.all.bits_per_byte": 2.0, "ppl.all.perplexity": 9.0, "eval.t.acc_norm": 0.5,
               "eval.t.acc_norm_stderr": 0.1, "eval.g.exact_match.strict-match": 0.2, "humaneval.pass_at_1": 0.0,
               "interference.bpb": 0.1, "interference.bpb.lo": 0.0, "interference.bpb.hi": 0.2,
               "interference.bpb.tasks_hurt": 1.0, "eval.failed_units": 0.0}
    assert set(headline_scores(metrics)) == {
        "ppl.all.bits_per_byte", "eval.t.acc_norm", "eval.g.exact_match.strict-match", "humaneval.pass_at_1",
        "interference.bpb", "interference.bpb.lo", "interference.bpb.hi"}


def test_the_summary_prints_the_model_folder(capsys):
    from flows.cli import _print_summary

    _print_summary({"pipeline": "tiny", "seconds": 12.0, "stages": {}, "metrics": {}, "report": {},
                    "tracking_uri": "sqlite:///x.db", "experiment": "tiny", "run_id": "r" * 32,
                    "registered_model": "tiny-target", "version": "2", "model_dir": "/ws/stages/fusion_training/k/model"})
    out = capsys.readouterr().out
    assert "Trained model: /ws/stages/fusion_training/k/model" in out and f"fusion export {'r' * 32} --out DIR" in out


@pytest.mark.parametrize("reference, message", [
    ("not-a-reference", "is not a run id (32 hex digits), MODEL/VERSION"),
    ("nosuch/1", "no registered model 'nosuch'"),
    ("nosuch@candidate", "no registered model 'nosuch'"),
    ("0123456789abcdef0123456789abcdef", "no MLflow run 0123456789abcdef0123456789abcdef"),
])
def test_a_bad_reference_is_one_line_naming_what_was_not_found(tmp_path, tiny_models, reference, message):
    from mlflow import MlflowClient

    from tasks.tracking import tracking_uri

    path = write_tiny_pipeline(tmp_path, tiny_models)
    result = CliRunner().invoke(app, ["export", "tiny-target/1", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "error: no MLflow tracking store at sqlite:///" in result.output, result.output
    MlflowClient(tracking_uri(load_config(path))).search_experiments()  # the store, empty
    result = CliRunner().invoke(app, ["export", reference, str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_a_version_registered_before_model_cards_exports_and_is_repaired(tmp_path, tiny_models, tiny_tokenizers):
    """A version whose artifact root is only MLflow's transformers flavor (model/, components/tokenizer/):
    exported from those, with a stub card; `publish_card` (a later run finding the version) then
    puts the Hugging Face folder and the card at its root and the card in its description."""
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.export import export_model
    from tasks.registry import publish_card

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("old", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(uri)
    folder = tiny_models["byte_level"]
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.transformers.log_model(
            transformers_model={"model": AutoModelForCausalLM.from_pretrained(str(folder)),
                                "tokenizer": AutoTokenizer.from_pretrained(str(folder))},
            name="model", task="text-generation", pip_requirements=["torch"])
        mlflow.register_model(info.model_uri, "old", tags={"training_key": "gone", "strategy": "min_ce",
                                                          "sources": "a,b", "pipeline": "p"})
    done = export_model("old/1", tmp_path / "out", tracking_uri=uri,
                        workspace=tmp_path / "workspace")
    assert done.weights_from == "the registry" and done.run_id is None
    text = TEXTS[1]
    want = encode_document(tiny_tokenizers["byte_level"], text).ids.tolist()
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out"))(text).input_ids == want
    assert "Registered without a model card" in (tmp_path / "out" / "README.md").read_text()

    facts = _facts(tmp_path / "cfg", tiny_models, registered_model="old")
    with mlflow.start_run(experiment_id=experiment) as run:
        card = publish_card(client, "old", "1", info.model_uri, facts, folder)
    assert card.startswith("# old version 1\n")
    assert client.get_model_version("old", "1").description == card_description(card)
    root = {a.path for a in client.list_logged_model_artifacts(info.model_id)}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "MLmodel"} <= root
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model_card")] == ["model_card/README.md"]
    done = export_model("old/1", tmp_path / "out", tracking_uri=uri, workspace=None, force=True)
    assert (tmp_path / "out" / "README.md").read_text() == card
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out"))(text).input_ids == want


@pytest.mark.slow
def test_export_of_a_pipeline_run_loads_with_plain_transformers(tmp_path, tiny_models, prefect_harness):
    """The tiny pipeline (adaptive), then `fusion export <run id>`: the folder loads with plain
    transformers, gives the trained folder's logits, its tokenizer adds the start token, its card
    names the sources, strategy and scores. The registered version has the card as description and
    its scores as tags, and its artifact root loads the same way; name/version and name@candidate
    export the same model; weights come from the registry when the workspace lost them; a
    non-empty --out is refused unless --force; a bad version or alias is one line naming it."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    from flows.pipeline import run_pipeline

    path = write_tiny_pipeline(tmp_path, tiny_models, **{"fusion.strategy": "adaptive"})
    summary = run_pipeline(path)
    trained = Path(summary["model_dir"])
    assert trained == Path(summary["stages"]["fusion_training"]["path"]) / "model" and trained.is_dir()
    runner = CliRunner()

    def export(reference: str, out: Path, *extra: str):
        return runner.invoke(app, ["export", reference, str(path), "--out", str(out), *extra])

    out = tmp_path / "exported"
    result = export(summary["run_id"], out)
    assert result.exit_code == 0, result.output
    assert f"exported tiny-target version 1, run {summary['run_id']}" in result.output
    trained_tok = AutoTokenizer.from_pretrained(str(trained))
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "def f3(x):\n    return x * 3 + 3\n"
    ids = tok(text).input_ids
    assert ids == encode_document(trained_tok, text).ids.tolist() and ids[0] == start_token_id(trained_tok)
    assert torch.equal(_logits(out, ids), _logits(trained, ids))

    card = (out / "README.md").read_text()
    assert card.startswith("# tiny-target version 1") and summary["run_id"] in card
    assert "| bytes | `hf: " in card and "| words | `hf: " in card and "| strategy | adaptive |" in card
    bpb = summary["metrics"]["ppl.all.bits_per_byte"]
    assert f"| ppl.all.bits_per_byte ↓ | {bpb:.4f}" in card
    assert "this model | target (baseline)" in card  # the scores beside the target before fusion
    assert (out / "fusion_strategy.safetensors").is_file() and "`fusion_strategy.safetensors`: the trained" in card

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    version = client.get_model_version("tiny-target", "1")
    assert version.description == card_description(card)
    assert float(version.tags["score.ppl.all.bits_per_byte"]) == pytest.approx(bpb, rel=1e-5)
    assert version.tags["strategy"] == "adaptive"
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "root"),
                                                    tracking_uri=summary["tracking_uri"]))
    assert (root / "MLmodel").is_file() and (root / "README.md").read_text() == card
    assert AutoTokenizer.from_pretrained(str(root))(text).input_ids == ids
    assert torch.equal(_logits(root, ids), _logits(trained, ids))

    for reference in ("tiny-target/1", "tiny-target@candidate"):
        again = tmp_path / reference.replace("/", "_").replace("@", "_")
        result = export(reference, again)
        assert result.exit_code == 0, result.output
        for name in ("model.safetensors", "config.json", "tokenizer.json", "fusion_strategy.safetensors"):
            assert _sha(again / name) == _sha(out / name), (reference, name)
        assert (again / "README.md").read_text() == card

    for reference, message in (("tiny-target/9", "registered model 'tiny-target' has no version 9"),
                               ("tiny-target@nosuch", "registered model 'tiny-target' has no alias 'nosuch'")):
        result = export(reference, tmp_path / "never")
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert message in result.output

    result = export(summary["run_id"], out)
    assert result.exit_code == 1 and "is not empty" in result.output and "--force" in result.output
    stage = Path(summary["stages"]["fusion_training"]["path"])
    stage.rename(stage.with_name(stage.name + ".moved"))  # the workspace lost the training output
    result = export("tiny-target@candidate", out, "--force")
    assert result.exit_code == 0 and "weights from the registry" in result.output, result.output
    assert torch.equal(_logits(out, ids), _logits(stage.with_name(stage.name + ".moved") / "model", ids))
    assert AutoTokenizer.from_pretrained(str(out))(text).input_ids == ids
    assert (out / "fusion_strategy.safetensors").is_file()
