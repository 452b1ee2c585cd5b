"""Vocabulary maps: every source token id -> the target token id that stands for the same text.

Canonical token surfaces
------------------------
`token_surfaces(tokenizer)` gives, for every id, the text the token stands for, in one form shared
by all tokenizer families, so that a token finds its exact twin in another family:

- byte_level (GPT-2, Llama-3, Qwen, SmolLM2): the token's characters are mapped back through
  GPT-2's byte-to-unicode table and the bytes decoded as UTF-8 with `surrogateescape`:
  `Ġhello` -> " hello", `Ċ` -> "\\n", `Ã©` -> "é"; a byte that is not a whole UTF-8 character
  becomes the lone surrogate U+DC80+byte (`Ã` = 0xC3 -> "\\udcc3").
- metaspace (SentencePiece: Llama-2, Mistral, T5): the replacement character (`▁`) -> " ";
  byte-fallback tokens `<0xNN>` -> the byte decoded the same way (`<0x0A>` -> "\\n",
  `<0xC3>` -> "\\udcc3"), so byte tokens of both families are twins.
- wordpiece (BERT): `##lo` -> "lo"; a word-initial token -> " " + token ("hello" -> " hello"),
  except single punctuation / CJK characters, which BERT splits off on their own and which in
  text rarely follow a space ("." -> "."), as BERT's decoder also does.
- other: `tokenizer.convert_tokens_to_string([token])`.
- special tokens (all_special_ids and added tokens flagged special) and ids with no token:
  SPECIAL_MARK (the lone surrogate U+D800, which no decoded text and no byte surface contains)
  + the token's content: "\\ud800<|endoftext|>". They never match text tokens.
- added tokens that are not special: their content, as text.

Byte-fallback tokens `<0xNN>` are byte tokens even where they were registered as special
tokens. Within one tokenizer several ids may share a surface (SentencePiece "A" and `<0x41>`):
an exact match goes to the target token of the same kind (regular / byte fallback / added) when
there is one, else to the REPRESENTATIVE of the surface: a regular vocabulary token before a
byte-fallback token before an added token, then the lowest id (the tokenizer itself emits the
regular token). So a tokenizer maps onto itself as the identity, up to ids that share a surface
(BERT's never-emitted "##!" goes to "!").

Map rule (`build_vocabulary_map`), in order, for each source id:
1. special / missing ids: a target special token with the same content; else by role
   (eos, bos, sep, cls, mask, unk, pad: the first role the source token plays, looked up in the
   target with fallbacks, e.g. bos -> bos | cls | eos); else target unk | eos | pad | bos | the
   lowest special id. kind SPECIAL (exact=True) or SPECIAL_FALLBACK (exact=False).
2. exact: the target token with the same canonical surface (same kind first, else the
   representative, see above). kind EXACT.
3. normalised exact: the same after the TARGET's own normaliser (lower-casing, accent stripping,
   Unicode NF*; e.g. " Hello" -> BERT-uncased " hello"). kind NORMALIZED, counted as exact.
4. a raw byte fragment (surface with a lone surrogate) with no twin, where the target has no
   byte tokens at all (WordPiece) -> the target's unk token (the target itself encodes such
   characters as unk). kind UNK_FALLBACK.
5. fuzzy: the target representative at the smallest Levenshtein distance (rapidfuzz cdist,
   workers=-1) from the (target-normalised) surface; ties broken by the longest common prefix,
   (up to 32 code points), then by the lowest target id. kind FUZZY. Special target tokens are
   never fuzzy candidates.
A source model whose output layer is larger than its tokenizer (padded rows) passes
`src_vocab_size`: the extra ids map like unknown specials.

`VocabularyMap.stats()`: exact_rate (EXACT + NORMALIZED + SPECIAL), surface_exact_rate,
normalized_rate, fuzzy_rate, unk_fallback_rate, special_count, special_fallback_count,
fuzzy_mean_distance, target_coverage (share of target ids hit), src/tgt_vocab_size.

Deterministic: no randomness, no dependence on dict or thread order.

Speed (the 2-core dev box, shared with other jobs; printed by tests/test_vocab.py with -s):
SmolLM2 (49152 byte-level) -> an 8000-token SentencePiece-style BPE trained on Python stdlib text:
3-8 s (45k source surfaces without a twin; the length-banded search computes 156M of the 357M
distances, ~20 ns each, the rest is surfaces and fingerprints, ~1.5 s); SmolLM2 <-> BERT (30522):
6-10 s; tiny tokenizers: milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import unicodedata
import uuid
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

VOCAB_MAP_VERSION = 1  # bump when the surface or map rules change; stored in saved maps

SPECIAL_MARK = "\ud800"  # prefix of special-token surfaces: never part of decoded text

# Values of VocabularyMap.kind
EXACT, NORMALIZED, FUZZY, SPECIAL, SPECIAL_FALLBACK, UNK_FALLBACK = 0, 1, 2, 3, 4, 5
KIND_NAMES = {EXACT: "exact", NORMALIZED: "normalized", FUZZY: "fuzzy", SPECIAL: "special",
              SPECIAL_FALLBACK: "special_fallback", UNK_FALLBACK: "unk_fallback"}

_ROLES = ("eos", "bos", "sep", "cls", "mask", "unk", "pad")  # priority when a token has several
_ROLE_FALLBACKS = {
    "bos": ("bos", "cls", "eos"),
    "eos": ("eos", "sep", "pad"),
    "sep": ("sep", "eos"),
    "cls": ("cls", "bos"),
    "mask": ("mask", "unk"),
    "unk": ("unk",),
    "pad": ("pad", "eos"),
}
_LAST_RESORT = ("unk", "eos", "pad", "bos", "sep", "cls")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_CHUNK_CELLS = 8_000_000  # distance-matrix cells per rapidfuzz call (int32: 32 MB)
_PREFIX_WIDTH = 32        # code points compared for the common-prefix tie-break


# ----------------------------------------------------------------------------- families

def _backend_spec(tokenizer) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return json.loads(backend.to_str())


def _component_types(node) -> list[dict]:
    """Every typed component inside a normalizer / pre_tokenizer / decoder / post_processor spec."""
    out = []
    if isinstance(node, dict):
        if "type" in node:
            out.append(node)
        for key, value in node.items():
            if key in ("vocab", "merges"):
                continue
            out.extend(_component_types(value))
    elif isinstance(node, list):
        for value in node:
            out.extend(_component_types(value))
    return out


def _family_from_spec(spec: dict, vocab_tokens: list[str | None]) -> str:
    model = spec.get("model") or {}
    comps = {name: _component_types(spec.get(name)) for name in ("normalizer", "pre_tokenizer", "decoder")}
    types = {name: {c["type"] for c in cs} for name, cs in comps.items()}
    if model.get("type") == "WordPiece" or "WordPiece" in types["decoder"]:
        return "wordpiece"
    if "ByteLevel" in types["pre_tokenizer"] or "ByteLevel" in types["decoder"]:
        return "byte_level"
    if "Metaspace" in types["pre_tokenizer"] or "Metaspace" in types["decoder"] or model.get("byte_fallback"):
        return "metaspace"
    for c in comps["normalizer"] + comps["decoder"]:
        if c["type"] in ("Replace", "Prepend") and "▁" in json.dumps(c, ensure_ascii=False):
            return "metaspace"
    return _family_from_vocab(vocab_tokens)


def _family_from_vocab(tokens: list[str | None]) -> str:
    toks = [t for t in tokens if t]
    if not toks:
        return "other"
    n = len(toks)
    share = {
        "byte_level": sum(t[0] == "Ġ" for t in toks) / n,
        "metaspace": sum(t[0] == "▁" for t in toks) / n,
        "wordpiece": sum(t.startswith("##") for t in toks) / n,
    }
    best = max(share, key=lambda k: (share[k], k))
    return best if share[best] >= 0.05 else "other"


def detect_family(tokenizer) -> str:
    """"byte_level", "metaspace", "wordpiece" or "other", from the tokenizer object itself.

    Read from the backend's model / pre-tokenizer / decoder / normalizer types (WordPiece model;
    ByteLevel pre-tokenizer or decoder; Metaspace pre-tokenizer or decoder, BPE byte_fallback, or
    a `▁` Replace/Prepend), else from the vocabulary (share of `Ġ`, `▁`, `##` tokens >= 5 %).
    """
    return _analyse(tokenizer).family


# ----------------------------------------------------------------------------- surfaces

@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decode_bytes(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _is_split_off_char(token: str) -> bool:
    """A single character BERT's pre-tokenizer always splits off: punctuation or CJK."""
    if len(token) != 1:
        return False
    cp = ord(token)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    if unicodedata.category(token).startswith("P"):
        return True
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


