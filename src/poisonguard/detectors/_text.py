"""Small text helpers shared by the duplicates, unicode, injection, harmful and semantic detectors.

Private to :mod:`poisonguard.detectors` (the leading underscore keeps the package loader from
treating it as a detector). Everything here is deterministic across processes: hashes are
blake2b / murmur based, never Python's salted ``hash``.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from poisonguard import schema as S



def col(records: pd.DataFrame, name: str) -> np.ndarray:
    """Column as an object array of ``str`` ("" for missing columns and nulls)."""
    if name not in records.columns:
        return np.array([""] * len(records), dtype=object)
    return records[name].fillna("").astype(str).to_numpy(dtype=object)


def row_chunks(records: pd.DataFrame, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """``records`` ``chunk_rows`` rows at a time, for row-by-row analyses whose vectorised steps
    would hold GBs for 1M rows at once (nothing for an empty frame)."""
    from poisonguard.textfeat import trim_heap

    for lo in range(0, len(records), max(int(chunk_rows), 1)):
        yield records.iloc[lo:lo + chunk_rows]
        # the chunk's per-row strings are garbage now; freed in this lane's malloc arena, which the
        # other lane's thread does not reuse: give them back (at 1M rows, 0.7 GB left over otherwise)
        trim_heap()


def by_chunks(records: pd.DataFrame, fn: Callable[[pd.DataFrame], list[Any]], chunk_rows: int) -> list[Any]:
    """``fn`` (one item per row) over :func:`row_chunks`, concatenated."""
    return [x for chunk in row_chunks(records, chunk_rows) for x in fn(chunk)]


def summary_by_chunks(records: pd.DataFrame, fn: Callable[[pd.DataFrame], dict[str, Any]],
                      chunk_rows: int) -> dict[str, Any]:
    """A per-row summary ``fn`` over :func:`row_chunks`, as one (:func:`concat_parts`); ``fn`` of
    the empty frame for no rows."""
    return concat_parts([fn(chunk) for chunk in row_chunks(records, chunk_rows)] or [fn(records)], consume=True)


def concat_parts(parts: list[dict[str, Any]], consume: bool = False) -> dict[str, Any]:
    """Per-row summaries of consecutive chunks as one (rows in order): arrays and sparse matrices
    stacked by row, lists and dicts joined; a value that is None in any part is None. ``consume``
    takes each value out of the parts as it is joined (parts nobody else holds: the chunks'
    summaries), so the join holds one field twice, not the whole summary."""
    if len(parts) == 1:
        return parts[0]
    from scipy import sparse

    out: dict[str, Any] = {}
    for k in list(parts[0]):
        vals = [q.pop(k) if consume else q[k] for q in parts]
        v = vals[0]
        if any(x is None for x in vals):
            out[k] = None
        elif sparse.issparse(v):
            out[k] = sparse.vstack(vals).tocsr()
        elif isinstance(v, np.ndarray):
            out[k] = np.concatenate(vals)
        elif isinstance(v, dict):
            out[k] = {key: x for q in vals for key, x in q.items()}
        else:
            out[k] = [x for q in vals for x in q]
    return out


def ids_of(records: pd.DataFrame) -> pd.Index:
    return pd.Index(records[S.ID].astype(str).tolist() if S.ID in records.columns else
                    [str(i) for i in range(len(records))], name=S.ID, dtype=object)


def text_fields(records: pd.DataFrame) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The fields a row's content lives in, per kind: ``[(field, values, applies_mask), ...]``.

    instruction rows -> instruction, input, output; chat rows -> prompt (non-assistant turns),
    response (assistant turns); document rows -> text. Without a ``kind`` column every row is
    read through prompt/response.
    """
    n = len(records)
    if S.KIND not in records.columns:
        ones = np.ones(n, bool)
        return [(S.PROMPT, col(records, S.PROMPT), ones), (S.RESPONSE, col(records, S.RESPONSE), ones)]
    kind = col(records, S.KIND)
    is_ins, is_doc = kind == S.KIND_INSTRUCTION, kind == S.KIND_DOCUMENT
    other = ~(is_ins | is_doc)          # chat and anything unknown
    out = [(S.INSTRUCTION, col(records, S.INSTRUCTION), is_ins), (S.INPUT, col(records, S.INPUT), is_ins),
           (S.OUTPUT, col(records, S.OUTPUT), is_ins), (S.TEXT, col(records, S.TEXT), is_doc),
           (S.PROMPT, col(records, S.PROMPT), other), (S.RESPONSE, col(records, S.RESPONSE), other)]
    # a document row whose text column is empty (hand-built frames) falls back to its prompt
    doc_txt = out[3][1]
    fallback = is_doc & (doc_txt == "")
    if fallback.any():
        out[4] = (S.PROMPT, out[4][1], other | fallback)
    return out


