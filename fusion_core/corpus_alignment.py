"""align_vocabularies for a whole corpus: one source's vocabulary map and per-document alignment.

Output of the stage, per source: `<source>.vocab.npz` (the VocabularyMap) and
`<source>.alignment.parquet` (doc_id, tgt_to_src: for every target position the source position
whose prefix ends at the same point of the text, -1 where none).
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fusion_core.alignment import align_positions
from fusion_core.data import Document
from fusion_core.tokenization import encode_document


@dataclass
class CorpusAlignment:
    tgt_to_src: dict[str, np.ndarray]
    stats: dict[str, float]


def align_corpus(src_tokenizer, tgt_tokenizer, docs: Sequence[Document]) -> CorpusAlignment:
    """Align every document's target positions to source positions; stats per domain.

    Rates count positions that predict a next token (all but the last one).
    """
    out: dict[str, np.ndarray] = {}
    hits: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for doc in docs:
        src = encode_document(src_tokenizer, doc.text)
        tgt = encode_document(tgt_tokenizer, doc.text)
        mapping = align_positions(src, tgt).astype(np.int32)
        out[doc.id] = mapping
        hits[doc.domain] += int((mapping[:-1] >= 0).sum())
        total[doc.domain] += max(len(mapping) - 1, 0)
    stats = {f"aligned_rate.{d}": hits[d] / total[d] for d in sorted(total) if total[d]}
    all_total = sum(total.values())
    stats["aligned_rate"] = sum(hits.values()) / all_total if all_total else 0.0
    stats["target_positions"] = float(all_total)
    return CorpusAlignment(tgt_to_src=out, stats=stats)


def save_alignment(path: Path, alignment: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = sorted(alignment)
    table = pa.table({
        "doc_id": pa.array(ids, pa.string()),
        "tgt_to_src": pa.array([alignment[i] for i in ids], pa.list_(pa.int32())),
    })
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def load_alignment(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {d: np.asarray(v, dtype=np.int64) for d, v in
            zip(table.column("doc_id").to_pylist(), table.column("tgt_to_src").to_pylist())}