@dataclass
class _Analysis:
    family: str
    tokens: list[str | None]
    surfaces: list[str]
    special: np.ndarray       # bool [V]: special or missing id
    rank: np.ndarray          # int8 [V]: 0 regular, 1 byte fallback, 2 added non-special
    roles: dict[str, int]     # role -> id
    normaliser: Callable[[str], str] | None
    specials_by_content: dict[str, int] = field(default_factory=dict)


def _special_ids(tokenizer) -> set[int]:
    ids = set()
    for i in getattr(tokenizer, "all_special_ids", None) or []:
        if i is not None:
            ids.add(int(i))
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for i, tok in decoder.items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def _roles(tokenizer) -> dict[str, int]:
    out = {}
    for role in _ROLES:
        try:
            value = getattr(tokenizer, f"{role}_token_id", None)
        except Exception:  # some tokenizers raise for roles they lack
            value = None
        if isinstance(value, int) and value >= 0:
            out[role] = int(value)
    return out


_ANALYSES: "weakref.WeakKeyDictionary[object, tuple[int, _Analysis]]" = weakref.WeakKeyDictionary()
_ANALYSES_LOCK = threading.Lock()


def _analyse(tokenizer) -> _Analysis:
    """The tokenizer's family, surfaces, specials and normaliser; computed once per tokenizer object
    (and again if its length changes, as when tokens are added)."""
    try:
        with _ANALYSES_LOCK:
            cached = _ANALYSES.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    result = _compute_analysis(tokenizer)
    try:
        with _ANALYSES_LOCK:
            _ANALYSES[tokenizer] = (len(tokenizer), result)
    except TypeError:
        pass
    return result


