"""Small tokenizers and models built from scratch: test fixtures and the demo's own models.

Three tokenizer families, trained with the `tokenizers` library on text the caller gives:
- "byte_level": GPT-2 / Llama-3 / SmolLM2 style byte-level BPE (`Ġ`, `Ċ`).
- "metaspace": SentencePiece style BPE (`▁` word marker, `<0xNN>` byte fallback).
- "wordpiece": BERT style WordPiece (`##` continuation, lower-cased).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

TokenizerFamily = Literal["byte_level", "metaspace", "wordpiece"]

_SPECIALS = {
    "byte_level": {"bos": "<|bos|>", "eos": "<|endoftext|>", "pad": "<|pad|>", "unk": None},
    "metaspace": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
    "wordpiece": {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "unk": "[UNK]"},
}


def train_tokenizer(family: TokenizerFamily, texts: Iterable[str], vocab_size: int, out_dir: Path | None = None):
    """Train a fast tokenizer of `family` on `texts`; save it to `out_dir` when given.

    Returns a transformers PreTrainedTokenizerFast with bos/eos/pad (and unk where the family
    has one) set. Raises ValueError for an unknown family.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family not in _SPECIALS:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {sorted(_SPECIALS)}")
    sp = _SPECIALS[family]
    specials = [t for t in (sp["unk"], sp["bos"], sp["eos"], sp["pad"]) if t is not None]
    texts = list(texts)
    if family == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
    elif family == "metaspace":
        tok = Tokenizer(models.BPE(unk_token=sp["unk"], byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
        ])
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False,
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token=sp["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    kwargs = {"bos_token": sp["bos"], "eos_token": sp["eos"], "pad_token": sp["pad"]}
    if sp["unk"] is not None:
        kwargs["unk_token"] = sp["unk"]
    if family == "wordpiece":
        kwargs["cls_token"], kwargs["sep_token"] = sp["bos"], sp["eos"]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf


def make_llama(tokenizer, *, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int | None = None,
               max_positions: int = 512, seed: int = 0, out_dir: Path | None = None):
    """A randomly initialised LlamaForCausalLM sized for `tokenizer`; saved with it to `out_dir` if given."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or hidden * 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model


def wordpiece_tokenizer(vocab: list[str], out_dir: Path | None = None):
    """A "wordpiece"-family tokenizer over a vocabulary the caller chose.

    Same normaliser, pre-tokenizer, decoder and special tokens as `train_tokenizer("wordpiece")`;
    the special tokens come first, then `vocab` in its order (duplicates dropped). For callers
    that need a reproducible vocabulary: the `tokenizers` WordPiece trainer breaks ties between
    equally frequent merges in a different order on every run.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = _SPECIALS["wordpiece"]
    tokens = list(dict.fromkeys([sp["unk"], sp["bos"], sp["eos"], sp["pad"], *vocab]))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token=sp["unk"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=sp["bos"], eos_token=sp["eos"], pad_token=sp["pad"], unk_token=sp["unk"],
        cls_token=sp["bos"], sep_token=sp["eos"],
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf
