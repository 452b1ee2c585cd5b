"""teacher_inference: score documents with a source model and project its predictions onto the target.

For every TARGET position t of a document, the stored record holds the source's top-k
next-token log-probabilities mapped into the target vocabulary (duplicates merged by
log-sum-exp), and whether t was aligned to a source position. A position that is not aligned
holds the one-hot of the TRUE NEXT target token (not the current one), so training can still
give it full weight. Records are written as compact parquet shards: ids in the narrowest
unsigned type that holds the target vocabulary, log-probabilities as float16, no padding.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from fusion_core.errors import FusionError
from fusion_core.data import Document
from fusion_core.tokenization import EncodedText, encode_document


@dataclass
class SourceScores:
    """One document scored by a source model in its own tokenization."""

    topk_ids: np.ndarray       # int64 [n_s, k], source vocabulary
    topk_logprobs: np.ndarray  # float32 [n_s, k], log-softmax(logits / T)
    token_ce: np.ndarray       # float32 [n_s - 1], -log p(next token) at T = 1
    predicted_bytes: int = 0   # UTF-8 bytes of the text covered by the predicted tokens 1 .. n_s - 1
    # Restricted top-k at the marginal queries (`marginal`), in the order they were asked:
    marginal_ids: np.ndarray | None = None       # int64 [q, k] source ids, -inf rows padded with 0
    marginal_logprobs: np.ndarray | None = None  # float32 [q, k], log p_T(v | v starts with c)

    @property
    def seq_ce(self) -> float:
        """Mean CE per source token: a diagnostic only (not comparable across tokenizers)."""
        return float(self.token_ce.mean()) if len(self.token_ce) else 0.0

    @property
    def nll_per_byte(self) -> float:
        """The score strategies compare: NLL (nats) of the predicted tokens per UTF-8 byte they cover."""
        return per_byte_nll(self.token_ce, self.predicted_bytes)


def per_byte_nll(token_ce: np.ndarray, predicted_bytes: int) -> float:
    """Summed next-token NLL (nats) divided by the UTF-8 bytes the predicted tokens cover; NaN
    when they cover none (a source that could not score the document never wins a comparison).

    Per-token CE is not comparable across tokenizers: at equal quality a tokenizer with fewer
    bytes per token shows a lower CE per token. Per byte, every source pays for the same text.
    The first token (the start token, which nothing predicts) is excluded for every source alike.
    A lossy tokenizer (WordPiece drops case and collapses whitespace) is charged for the bytes of
    the ORIGINAL text its tokens span, whitespace and case included: what it does not predict
    comes free, so its score is a lower bound of what predicting the exact text would cost.
    """
    if predicted_bytes <= 0:
        return float("nan")
    return float(np.asarray(token_ce, dtype=np.float64).sum() / predicted_bytes)


def covered_bytes(text: str, encoded: EncodedText) -> int:
    """UTF-8 bytes of `text` covered by tokens 1 .. n-1 of its encoding (those a model predicts)."""
    ends = np.asarray(encoded.ends)
    if len(ends) < 2:
        return 0
    return len(text[int(ends[0]):int(ends[-1])].encode("utf-8"))


@dataclass
class TeacherRecord:
    """One document's teacher signal at target positions."""

    ids: np.ndarray        # int64 [n_t, k], target vocabulary
    logprobs: np.ndarray   # float32 [n_t, k]; -inf marks an unused entry
    aligned: np.ndarray    # bool [n_t]: the position holds a teacher distribution (not a fallback)
    seq_ce: float          # the source's mean CE per token of its own (a diagnostic: not comparable across sources)
    source_tokens: int
    label: np.ndarray | None = None  # uint8 [n_t]: alignment label as realised (alignment.LABEL_NAMES)
    token_ce: np.ndarray | None = None  # float32 [n_s - 1]: the source's CE of each of its own next tokens
    nll_per_byte: float = float("nan")  # the source's NLL (nats) per UTF-8 byte of the document: the score