def _compute_analysis(tokenizer) -> _Analysis:
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    tokens = [t if isinstance(t, str) else None for t in tokens]
    spec = _backend_spec(tokenizer)
    family = _family_from_spec(spec, tokens) if spec is not None else _family_from_vocab(tokens)
    special_ids = _special_ids(tokenizer)
    added = {int(i): getattr(t, "content", str(t)) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    model = (spec or {}).get("model") or {}
    replacement = "▁"
    for c in _component_types((spec or {}).get("pre_tokenizer")) + _component_types((spec or {}).get("decoder")):
        if c.get("type") == "Metaspace" and c.get("replacement"):
            replacement = c["replacement"]
    wp_prefix = model.get("continuing_subword_prefix") or "##"
    byte_decoder = _byte_decoder()
    byte_fallback = family == "metaspace" or bool(model.get("byte_fallback"))

    surfaces: list[str] = []
    special = np.zeros(n, dtype=bool)
    rank = np.zeros(n, dtype=np.int8)
    for i, tok in enumerate(tokens):
        if tok is None:
            special[i] = True
            surfaces.append(f"{SPECIAL_MARK}<missing {i}>")
            continue
        m = _BYTE_TOKEN.match(tok) if byte_fallback else None
        if m:  # `<0xNN>` byte-fallback token, even where it was registered as a special token
            rank[i] = 1
            surfaces.append(_decode_bytes(bytes([int(m.group(1), 16)])))
            continue
        if i in special_ids:
            special[i] = True
            surfaces.append(SPECIAL_MARK + tok)
            continue
        if i in added:
            rank[i] = 2
            surfaces.append(added[i])
            continue
        if family == "byte_level":
            if all(ch in byte_decoder for ch in tok):
                surfaces.append(_decode_bytes(bytes(byte_decoder[ch] for ch in tok)))
            else:
                surfaces.append(tok)
        elif family == "metaspace":
            surfaces.append(tok.replace(replacement, " "))
        elif family == "wordpiece":
            if tok.startswith(wp_prefix) and len(tok) > len(wp_prefix):
                surfaces.append(tok[len(wp_prefix):])
            elif _is_split_off_char(tok):
                surfaces.append(tok)
            else:
                surfaces.append(" " + tok)
        else:
            try:
                surfaces.append(tokenizer.convert_tokens_to_string([tok]))
            except Exception:
                surfaces.append(tok)
    specials_by_content: dict[str, int] = {}
    for i in np.flatnonzero(special):
        if tokens[i] is not None:
            specials_by_content.setdefault(tokens[i], int(i))
    return _Analysis(family=family, tokens=tokens, surfaces=surfaces, special=special, rank=rank,
                     roles=_roles(tokenizer), normaliser=_text_normaliser(spec),
                     specials_by_content=specials_by_content)


def token_surfaces(tokenizer) -> list[str]:
    """For every id 0..len(tokenizer)-1, the canonical text the token stands for (module doc)."""
    return list(_analyse(tokenizer).surfaces)


def _text_normaliser(spec: dict | None) -> Callable[[str], str] | None:
    """A Python version of the text-changing parts of the backend's normalizer, or None.

    Lower-casing, accent stripping and Unicode normal forms are kept; whitespace/marker rewriting
    (Prepend, Replace, Strip, BERT clean_text) is not: surfaces already use " " for the marker.
    """
    if spec is None or not spec.get("normalizer"):
        return None
    steps: list[Callable[[str], str]] = []

    def strip_accents(s: str) -> str:
        return "".join(ch for ch in unicodedata.normalize("NFD", s) if unicodedata.category(ch) != "Mn")

    for c in _component_types(spec["normalizer"]):
        t = c["type"]
        if t == "BertNormalizer":
            lower = bool(c.get("lowercase", True))
            accents = c.get("strip_accents")
            if lower:
                steps.append(str.lower)
            if accents or (accents is None and lower):
                steps.append(strip_accents)
        elif t == "Lowercase":
            steps.append(str.lower)
        elif t == "StripAccents":
            steps.append(strip_accents)
        elif t in ("NFC", "NFD", "NFKC", "NFKD"):
            steps.append(lambda s, form=t: unicodedata.normalize(form, s))
    if not steps:
        return None

    def apply(s: str) -> str:
        for step in steps:
            s = step(s)
        return s

    return apply


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(s: str) -> bool:
    return _SURROGATE.search(s) is not None


# ----------------------------------------------------------------------------- the map

@dataclass(eq=False)
class VocabularyMap:
    """src_to_tgt: int64 [V_src], a target id for every source id; exact: bool [V_src].

    kind: int8 [V_src] how each id was mapped (EXACT, NORMALIZED, FUZZY, SPECIAL,
    SPECIAL_FALLBACK, UNK_FALLBACK); distance: int32 [V_src] edit distance of fuzzy matches
    (0 otherwise). exact is True for EXACT, NORMALIZED and SPECIAL.
    """

    src_to_tgt: np.ndarray
    exact: np.ndarray
    kind: np.ndarray | None = None
    distance: np.ndarray | None = None
    tgt_vocab_size: int = 0
    src_fingerprint: str = ""
    tgt_fingerprint: str = ""
    version: int = VOCAB_MAP_VERSION

    def __post_init__(self) -> None:
        self.src_to_tgt = np.asarray(self.src_to_tgt, dtype=np.int64)
        self.exact = np.asarray(self.exact, dtype=bool)
        n = self.src_to_tgt.shape[0]
        if self.kind is None:
            self.kind = np.where(self.exact, EXACT, FUZZY).astype(np.int8)
        if self.distance is None:
            self.distance = np.zeros(n, dtype=np.int32)
        self.kind = np.asarray(self.kind, dtype=np.int8)
        self.distance = np.asarray(self.distance, dtype=np.int32)
        if not (self.exact.shape == self.kind.shape == self.distance.shape == (n,)):
            raise ValueError("VocabularyMap arrays must all have shape [V_src]")
        if n and self.src_to_tgt.min() < 0:
            raise ValueError("VocabularyMap.src_to_tgt has unmapped (negative) ids")

    def __len__(self) -> int:
        return int(self.src_to_tgt.shape[0])

    def special_mask(self) -> np.ndarray:
        """bool [V_src]: source ids that are special tokens (or padded/missing ids)."""
        return np.isin(self.kind, (SPECIAL, SPECIAL_FALLBACK))

    def stats(self) -> dict[str, float]:
        n = max(len(self), 1)
        out = {"src_vocab_size": float(len(self)), "tgt_vocab_size": float(self.tgt_vocab_size),
               "exact_rate": float(self.exact.sum()) / n}
        for k, name in KIND_NAMES.items():
            count = int((self.kind == k).sum())
            if k in (SPECIAL, SPECIAL_FALLBACK):
                out[f"{name}_count"] = float(count)
            else:
                out[f"{'surface_exact' if k == EXACT else name}_rate"] = count / n
        fuzzy = self.kind == FUZZY
        out["fuzzy_mean_distance"] = float(self.distance[fuzzy].mean()) if fuzzy.any() else 0.0
        out["target_coverage"] = (float(np.unique(self.src_to_tgt).size) / self.tgt_vocab_size
                                  if self.tgt_vocab_size else 0.0)
        return out

    def save(self, path) -> None:
        """Write an .npz at exactly `path`, atomically (temporary file + os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"version": self.version, "tgt_vocab_size": self.tgt_vocab_size,
                "src_fingerprint": self.src_fingerprint, "tgt_fingerprint": self.tgt_fingerprint}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, src_to_tgt=self.src_to_tgt, exact=self.exact, kind=self.kind,
                         distance=self.distance, meta=np.asarray(json.dumps(meta)))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path) -> "VocabularyMap":
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
            return cls(src_to_tgt=data["src_to_tgt"], exact=data["exact"],
                       kind=data["kind"] if "kind" in data else None,
                       distance=data["distance"] if "distance" in data else None,
                       tgt_vocab_size=int(meta.get("tgt_vocab_size", 0)),
                       src_fingerprint=meta.get("src_fingerprint", ""),
                       tgt_fingerprint=meta.get("tgt_fingerprint", ""),
                       version=int(meta.get("version", 0)))


def _special_target(src: _Analysis, tgt: _Analysis, i: int) -> tuple[int, bool]:
    """Target id for source special (or missing) id i, and whether it was an explicit match."""
    tok = src.tokens[i]
    if tok is not None and tok in tgt.specials_by_content:
        return tgt.specials_by_content[tok], True
    for role in _ROLES:
        if src.roles.get(role) == i:
            for candidate in _ROLE_FALLBACKS[role]:
                if candidate in tgt.roles:
                    return tgt.roles[candidate], True
            break
    return _last_resort(tgt), False


def _last_resort(tgt: _Analysis) -> int:
    """Where a source special with no counterpart goes: target unk | eos | pad | bos | sep | cls."""
    for candidate in _LAST_RESORT:
        if candidate in tgt.roles:
            return tgt.roles[candidate]
    specials = np.flatnonzero(tgt.special)
    return int(specials[0]) if specials.size else 0


def build_vocabulary_map(src_tokenizer, tgt_tokenizer, *, src_vocab_size: int | None = None,
                         workers: int = -1) -> VocabularyMap:
    """Map every source id to a target id (module doc for the rules and tie-breaking).

    src_vocab_size: the source MODEL's output size when larger than len(src_tokenizer) (padded
    embedding rows, e.g. Qwen); the extra ids map like unknown specials (SPECIAL_FALLBACK).
    """
    src, tgt = _analyse(src_tokenizer), _analyse(tgt_tokenizer)
    for side, tok, a in (("source", src_tokenizer, src), ("target", tgt_tokenizer, tgt)):
        problem = _problem(len(tok), a)
        if problem is not None:
            raise ValueError(f"{side} tokenizer {getattr(tok, 'name_or_path', '') or ''!s}: {problem}".replace("  ", " "))
    n_src = max(len(src.surfaces), src_vocab_size or 0)
    n_tgt = len(tgt.surfaces)
    src_to_tgt = np.full(n_src, -1, dtype=np.int64)
    kind = np.full(n_src, FUZZY, dtype=np.int8)
    distance = np.zeros(n_src, dtype=np.int32)

    rep, rep_same_rank = _representatives(tgt)

    # Raw byte fragments go to unk only where the target has no byte tokens of its own (WordPiece).
    unk_for_bytes = "unk" in tgt.roles and not any(_has_surrogate(x) for x in rep)
    pending: dict[str, list[int]] = {}  # fuzzy query -> source ids
    for i in range(n_src):
        if i >= len(src.surfaces) or src.special[i]:
            j, explicit = _special_target(src, tgt, i) if i < len(src.surfaces) else (_last_resort(tgt), False)
            src_to_tgt[i], kind[i] = j, (SPECIAL if explicit else SPECIAL_FALLBACK)
            continue
        s = src.surfaces[i]
        j = rep_same_rank.get((s, int(src.rank[i])), rep.get(s))
        if j is not None:
            src_to_tgt[i], kind[i] = j, EXACT
            continue
        query = s
        if tgt.normaliser is not None and not _has_surrogate(s):
            query = tgt.normaliser(s)
            j = rep.get(query)
            if j is not None:
                src_to_tgt[i], kind[i] = j, NORMALIZED
                continue
        if _has_surrogate(s) and unk_for_bytes:
            src_to_tgt[i], kind[i] = tgt.roles["unk"], UNK_FALLBACK
            continue
        pending.setdefault(query, []).append(i)

    if pending:
        if not rep:
            raise ValueError("target tokenizer has no non-special tokens to map onto")
        cand_ids = np.asarray(sorted(rep.values()), dtype=np.int64)
        cand_surf = [tgt.surfaces[j] for j in cand_ids.tolist()]
        queries = sorted(pending)
        best, dist = _nearest(queries, cand_surf, workers=workers)
        for q, b, d in zip(queries, best.tolist(), dist.tolist()):
            for i in pending[q]:
                src_to_tgt[i], distance[i] = cand_ids[b], d

    exact = np.isin(kind, (EXACT, NORMALIZED, SPECIAL))
    return VocabularyMap(src_to_tgt=src_to_tgt, exact=exact, kind=kind, distance=distance, tgt_vocab_size=n_tgt,
                         src_fingerprint=tokenizer_fingerprint(src_tokenizer),
                         tgt_fingerprint=tokenizer_fingerprint(tgt_tokenizer))


def _codepoints(strings: list[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """[len(strings), width] uint32 code points (0-padded) and the true lengths."""
    out = np.zeros((len(strings), width), dtype=np.uint32)
    lengths = np.zeros(len(strings), dtype=np.int64)
    for r, s in enumerate(strings):
        cps = np.frombuffer(s[:width].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        out[r, :cps.size] = cps
        lengths[r] = len(s)
    return out, lengths


def _nearest(queries: list[str], choices: list[str], *, workers: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the index of the nearest choice and its Levenshtein distance.

    Ties: the longest common prefix (first _PREFIX_WIDTH code points), then the lowest index.
    Exact, but pruned by length: |len(q) - len(c)| is a lower bound of the distance, so choices
    are visited in bands of growing length difference r = 0, 1, 2, ... and a query is finished
    once its best distance is <= r (every later band is farther, ties included).
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    q_cp, q_len = _codepoints(queries, _PREFIX_WIDTH)
    c_cp, c_len = _codepoints(choices, _PREFIX_WIDTH)
    order = np.lexsort((np.arange(len(choices)), c_len))  # by length, then index
    sorted_len = c_len[order]
    sorted_choices = [choices[k] for k in order.tolist()]
    big = np.iinfo(np.int64).max // 4
    best = np.full(len(queries), big, dtype=np.int64)      # choice index
    dist = np.full(len(queries), big, dtype=np.int64)
    pref = np.full(len(queries), -1, dtype=np.int64)

    def visit(rows: np.ndarray, length: int) -> None:
        """Compare `rows` with every choice of exactly `length`; keep each row's best."""
        a = int(np.searchsorted(sorted_len, length, side="left"))
        b = int(np.searchsorted(sorted_len, length, side="right"))
        if a == b:
            return
        cols = order[a:b]
        step = max(1, _CHUNK_CELLS // (b - a))
        for k in range(0, len(rows), step):
            chunk = rows[k:k + step]
            d = process.cdist([queries[r] for r in chunk.tolist()], sorted_choices[a:b],
                              scorer=Levenshtein.distance, dtype=np.int32, workers=workers)
            m = d.min(axis=1).astype(np.int64)
            live = m <= dist[chunk]  # rows this band can improve or tie
            if not live.any():
                continue
            chunk, d, m = chunk[live], d[live], m[live]
            r, c = np.nonzero(d == m[:, None])
            g, c = chunk[r], cols[c]
            # Common prefix length, computed only for the pairs that share the first character.
            prefix = np.zeros(g.size, dtype=np.int64)
            same = (q_cp[g, 0] == c_cp[c, 0]) & (q_len[g] > 0)
            if same.any():
                gs, cs = g[same], c[same]
                differ = np.concatenate([q_cp[gs] != c_cp[cs], np.ones((gs.size, 1), dtype=bool)], axis=1)
                prefix[same] = np.minimum(differ.argmax(axis=1), np.minimum(q_len[gs], c_len[cs]))
            pick = np.lexsort((c, -prefix, r))
            first = np.ones(pick.size, dtype=bool)
            first[1:] = r[pick][1:] != r[pick][:-1]
            pick = pick[first]
            g, c, p, dm = g[pick], c[pick], prefix[pick], m[r[pick]]
            better = (dm < dist[g]) | ((dm == dist[g]) & ((p > pref[g]) | ((p == pref[g]) & (c < best[g]))))
            g, c, p, dm = g[better], c[better], p[better], dm[better]
            best[g], dist[g], pref[g] = c, dm, p

    max_len = int(max(c_len.max(initial=0), q_len.max(initial=0)))
    active = np.arange(len(queries))
    for r in range(max_len + 1):
        if active.size == 0:
            break
        for length in np.unique(q_len[active]).tolist():
            rows = active[q_len[active] == length]
            visit(rows, length - r)
            if r:
                visit(rows, length + r)
        active = active[dist[active] > r]
    return best, dist


# ----------------------------------------------------------------------------- fingerprint

def tokenizer_fingerprint(tokenizer) -> str:
    """A stable 32-hex-digit hash of the tokenizer's content: the backend's JSON (keys sorted),
    or the vocabulary for slow tokenizers, plus the special-token roles and the special ids."""
    h = hashlib.sha256()
    spec = _backend_spec(tokenizer)
    if spec is not None:
        h.update(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    else:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        h.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    roles = {}
    for role in _ROLES:
        try:
            roles[role] = getattr(tokenizer, f"{role}_token", None)
        except Exception:
            roles[role] = None
        roles[role] = None if roles[role] is None else str(roles[role])
    h.update(json.dumps({"roles": roles, "special_ids": sorted(_special_ids(tokenizer)), "len": len(tokenizer)},
                        sort_keys=True).encode())
    return h.hexdigest()[:32]



# ----------------------------------------------------------------------------- lookups by text

@dataclass(frozen=True, eq=False)
class SurfaceLookup:
    """Text -> the token id that stands for it, in one tokenizer (for character-level projection).

    `representatives`: canonical surface -> id, non-special tokens only, a regular token before
    a byte-fallback token before an added token, then the lowest id (as the vocabulary map
    chooses). `normaliser`: the tokenizer's own text normaliser (lower-casing, accents), or None.
    """

    representatives: dict[str, int]
    normaliser: Callable[[str], str] | None
    max_length: int

    def exact(self, text: str) -> int:
        """The id whose surface is `text` (after the normaliser when plain lookup fails), or -1."""
        j = self.representatives.get(text)
        if j is None and self.normaliser is not None and not _has_surrogate(text):
            j = self.representatives.get(self.normaliser(text))
        return -1 if j is None else j

    def longest_prefix(self, text: str) -> int:
        """The id of the longest surface that `text` starts with (normaliser applied), or -1."""
        if self.normaliser is not None and not _has_surrogate(text):
            text = self.normaliser(text)
        for n in range(min(len(text), self.max_length), 0, -1):
            j = self.representatives.get(text[:n])
            if j is not None:
                return j
        return -1


def surface_lookup(tokenizer) -> SurfaceLookup:
    a = _analyse(tokenizer)
    rep, _ = _representatives(a)
    return SurfaceLookup(rep, a.normaliser, max((len(s) for s in rep), default=0))


def text_normaliser(tokenizer) -> Callable[[str], str] | None:
    """The text-changing part of the tokenizer's normalizer (lower-casing, accents, NF*), or None."""
    return _analyse(tokenizer).normaliser


def vocabulary_problem(tokenizer) -> str | None:
    """Why a tokenizer cannot take part in alignment (no vocabulary, only special tokens), or None."""
    return _problem(len(tokenizer), None if len(tokenizer) == 0 else _analyse(tokenizer))


def _problem(n: int, a: _Analysis | None) -> str | None:
    if n == 0 or a is None:
        return "the tokenizer has no vocabulary (0 tokens)"
    if not (~a.special).any():
        return f"the tokenizer has no text tokens: all {n} of its tokens are special"
    return None


def _representatives(a: _Analysis) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """One id per surface among the non-special tokens (a regular token before a byte-fallback token
    before an added token, then the lowest id), and the same per (surface, kind)."""
    candidates = np.flatnonzero(~a.special)
    order = candidates[np.lexsort((candidates, a.rank[candidates]))]
    rep: dict[str, int] = {}
    rep_same_rank: dict[tuple[str, int], int] = {}
    for j in order.tolist():
        rep.setdefault(a.surfaces[j], j)
        rep_same_rank.setdefault((a.surfaces[j], int(a.rank[j])), j)
    return rep, rep_same_rank