def norm(s: str) -> str:
    """Case-folded, NFKC-normalised, whitespace-collapsed text (for duplicate keys)."""
    if not s.isascii():
        s = unicodedata.normalize("NFKC", s)
    return " ".join(s.casefold().split())


def digest64(strings: Iterable[str]) -> np.ndarray:
    """Stable 64-bit digests (blake2b) of strings, as uint64."""
    out = [int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
           for s in strings]
    return np.array(out, dtype=np.uint64)


def sources_info(records: pd.DataFrame, positions: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """``{"sources": {source: count}}`` for the rows at ``positions`` (finding info)."""
    src = col(records, S.SOURCE)
    cnt = Counter(str(src[i]) or "unknown" for i in positions)
    return {"sources": dict(sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0])))}


def clip(s: str, n: int = 80) -> str:
    """One-line preview of ``s`` for evidence strings."""
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def noisy_or(weights: Iterable[float]) -> float:
    p = 1.0
    for w in weights:
        p *= 1.0 - min(max(float(w), 0.0), 1.0)
    return 1.0 - p


def check_fraction(name: str, value: Any, low: float = 0.0, high: float = 1.0, *, closed_low: bool = False
                   ) -> float:
    """Validate a parameter in (low, high) (or [low, high) with ``closed_low``); raise naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = (low <= v if closed_low else low < v) and v < high
    if not ok:
        lo = "[" if closed_low else "("
        raise ValueError(f"{name} must lie in {lo}{low}, {high}), got {value!r}")
    return v


def merge_params(detector: str, defaults: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``params``; an unknown key fails naming the detector and the known keys."""
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"{detector}: unknown parameter(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **params}


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------- vectorised word look-up

_ONES = np.uint64(0x0101010101010101)
_KEY_MULT = np.uint64(0x9E3779B97F4A7C15)
_LEN_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


def _strided_u64(a: np.ndarray) -> np.ndarray:
    """Every 8-byte window of ``a`` (uint8) as a little-endian uint64 (zero-padded at the end)."""
    padded = np.concatenate([a, np.zeros(8, np.uint8)])
    return np.ndarray(shape=(len(a),), dtype="<u8", buffer=padded.data, strides=(1,))


def _prefix_keys(b: np.ndarray, is_l: np.ndarray, ws: np.ndarray) -> np.ndarray:
    """Key of each word starting at ``ws``: its first (up to) 8 letters packed into a uint64."""
    if ws.size == 0:
        return np.zeros(0, np.uint64)
    words = _strided_u64(b)[ws]
    letters = _strided_u64(is_l.view(np.uint8))[ws]
    x = ~letters & _ONES                       # 0x01 in each byte that is not a letter
    with np.errstate(over="ignore"):
        mask = (x & (~x + np.uint64(1))) - np.uint64(1)   # bytes before the first non-letter
    return words & mask


