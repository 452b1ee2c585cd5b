"""The trained model as a plain Hugging Face folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load, with its model card (README.md).

Every stage encodes a document as the start token followed by the document's tokens
(`fusion_core.tokenization.encode_document`): the model was trained and scored that way. The
tokenizer saved with the trained model does not add that token by itself (`tokenizer(text)`
gives the document's tokens only), and a model scored without it does measurably worse (on the
demo, code bits per byte 0.979 without it against 0.932 with it). The exported tokenizer adds
it: a TemplateProcessing post-processor in tokenizer.json puts the start token
(`start_token_id`: bos, else cls, else eos) in front of every text, and tokenizer_config.json
declares it as bos with `add_bos_token: true` (and `add_eos_token: false`), which is what
transformers' tokenizer classes rebuild their post-processor from (a class that builds its own,
such as BertTokenizer's [CLS] ... [SEP], is replaced by the generic fast tokenizer class, which
follows tokenizer.json). `tokenizer(text).input_ids`
of the exported folder then equals `encode_document(tokenizer, text).ids` (checked on every
export). Pure: no MLflow, no Prefect.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from fusion_core.errors import FusionError

SELECTOR_FILE = "fusion_strategy.safetensors"
CARD_FILE = "README.md"
# What a tokenizer's save_pretrained may write: never copied from the trained folder (the
# exported tokenizer writes its own), so no stale file can change how the folder's tokenizer loads.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
})
GENERIC_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Arguments of a from_pretrained call that save_pretrained writes back into tokenizer_config.json.
LOAD_ARGUMENTS = ("is_local", "local_files_only", "name_or_path")
# Texts every export checks its tokenizer on: prose, code with indentation, digits, non-ASCII, empty.
CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "12 + 35 = 47\n7 * 8 = 56",
    "café naïve résumé — unicode text",
    "  leading spaces and trailing  ",
    "",
)


class ExportError(FusionError):
    """An export that cannot be written; the message says why."""


def start_token(tokenizer) -> tuple[str, int]:
    """The start token (text, id) every document is encoded with (`start_token_id`)."""
    from fusion_core.tokenization import start_token_id

    ident = start_token_id(tokenizer)
    return str(tokenizer.convert_ids_to_tokens(ident)), ident


def _template(token: str, ident: int) -> dict:
    """tokenizer.json's TemplateProcessing: the start token, then the text (pairs: the same per text)."""
    special = {"SpecialToken": {"id": token, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": token, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {token: {"id": token, "ids": [ident], "tokens": [token]}},
    }


def start_post_processor(existing: dict | None, token: str, ident: int) -> dict:
    """A post-processor that puts the start token in front of every text and adds nothing else.

    Processors that add special tokens (templates, BERT/RoBERTa processors) are replaced: the
    model never saw a [SEP] or eos after a document. A ByteLevel processor (offset trimming only)
    is kept, in a Sequence before the template."""
    template = _template(token, ident)
    if not existing:
        return template
    if existing.get("type") == "ByteLevel":
        return {"type": "Sequence", "processors": [existing, template]}
    if existing.get("type") == "Sequence":
        kept = [p for p in existing.get("processors", []) if p.get("type") == "ByteLevel"]
        return {"type": "Sequence", "processors": [*kept, template]} if kept else template
    return template


def save_start_token_tokenizer(model_dir: Path, out_dir: Path) -> tuple[str, int]:
    """Save the tokenizer of `model_dir` into `out_dir`, set to put the start token in front of
    every text; return the start token (text, id).

    The start token becomes the tokenizer's bos where it is not already (a tokenizer with only
    cls or eos), so that `add_bos_token` means it in every tokenizer class."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    token, ident = start_token(tok)
    if tok.bos_token_id != ident:
        tok.bos_token = token
    tok.save_pretrained(str(out_dir))
    path = Path(out_dir) / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"the tokenizer of {model_dir} is not a fast tokenizer (no tokenizer.json): its start "
                          "token cannot be set in the exported folder")
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["post_processor"] = start_post_processor(spec.get("post_processor"), token, ident)
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    for name in LOAD_ARGUMENTS:  # how this copy was loaded, not what the tokenizer is
        config.pop(name, None)
    config.update(bos_token=token, add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return token, ident


def use_generic_tokenizer_class(folder: Path) -> None:
    """Name the generic fast tokenizer class in `folder`'s tokenizer_config.json: it takes
    everything, the post-processor included, from tokenizer.json."""
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = GENERIC_TOKENIZER_CLASS
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def check_start_token(folder: Path, reference, texts: Iterable[str] = CHECK_TEXTS) -> None:
    """Raise ExportError unless `AutoTokenizer.from_pretrained(folder)(text).input_ids` equals
    `encode_document(reference, text).ids` (start token + the text's tokens) for every text, and
    `add_special_tokens=False` still gives the text's tokens alone."""
    from transformers import AutoTokenizer

    from fusion_core.tokenization import encode_document

    loaded = AutoTokenizer.from_pretrained(str(folder))
    for text in texts:
        want = encode_document(reference, text).ids.tolist()
        got = list(loaded(text).input_ids)
        if got != want:
            raise ExportError(f"the exported tokenizer ({type(loaded).__name__}) encodes {text!r} as {got[:12]}, "
                              f"not as the model was trained: {want[:12]} (start token first)")
        if list(loaded(text, add_special_tokens=False).input_ids) != want[1:]:
            raise ExportError(f"the exported tokenizer changed the tokens of {text!r} themselves")


def check_destination(out: Path, *, force: bool) -> None:
    """Refuse an `out` that is a file, or a non-empty folder without `force`; refuse with `force`
    too when it is the filesystem root, the home folder, or the current folder or one above it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} is not empty: choose an empty or new folder, or --force to replace it")
        resolved, cwd = out.resolve(), Path.cwd().resolve()
        if resolved in (Path(resolved.anchor), Path.home().resolve()) or resolved == cwd or resolved in cwd.parents:
            raise ExportError(f"{out} is the root, home or current folder (or above it): not replaced, even with "
                              "--force")


def write_model_folder(model_dir: Path, out: Path, *, card: str, force: bool = False) -> Path:
    """Write the trained model of `model_dir` into `out` as a Hugging Face folder: its weights and
    config, the trained selector (`fusion_strategy.safetensors`, when the strategy has one), the
    tokenizer set to add the start token (checked), and `card` as README.md.

    The folder is written beside `out` and moved into place when complete; an existing `out` is
    replaced only when empty or with `force` (check_destination). Returns `out`."""
    from transformers import AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} holds no model (no config.json)")
    check_destination(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for path in sorted(model_dir.iterdir()):
            if path.is_file() and path.name not in TOKENIZER_FILES and path.name != CARD_FILE:
                shutil.copy2(path, tmp / path.name)
        save_start_token_tokenizer(model_dir, tmp)
        reference = AutoTokenizer.from_pretrained(str(model_dir))
        try:
            check_start_token(tmp, reference)
        except ExportError:
            # A tokenizer class that builds its own post-processor (BertTokenizer adds [SEP]): the
            # generic fast class, which follows tokenizer.json, in transformers 4 and 5 alike.
            use_generic_tokenizer_class(tmp)
            check_start_token(tmp, reference)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
