"""Aligning two tokenizations of the same text, position by position.

Positions follow `fusion_core.tokenization`: position i is the state after reading tokens 0..i
(token 0 = the start token) and predicts token i+1. A target position t is aligned with the
source position s whose prefix boundary is the same point of the text, so the source's
next-token prediction at s is a prediction of what follows the target's prefix.

Boundaries (`align_positions`)
------------------------------
Each position's boundary is `ends[i]` (untrimmed, see `encode_document`). A position is
*eligible* when it is a clean boundary: the next token does not start before it (a character
split over several byte tokens, SentencePiece's prepended `▁`, leave the earlier pieces mid-
character) and the next token ends further on (of several positions at one offset, the last).

Whitespace: all boundaries inside one whitespace gap (same `anchors[i]`: the end of the last
non-whitespace character read) are one GAP. Tokenizers read a gap differently: WordPiece never
reads whitespace, byte-level BPE reads `ĊĠĠĠ` then `Ġreturn` (one space kept for the word),
SentencePiece `<0x0A>`, `▁`, `▁`, `▁`, `▁return`. Within a gap:
- the LAST eligible state of each side (the one whose next token carries the next
  non-whitespace character, e.g. `Ġreturn`) are aligned with each other, whatever whitespace
  each has read: both are about to predict the next word. (This is the "whitespace neither side
  has read as a token is interchangeable" rule, extended to the word-attached space.)
- the other target states of the gap (whose next token is whitespace) are aligned only with a
  source state that is also not the last of its gap and has read exactly as much text
  (equal `ends`); else -1.
So an aligned pair always has the same text modulo whitespace (equal anchors), a state about to
emit whitespace is never paired with a state about to emit a word, and no source position is
used twice. Without anchors (EncodedText built by hand), every boundary is its own gap: exact
offset equality.

Cost: O(n log n) numpy (searchsorted), no Python loop over tokens; 0.2-0.6 ms per 1k target tokens
(measured in tests/test_alignment.py, printed with -s).

DTW fallback (`dtw_align`, `align_positions_dtw`) for tokenizers without offsets: see there.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion_core.tokenization import EncodedText, unk_token_id


def _eligible_states(enc: EncodedText) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Eligible positions, their ends, anchors and whether each is the last of its gap."""
    n = len(enc)
    ends = np.asarray(enc.ends, dtype=np.int64)
    anchors = ends if enc.anchors is None else np.asarray(enc.anchors, dtype=np.int64)
    spans = np.asarray(enc.spans, dtype=np.int64).reshape(-1, 2)
    ok = np.ones(n, dtype=bool)
    if n > 1:
        ok[:-1] = (spans[1:, 0] >= ends[:-1]) & (ends[1:] != ends[:-1])
    pos = np.flatnonzero(ok)
    e, a = ends[pos], anchors[pos]
    last = np.ones(pos.size, dtype=bool)
    last[:-1] = a[1:] != a[:-1]
    return pos, e, a, last


def _lookup(keys: np.ndarray, table_keys: np.ndarray, table_values: np.ndarray) -> np.ndarray:
    """table_values at the index where table_keys (strictly increasing) == key; -1 where absent."""
    out = np.full(keys.shape, -1, dtype=np.int64)
    if table_keys.size == 0 or keys.size == 0:
        return out
    idx = np.searchsorted(table_keys, keys)
    idx_c = np.minimum(idx, table_keys.size - 1)
    hit = (idx < table_keys.size) & (table_keys[idx_c] == keys)
    out[hit] = table_values[idx_c[hit]]
    return out


def align_positions(src: EncodedText, tgt: EncodedText) -> np.ndarray:
    """int64 [len(tgt)]: for each target position the source position at the same boundary, or -1.

    Both encodings must be of the same text (module doc for the rules). Deterministic.
    """
    out = np.full(len(tgt), -1, dtype=np.int64)
    s_pos, s_e, s_a, s_last = _eligible_states(src)
    t_pos, t_e, t_a, t_last = _eligible_states(tgt)
    # Last state of a gap <-> last state of the same gap (anchors strictly increase over them).
    out[t_pos[t_last]] = _lookup(t_a[t_last], s_a[s_last], s_pos[s_last])
    # Other states: the same amount of text read, and not the last of the source's gap either.
    out[t_pos[~t_last]] = _lookup(t_e[~t_last], s_e[~s_last], s_pos[~s_last])
    return out


