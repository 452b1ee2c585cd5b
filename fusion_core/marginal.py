"""Character-level marginalisation: a teacher distribution where the target cuts inside a source token.

Two tokenizers cut the same text at different places (code indentation, numbers, rare words).
A target position t that has read the text up to offset e, where e falls strictly inside source
token j, has no source state at the same boundary. But the source state s just before token j
(`alignment.PositionAlignment`: label MARGINAL, src_pos = s, consumed = how many characters of
token j's canonical surface lie before e) knows what comes next: its next-token distribution,
restricted to the tokens whose surface starts with the characters already read,
c = surface(token j)[:consumed], and is longer than c, is the source's distribution over how the
text continues after e (the single-token cover of the exact byte-level marginal).

Each such candidate v continues with r = surface(v)[len(c):], which becomes a target token:
- r agrees with the document's actual text from e on (text[e:e+len(r)] == r, after the source's
  normaliser): the candidate IS the actual continuation as far as it goes, so the target's next
  token is the true one (ids[t+1]) — whatever the source's cut after r;
- otherwise the target token whose surface is r, else (target normaliser) the longest target
  surface r starts with (`vocab.SurfaceLookup`); a candidate none fits is dropped.
Duplicates are merged by log-sum-exp (`teacher.merge_duplicates`), like boundary positions.

The restriction is computed on the source's FULL vocabulary while scoring: sorted by surface, the
tokens that start with c are one contiguous range (`PrefixIndex.range`), so the restricted
log-softmax is a gather over that range and a log-sum-exp (`teacher.score_documents`).

Left out, and why the result is the single-token cover renormalised rather than the exact
marginal: tokenizations of the prefix whose last token ends exactly at e or inside c (a shorter
token followed by others) need further forward passes of the source.

A known bias, towards the truth: a candidate whose remainder r is a strict prefix of the true
next target token (the source would cut earlier and go on) counts wholly for that token, where
the exact marginal would share its mass with every target token that starts with r. The teacher
probability of the true token at MARGINAL positions is therefore an upper bound (measured in
`benchmarks/alignment.py`: p(true) 0.66 prose / 0.79-0.84 code against 0.25-0.36 at exact
boundary positions); the rest of the distribution is the source's own.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fusion_core.vocab import SPECIAL_MARK, SurfaceLookup

_MAX_CHAR = 0x10FFFF


class PrefixIndex:
    """The source vocabulary sorted by canonical surface: tokens sharing a prefix form one range."""

    def __init__(self, surfaces: Sequence[str]) -> None:
        ids = [i for i, s in enumerate(surfaces) if s and not s.startswith(SPECIAL_MARK)]
        ids.sort(key=lambda i: (surfaces[i], i))
        self.order = np.asarray(ids, dtype=np.int64)          # position in sorted order -> token id
        self.sorted_surfaces = [surfaces[i] for i in ids]

    def range(self, prefix: str) -> tuple[int, int]:
        """[lo, hi) in `order` of the tokens whose surface starts with `prefix` and is longer."""
        if not prefix:
            return 0, len(self.sorted_surfaces)
        lo = bisect.bisect_right(self.sorted_surfaces, prefix)  # skips the surface equal to prefix
        last = ord(prefix[-1])
        if last >= _MAX_CHAR:
            hi = len(self.sorted_surfaces)
        else:
            hi = bisect.bisect_left(self.sorted_surfaces, prefix[:-1] + chr(last + 1), lo)
        return lo, max(lo, hi)


@dataclass(frozen=True, eq=False)
class Marginalizer:
    """What projecting marginal positions needs: source surfaces, their prefix index, the target lookup."""

    src_surfaces: list[str]
    index: PrefixIndex
    target: SurfaceLookup
    src_normaliser: Callable[[str], str] | None = None

    @classmethod
    def build(cls, src_tokenizer, tgt_tokenizer) -> "Marginalizer":
        from fusion_core.vocab import surface_lookup, text_normaliser, token_surfaces

        surfaces = token_surfaces(src_tokenizer)
        return cls(surfaces, PrefixIndex(surfaces), surface_lookup(tgt_tokenizer), text_normaliser(src_tokenizer))

    def prefix(self, token_id: int, consumed: int) -> str:
        """c: the characters of source token `token_id` the target has already read."""
        return self.src_surfaces[token_id][:consumed]

    def queries(self, src_ids: np.ndarray, src_pos: np.ndarray, consumed: np.ndarray) -> np.ndarray:
        """int64 [q, 3] (source position, lo, hi) for MARGINAL positions given by src_pos/consumed."""
        out = np.zeros((len(src_pos), 3), dtype=np.int64)
        for r, (s, n) in enumerate(zip(np.asarray(src_pos).tolist(), np.asarray(consumed).tolist())):
            lo, hi = self.index.range(self.prefix(int(src_ids[s + 1]), n))
            out[r] = (s, lo, hi)
        return out

    def project(self, cand_ids: np.ndarray, cand_logprobs: np.ndarray, prefixes: Sequence[str],
                text: str, starts: np.ndarray, true_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Target ids [q, k] and log-probs [q, k] (-inf where dropped) for q marginal positions.

        cand_ids / cand_logprobs: the restricted source top-k at each position; prefixes: c per
        position; starts: the text offset e where each target position stands; true_next: the
        target's actual next token there.
        """
        q, k = cand_ids.shape
        ids = np.zeros((q, k), dtype=np.int64)
        lp = np.full((q, k), -np.inf, dtype=np.float32)
        memo: dict[str, int] = {}
        norm = self.src_normaliser
        for r in range(q):
            c_len = len(prefixes[r])
            e = int(starts[r])
            for col in range(k):
                if not np.isfinite(cand_logprobs[r, col]):
                    continue
                rest = self.src_surfaces[int(cand_ids[r, col])][c_len:]
                actual = text[e:e + len(rest)]
                if norm is not None:
                    actual = norm(actual)
                if rest and actual == rest:
                    j = int(true_next[r])
                else:
                    j = memo.get(rest)
                    if j is None:
                        j = self.target.exact(rest)
                        if j < 0:
                            j = self.target.longest_prefix(rest)
                        memo[rest] = j
                if j >= 0:
                    ids[r, col], lp[r, col] = j, cand_logprobs[r, col]
        return ids, lp
