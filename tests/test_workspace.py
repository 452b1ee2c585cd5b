import json

import pytest

from fusion_core.workspace import StageOutput, fingerprint, verify_manifest


def test_fingerprint_is_stable_and_order_free():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_stage_output_appears_only_when_complete(tmp_path):
    out = StageOutput(tmp_path, "prepare_data", "abc")
    assert not out.complete()
    with pytest.raises(RuntimeError):
        with out.building() as d:
            (d / "train.jsonl").write_text("x")
            raise RuntimeError("crash mid-stage")
    assert not out.path.exists() and not out.complete()
    assert not list(out.path.parent.glob("*partial*"))
    with out.building({"rows": 1}) as d:
        (d / "train.jsonl").write_text("x")
    assert out.complete() and out.meta["rows"] == 1


def test_corrupted_output_is_not_complete(tmp_path):
    out = StageOutput(tmp_path, "s", "k")
    with out.building() as d:
        (d / "a.bin").write_bytes(b"12345")
    (out.path / "a.bin").write_bytes(b"12346")
    ok, why = verify_manifest(out.path)
    assert not ok and "a.bin" in why
    assert not out.complete()
    # A rebuild replaces the corrupted folder.
    with out.building() as d:
        (d / "a.bin").write_bytes(b"12345")
    assert out.complete()
    assert json.loads((out.path / "manifest.json").read_text())["files"]["a.bin"]["size"] == 5