@dataclass(frozen=True)
class AlignmentStats:
    """Aligned target positions among those that predict a next token (all but the last).

    Add stats of several documents with `+`; `rate` is 1.0 for no positions at all.
    """

    aligned: int
    positions: int

    @property
    def rate(self) -> float:
        return self.aligned / self.positions if self.positions else 1.0

    def __add__(self, other: "AlignmentStats") -> "AlignmentStats":
        return AlignmentStats(self.aligned + other.aligned, self.positions + other.positions)


def alignment_stats(mapping: np.ndarray) -> AlignmentStats:
    mapping = np.asarray(mapping)
    predicting = mapping[:-1]
    return AlignmentStats(aligned=int((predicting >= 0).sum()), positions=int(predicting.size))


def alignment_rate(mapping: np.ndarray) -> float:
    """Share of target positions aligned, excluding the final position (it predicts nothing).

    1.0 when there is no predicting position (empty text). Over a corpus, add `alignment_stats`
    rather than averaging rates.
    """
    return alignment_stats(mapping).rate


# ----------------------------------------------------------------------------- DTW fallback

_DIAG, _UP, _LEFT = 0, 1, 2


def _dtw_path(src_tokens: list[str], tgt_tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost monotone path from (0, 0) to (n-1, m-1); cost = Levenshtein distance.

    Steps: diagonal (i-1, j-1), up (i-1, j: the source advances alone), left (i, j-1: the target
    advances alone). Filled by anti-diagonals (numpy per diagonal). Backtracking breaks ties by
    preferring diagonal, then up, then left. Returns the path's (i, j) arrays from the start.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    n, m = len(src_tokens), len(tgt_tokens)
    cost = process.cdist(src_tokens, tgt_tokens, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
    big = np.int32(2**30)  # above any path cost of a document
    acc = np.full((n, m), big, dtype=np.int32)
    acc[0, 0] = cost[0, 0]
    for k in range(1, n + m - 1):
        i = np.arange(max(0, k - m + 1), min(n - 1, k) + 1)
        j = k - i
        best = np.full(i.size, big, dtype=np.int32)
        has = (i > 0) & (j > 0)
        best[has] = acc[i[has] - 1, j[has] - 1]
        has = i > 0
        best[has] = np.minimum(best[has], acc[i[has] - 1, j[has]])
        has = j > 0
        best[has] = np.minimum(best[has], acc[i[has], j[has] - 1])
        acc[i, j] = cost[i, j] + best
    path_i, path_j = [n - 1], [m - 1]
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        options = []
        if i > 0 and j > 0:
            options.append((acc[i - 1, j - 1], _DIAG))
        if i > 0:
            options.append((acc[i - 1, j], _UP))
        if j > 0:
            options.append((acc[i, j - 1], _LEFT))
        _, step = min(options)  # smallest cost, then DIAG < UP < LEFT
        if step != _LEFT:
            i -= 1
        if step != _UP:
            j -= 1
        path_i.append(i)
        path_j.append(j)
    return np.asarray(path_i[::-1], dtype=np.int64), np.asarray(path_j[::-1], dtype=np.int64)


def dtw_align(src_tokens: list[str], tgt_tokens: list[str]) -> np.ndarray:
    """int64 [len(tgt_tokens)]: the source token matched 1:1 with each target token, else -1.

    Minimum-edit-distance DTW (FuseLLM's fallback) over token surfaces (pass
    `vocab.token_surfaces(tok)[id]` for the document's ids, without the start token); a target
    token is matched when the path holds exactly one cell in its column and that cell is the only
    one in its row. Memory O(len(src) * len(tgt)); deterministic (see `_dtw_path`).
    """
    out = np.full(len(tgt_tokens), -1, dtype=np.int64)
    if not src_tokens or not tgt_tokens:
        return out
    pi, pj = _dtw_path(list(src_tokens), list(tgt_tokens))
    row_cells = np.bincount(pi, minlength=len(src_tokens))
    col_cells = np.bincount(pj, minlength=len(tgt_tokens))
    one = (row_cells[pi] == 1) & (col_cells[pj] == 1)
    out[pj[one]] = pi[one]
    return out


def _nonspace_counts(tokens: list[str]) -> np.ndarray:
    """Cumulative count of non-whitespace characters, a UTF-8 continuation byte (U+DC80..DCBF,
    a surrogate-escaped byte) counting 0 and a special surface (U+D800...) counting 0."""
    counts = np.zeros(len(tokens), dtype=np.int64)
    for k, tok in enumerate(tokens):
        if tok.startswith("\ud800"):
            continue
        counts[k] = sum(1 for ch in tok if not ch.isspace() and not ("\udc80" <= ch <= "\udcbf"))
    return np.cumsum(counts)


def align_positions_dtw(src_tokens: list[str], tgt_tokens: list[str]) -> np.ndarray:
    """Like `align_positions` for tokenizers without offsets: int64 [len(tgt_tokens) + 1].

    Inputs are the document's token surfaces WITHOUT the start token; output positions include it
    (position 0 = start <-> 0). Target position j+1 (after target token j) is aligned with source
    position i+1 when the DTW path leaves cell (i, j) diagonally (both sequences cut there) or
    (i, j) is the path's last cell, AND both prefixes hold the same number of non-whitespace
    characters (guards against a diagonal step between differently cut pieces). As in
    `align_positions`, whitespace read by one side only is interchangeable: the path moving through
    a whitespace token of one side and then diagonally aligns the states before the next word.
    """
    out = np.full(len(tgt_tokens) + 1, -1, dtype=np.int64)
    out[0] = 0
    if not src_tokens or not tgt_tokens:
        return out
    pi, pj = _dtw_path(list(src_tokens), list(tgt_tokens))
    cut = np.ones(pi.size, dtype=bool)
    cut[:-1] = (pi[1:] == pi[:-1] + 1) & (pj[1:] == pj[:-1] + 1)
    same = _nonspace_counts(list(src_tokens))[pi] == _nonspace_counts(list(tgt_tokens))[pj]
    keep = cut & same
    out[pj[keep] + 1] = pi[keep] + 1
    return out


# ----------------------------------------------------------------------------- labelled alignment

# Every target position gets exactly one label. The first four are boundary alignments (the
# source's next-token prediction at the same boundary), told apart by how the two NEXT tokens
# compare; MARGINAL positions get the source's distribution restricted to the characters already
# read (character-level marginalisation, see `fusion_core.marginal`); FALLBACK positions get the
# one-hot of the true next token; END is the last position, which predicts nothing.
ONE_TO_ONE_EXACT = 0   # same boundary, next tokens end together and the map sends one to the other
ONE_TO_ONE_MAPPED = 1  # same boundary, next tokens end together, the map sends it elsewhere
MANY_TO_ONE = 2        # same boundary, the target's next token spans several source tokens
ONE_TO_MANY = 3        # same boundary, the source's next token spans several target tokens
MARGINAL = 4           # the boundary falls inside a source token (or at the start of one no rule paired)
FALLBACK = 5           # no teacher distribution: one-hot of the true next token
END = 6                # the last position
LABEL_NAMES = ("one_to_one_exact", "one_to_one_mapped", "many_to_one", "one_to_many", "marginal", "fallback", "end")
BOUNDARY_LABELS = (ONE_TO_ONE_EXACT, ONE_TO_ONE_MAPPED, MANY_TO_ONE, ONE_TO_MANY)


@dataclass(frozen=True, eq=False)
class PositionAlignment:
    """One document's target positions, each with a label and where its teacher signal comes from.

    src_pos:  int64 [n_t]. Boundary labels: the source position at the same boundary. MARGINAL:
              the source state just BEFORE the source token that contains the target boundary.
              Otherwise -1.
    label:    uint8 [n_t], one of the labels above (END exactly at the last position).
    consumed: int32 [n_t]. MARGINAL: how many characters of that source token's canonical surface
              (`vocab.token_surfaces`) the target has already read; 0 elsewhere.
    """

    src_pos: np.ndarray
    label: np.ndarray
    consumed: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def boundary(self) -> np.ndarray:
        """bool [n_t]: positions aligned at a shared boundary (the first four labels)."""
        return self.label <= ONE_TO_MANY

    @property
    def tgt_to_src(self) -> np.ndarray:
        """int64 [n_t]: the boundary-aligned source position, -1 elsewhere (MARGINAL included)."""
        return np.where(self.boundary, self.src_pos, -1)

    def counts(self) -> np.ndarray:
        """int64 [len(LABEL_NAMES)]: positions per label."""
        return np.bincount(self.label, minlength=len(LABEL_NAMES)).astype(np.int64)


@dataclass(frozen=True, eq=False)
class PairTables:
    """What labelling needs beyond the two encodings: canonical surfaces of both vocabularies
    (`vocab.token_surfaces`), the source surfaces' lengths, and the vocabulary map."""

    src_surfaces: list[str]
    tgt_surfaces: list[str]
    src_to_tgt: np.ndarray
    src_surface_len: np.ndarray
    src_unk: int | None = None  # the source's unk id: a position whose source next token is unk falls back

    @classmethod
    def build(cls, src_tokenizer, tgt_tokenizer, src_to_tgt: np.ndarray) -> "PairTables":
        from fusion_core.vocab import token_surfaces

        src = token_surfaces(src_tokenizer)
        tgt = src if src_tokenizer is tgt_tokenizer else token_surfaces(tgt_tokenizer)
        return cls.from_surfaces(src, tgt, src_to_tgt, unk_token_id(src_tokenizer))

    @classmethod
    def from_surfaces(cls, src_surfaces: list[str], tgt_surfaces: list[str], src_to_tgt,
                      src_unk: int | None = None) -> "PairTables":
        lengths = np.fromiter((len(s) for s in src_surfaces), dtype=np.int64, count=len(src_surfaces))
        return cls(list(src_surfaces), list(tgt_surfaces), np.asarray(src_to_tgt, dtype=np.int64), lengths, src_unk)


def _match_identical_segments(src: EncodedText, tgt: EncodedText, mapping: np.ndarray, tables: PairTables) -> None:
    """Align, in place, the inner positions of segments both sides spell with the same tokens.

    Between two aligned boundaries (or an aligned boundary and the end of both texts), when the
    target and the source read the same number of tokens and their canonical surfaces are equal
    one by one, the inner states are the same states: aligned 1:1. This covers what boundaries
    alone cannot see: the byte pieces of one character (an emoji split into byte tokens) and
    SentencePiece's prepended `▁`. A tokenizer aligned with itself is therefore the identity.
    """
    n_t, n_s = len(tgt), len(src)
    miss = np.flatnonzero(mapping < 0)
    if miss.size == 0 or n_t == 0:
        return
    starts = miss[np.r_[True, np.diff(miss) > 1]]
    stops = miss[np.r_[np.diff(miss) > 1, True]]  # inclusive
    ok = starts > 0
    starts, stops = starts[ok], stops[ok]
    if starts.size == 0:
        return
    ta = starts - 1
    sa = mapping[ta]
    at_end = stops == n_t - 1
    tb = np.where(at_end, n_t - 1, np.minimum(stops + 1, n_t - 1))
    sb = np.where(at_end, n_s - 1, mapping[tb])
    # Inner positions ta+1..stops; tokens read ta+1..tb (target) and sa+1..sb (source).
    keep = (sa >= 0) & (sb >= 0) & (tb - ta == sb - sa)
    t_ids, s_ids = tgt.ids, src.ids
    t_surf, s_surf = tables.tgt_surfaces, tables.src_surfaces
    for a, b, s0 in zip(ta[keep].tolist(), tb[keep].tolist(), sa[keep].tolist()):
        span = b - a
        if all(_surface(t_surf, t_ids[a + k]) == _surface(s_surf, s_ids[s0 + k]) for k in range(1, span + 1)):
            mapping[a + 1:b + 1] = np.arange(s0 + 1, s0 + span + 1)


def _surface(surfaces: list[str], token_id) -> str | None:
    i = int(token_id)
    return surfaces[i] if 0 <= i < len(surfaces) else None


def label_positions(src: EncodedText, tgt: EncodedText, mapping: np.ndarray, tables: PairTables | None,
                    *, marginalize: bool = True, text: str | None = None) -> PositionAlignment:
    """Label every target position given its boundary alignment (`align_positions` / `_dtw`).

    Without `tables` (no surfaces, no map), 1:1 positions are all ONE_TO_ONE_MAPPED and no
    position is MARGINAL. Vectorised; deterministic.
    """
    n_t, n_s = len(tgt), len(src)
    mapping = np.asarray(mapping, dtype=np.int64).copy()
    label = np.full(n_t, FALLBACK, dtype=np.uint8)
    consumed = np.zeros(n_t, dtype=np.int32)
    if n_t == 0:
        return PositionAlignment(mapping, label, consumed)
    predicting = np.arange(n_t) < n_t - 1
    t = np.flatnonzero(predicting & (mapping >= 0))
    if t.size:
        s = mapping[t]
        t_next = tgt.ends[t + 1]
        has_next = s + 1 < n_s
        s_next = np.where(has_next, src.ends[np.minimum(s + 1, n_s - 1)], np.iinfo(np.int64).max)
        same = t_next == s_next
        exact = np.zeros(t.size, dtype=bool)
        if tables is not None:
            nxt = src.ids[np.minimum(s + 1, n_s - 1)]
            inside = has_next & (nxt >= 0) & (nxt < tables.src_to_tgt.size)
            exact[inside] = tables.src_to_tgt[nxt[inside]] == tgt.ids[t[inside] + 1]
        label[t] = np.where(same, np.where(exact, ONE_TO_ONE_EXACT, ONE_TO_ONE_MAPPED),
                            np.where(t_next > s_next, MANY_TO_ONE, ONE_TO_MANY))
    if marginalize and tables is not None and n_s > 1:
        u = np.flatnonzero(predicting & (mapping < 0))
        e = tgt.ends[u]
        j = np.searchsorted(src.ends, e, side="right")  # first source token that ends after e
        ok = (j >= 1) & (j < n_s)
        jc = np.clip(j, 1, n_s - 1)
        start, stop = src.spans[jc, 0], src.spans[jc, 1]
        tok = src.ids[jc]
        in_vocab = (tok >= 0) & (tok < tables.src_surface_len.size)
        # The surface may carry one character the text does not show there (WordPiece's and
        # SentencePiece's word-start space); any other length difference: not marginalised.
        extra = np.where(in_vocab, tables.src_surface_len[np.where(in_vocab, tok, 0)], 0) - (stop - start)
        # e inside token j's own text, or at its start where the boundary rules paired nothing
        # (whitespace read differently by the two sides: c is then empty, or the surface's space),
        # or one space before it when that space is the surface's word-start space (WordPiece
        # reads no whitespace, so its " word" predicts the space too; needs the text).
        inside = (start <= e) & (stop > e)
        if text is not None and len(text):
            spaced = (extra == 1) & (start == e + 1) & (e < len(text))
            if spaced.any():
                codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
                spaced &= codes[np.minimum(e, len(codes) - 1)] == 32
            extra = np.where(spaced, 0, extra)
            inside |= spaced
        ok &= inside & in_vocab
        ok &= start >= src.ends[jc - 1]           # token j starts on a clean boundary
        after = np.minimum(jc + 1, n_s - 1)       # token j is not one byte piece of a split character
        ok &= (jc + 1 >= n_s) | (src.spans[after, 0] >= stop)
        ok &= tgt.spans[np.minimum(u + 1, n_t - 1), 0] >= e  # the target's next token starts at e
        ok &= (extra == 0) | (extra == 1)
        u, jc, extra, e, start = u[ok], jc[ok], extra[ok], e[ok], start[ok]
        label[u] = MARGINAL
        mapping[u] = jc - 1
        consumed[u] = np.maximum(extra + (e - start), 0)
    if tables is not None and tables.src_unk is not None and n_s > 1 and tables.src_unk < tables.src_to_tgt.size:
        # The source cannot say what its unk stands for: no teacher distribution from it there,
        # unless the target reads the same unknown text as its own unk.
        nxt = src.ids[np.clip(mapping + 1, 0, n_s - 1)]
        t_next = tgt.ids[np.minimum(np.arange(n_t) + 1, n_t - 1)]
        unknown = (nxt == tables.src_unk) & (t_next != tables.src_to_tgt[tables.src_unk])
        label[(label < FALLBACK) & (mapping >= 0) & unknown] = FALLBACK
    label[n_t - 1] = END
    mapping[label >= FALLBACK] = -1
    consumed[label != MARGINAL] = 0
    return PositionAlignment(mapping, label, consumed)


def align_document(src: EncodedText, tgt: EncodedText, tables: PairTables | None = None, *,
                   marginalize: bool = True, text: str | None = None) -> PositionAlignment:
    """Boundary alignment (`align_positions`), identical segments, then labels (module doc).

    text: the document (optional): lets a word-start surface space stand for a text space.
    """
    mapping = align_positions(src, tgt)
    if tables is not None:
        _match_identical_segments(src, tgt, mapping, tables)
    return label_positions(src, tgt, mapping, tables, marginalize=marginalize, text=text)


def align_document_dtw(src: EncodedText, tgt: EncodedText, tables: PairTables) -> PositionAlignment:
    """The DTW fallback (`align_positions_dtw` over canonical surfaces), labelled the same way.

    Lengths are measured on the surfaces (no offsets are trusted), so no position is MARGINAL.
    """
    s_tokens = [_surface(tables.src_surfaces, i) or "" for i in src.ids[1:].tolist()]
    t_tokens = [_surface(tables.tgt_surfaces, i) or "" for i in tgt.ids[1:].tolist()]
    mapping = align_positions_dtw(s_tokens, t_tokens)

    def pseudo(enc: EncodedText, tokens: list[str]) -> EncodedText:
        ends = np.concatenate([[0], np.cumsum([len(x) for x in tokens], dtype=np.int64)]).astype(np.int64)
        spans = np.stack([np.r_[0, ends[:-1]], ends], axis=1)
        return EncodedText(ids=enc.ids, ends=ends, spans=spans, anchors=None)

    return label_positions(pseudo(src, s_tokens), pseudo(tgt, t_tokens), mapping, tables, marginalize=False)


def coverage_metrics(labels_by_domain: dict[str, np.ndarray]) -> dict[str, float]:
    """Metrics from positions-per-label counts per domain (END excluded: it predicts nothing).

    coverage: share of positions with a teacher distribution (boundary labels + MARGINAL);
    boundary_rate: boundary labels only (what alignment without marginalisation gives);
    <label>_rate for each label; positions. Each also per domain as `<name>.<domain>`.
    """
    out: dict[str, float] = {}
    total = np.zeros(len(LABEL_NAMES), dtype=np.int64)
    for domain in sorted(labels_by_domain):
        counts = np.asarray(labels_by_domain[domain], dtype=np.int64)
        total += counts
        out.update({f"{k}.{domain}": v for k, v in _rates(counts).items()})
    out.update(_rates(total))
    return out


def _rates(counts: np.ndarray) -> dict[str, float]:
    n = int(counts[:END].sum())
    out = {"positions": float(n)}
    if n == 0:
        return out
    out["coverage"] = float(counts[:FALLBACK].sum()) / n
    out["boundary_rate"] = float(counts[:MARGINAL].sum()) / n
    for k in range(END):
        out[f"{LABEL_NAMES[k]}_rate"] = float(counts[k]) / n
    return out
