"""prepare_data: corpora -> cleaned, chunked, split documents with a domain label.

Reads local jsonl / parquet / text folders, cleans the text, drops short and duplicate
documents, splits whole documents deterministically into train / validation / test (so chunks
of one document never straddle splits; a held-out corpus reaches only validation and test),
and cuts long documents along line breaks so that every chunk fits `max_length` tokens (start
token included) in EVERY tokenizer involved. Validation is for every choice, test is reported
once (docs/method.md, "Experimental protocol").
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from fusion_core.errors import FusionError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}


class DataError(FusionError, ValueError):
    """A corpus that cannot be used; the message names it."""


@dataclass(frozen=True)
class Document:
    id: str
    domain: str
    text: str


def write_documents(path: Path, docs: Iterable[Document]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(asdict(d), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_documents(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


class DocumentFile:
    """A documents jsonl read by position without holding the corpus: only line offsets stay in memory.

    `ids()` streams the document ids; `slice(start, stop)` reads documents [start, stop) (what one
    teacher shard needs); `sample(n)` reads n documents spread over the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        offsets = []
        pos = 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def slice(self, start: int, stop: int) -> list[Document]:
        out = []
        with open(self.path, "rb") as f:
            for off in self._offsets[start:stop]:
                f.seek(off)
                out.append(Document(**json.loads(f.readline().decode("utf-8"))))
        return out

    def sample(self, n: int) -> list[Document]:
        if not self._offsets:
            return []
        step = max(1, len(self._offsets) // max(n, 1))
        return [self.slice(i, i + 1)[0] for i in range(0, len(self._offsets), step)][:n]

    def total_chars(self) -> int:
        total = 0
        for start in range(0, len(self), 1024):
            total += sum(len(d.text) for d in self.slice(start, start + 1024))
        return total


# ---------------------------------------------------------------- reading

def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "text"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def read_corpus_texts(path: Path, fmt: str = "auto", text_field: str = "text", name: str = "") -> list[str]:
    """Raw texts of one corpus. Raises DataError naming the corpus and file when it cannot be read."""
    path = Path(path)
    label = f"corpus {name!r} ({path})" if name else str(path)
    if not path.exists():
        raise DataError(f"{label}: path not found")
    fmt = _detect_format(path) if fmt == "auto" else fmt
    if fmt == "jsonl":
        files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
        texts = []
        for fp in files:
            with open(fp, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise DataError(f"{label}: {fp}:{lineno}: not valid JSON ({exc})") from None
                    if not isinstance(row, dict) or text_field not in row:
                        raise DataError(f"{label}: {fp}:{lineno}: no field {text_field!r}")
                    if not isinstance(row[text_field], str):
                        raise DataError(f"{label}: {fp}:{lineno}: field {text_field!r} is not a string")
                    texts.append(row[text_field])
        return texts
    if fmt == "parquet":
        import pyarrow.parquet as pq

        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        texts = []
        for fp in files:
            try:
                table = pq.read_table(fp, columns=[text_field])
            except Exception as exc:
                raise DataError(f"{label}: {fp}: cannot read column {text_field!r} ({exc})") from None
            texts.extend(str(t) for t in table.column(text_field).to_pylist() if t is not None)
        return texts
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES) \
        if path.is_dir() else [path]
    texts = []
    for fp in files:
        try:
            texts.append(fp.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{label}: {fp}: not UTF-8 text") from None
    return texts


# ---------------------------------------------------------------- cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC, unix newlines, no control characters, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text.replace("\t", "    "))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip("\n").rstrip()


# ---------------------------------------------------------------- chunking

def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chunk_text(text: str, tokenizers: Sequence, max_tokens: int) -> list[str]:
    """Cut `text` into pieces that each fit `max_tokens` tokens in every tokenizer.

    Cuts fall on line breaks where possible, else on spaces, else anywhere. The pieces
    concatenate back to the text (the cut characters stay at the end of the earlier piece).
    Raises DataError when max_tokens < 1.
    """
    if max_tokens < 1:
        raise DataError("max_tokens must be at least 1")
    if not tokenizers or max(_token_count(t, text) for t in tokenizers) <= max_tokens:
        return [text]
    chunks, start = [], 0
    while start < len(text):
        # The furthest end each tokenizer allows, from its offsets, then the nearest line break.
        limit = len(text)
        for tok in tokenizers:
            enc = tok(text[start:], add_special_tokens=False, return_offsets_mapping=True)
            offs = enc["offset_mapping"]
            if len(offs) > max_tokens:
                limit = min(limit, start + offs[max_tokens - 1][1])
        end = limit
        while True:
            piece = text[start:end]
            if end < len(text):
                cut = piece.rfind("\n")
                if cut < len(piece) // 4:
                    cut = piece.rfind(" ")
                if cut >= len(piece) // 4 and cut > 0:
                    end = start + cut + 1
                    piece = text[start:end]
            if max(_token_count(t, piece) for t in tokenizers) <= max_tokens or end - start <= 1:
                break
            end = start + max(1, int((end - start) * 0.9))
        chunks.append(piece)
        start = end
    return chunks


# ---------------------------------------------------------------- the stage

SPLITS: tuple[str, ...] = ("train", "validation", "test")


class CorpusTexts(NamedTuple):
    """One corpus's raw texts. A held-out corpus feeds only validation and test, never train."""

    name: str
    domain: str
    texts: list[str]
    heldout: bool = False


def _split_value(seed: int, doc_key: str) -> float:
    h = hashlib.sha256(f"{seed}:{doc_key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def check_split_fractions(validation_fraction: float, test_fraction: float) -> None:
    """Raise DataError naming the field when a fraction is outside [0, 1) or they leave nothing to train on."""
    for field, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{field} must be in [0, 1), got {value!r}")
    if validation_fraction + test_fraction >= 1.0:
        raise DataError(f"validation_fraction + test_fraction must be below 1 (got {validation_fraction!r} + "
                        f"{test_fraction!r}): nothing would be left for training")


def assign_split(seed: int, doc_key: str, *, validation_fraction: float, test_fraction: float,
                 heldout: bool = False) -> str:
    """The split of one whole document: "train", "validation" or "test", from a hash of (seed, key).

    One uniform value u per document: validation when u < validation_fraction, test when
    u < validation_fraction + test_fraction, train otherwise. A held-out document never goes to
    train: the same u divides it between validation and test in the ratio of their fractions.
    Raises DataError for a held-out document when both fractions are 0.
    """
    u = _split_value(seed, doc_key)
    if heldout:
        held = validation_fraction + test_fraction
        if held <= 0.0:
            raise DataError("a held-out corpus needs validation_fraction + test_fraction > 0")
        return "validation" if u < validation_fraction / held else "test"
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


@dataclass
class PreparedCorpus:
    train: list[Document]
    validation: list[Document]
    test: list[Document]
    stats: dict[str, float]

    def split(self, name: str) -> list[Document]:
        """The chunks of one split by name ("train", "validation" or "test")."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return getattr(self, name)


def prepare_documents(corpora: Sequence[CorpusTexts | tuple], *, tokenizers: Sequence, max_length: int,
                      min_chars: int, validation_fraction: float, seed: int,
                      test_fraction: float = 0.0) -> PreparedCorpus:
    """Clean, deduplicate, split and chunk.

    corpora: CorpusTexts, or (corpus name, domain, raw texts[, heldout]) tuples. Whole documents
    are split (`assign_split`), so the chunks of one document share a split; a held-out corpus
    reaches only validation and test. max_length counts the start token, so chunks get
    max_length - 1 text tokens. test_fraction 0 (the default) leaves the test split empty.

    Returns the chunks per split and stats: chunk, character and whole-document counts per
    split (`<split>_chunks`, `<split>_chars`, `<split>_documents.<domain>`, ...).
    Raises DataError for fractions outside [0, 1) or summing to 1 or more, a corpus with no
    usable document, or no training document at all.
    """
    check_split_fractions(validation_fraction, test_fraction)
    seen: set[str] = set()
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    stats: Counter = Counter()
    for entry in corpora:
        corpus = CorpusTexts(*entry)
        kept = 0
        for i, raw in enumerate(corpus.texts):
            text = clean_text(raw)
            if len(text) < min_chars:
                stats["dropped_short"] += 1
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                stats["dropped_duplicate"] += 1
                continue
            seen.add(digest)
            kept += 1
            doc_id = f"{corpus.name}-{i:06d}"
            split = assign_split(seed, digest, validation_fraction=validation_fraction, test_fraction=test_fraction,
                                 heldout=corpus.heldout)
            stats[f"{split}_documents.{corpus.domain}"] += 1
            for j, piece in enumerate(chunk_text(text, tokenizers, max_length - 1)):
                if len(piece.strip()) >= min(min_chars, 8):
                    splits[split].append(Document(id=f"{doc_id}-{j:03d}", domain=corpus.domain, text=piece))
                    stats[f"{split}_chunks.{corpus.domain}"] += 1
        if kept == 0:
            raise DataError(f"corpus {corpus.name!r} has no documents of at least {min_chars} characters "
                            "after cleaning")
        stats[f"documents.{corpus.domain}"] += kept
        if corpus.heldout:
            stats[f"heldout_documents.{corpus.domain}"] += kept
    if not splits["train"]:
        raise DataError("no training documents: every document went to validation or test (lower "
                        "validation_fraction / test_fraction, or declare fewer corpora held out)")
    per_domain: dict[str, int] = defaultdict(int)
    for d in splits["train"]:
        per_domain[d.domain] += len(d.text)
    out = dict(stats)
    for name, docs in splits.items():
        out[f"{name}_chunks"] = len(docs)
        out[f"{name}_chars"] = sum(len(d.text) for d in docs)
    out.update({f"train_chars.{k}": v for k, v in per_domain.items()})
    return PreparedCorpus(train=splits["train"], validation=splits["validation"], test=splits["test"], stats=out)
