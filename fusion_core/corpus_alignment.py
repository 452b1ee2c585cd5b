"""align_vocabularies for a whole corpus: one source's per-document alignment and its report.

Output of the stage, per source: `<source>.vocab.npz` (the VocabularyMap),
`<source>.alignment.parquet` (doc_id, then per target position: src_pos, label, consumed; see
`alignment.PositionAlignment`) and `<source>.alignment.md` (the report below, also in MLflow).

The report counts target positions per label and domain (`alignment.LABEL_NAMES`), the
vocabulary map's exact-match share, the source's and the target's unknown tokens (characters a
tokenizer cannot encode: the positions whose source next token is the source's unk get no
teacher distribution, counted as fallback) and the worst-aligned spans: the longest runs of
fallback positions, with both tokenizations. Results are per document, so they do not depend
on the order of the documents (ties between spans are broken by document id).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from fusion_core.alignment import (
    END, FALLBACK, LABEL_NAMES, PairTables, PositionAlignment, align_document, align_document_dtw, coverage_metrics,
)
from fusion_core.data import Document
from fusion_core.errors import FusionError
from fusion_core.tokenization import EncodedText, encode_document, unk_token_id

ALIGNMENT_FORMAT = 2  # parquet columns src_pos / label / consumed


class AlignmentError(FusionError):
    """A document or tokenizer the alignment cannot handle; the message names which."""


@dataclass(frozen=True)
class WorstSpan:
    doc_id: str
    domain: str
    positions: int          # consecutive fallback positions
    start: int              # character range of the text those positions predict
    end: int
    text: str = ""
    target_tokens: tuple[str, ...] = ()
    source_tokens: tuple[str, ...] = ()


@dataclass
class AlignmentReport:
    source: str
    target: str
    labels_by_domain: dict[str, np.ndarray] = field(default_factory=dict)
    documents: int = 0
    source_unk_tokens: int = 0
    target_unk_tokens: int = 0
    target_tokens: int = 0
    seconds: float = 0.0
    vocab_stats: dict[str, float] = field(default_factory=dict)
    worst: list[WorstSpan] = field(default_factory=list)
    method: str = "offsets"
    marginalize: bool = True

    def metrics(self) -> dict[str, float]:
        m = coverage_metrics(self.labels_by_domain)
        m.update({"documents": float(self.documents), "source_unk_tokens": float(self.source_unk_tokens),
                  "target_unk_tokens": float(self.target_unk_tokens),
                  "align_tokens_per_s": self.target_tokens / self.seconds if self.seconds else 0.0})
        m.update({f"vocab.{k}": v for k, v in self.vocab_stats.items()})
        return m

    def markdown(self) -> str:
        m = coverage_metrics(self.labels_by_domain)
        domains = sorted(self.labels_by_domain)
        cols = domains + ["all"]
        lines = [f"# Alignment report: {self.source} -> {self.target}", "",
                 f"{self.documents} documents, method `{self.method}`, character-level marginalisation "
                 f"{'on' if self.marginalize else 'off'}. Shares of target positions that predict a next token.", "",
                 "| label | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

        def cell(name: str, domain: str) -> str:
            value = m.get(name if domain == "all" else f"{name}.{domain}")
            return "" if value is None else (f"{value:,.0f}" if name == "positions" else f"{value:.1%}")

        for name in ["positions", "coverage", "boundary_rate"] + [f"{n}_rate" for n in LABEL_NAMES[:END]]:
            lines.append(f"| {name} | " + " | ".join(cell(name, d) for d in cols) + " |")
        lines += ["", "coverage: a teacher distribution (boundary labels + marginal); the rest get the one-hot "
                  "of the true next token. Labels: one_to_one_exact / one_to_one_mapped (both next tokens end "
                  "together; the vocabulary map sends one to the other, or elsewhere), many_to_one (the target's "
                  "next token spans several source tokens), one_to_many (the reverse), marginal (the target "
                  "cuts inside a source token), fallback.", ""]
        v = self.vocab_stats
        if v:
            lines += ["## Vocabulary map", "",
                      f"- exact-match share {v.get('exact_rate', 0):.1%} of {v.get('src_vocab_size', 0):,.0f} "
                      f"source ids (surface-exact {v.get('surface_exact_rate', 0):.1%}, normalised "
                      f"{v.get('normalized_rate', 0):.1%}), fuzzy {v.get('fuzzy_rate', 0):.1%} (mean edit distance "
                      f"{v.get('fuzzy_mean_distance', 0):.2f}), to unk {v.get('unk_fallback_rate', 0):.1%}",
                      f"- target ids reached: {v.get('target_coverage', 0):.1%} of {v.get('tgt_vocab_size', 0):,.0f}",
                      ""]
        lines += ["## Unknown tokens", "",
                  f"- source unk tokens: {self.source_unk_tokens:,} (their positions fall back)",
                  f"- target unk tokens: {self.target_unk_tokens:,}", ""]
        if self.worst:
            lines += ["## Worst-aligned spans", "", "The longest runs of fallback positions.", ""]
            for w in self.worst:
                lines += [f"### {w.doc_id} ({w.domain}): {w.positions} positions, characters {w.start}-{w.end}", "",
                          "```text", w.text, "```", "",
                          f"- target: `{' '.join(w.target_tokens)}`",
                          f"- source: `{' '.join(w.source_tokens)}`", ""]
        if self.seconds:
            lines.append(f"Aligned {self.target_tokens:,} target tokens in {self.seconds:.2f} s "
                         f"({self.target_tokens / self.seconds:,.0f} tokens/s, encoding excluded).")
        return "\n".join(lines) + "\n"


@dataclass
class CorpusAlignment:
    alignments: dict[str, PositionAlignment]
    report: AlignmentReport

    @property
    def stats(self) -> dict[str, float]:
        return self.report.metrics()


def _encode(tokenizer, text: str, role: str, doc: Document) -> EncodedText:
    try:
        return encode_document(tokenizer, text)
    except Exception as exc:  # a tokenizer that fails on this text: name the document and the side
        raise AlignmentError(f"{role} tokenizer cannot encode document {doc.id!r} ({doc.domain}): {exc}") from exc


def _longest_run(mask: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in mask; (0, 0) when none."""
    if not mask.any():
        return 0, 0
    padded = np.r_[False, mask, False].astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, stops = edges[::2], edges[1::2]
    k = int(np.argmax(stops - starts))
    return int(starts[k]), int(stops[k] - starts[k])


def align_corpus(src_tokenizer, tgt_tokenizer, docs: Sequence[Document], src_to_tgt: np.ndarray | None = None, *,
                 method: str = "offsets", marginalize: bool = True, examples: int = 5,
                 source_name: str = "source", target_name: str = "target",
                 vocab_stats: dict[str, float] | None = None, tables: PairTables | None = None) -> CorpusAlignment:
    """Label every document's target positions against one source; the report (module doc).

    src_to_tgt: the vocabulary map (needed for exact/mapped and marginal labels and for the
    source-unk fallback; without it 1:1 positions are all "mapped", nothing is marginalised and
    only the unk counts are reported). method: "offsets" or "dtw".
    Raises AlignmentError naming the document and side when a tokenizer fails on a document.
    """
    if method not in ("offsets", "dtw"):
        raise ValueError(f"alignment method must be 'offsets' or 'dtw', not {method!r}")
    if tables is None and src_to_tgt is not None:
        tables = PairTables.build(src_tokenizer, tgt_tokenizer, src_to_tgt)
    # (positions whose source next token is the source's unk fall back: `alignment.label_positions`)
    if method == "dtw" and tables is None:
        raise ValueError("DTW alignment compares token surfaces: pass the vocabulary map")
    src_unk, tgt_unk = unk_token_id(src_tokenizer), unk_token_id(tgt_tokenizer)
    report = AlignmentReport(source=source_name, target=target_name, vocab_stats=dict(vocab_stats or {}),
                             method=method, marginalize=marginalize)
    out: dict[str, PositionAlignment] = {}
    runs: list[tuple[int, str, int, int]] = []  # (positions, doc id, first, last): each document's longest
    seconds = 0.0
    for doc in docs:
        src = _encode(src_tokenizer, doc.text, f"source {source_name!r}", doc)
        tgt = _encode(tgt_tokenizer, doc.text, f"target {target_name!r}", doc)
        t0 = time.perf_counter()
        if method == "dtw":
            al = align_document_dtw(src, tgt, tables)
        else:
            al = align_document(src, tgt, tables, marginalize=marginalize, text=doc.text)
        seconds += time.perf_counter() - t0
        out[doc.id] = al
        counts = al.counts()
        report.labels_by_domain[doc.domain] = report.labels_by_domain.get(doc.domain, 0) + counts
        report.documents += 1
        report.target_tokens += len(tgt)
        if src_unk is not None:
            report.source_unk_tokens += int((src.ids[1:] == src_unk).sum())
        if tgt_unk is not None:
            report.target_unk_tokens += int((tgt.ids[1:] == tgt_unk).sum())
        if examples > 0:
            first, length = _longest_run(al.label[:-1] == FALLBACK) if len(al) > 1 else (0, 0)
            if length:
                runs.append((length, doc.id, first, first + length - 1))
    report.seconds = seconds
    by_id = {d.id: d for d in docs}
    # Longest first; equal lengths by document id, so the choice does not depend on document order.
    for length, doc_id, first, last in sorted(runs, key=lambda w: (-w[0], w[1]))[:examples]:
        report.worst.append(_describe_span(by_id[doc_id], src_tokenizer, tgt_tokenizer, length, first, last))
    return CorpusAlignment(alignments=out, report=report)


def _describe_span(doc: Document, src_tokenizer, tgt_tokenizer, length: int, first: int, last: int) -> WorstSpan:
    """The text predicted by target positions first..last, and both tokenizations of it."""
    tgt = encode_document(tgt_tokenizer, doc.text)
    src = encode_document(src_tokenizer, doc.text)
    # The tokens predicted at positions first..last are first+1..last+1; where spans overlap
    # (a prepended word marker, byte pieces) the first of them may start before ends[first].
    start = int(min(tgt.ends[first], tgt.spans[first + 1, 0]))
    end = int(tgt.ends[last + 1])

    def tokens(enc: EncodedText, tok) -> tuple[str, ...]:
        inside = np.flatnonzero((enc.spans[1:, 1] > start) & (enc.spans[1:, 0] < end)) + 1
        return tuple(str(t) for t in tok.convert_ids_to_tokens(enc.ids[inside].tolist()))

    return WorstSpan(doc_id=doc.id, domain=doc.domain, positions=length, start=start, end=end,
                     text=doc.text[start:end], target_tokens=tokens(tgt, tgt_tokenizer),
                     source_tokens=tokens(src, src_tokenizer))


ROW_GROUP = 256  # documents per parquet row group: what a shard reads at a time


def save_alignment(path: Path, alignment: dict[str, PositionAlignment]) -> None:
    """Write the alignments in their dict order (the stage's document order), row groups of ROW_GROUP."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = list(alignment)
    table = pa.table({
        "doc_id": pa.array(ids, pa.string()),
        "src_pos": pa.array([alignment[i].src_pos.astype(np.int32) for i in ids], pa.list_(pa.int32())),
        "label": pa.array([alignment[i].label.astype(np.uint8) for i in ids], pa.list_(pa.uint8())),
        "consumed": pa.array([alignment[i].consumed.astype(np.int32) for i in ids], pa.list_(pa.int32())),
    }, metadata={"format": str(ALIGNMENT_FORMAT)})
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP)
    os.replace(tmp, path)


def _rows(table) -> dict[str, PositionAlignment]:
    def column(name: str, dtype) -> list[np.ndarray]:
        col = table.column(name)
        return [np.asarray(col[r].values.to_numpy(zero_copy_only=False), dtype=dtype) for r in range(len(col))]

    src_pos, label, consumed = column("src_pos", np.int64), column("label", np.uint8), column("consumed", np.int32)
    return {d: PositionAlignment(s, lab, c)
            for d, s, lab, c in zip(table.column("doc_id").to_pylist(), src_pos, label, consumed)}


class AlignmentFile:
    """One source's saved alignment, read by document without loading the whole corpus.

    Only the document ids stay in memory; `get(ids)` reads the row groups that hold them, so a
    shard of consecutive documents costs one or two row groups (ROW_GROUP documents each).
    Raises AlignmentError for a file of another format.
    """

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self._file = pq.ParquetFile(self.path)
        meta = self._file.schema_arrow.metadata or {}
        if meta.get(b"format") != str(ALIGNMENT_FORMAT).encode():
            raise AlignmentError(f"{path}: alignment format {meta.get(b'format', b'1').decode()} is not "
                                 f"{ALIGNMENT_FORMAT}; rerun align_vocabularies")
        ids = self._file.read(columns=["doc_id"]).column("doc_id").to_pylist()
        self._row = {d: i for i, d in enumerate(ids)}
        sizes = [self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)]
        self._starts = np.cumsum([0] + sizes)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row

    def __len__(self) -> int:
        return len(self._row)

    def get(self, doc_ids) -> dict[str, PositionAlignment]:
        missing = [d for d in doc_ids if d not in self._row]
        if missing:
            raise KeyError(f"document {missing[0]!r} has no alignment in {self.path} ({len(missing)} such documents): "
                           "the alignment stage is out of date")
        rows = sorted(self._row[d] for d in doc_ids)
        groups = sorted({int(np.searchsorted(self._starts, r, side="right") - 1) for r in rows})
        wanted = set(doc_ids)
        out: dict[str, PositionAlignment] = {}
        for g in groups:
            out.update({d: a for d, a in _rows(self._file.read_row_group(g)).items() if d in wanted})
        return out


def load_alignment(path: Path) -> dict[str, PositionAlignment]:
    """Every document's alignment (small corpora, tests); `AlignmentFile` reads by document."""
    f = AlignmentFile(path)
    return _rows(f._file.read())