def score_documents(model, tokenizer, texts: Sequence[str], *, top_k: int, temperature: float = 1.0,
                    batch_size: int = 8, device: str = "cpu",
                    progress: Callable[[int, int], None] | None = None,
                    encoded: Sequence[EncodedText] | None = None,
                    marginal_queries: Sequence[np.ndarray] | None = None,
                    prefix_order: np.ndarray | None = None) -> list[SourceScores]:
    """Top-k log-probabilities and per-token CE of `model` on each text (start token prepended).

    Documents are batched by length (longest first) so padding stays small. The result is in
    the order of `texts`. progress(tokens_done, docs_done) is called after each batch.

    marginal_queries: per text an int64 [q, 3] array of (source position, lo, hi); for each the
    top-k of the temperature-scaled distribution at that position restricted to the token ids
    prefix_order[lo:hi] and renormalised over them (`fusion_core.marginal`).
    """
    import torch

    if encoded is None:
        encoded = [encode_document(tokenizer, t) for t in texts]
    order_t = torch.from_numpy(np.asarray(prefix_order, dtype=np.int64)) if prefix_order is not None else None
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[SourceScores | None] = [None] * len(texts)
    done_tokens = 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        lengths = [len(encoded[i]) for i in idx]
        width = max(lengths)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :lengths[r]] = torch.from_numpy(encoded[i].ids)
            mask[r, :lengths[r]] = 1
        marg: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        with torch.inference_mode():
            # One float32 copy of the logits; no log-softmax tensors (the top-k of the logits minus
            # the normaliser is the top-k of the log-softmax) and no key/value cache (nothing is
            # generated). Each row is reduced over its real positions only, not its padding.
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
            top_v = torch.zeros((len(idx), width, top_k), dtype=logits.dtype, device=logits.device)
            top_ids = torch.zeros((len(idx), width, top_k), dtype=torch.long, device=logits.device)
            lse = torch.zeros((len(idx), width), dtype=logits.dtype, device=logits.device)
            lse_t = lse if temperature == 1.0 else torch.zeros_like(lse)
            for r, n in enumerate(lengths):
                v, i, l1, lt = topk_logsumexp(logits[r, :n], top_k, temperature)
                top_v[r, :n], top_ids[r, :n], lse[r, :n] = v, i, l1
                if lt is not None:
                    lse_t[r, :n] = lt
            finite = torch.isfinite(lse) | ~mask.to(device).bool()  # NaN or +inf where any logit is
            if not bool(finite.all()):
                raise _NonFinite(idx[int((~finite).any(dim=1).nonzero()[0, 0])])
            nxt = ids[:, 1:].to(device)
            ce = lse[:, :-1] - logits[:, :-1].gather(-1, nxt[..., None])[..., 0]
            top_lp = top_v / temperature - lse_t[..., None]
            if marginal_queries is not None:
                dev_order = order_t.to(logits.device) if order_t is not None else None
                for r, i in enumerate(idx):
                    marg[i] = _restricted_topk(logits[r], marginal_queries[i], dev_order, top_k, temperature)
            del logits, lse  # [batch, length, V]: freed before the next batch's forward, not during it
        top_lp, top_ids, ce = top_lp.cpu().numpy(), top_ids.cpu().numpy(), ce.cpu().numpy()
        for r, i in enumerate(idx):
            n = lengths[r]
            m_ids, m_lp = marg.get(i, (None, None))
            results[i] = SourceScores(topk_ids=top_ids[r, :n].astype(np.int64),
                                      topk_logprobs=top_lp[r, :n].astype(np.float32),
                                      token_ce=ce[r, :n - 1].astype(np.float32),
                                      predicted_bytes=covered_bytes(texts[i], encoded[i]),
                                      marginal_ids=m_ids, marginal_logprobs=m_lp)
        done_tokens += sum(lengths)
        if progress is not None:
            progress(done_tokens, b + len(idx))
    return results  # type: ignore[return-value]


_CACHE_BYTES = 1 << 21  # rows of logits reduced at once on a CPU: about 2 MiB, so they stay in cache