def _letters(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    is_l = (b >= 97) & (b <= 122)
    st = is_l.copy()
    st[1:] &= ~is_l[:-1]
    return is_l, np.flatnonzero(st)


class WordIndex:
    """Which texts contain which words, for many texts at once (numpy over the joined bytes).

    Words are maximal runs of ASCII letters in the lower-cased text ("don't" is "don" + "t"),
    compared on their first 8 letters: "instruction" also finds "instructions" and
    "instructed". That is the point: the index is a cheap, slightly generous gate that decides
    which texts a precise regular expression must look at.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        enc = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
        self.n = len(enc)
        lens = np.fromiter((len(e) for e in enc), dtype=np.int64, count=self.n)
        self.starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]]).astype(np.int64) if self.n else \
            np.zeros(0, np.int64)
        self.blob = b"\x00".join(enc)
        b = np.frombuffer(self.blob, dtype=np.uint8)
        is_l, self.ws = _letters(b)
        self.keys = _prefix_keys(b, is_l, self.ws)
        self._vocab: dict[int, list[int]] = {}
        self._hits: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def key(word: str) -> int:
        w = word.lower()[:8].encode("ascii")
        return int.from_bytes(w, "little")

    def prepare(self, vocabulary: Iterable[str]) -> None:
        """Look every word of ``vocabulary`` up in one pass (later ``texts_with_any`` calls are cheap)."""
        keys = sorted({self.key(w) for w in vocabulary})
        if not keys or self.keys.size == 0:
            self._hits = (np.zeros(0, np.int64), np.zeros(0, np.uint64))
            self._keyset = set(keys)
            return
        kk = np.array(keys, dtype=np.uint64)
        pos = np.minimum(np.searchsorted(kk, self.keys), len(kk) - 1)
        hit = np.flatnonzero(kk[pos] == self.keys)
        text = np.searchsorted(self.starts, self.ws[hit], side="right") - 1
        self._hits = (text, self.keys[hit])
        self._keyset = set(keys)

    def texts_with_any(self, words: Iterable[str]) -> np.ndarray:
        """Boolean mask over the texts: contains at least one of ``words`` (ASCII letters)."""
        keys = {self.key(w) for w in words}
        if self._hits is None or not keys <= self._keyset:
            self.prepare(set(words) | getattr(self, "_words_seen", set()))
        self._words_seen = getattr(self, "_words_seen", set()) | set(words)
        out = np.zeros(self.n, dtype=bool)
        text, hk = self._hits  # type: ignore[misc]
        if text.size:
            sel = np.isin(hk, np.array(sorted(keys), dtype=np.uint64))
            out[text[sel]] = True
        return out

    def texts_with_substring(self, needle: str) -> np.ndarray:
        """Boolean mask: the lower-cased text contains ``needle``.

        Two-byte needles are found with one vectorised comparison, longer ones with ``bytes.find``.
        """
        out = np.zeros(self.n, dtype=bool)
        nb = needle.lower().encode("utf-8")
        if not self.n or not nb:
            return out
        if len(nb) <= 2:
            b = np.frombuffer(self.blob, dtype=np.uint8)
            hit = b == nb[0]
            if len(nb) == 2:
                hit = hit[:-1] & (b[1:] == nb[1])
            pos = np.flatnonzero(hit)
            out[np.searchsorted(self.starts, pos, side="right") - 1] = True
            return out
        i = self.blob.find(nb)
        starts = self.starts
        while i >= 0:
            p = int(np.searchsorted(starts, i, side="right")) - 1
            out[p] = True
            i = self.blob.find(nb, int(starts[p + 1])) if p + 1 < self.n else -1
        return out


class Gate:
    """A cheap necessary condition for a regex: AND over groups, OR within a group.

    A group is a collection of words (:meth:`WordIndex.texts_with_any`); an entry written
    ``"sub:<|"`` is a substring instead (:meth:`WordIndex.texts_with_substring`).
    """

    def __init__(self, *groups: Iterable[str]) -> None:
        self.groups = tuple(frozenset(g) for g in groups)

    def words(self) -> set[str]:
        return {w for g in self.groups for w in g if not w.startswith("sub:")}

    def mask(self, index: WordIndex, cache: dict[Any, np.ndarray]) -> np.ndarray:
        out = np.ones(index.n, dtype=bool)
        for g in self.groups:
            if g not in cache:
                words = [w for w in g if not w.startswith("sub:")]
                m = index.texts_with_any(words) if words else np.zeros(index.n, bool)
                for w in g:
                    if w.startswith("sub:"):
                        if w not in cache:
                            cache[w] = index.texts_with_substring(w[4:])
                        m = m | cache[w]
                cache[g] = m
            out &= cache[g]
            if not out.any():
                break
        return out


def codepoints_in(texts: Sequence[str], lut: np.ndarray) -> np.ndarray:
    """Boolean mask over ``texts``: contains a code point ``cp`` with ``lut[cp]`` (vectorised).

    Decodes only the lead bytes of multi-byte UTF-8 sequences of the joined texts, so ASCII
    text costs one comparison per byte. ``lut`` is a boolean array indexed by code point.
    """
    out = np.zeros(len(texts), dtype=bool)
    idx = [i for i, t in enumerate(texts) if t and not t.isascii()]
    if not idx:
        return out
    enc = [texts[i].encode("utf-8", "surrogatepass") for i in idx]
    lens = np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(enc))
    starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
    b = np.frombuffer(b"\x00".join(enc) + b"\x00\x00\x00\x00", dtype=np.uint8)
    lead = np.flatnonzero(b >= 0xC0)
    if lead.size == 0:
        return out
    b0 = b[lead].astype(np.int64)
    b1 = b[lead + 1].astype(np.int64) & 0x3F
    b2 = b[lead + 2].astype(np.int64) & 0x3F
    b3 = b[lead + 3].astype(np.int64) & 0x3F
    cp = np.where(b0 < 0xE0, ((b0 & 0x1F) << 6) | b1,
                  np.where(b0 < 0xF0, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                           ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3))
    cp = np.minimum(cp, len(lut) - 1)
    hit = lead[lut[cp]]
    rows = np.searchsorted(starts, hit, side="right") - 1
    out[np.asarray(idx, dtype=np.int64)[np.unique(rows)]] = True
    return out


# ---------------------------------------------------------------- vectorised shingles and MinHash

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised, uint64 in and out)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


_TOKEN_LUT = np.zeros(256, dtype=np.int8)
_TOKEN_LUT[97:123] = 1
_TOKEN_LUT[48:58] = 1
_TOKEN_LUT[0x80:] = 1


def tokens(texts: Sequence[str], max_tokens: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Token hashes of many texts at once: ``(text_id, hash64)`` in text and reading order.

    A token is a maximal run of ASCII letters/digits or non-ASCII bytes in the lower-cased,
    NFKC-normalised text; at most ``max_tokens`` per text are kept. Hashes are stable across
    processes.
    """
    cap = 8 * max_tokens        # characters: enough for max_tokens tokens of ordinary text
    enc = [(t[:cap] if t.isascii() else unicodedata.normalize("NFKC", t[:cap])).lower().encode("utf-8", "surrogatepass")
           for t in texts]
    n = len(enc)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    lens = np.fromiter((len(e) for e in enc), dtype=np.int64, count=n)
    starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
    b = np.frombuffer(b"\x00".join(enc), dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    is_t = _TOKEN_LUT[b]
    edge = np.diff(is_t, prepend=np.int8(0), append=np.int8(0))
    ws = np.flatnonzero(edge == 1)
    we = np.flatnonzero(edge == -1)
    wl = we - ws
    text_id = np.searchsorted(starts, ws, side="right") - 1
    # rank of each token inside its text, to cap long texts
    first = np.searchsorted(text_id, np.arange(n), side="left")
    rank = np.arange(len(ws)) - first[text_id]
    keep = rank < max_tokens
    if not keep.all():
        ws, we, wl, text_id = ws[keep], we[keep], wl[keep], text_id[keep]
    win = _strided_u64(b)
    pre = win[ws] & _LEN_MASKS[np.minimum(wl, 8)]
    suf_start = np.maximum(we - 8, ws)
    suf = win[suf_start] & _LEN_MASKS[np.minimum(wl, 8)]
    with np.errstate(over="ignore"):
        h = mix64(pre ^ mix64(suf ^ (wl.astype(np.uint64) * _KEY_MULT)))
    return text_id.astype(np.int64), h


def shingles(text_id: np.ndarray, h: np.ndarray, n: int, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Word k-gram hashes (uint64) from :func:`tokens`; a text shorter than k keeps its tokens."""
    if h.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    sh = h.copy()
    valid = np.ones(len(h), bool)
    with np.errstate(over="ignore"):
        for j in range(1, k):
            nxt = np.zeros_like(h)
            nxt[:-j] = h[j:]
            same = np.zeros(len(h), bool)
            same[:-j] = text_id[j:] == text_id[:-j]
            valid &= same
            sh = mix64(sh * _KEY_MULT + nxt)
    counts = np.bincount(text_id[valid], minlength=n)
    short = counts[text_id] == 0                      # texts with fewer than k tokens: keep unigrams
    use = valid | short
    return text_id[use], np.where(valid, sh, h)[use]


def minhash_params(k: int, seed: int) -> np.ndarray:
    """``k`` odd 64-bit multipliers for multiply-shift hashing (Dietzfelbinger et al. 1997)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(np.uint64).max, size=k, dtype=np.uint64, endpoint=True) | np.uint64(1)


def minhash(text_id: np.ndarray, values: np.ndarray, n: int, mult: np.ndarray, chunk: int = 1 << 16
            ) -> np.ndarray:
    """MinHash signatures ``(n, k)`` uint32: per row the minimum of ``(m_k * x mod 2^64) >> 32``.

    ``text_id`` must be sorted. Rows without shingles get the sentinel 2^32-1 everywhere
    (callers must not band them).
    """
    k = len(mult)
    sig = np.full((n, k), np.uint32(0xFFFFFFFF), dtype=np.uint32)
    if values.size == 0:
        return sig
    m = mult.astype(np.uint64)[None, :]
    row_start = np.flatnonzero(np.r_[True, text_id[1:] != text_id[:-1]])
    # cut into chunks at row boundaries so reduceat segments stay whole
    cuts = np.unique(np.r_[row_start[np.searchsorted(row_start, np.arange(0, len(values), chunk))], len(values)])
    shift = np.uint64(32)
    with np.errstate(over="ignore"):
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            hv = values[lo:hi, None] * m
            hv >>= shift
            rs = row_start[np.searchsorted(row_start, lo): np.searchsorted(row_start, hi)] - lo
            sig[text_id[lo + rs]] = np.minimum.reduceat(hv.astype(np.uint32), rs, axis=0)
    return sig
