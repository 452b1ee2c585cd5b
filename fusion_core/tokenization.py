"""Encoding documents the same way in every stage.

Every stage sees a document as: a start-of-sequence token, then the document's tokens.
Position i of that sequence is the state *after* reading tokens 0..i; the model's output there
predicts token i+1. `EncodedText.ends[i]` is the character offset in the text where the prefix
read so far ends, which is what lets two tokenizers be compared position by position.

Offsets are taken UNTRIMMED: some tokenizers (GPT-2/RoBERTa-style `ByteLevel` or
`RobertaProcessing` post-processors with `trim_offsets=True`) report `Ġworld` as the span of
"world" and whitespace-only tokens such as `ĊĠĠĠ` with spans that do not cover what they
consumed (`(1, 2)` for "\\n   ", `(7, 7)` for " "). `encode_document` asks a copy of the tokenizer
with trimming switched off, so `ends` is the true amount of text consumed; the token ids are the
tokenizer's own (checked).
"""
from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class EncodedText:
    """A document encoded by one tokenizer, with a start token at position 0.

    ids:  int64 [n] token ids, ids[0] is the start token.
    ends: int64 [n] character offset where the prefix covered by ids[0..i] ends (ends[0] == 0),
          non-decreasing; untrimmed (whitespace a token consumed is included).
    spans: int64 [n, 2] the tokenizer's own untrimmed (start, end) offsets; (0, 0) for the start
          token. Where one character is split over several tokens (byte-level pieces of "日",
          SentencePiece `<0xE6>` byte fallback, a prepended `▁`), consecutive spans overlap.
    anchors: optional int64 [n]: the offset just after the last non-whitespace character of
          text[:ends[i]] (so ends[i] - anchors[i] is the whitespace read since the last
          non-whitespace character). `encode_document` fills it; `alignment.align_positions`
          uses it to treat whitespace gaps as one boundary. None: no whitespace knowledge.
    """

    ids: np.ndarray
    ends: np.ndarray
    spans: np.ndarray
    anchors: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def start_token_id(tokenizer) -> int:
    """The id put in front of every document: bos, else cls, else eos.

    Raises ValueError when the tokenizer has none of them.
    """
    for name in ("bos_token_id", "cls_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no bos, cls or eos token "
        "to start a sequence with"
    )


def unk_token_id(tokenizer) -> int | None:
    """The tokenizer's unknown-token id, or None when it has none."""
    value = getattr(tokenizer, "unk_token_id", None)
    return int(value) if isinstance(value, int) and value >= 0 else None


def encode_document(tokenizer, text: str) -> EncodedText:
    """Encode `text` with a fast tokenizer: start token + tokens, with prefix end offsets.

    Raises ValueError when the tokenizer cannot give character offsets.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} is not a fast tokenizer: "
            "character offsets are needed"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    token_ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    untrimmed = _untrimmed_backend(tokenizer)
    if untrimmed is not None and token_ids:
        raw = untrimmed.encode(text, add_special_tokens=False)
        if list(raw.ids) == token_ids:  # the same tokens; only the offsets differ
            offsets = raw.offsets
    ids = np.asarray([start_token_id(tokenizer), *token_ids], dtype=np.int64)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    spans = np.concatenate([np.zeros((1, 2), dtype=np.int64), spans])
    ends = np.maximum.accumulate(spans[:, 1])
    return EncodedText(ids=ids, ends=ends, spans=spans, anchors=whitespace_anchors(text, ends))


def whitespace_anchors(text: str, ends: np.ndarray) -> np.ndarray:
    """For each prefix end e: len(text[:e].rstrip()) (str.isspace whitespace), vectorised."""
    ends = np.asarray(ends, dtype=np.int64)
    if not text:
        return np.zeros_like(ends)
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    is_ws = np.isin(codes, _WHITESPACE_CODES)
    # last_nonws_end[k] = 1 + index of the last non-whitespace char among text[:k]; 0 if none.
    last_nonws_end = np.zeros(len(codes) + 1, dtype=np.int64)
    last_nonws_end[1:] = np.maximum.accumulate(np.where(is_ws, 0, np.arange(1, len(codes) + 1)))
    return last_nonws_end[np.clip(ends, 0, len(codes))]


_WHITESPACE_CODES = np.asarray([c for c in range(0x3000 + 1) if chr(c).isspace()], dtype=np.uint32)

# Tokenizers whose post-processor trims offsets get an untrimmed copy of their backend, made once.
_UNTRIMMED: "weakref.WeakKeyDictionary[object, object]" = weakref.WeakKeyDictionary()
_UNTRIMMED_NONE = object()
_LOCK = threading.Lock()


def _untrimmed_backend(tokenizer):
    """A copy of the backend tokenizer with offset trimming switched off; None when not needed."""
    try:
        with _LOCK:
            cached = _UNTRIMMED.get(tokenizer)
    except TypeError:  # not weak-referenceable: compute each time
        cached = None
    if cached is not None:
        return None if cached is _UNTRIMMED_NONE else cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    result = None
    if backend is not None:
        spec = json.loads(backend.to_str())
        if _disable_trimming(spec.get("post_processor")):
            from tokenizers import Tokenizer

            result = Tokenizer.from_str(json.dumps(spec))
    try:
        with _LOCK:
            _UNTRIMMED[tokenizer] = _UNTRIMMED_NONE if result is None else result
    except TypeError:
        pass
    return result


def _disable_trimming(node) -> bool:
    """Set every `trim_offsets: true` inside a post-processor spec to false; True if any was."""
    changed = False
    if isinstance(node, dict):
        if node.get("trim_offsets") is True:
            node["trim_offsets"] = False
            changed = True
        for value in node.values():
            changed |= _disable_trimming(value)
    elif isinstance(node, list):
        for value in node:
            changed |= _disable_trimming(value)
    return changed