def topk_logsumexp(x, k: int, temperature: float = 1.0):
    """For the rows of x [n, V]: the k largest values and their ids, log-sum-exp(x) and, when
    temperature != 1, log-sum-exp(x / temperature) (else None); NaN or +inf where a row has any.

    On a CPU a whole-tensor `torch.logsumexp` makes several passes over the logits through main
    memory (max, subtract, exp, sum). Here the top-k gives each row's maximum m, and the sums of
    exp((x - m) / T) are taken a few rows at a time while they stay in cache: about twice as fast
    (benchmarks/teacher.py). On an accelerator one kernel over the whole tensor is the fast way.
    """
    import torch

    values, ids = x.topk(k, dim=-1)
    if x.device.type != "cpu":
        return (values, ids, torch.logsumexp(x, dim=-1),
                None if temperature == 1.0 else torch.logsumexp(x / temperature, dim=-1))
    m = values[:, 0]
    rows = max(1, _CACHE_BYTES // (x.shape[1] * x.element_size()))
    sums = torch.empty(x.shape[0], dtype=x.dtype)
    sums_t = None if temperature == 1.0 else torch.empty(x.shape[0], dtype=x.dtype)
    for r0 in range(0, x.shape[0], rows):
        shifted = x[r0:r0 + rows] - m[r0:r0 + rows, None]
        if sums_t is not None:
            sums_t[r0:r0 + rows] = (shifted / temperature).exp_().sum(-1)
        sums[r0:r0 + rows] = shifted.exp_().sum(-1)
    lse = sums.log_().add_(m)
    return values, ids, lse, None if sums_t is None else sums_t.log_().add_(m / temperature)


_MIN_WIDTH = 64  # narrowest gather of the restricted top-k


def _restricted_topk(logits, queries: np.ndarray, order_t, k: int,
                     temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per query (position, lo, hi): top-k of log-softmax(logits[position] / T) over the ids
    order_t[lo:hi], renormalised over them.

    Vectorised and proportional to the ranges, not the vocabulary: queries are grouped by the
    power of two that holds their range's width, and per group one gather of [q, width] logits
    (the ids order_t[lo:lo + width], everything past hi masked), one top-k and one log-sum-exp;
    one device-to-host copy per group. Most prefixes select a few dozen tokens, so this reads a
    small fraction of what gathering whole rows would.
    """
    import torch

    queries = np.asarray(queries, dtype=np.int64).reshape(-1, 3)
    out_ids = np.zeros((len(queries), k), dtype=np.int64)
    out_lp = np.full((len(queries), k), -np.inf, dtype=np.float32)
    if not len(queries):
        return out_ids, out_lp
    if order_t is None:
        raise ValueError("marginal queries need the source's prefix order (marginal.PrefixIndex.order)")
    n = order_t.numel()
    widths = np.clip(queries[:, 2] - queries[:, 1], 0, n)
    group = np.maximum(_MIN_WIDTH, 1 << np.ceil(np.log2(np.maximum(widths, 1))).astype(np.int64))
    group = np.minimum(group, n)
    for w in np.unique(group).tolist():
        rows = np.flatnonzero(group == w)
        q = torch.from_numpy(queries[rows]).to(logits.device)
        offsets = torch.arange(w, device=logits.device)
        cols = (q[:, 1:2] + offsets[None, :]).clamp_(max=n - 1)       # [g, w] positions in prefix order
        vocab_ids = order_t[cols]                                      # [g, w] source ids
        sub = logits[q[:, 0:1], vocab_ids]                             # [g, w] gathered logits
        if temperature != 1.0:
            sub = sub / temperature
        sub = sub.masked_fill(q[:, 1:2] + offsets[None, :] >= q[:, 2:3], float("-inf"))
        kk = min(k, w)
        lse = torch.logsumexp(sub, dim=1, keepdim=True)
        v, ix = sub.topk(kk, dim=1)
        lp = (v - lse).masked_fill(~torch.isfinite(v), float("-inf"))
        out_ids[rows, :kk] = vocab_ids.gather(1, ix).cpu().numpy()
        out_lp[rows, :kk] = lp.cpu().numpy()
    out_ids[~np.isfinite(out_lp)] = 0
    return out_ids, out_lp


def merge_duplicates(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, merge equal ids by log-sum-exp of their log-probabilities; rows sorted by probability.

    ids, logprobs: [A, k]. Returns arrays of the same shape, merged entries first (descending),
    the freed slots filled with id 0 and -inf.
    """
    a, k = ids.shape
    if a == 0:
        return ids.copy(), logprobs.copy()
    order = np.argsort(ids, axis=1, kind="stable")
    sid = np.take_along_axis(ids, order, axis=1)
    slp = np.take_along_axis(logprobs, order, axis=1).astype(np.float64)
    new_group = np.ones_like(sid, dtype=bool)
    new_group[:, 1:] = sid[:, 1:] != sid[:, :-1]
    flat_starts = np.flatnonzero(new_group.ravel())
    probs = np.exp(slp).ravel()
    merged_p = np.add.reduceat(probs, flat_starts)
    rows = flat_starts // k
    rank_in_row = np.arange(len(flat_starts)) - np.searchsorted(flat_starts // k, rows, side="left")
    out_ids = np.zeros((a, k), dtype=ids.dtype)
    out_lp = np.full((a, k), -np.inf, dtype=np.float64)
    out_ids[rows, rank_in_row] = sid.ravel()[flat_starts]
    with np.errstate(divide="ignore"):
        out_lp[rows, rank_in_row] = np.log(merged_p)
    resort = np.argsort(-out_lp, axis=1, kind="stable")
    out_ids = np.take_along_axis(out_ids, resort, axis=1)
    out_lp = np.take_along_axis(out_lp, resort, axis=1)
    out_ids[~np.isfinite(out_lp)] = 0
    return out_ids, out_lp.astype(np.float32)


def project_to_target(scores: SourceScores, alignment, target: EncodedText, src_to_tgt: np.ndarray, *,
                      marginalizer=None, text: str | None = None, src_ids: np.ndarray | None = None,
                      src_special: np.ndarray | None = None, projection: str = "map",
                      src_ends: np.ndarray | None = None) -> TeacherRecord:
    """Map a source's predictions onto target positions and ids.

    alignment: an `alignment.PositionAlignment`, or a plain int64 [n_t] array of the source
    position aligned with each target position (-1 where none; all taken as boundary positions).
    src_to_tgt: the vocabulary map, [V_src] -> target id.
    MARGINAL positions need `marginalizer` (a `marginal.Marginalizer`), the document's `text`,
    the source's `src_ids` and the restricted top-k in `scores.marginal_*` (in the order of the
    MARGINAL positions); without them, or where no candidate survives, they fall back.
    src_special: bool [V_src]; predictions of these source ids (unk, pad, bos, eos...) are dropped:
    a position that predicts a next token never has a special one in the text, and a source's
    unk must not teach the target to emit its own unk.
    projection: "map" (every boundary position through the vocabulary map) or "text": boundary
    positions whose next tokens differ (one_to_one_mapped, many_to_one, one_to_many) and where both
    sides have read exactly the same text (src_ends[s] == target.ends[t]) project each candidate
    by its surface, as MARGINAL positions do with nothing read yet (`marginal.Marginalizer.project`):
    a candidate the text continues with -> the true next target token, else its twin or the
    longest target token it starts with. Needs marginalizer, text and src_ends.
    """
    from fusion_core.alignment import (
        END, FALLBACK, MANY_TO_ONE, MARGINAL, ONE_TO_MANY, ONE_TO_ONE_MAPPED, PositionAlignment,
    )

    n_t, k = len(target), scores.topk_ids.shape[1]
    if not isinstance(alignment, PositionAlignment):
        src_pos = np.asarray(alignment, dtype=np.int64)
        label = np.where(src_pos >= 0, ONE_TO_ONE_MAPPED, FALLBACK).astype(np.uint8)
        if n_t:
            label[-1] = END
        alignment = PositionAlignment(src_pos, label, np.zeros(n_t, dtype=np.int32))
    if len(alignment) != n_t:
        raise ValueError(f"alignment has {len(alignment)} positions, the target tokenization {n_t}")
    label = alignment.label.copy()
    src_pos = alignment.src_pos
    ids = np.zeros((n_t, k), dtype=np.int64)
    lp = np.full((n_t, k), -np.inf, dtype=np.float32)
    boundary = alignment.boundary & (src_pos >= 0) & (src_pos < len(scores.topk_ids))
    label[alignment.boundary & ~boundary] = FALLBACK
    if boundary.any():
        top = scores.topk_ids[src_pos[boundary]]
        top_lp = scores.topk_logprobs[src_pos[boundary]]
        if src_special is not None:
            top_lp = np.where(src_special[top], -np.inf, top_lp).astype(np.float32)
        ids[boundary], lp[boundary] = merge_duplicates(src_to_tgt[top], top_lp)
        if projection == "text" and marginalizer is not None and text is not None and src_ends is not None:
            pos = np.flatnonzero(boundary)
            sel = np.isin(label[pos], (ONE_TO_ONE_MAPPED, MANY_TO_ONE, ONE_TO_MANY))
            sel &= np.asarray(src_ends)[src_pos[pos]] == target.ends[pos]
            if sel.any():
                rows = np.flatnonzero(sel)
                t_ids, t_lp = marginalizer.project(top[rows], top_lp[rows], [""] * rows.size, text,
                                                   target.ends[pos[rows]], target.ids[pos[rows] + 1])
                ids[pos[rows]], lp[pos[rows]] = merge_duplicates(t_ids, t_lp)
        elif projection not in ("map", "text"):
            raise ValueError(f"projection must be 'map' or 'text', not {projection!r}")
        label[np.flatnonzero(boundary)[~np.isfinite(lp[boundary, 0])]] = FALLBACK
    marg = np.flatnonzero(label == MARGINAL)
    if marg.size:
        if marginalizer is None or text is None or src_ids is None or scores.marginal_ids is None \
                or len(scores.marginal_ids) != marg.size:
            label[marg] = FALLBACK
        else:
            prefixes = [marginalizer.prefix(int(src_ids[s + 1]), int(c))
                        for s, c in zip(src_pos[marg].tolist(), alignment.consumed[marg].tolist())]
            m_ids, m_lp = marginalizer.project(scores.marginal_ids, scores.marginal_logprobs, prefixes, text,
                                               target.ends[marg], target.ids[marg + 1])
            m_ids, m_lp = merge_duplicates(m_ids, m_lp)
            ids[marg], lp[marg] = m_ids, m_lp
            label[marg[~np.isfinite(m_lp[:, 0])]] = FALLBACK
    # No teacher signal: the one-hot of the TRUE NEXT token (label at t), flagged.
    fallback = np.flatnonzero(label == FALLBACK)
    fallback = fallback[fallback < n_t - 1]
    ids[fallback] = 0
    lp[fallback] = -np.inf
    ids[fallback, 0] = target.ids[fallback + 1]
    lp[fallback, 0] = 0.0
    aligned = label < FALLBACK
    return TeacherRecord(ids=ids, logprobs=lp, aligned=aligned, seq_ce=scores.seq_ce,
                         source_tokens=len(scores.topk_ids), label=label, nll_per_byte=scores.nll_per_byte)


# ---------------------------------------------------------------- shards

SHARD_FORMAT = 3  # columns: doc_id, domain, positions, ids, logprobs, aligned, label, token_ce, seq_ce,
                  # source_tokens, nll_per_byte (3: the per-byte score)


def id_dtype(vocab_size: int):
    """The narrowest unsigned integer type that holds every id of a vocabulary."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return dt
    return np.uint64


def write_shard(path: Path, doc_ids: Sequence[str], domains: Sequence[str], records: Sequence[TeacherRecord],
                vocab_size: int) -> int:
    """Write records as one parquet shard atomically; returns its size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dt = id_dtype(vocab_size)
    arrow_dt = {np.uint8: pa.uint8(), np.uint16: pa.uint16(), np.uint32: pa.uint32(), np.uint64: pa.uint64()}[dt]
    k = records[0].ids.shape[1] if records else 0
    table = pa.table({
        "doc_id": pa.array(list(doc_ids), pa.string()),
        "domain": pa.array(list(domains), pa.string()),
        "positions": pa.array([len(r.aligned) for r in records], pa.int32()),
        "ids": pa.array([r.ids.astype(dt).ravel() for r in records], pa.list_(arrow_dt)),
        "logprobs": pa.array([r.logprobs.astype(np.float16).ravel() for r in records], pa.list_(pa.float16())),
        "aligned": pa.array([r.aligned for r in records], pa.list_(pa.bool_())),
        "label": pa.array([_label_of(r) for r in records], pa.list_(pa.uint8())),
        "token_ce": pa.array([np.zeros(0, np.float16) if r.token_ce is None else r.token_ce.astype(np.float16)
                              for r in records], pa.list_(pa.float16())),
        "seq_ce": pa.array([r.seq_ce for r in records], pa.float32()),
        "nll_per_byte": pa.array([r.nll_per_byte for r in records], pa.float32()),
        "source_tokens": pa.array([r.source_tokens for r in records], pa.int32()),
    }, metadata={"top_k": str(k), "vocab_size": str(vocab_size)})
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return Path(path).stat().st_size


def _label_of(record: TeacherRecord) -> np.ndarray:
    from fusion_core.alignment import END, FALLBACK, ONE_TO_ONE_MAPPED

    if record.label is not None:
        return np.asarray(record.label, dtype=np.uint8)
    label = np.where(record.aligned, ONE_TO_ONE_MAPPED, FALLBACK).astype(np.uint8)
    if label.size:
        label[-1] = END
    return label


def read_shards(folder: Path) -> dict[str, TeacherRecord]:
    """All records of a source's shard folder, by document id."""
    import pyarrow.parquet as pq

    out: dict[str, TeacherRecord] = {}
    for path in sorted(Path(folder).glob("shard-*.parquet")):
        table = pq.read_table(path)
        k = int(table.schema.metadata[b"top_k"])
        cols = {c: table.column(c).to_pylist() for c in ("doc_id", "positions", "seq_ce", "source_tokens")}
        ids_col, lp_col, al_col = table.column("ids"), table.column("logprobs"), table.column("aligned")
        lab_col = table.column("label") if "label" in table.column_names else None
        nb_col = table.column("nll_per_byte").to_pylist() if "nll_per_byte" in table.column_names else None
        ce_col = table.column("token_ce") if "token_ce" in table.column_names else None
        for row, doc_id in enumerate(cols["doc_id"]):
            n = cols["positions"][row]
            out[doc_id] = TeacherRecord(
                ids=np.asarray(ids_col[row].values.to_numpy(zero_copy_only=False), dtype=np.int64).reshape(n, k),
                logprobs=np.asarray(lp_col[row].values.to_numpy(zero_copy_only=False),
                                    dtype=np.float32).reshape(n, k),
                aligned=np.asarray(al_col[row].values.to_numpy(zero_copy_only=False), dtype=bool),
                label=(None if lab_col is None else
                       np.asarray(lab_col[row].values.to_numpy(zero_copy_only=False), dtype=np.uint8)),
                token_ce=(None if ce_col is None else
                          np.asarray(ce_col[row].values.to_numpy(zero_copy_only=False), dtype=np.float32)),
                seq_ce=float(cols["seq_ce"][row]), source_tokens=int(cols["source_tokens"][row]),
                nll_per_byte=float("nan") if nb_col is None or nb_col[row] is None else float(nb_col[row]))
    return out


@dataclass
class TeacherRunStats:
    documents: int
    source_tokens: int
    target_positions: int
    seconds: float
    bytes: int
    ce_by_domain: dict[str, float]
    # positions per realised alignment label (alignment.LABEL_NAMES), per domain
    labels_by_domain: dict[str, np.ndarray] | None = None
    nll_per_byte_by_domain: dict[str, float] | None = None  # nats per UTF-8 byte: the comparable score

    def metrics(self) -> dict[str, float]:
        m = {"documents": self.documents, "source_tokens": self.source_tokens,
             "target_positions": self.target_positions, "seconds": self.seconds,
             "tokens_per_s": self.source_tokens / self.seconds if self.seconds else 0.0,
             "bytes_per_target_token": self.bytes / max(self.target_positions, 1)}
        for d, ce in self.ce_by_domain.items():
            m[f"ce.{d}"] = ce
            m[f"perplexity.{d}"] = float(np.exp(ce))
        for d, nb in (self.nll_per_byte_by_domain or {}).items():
            m[f"bits_per_byte.{d}"] = nb / float(np.log(2.0))
        if self.labels_by_domain:
            from fusion_core.alignment import coverage_metrics

            m.update(coverage_metrics(self.labels_by_domain))
        return m


class TeacherError(FusionError, ValueError):
    """A source that cannot score a document (non-finite outputs, too long); the message names both."""


@dataclass(frozen=True)
class ShardSpec:
    """One unit of teacher work: documents [start, stop) of the stage's document list."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}.parquet"


def plan_shards(n_docs: int, docs_per_shard: int) -> list[ShardSpec]:
    """Consecutive shards of `docs_per_shard` documents (deterministic: the same plan on every rerun)."""
    if docs_per_shard < 1:
        raise ValueError("docs_per_shard must be >= 1")
    return [ShardSpec(i, lo, min(lo + docs_per_shard, n_docs))
            for i, lo in enumerate(range(0, n_docs, docs_per_shard))]


def _sidecar(folder: Path, spec: ShardSpec) -> Path:
    return Path(folder) / f"{spec.name}.json"


def shard_state(folder: Path, spec: ShardSpec, fingerprint: str) -> tuple[bool, str]:
    """(True, "") when the shard and its sidecar exist, belong to `fingerprint` and the checksum holds.

    The sidecar (written after the shard, atomically) is what marks a shard complete; a shard
    without one, with another fingerprint, or whose bytes changed is (False, why).
    """
    from fusion_core.workspace import file_sha256

    path, side = Path(folder) / spec.name, _sidecar(folder, spec)
    if not side.is_file():
        return False, "missing" if not path.is_file() else "no sidecar (interrupted)"
    try:
        meta = json.loads(side.read_text())
    except ValueError:
        return False, "unreadable sidecar"
    if meta.get("fingerprint") != fingerprint or meta.get("start") != spec.start or meta.get("stop") != spec.stop:
        return False, "from another configuration"
    if not path.is_file():
        return False, "missing"
    if path.stat().st_size != meta.get("size") or file_sha256(path) != meta.get("sha256"):
        return False, "checksum mismatch"
    return True, ""


@dataclass
class ShardStats:
    documents: int = 0
    source_tokens: int = 0
    target_positions: int = 0
    bytes: int = 0
    seconds: float = 0.0
    ce_sum: dict[str, float] | None = None
    ce_n: dict[str, int] | None = None
    labels: dict[str, list[int]] | None = None
    text_bytes: dict[str, int] | None = None  # UTF-8 bytes the predicted tokens cover, per domain

    def to_json(self) -> dict:
        return {"documents": self.documents, "source_tokens": self.source_tokens,
                "target_positions": self.target_positions, "bytes": self.bytes, "seconds": self.seconds,
                "ce_sum": self.ce_sum or {}, "ce_n": self.ce_n or {}, "labels": self.labels or {},
                "text_bytes": self.text_bytes or {}}

    @classmethod
    def from_json(cls, d: dict) -> "ShardStats":
        return cls(**{k: d.get(k) for k in ("documents", "source_tokens", "target_positions", "bytes", "seconds",
                                            "ce_sum", "ce_n", "labels", "text_bytes")})


def read_shard_stats(folder: Path, spec: ShardSpec) -> ShardStats:
    return ShardStats.from_json(json.loads(_sidecar(folder, spec).read_text())["stats"])


def score_shard(model, src_tokenizer, tgt_tokenizer, docs: Sequence[Document], alignments: dict,
                src_to_tgt: np.ndarray, folder: Path, spec: ShardSpec, *, fingerprint: str, top_k: int,
                temperature: float, batch_size: int, device: str = "cpu", marginalizer=None,
                src_special: np.ndarray | None = None, projection: str = "map", source_name: str = "source",
                context_length: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> ShardStats:
    """Score the documents of one shard and write it (parquet, then its sidecar), atomically.

    docs: the shard's documents (docs[spec.start:spec.stop] of the stage). Raises TeacherError
    naming the source and the document when a document is longer than `context_length` or the
    model returns non-finite logits on it; nothing is written then.
    """
    from fusion_core.alignment import LABEL_NAMES, MARGINAL, PositionAlignment
    from fusion_core.workspace import file_sha256, write_json_atomic

    start = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(alignments, "get") and not isinstance(alignments, dict):  # an AlignmentFile: read this shard's rows
        alignments = alignments.get([d.id for d in docs])
    missing = [d.id for d in docs if d.id not in alignments]
    if missing:
        raise KeyError(f"document {missing[0]!r} has no alignment for source {source_name!r} "
                       f"({len(missing)} such documents): the alignment stage is out of date")
    encoded = [encode_document(src_tokenizer, d.text) for d in docs]
    if context_length is not None:
        for doc, enc in zip(docs, encoded):
            if len(enc) > context_length:
                raise TeacherError(f"source {source_name!r}: document {doc.id!r} has {len(enc)} tokens with the start "
                                   f"token, more than the model's context ({context_length}); lower data.max_length")
    queries = None
    if marginalizer is not None:
        queries = []
        for doc, enc in zip(docs, encoded):
            al = alignments[doc.id]
            marg = np.flatnonzero(al.label == MARGINAL) if isinstance(al, PositionAlignment) else np.zeros(0, int)
            queries.append(marginalizer.queries(enc.ids, al.src_pos[marg], al.consumed[marg]) if marg.size
                           else np.zeros((0, 3), dtype=np.int64))
    try:
        scores = score_documents(model, src_tokenizer, [d.text for d in docs], top_k=top_k, temperature=temperature,
                                 batch_size=batch_size, device=device, progress=progress, encoded=encoded,
                                 marginal_queries=queries,
                                 prefix_order=marginalizer.index.order if marginalizer is not None else None)
    except _NonFinite as exc:
        doc = docs[exc.index]
        raise TeacherError(f"source {source_name!r} returned non-finite (NaN/inf) logits on document {doc.id!r} "
                           f"({doc.domain}); no shard was written") from None
    stats = ShardStats(ce_sum={}, ce_n={}, labels={}, text_bytes={})
    records = []
    for doc, enc, sc in zip(docs, encoded, scores):
        target = encode_document(tgt_tokenizer, doc.text)
        rec = project_to_target(sc, alignments[doc.id], target, src_to_tgt, marginalizer=marginalizer,
                                text=doc.text, src_ids=enc.ids, src_special=src_special,
                                projection=projection, src_ends=enc.ends)
        rec.token_ce = sc.token_ce
        records.append(rec)
        counts = np.bincount(rec.label, minlength=len(LABEL_NAMES))
        prev = np.asarray(stats.labels.get(doc.domain, [0] * len(LABEL_NAMES)))
        stats.labels[doc.domain] = (prev + counts).tolist()
        stats.source_tokens += len(sc.topk_ids)
        stats.target_positions += len(target)
        stats.ce_sum[doc.domain] = stats.ce_sum.get(doc.domain, 0.0) + float(sc.token_ce.astype(np.float64).sum())
        stats.ce_n[doc.domain] = stats.ce_n.get(doc.domain, 0) + len(sc.token_ce)
        stats.text_bytes[doc.domain] = stats.text_bytes.get(doc.domain, 0) + int(sc.predicted_bytes)
    path = folder / spec.name
    stats.bytes = write_shard(path, [d.id for d in docs], [d.domain for d in docs], records, len(tgt_tokenizer))
    stats.documents = len(docs)
    stats.seconds = time.perf_counter() - start
    write_json_atomic(_sidecar(folder, spec), {
        "fingerprint": fingerprint, "start": spec.start, "stop": spec.stop, "size": path.stat().st_size,
        "sha256": file_sha256(path), "stats": stats.to_json(), "format": SHARD_FORMAT})
    return stats


class _NonFinite(Exception):
    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def aggregate_stats(parts: Sequence[ShardStats], seconds: float) -> TeacherRunStats:
    from fusion_core.alignment import LABEL_NAMES

    ce_sum: dict[str, float] = {}
    ce_n: dict[str, int] = {}
    labels: dict[str, np.ndarray] = {}
    text_bytes: dict[str, int] = {}
    for p in parts:
        for d, v in (p.text_bytes or {}).items():
            text_bytes[d] = text_bytes.get(d, 0) + int(v)
        for d, v in (p.ce_sum or {}).items():
            ce_sum[d] = ce_sum.get(d, 0.0) + v
        for d, v in (p.ce_n or {}).items():
            ce_n[d] = ce_n.get(d, 0) + v
        for d, v in (p.labels or {}).items():
            labels[d] = labels.get(d, np.zeros(len(LABEL_NAMES), dtype=np.int64)) + np.asarray(v, dtype=np.int64)
    return TeacherRunStats(documents=sum(p.documents for p in parts), source_tokens=sum(p.source_tokens for p in parts),
                           target_positions=sum(p.target_positions for p in parts), seconds=seconds,
                           bytes=sum(p.bytes for p in parts),
                           ce_by_domain={d: ce_sum[d] / ce_n[d] for d in sorted(ce_sum) if ce_n.get(d)},
                           labels_by_domain=labels,
                           nll_per_byte_by_domain={d: ce_sum[d] / text_bytes[d] for d in sorted(ce_sum)
                                                   if text_bytes.get(d)})


def run_teacher(model, src_tokenizer, tgt_tokenizer, docs: Sequence[Document], alignments: dict,
                src_to_tgt: np.ndarray, out_dir: Path, *, top_k: int, temperature: float, batch_size: int,
                docs_per_shard: int, device: str = "cpu", marginalizer=None, src_special: np.ndarray | None = None,
                projection: str = "map", fingerprint: str = "", source_name: str = "source",
                context_length: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> TeacherRunStats:
    """Score `docs` with one source into out_dir (shard-00000.parquet, ... and their sidecars), in order.

    alignments: document id -> `alignment.PositionAlignment` (or a plain tgt_to_src array), or a
    `corpus_alignment.AlignmentFile` (read shard by shard).
    marginalizer: a `marginal.Marginalizer` for MARGINAL positions; None: they fall back.
    projection: how boundary positions project (`project_to_target`).
    Shards already complete in out_dir for `fingerprint` (`shard_state`) are kept, not rescored:
    an interrupted run resumes. The stage runs the same shards as mapped Prefect tasks.
    """
    start = time.perf_counter()
    parts = []
    done_tokens = [0]
    for spec in plan_shards(len(docs), docs_per_shard):
        if shard_state(out_dir, spec, fingerprint)[0]:
            parts.append(read_shard_stats(out_dir, spec))
            continue
        base = done_tokens[0]

        def _progress(t: int, d: int, base=base, lo=spec.start) -> None:
            if progress is not None:
                progress(base + t, lo + d)

        parts.append(score_shard(model, src_tokenizer, tgt_tokenizer, docs[spec.start:spec.stop], alignments,
                                 src_to_tgt, out_dir, spec, fingerprint=fingerprint, top_k=top_k,
                                 temperature=temperature, batch_size=batch_size, device=device,
                                 marginalizer=marginalizer, src_special=src_special, projection=projection,
                                 source_name=source_name, context_length=context_length, progress=_progress))
        done_tokens[0] += parts[-1].source_tokens
    return aggregate_stats(parts, time.perf_counter() - start)


def load_fusion_examples(train: Path, target: Path, teacher_folders: Sequence[Path]) -> list:
    """The training examples from the stage files: the documents (train.jsonl), the target's
    tokenizer folder and one teacher shard folder per source, in source order (none: plain CLM)."""
    from fusion_core.data import read_documents
    from fusion_core.models import load_tokenizer

    teachers = [read_shards(Path(f)) for f in teacher_folders]
    return list(iter_fusion_examples(read_documents(Path(train)), load_tokenizer(Path(target)), teachers))


def iter_fusion_examples(docs: Sequence[Document], tgt_tokenizer,
                         teachers: Sequence[dict[str, TeacherRecord]]) -> Iterator:
    """FusionExample per document: target ids plus every source's record, stacked [K, ...]."""
    from fusion_core.fusion import FusionExample

    for doc in docs:
        target = encode_document(tgt_tokenizer, doc.text)
        n = len(target)
        recs = [t[doc.id] for t in teachers]
        for r in recs:
            if len(r.aligned) != n:
                raise ValueError(f"document {doc.id!r}: teacher record has {len(r.aligned)} positions, "
                                 f"target tokenization has {n}; the stages are out of date")
        k = recs[0].ids.shape[1] if recs else 1
        yield FusionExample(
            input_ids=target.ids, domain=doc.domain,
            teacher_ids=np.stack([r.ids for r in recs]) if recs else np.zeros((0, n, k), np.int64),
            teacher_logprobs=np.stack([r.logprobs for r in recs]) if recs else np.zeros((0, n, k), np.float32),
            teacher_aligned=np.stack([r.aligned for r in recs]) if recs else np.zeros((0, n), bool),
            teacher_nll_per_byte=np.asarray([r.nll_per_byte for r in recs], dtype=np.float32),
            teacher_label=np.stack([_label_of(r) for r in recs]) if recs else None,
        )
