"""Encoding documents the same way in every stage.

Every stage sees a document as: a start-of-sequence token, then the document's tokens.
Position i of that sequence is the state *after* reading tokens 0..i; the model's output there
predicts token i+1. `EncodedText.ends[i]` is the character offset in the text where the prefix
read so far ends, which is what lets two tokenizers be compared position by position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EncodedText:
    """A document encoded by one tokenizer, with a start token at position 0.

    ids:  int64 [n] token ids, ids[0] is the start token.
    ends: int64 [n] character offset where the prefix covered by ids[0..i] ends (ends[0] == 0),
          non-decreasing.
    spans: int64 [n, 2] the tokenizer's own (start, end) offsets; (0, 0) for the start token.
    """

    ids: np.ndarray
    ends: np.ndarray
    spans: np.ndarray

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
    ids = np.asarray([start_token_id(tokenizer), *enc["input_ids"]], dtype=np.int64)
    spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    spans = np.concatenate([np.zeros((1, 2), dtype=np.int64), spans])
    ends = np.maximum.accumulate(spans[:, 1])
    return EncodedText(ids=ids, ends=ends, spans=spans)
