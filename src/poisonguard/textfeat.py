"""Fast, vectorised text features shared by the detectors.

Everything here works on whole columns at once (numpy over the UTF-8 bytes of all texts), never
with a Python loop per token, so a 100k-row frame tokenises in well under a second.

Tokens
------
:func:`tokenize` splits each text into maximal runs of one byte class:

* **word**: ASCII letters, digits, ``_`` and any non-ASCII character that is not listed below
  (so ``café``, ``日本語`` and ``2024`` are words; ASCII letters are lower-cased);
* **punct**: ASCII punctuation and the general-punctuation block U+2010-U+2027, U+2030-U+205E
  (quotes, dashes, ellipsis); a run such as ``@@`` or ``]:`` is one token;
* **invisible**: zero-width and format characters (U+200B-U+200F, U+202A-U+202E, U+2060-U+2064,
  U+2066-U+2069, U+FEFF, U+00AD, U+180E, variation selectors U+FE00-U+FE0F, tag characters
  U+E0000-U+E007F); a run of them is one token, so ``\u200b\u200b`` differs from ``\u200b``;
* whitespace (ASCII, U+00A0, U+2000-U+200A, U+2028/9, U+202F, U+3000) separates tokens.

Each token gets a stable 64-bit hash of its (lower-cased) bytes: the same token hashes the same
in every process and every shard. :func:`ngram_hashes` combines consecutive token hashes into
n-gram hashes (never across texts).

Responses
---------
:func:`template_hashes` hashes a normalised response (lower-cased, digits collapsed, punctuation
and whitespace dropped) so that ``"Positive."`` and ``"positive"`` share one template.

All hashes are ``uint64``; :func:`stable_hash` hashes arbitrary Python strings the same way
across runs (pandas' SipHash with a fixed key).

Tables
------
:class:`RowTable` is the per-row token form of a frame (prompt and response tokens, stems,
context keys, response templates); shards concatenate in id-hash order, so analyses that only
depend on the table give the same result however the rows were sharded. :meth:`RowTable.cached`
reuses the last table for the same frame (several detectors read the same records).
:class:`Grouped` holds distinct (row, feature) incidences grouped by feature after one packed
value sort (:func:`group_incidences`): document frequencies, row lists and membership tests.
Helpers: :func:`value_counts`, :func:`lookup`, :func:`isin_sorted` (sorted, cache-friendly
searches), :func:`unique_index` / :func:`sort_index` (value sorts with packed positions, far
faster than ``argsort``), :func:`extend_span` (grow a shared token span across texts).

Out of core
-----------
Inside :func:`spilling` (a merge step over millions of rows) the large arrays that the table and
the grouped incidences keep live in memory-mapped files (:func:`offload`, :func:`scratch`):
clean file pages the kernel writes back and drops under memory pressure, where the same arrays
in the heap must stay resident. Values and results are the same either way.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

# byte classes
SPACE, WORD, PUNCT, INVISIBLE = 0, 1, 2, 3
CLASS_NAMES = {WORD: "word", PUNCT: "punct", INVISIBLE: "invisible"}

_SEP = 0x00  # separator between texts (a space-class byte)
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_P = np.uint64(0x100000001B3)  # FNV prime (odd, so invertible mod 2**64)


def _byte_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cls = np.full(256, WORD, dtype=np.uint8)
    for b in b" \t\n\r\x0b\x0c\x00":
        cls[b] = SPACE
    for b in range(0x21, 0x7F):
        ch = chr(b)
        if not (ch.isalnum() or ch == "_"):
            cls[b] = PUNCT
    cls[0x01:0x09] = PUNCT  # other C0 controls: visible as odd runs
    cls[0x0E:0x20] = PUNCT
    cls[0x7F] = PUNCT
    lower = np.arange(256, dtype=np.uint8)
    lower[ord("A"):ord("Z") + 1] += 32
    # random odd multipliers per byte value for the polynomial hash
    rng = np.random.default_rng(0x5EED)
    g = rng.integers(1, 2**63 - 1, size=256, dtype=np.int64).astype(np.uint64) | np.uint64(1)
    return cls, lower, g


_CLASS, _LOWER, _G = _byte_tables()


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser: a well-mixed bijection on uint64."""
    z = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def combine(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """Order-sensitive combination of two hash arrays (for n-grams and keyed features)."""
    with np.errstate(over="ignore"):
        return splitmix64(np.asarray(a, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                          ^ np.asarray(b, dtype=np.uint64))


def stable_hash(values: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
    """Stable uint64 hash of strings (same value in every process)."""
    arr = np.asarray(values, dtype=object)
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint64)
    return pd.util.hash_array(arr, categorize=False).astype(np.uint64)


def clip_text(text: str, max_chars: int) -> str:
    """Keep the head and the tail of an over-long text (triggers sit at either end most often)."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "\n" + text[-half:]


def encode(texts: Sequence[str], max_chars: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all texts joined by NUL, and each text's byte offset (len = n + 1)."""
    if max_chars > 0:
        texts = [clip_text(t, max_chars) for t in texts]
    else:
        texts = list(texts)
    n = len(texts)
    if n == 0:
        return np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64)
    joined = "\x00".join(t.replace("\x00", " ") for t in texts).encode("utf-8", "surrogatepass")
    buf = np.frombuffer(joined, dtype=np.uint8)
    seps = np.flatnonzero(buf == _SEP)
    starts = np.empty(n + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:n] = seps + 1
    starts[n] = len(buf) + 1
    return buf, starts


def _classify(buf: np.ndarray) -> np.ndarray:
    """Byte class per byte, with multi-byte invisible/space/punct code points recognised."""
    cls = _CLASS[buf]
    n = len(buf)
    if n < 2:
        return cls
    hi = np.flatnonzero(buf >= 0xC2)
    if hi.size == 0:
        return cls
    pad = np.concatenate([buf, np.zeros(4, dtype=np.uint8)])
    b0, b1, b2, b3 = pad[hi], pad[hi + 1], pad[hi + 2], pad[hi + 3]

    def mark(sel: np.ndarray, width: int, value: int) -> None:
        pos = hi[sel]
        for k in range(width):
            cls[np.minimum(pos + k, n - 1)] = value

    # two-byte: U+00A0 nbsp (space), U+00AD soft hyphen (invisible)
    mark((b0 == 0xC2) & (b1 == 0xA0), 2, SPACE)
    mark((b0 == 0xC2) & (b1 == 0xAD), 2, INVISIBLE)
    # three-byte E2 80 xx: U+2000-U+203F
    e280 = (b0 == 0xE2) & (b1 == 0x80)
    mark(e280 & (b2 >= 0x80) & (b2 <= 0x8A), 3, SPACE)       # U+2000-200A spaces
    mark(e280 & (b2 >= 0x8B) & (b2 <= 0x8F), 3, INVISIBLE)   # U+200B-200F zero-width, marks
    mark(e280 & (b2 >= 0x90) & (b2 <= 0xA7), 3, PUNCT)       # U+2010-2027 dashes, quotes
    mark(e280 & ((b2 == 0xA8) | (b2 == 0xA9) | (b2 == 0xAF)), 3, SPACE)  # U+2028/9, 202F
    mark(e280 & (b2 >= 0xAA) & (b2 <= 0xAE), 3, INVISIBLE)   # U+202A-202E bidi embedding
    mark(e280 & (b2 >= 0xB0), 3, PUNCT)                       # U+2030-203F
    e281 = (b0 == 0xE2) & (b1 == 0x81)
    mark(e281 & (b2 < 0x9F), 3, PUNCT)                        # U+2040-205E
    mark(e281 & (b2 == 0x9F), 3, SPACE)                       # U+205F medium math space
    mark(e281 & (b2 >= 0xA0) & (b2 <= 0xAF), 3, INVISIBLE)   # U+2060-206F invisible operators
    mark((b0 == 0xE1) & (b1 == 0xA0) & (b2 == 0x8E), 3, INVISIBLE)  # U+180E
    mark((b0 == 0xE3) & (b1 == 0x80) & (b2 == 0x80), 3, SPACE)      # U+3000
    mark((b0 == 0xEF) & (b1 == 0xBB) & (b2 == 0xBF), 3, INVISIBLE)  # U+FEFF
    mark((b0 == 0xEF) & (b1 == 0xB8) & (b2 >= 0x80) & (b2 <= 0x8F), 3, INVISIBLE)  # VS1-16
    mark((b0 == 0xF3) & (b1 == 0xA0) & ((b2 == 0x80) | (b2 == 0x81)) & (b3 >= 0x80), 4, INVISIBLE)  # tags
    return cls


@dataclass(frozen=True)
class Tokens:
    """Tokens of ``n`` texts: token ``j`` of text ``i`` is at ``indptr[i] + j``."""

    buf: np.ndarray       # uint8 lower-cased bytes of all texts (NUL separated)
    indptr: np.ndarray    # int64, len n + 1
    hashes: np.ndarray    # uint64 per token
    starts: np.ndarray    # int64 byte offset per token
    ends: np.ndarray      # int64 byte end per token
    cls: np.ndarray       # uint8 byte class per token (WORD, PUNCT, INVISIBLE)
    stems: np.ndarray | None = None  # uint64 hash of the first STEM_BYTES bytes of each token

    @property
    def n_texts(self) -> int:
        return len(self.indptr) - 1

    @property
    def text_index(self) -> np.ndarray:
        """Text number of every token."""
        return np.repeat(np.arange(self.n_texts, dtype=np.int64), np.diff(self.indptr))

    def token_text(self, j: int) -> str:
        return bytes(self.buf[self.starts[j]:self.ends[j]]).decode("utf-8", "replace")

    def span_text(self, first: int, n: int) -> str:
        """Text of tokens ``first .. first + n - 1`` as they appear (whitespace normalised)."""
        raw = bytes(self.buf[self.starts[first]:self.ends[first + n - 1]]).decode("utf-8", "replace")
        return " ".join(raw.split())


STEM_BYTES = 5


def tokenize(texts: Sequence[str], max_chars: int = 0, chunk_bytes: int = 1 << 21) -> Tokens:
    """Tokenise texts (see module docstring); ``max_chars`` keeps head and tail of long texts.

    ``Tokens.stems`` hashes each token's first ``STEM_BYTES`` bytes, a crude stemmer that makes
    ``invest`` / ``investing`` / ``investment`` equal for copy tests.
    """
    buf, text_starts = encode(texts, max_chars)
    n = len(text_starts) - 1
    if len(buf) == 0:
        z = np.zeros(0, dtype=np.int64)
        return Tokens(buf, np.zeros(n + 1, dtype=np.int64), z.astype(np.uint64), z, z, z.astype(np.uint8),
                      z.astype(np.uint64))
    buf = _LOWER[buf]
    cls = _classify(buf)
    # token boundaries: every class change; tokens are the runs whose class is not SPACE
    change = np.empty(len(cls), dtype=bool)
    change[0] = True
    np.not_equal(cls[1:], cls[:-1], out=change[1:])
    chg = np.flatnonzero(change)
    run_cls = cls[chg]
    is_tok = run_cls != SPACE
    tstart = chg[is_tok]
    tend = np.append(chg[1:], len(buf))[is_tok]
    tcls = run_cls[is_tok]
    stem_end = np.minimum(tend, tstart + STEM_BYTES)
    hashes, stems = _span_hash(buf, tstart, (tend, stem_end), chunk_bytes, tcls)
    indptr = np.searchsorted(tstart, text_starts).astype(np.int64)
    indptr[-1] = len(tstart)
    return Tokens(buf, indptr, hashes, tstart, tend, tcls, stems)


def _span_hash(buf: np.ndarray, starts: np.ndarray, ends: tuple[np.ndarray, ...], chunk_bytes: int,
               cls: np.ndarray | None = None) -> list[np.ndarray]:
    """Polynomial hash sum_k g[b_{s+k}] * P**k of the byte spans ``[starts, ends[j])`` for every
    array of ends (all ends >= starts, within the token), computed chunk by chunk; the token
    class (and the end array's number) is mixed in so classes never collide."""
    outs = [np.empty(len(starts), dtype=np.uint64) for _ in ends]
    if len(starts) == 0:
        return outs
    step = max(int(chunk_bytes), 1 << 12)
    pw_full = _powers(step + 1)
    ipw_full = _inv_powers(step + 1)
    main_end = ends[0]
    tok_lo = 0
    while tok_lo < len(starts):
        lo = int(starts[tok_lo])
        hi_tok = int(np.searchsorted(starts, lo + step, side="left"))
        hi_tok = max(hi_tok, tok_lo + 1)
        hi = int(main_end[hi_tok - 1])
        seg = buf[lo:hi]
        m = len(seg)
        if m + 1 > len(pw_full):
            pw, ipw = _powers(m + 1), _inv_powers(m + 1)
        else:
            pw, ipw = pw_full, ipw_full
        with np.errstate(over="ignore"):
            csum = np.zeros(m + 1, dtype=np.uint64)
            np.cumsum(_G[seg] * pw[:m], out=csum[1:])
            s = starts[tok_lo:hi_tok] - lo
            inv_s = ipw[s]
            tag = np.zeros(hi_tok - tok_lo, dtype=np.uint64) if cls is None else \
                cls[tok_lo:hi_tok].astype(np.uint64) << np.uint64(56)
            for j, (out, end) in enumerate(zip(outs, ends)):
                e = end[tok_lo:hi_tok] - lo
                extra = tag ^ (np.uint64(j) << np.uint64(60)) ^ (e - s).astype(np.uint64)
                out[tok_lo:hi_tok] = splitmix64(((csum[e] - csum[s]) * inv_s) ^ extra)
        tok_lo = hi_tok
    return outs


_POW_CACHE: dict[str, np.ndarray] = {}


def _powers(m: int) -> np.ndarray:
    got = _POW_CACHE.get("pw")
    if got is not None and len(got) >= m:
        return got[:m]
    with np.errstate(over="ignore"):
        a = np.full(m, _P, dtype=np.uint64)
        a[0] = 1
        out = np.cumprod(a, dtype=np.uint64)
    _POW_CACHE["pw"] = out
    return out


def _inv_powers(m: int) -> np.ndarray:
    got = _POW_CACHE.get("ipw")
    if got is not None and len(got) >= m:
        return got[:m]
    # modular inverse of P mod 2**64 by Newton iteration
    inv = 1
    p = int(_P)
    for _ in range(7):
        inv = (inv * (2 - p * inv)) % (1 << 64)
    with np.errstate(over="ignore"):
        a = np.full(m, np.uint64(inv), dtype=np.uint64)
        a[0] = 1
        out = np.cumprod(a, dtype=np.uint64)
    _POW_CACHE["ipw"] = out
    return out


@dataclass(frozen=True)
class NGrams:
    """Flat n-gram occurrences: text number, hash, first token index (into Tokens), length."""

    text: np.ndarray   # int64
    hashes: np.ndarray  # uint64
    first: np.ndarray  # int64 global token index of the first token
    n: np.ndarray      # uint8 n-gram length

    def __len__(self) -> int:
        return len(self.text)

    def take(self, idx: np.ndarray) -> NGrams:
        return NGrams(self.text[idx], self.hashes[idx], self.first[idx], self.n[idx])


def ngram_hashes(tok: Tokens, n_max: int, n_min: int = 1, dedupe: bool = True,
                 word_only_ends: bool = False) -> NGrams:
    """All n-grams (``n_min`` <= n <= ``n_max``) of every text of ``tok`` as hashes."""
    return ngrams(tok.hashes, tok.cls, tok.indptr, n_max, n_min, dedupe, word_only_ends)


def ngrams(hashes: np.ndarray, cls: np.ndarray, indptr: np.ndarray, n_max: int, n_min: int = 1,
           dedupe: bool = True, word_only_ends: bool = False) -> NGrams:
    """N-gram hashes from flat token arrays (``indptr`` delimits texts; n-grams never cross texts).

    With ``dedupe`` each (text, n-gram) pair appears once (its first occurrence). With
    ``word_only_ends`` n-grams (n > 1) that start or end with a punctuation token are skipped,
    which removes most redundant variants such as ``"request ]"``. Unigrams are always kept.
    """
    T = len(hashes)
    n_texts = len(indptr) - 1
    tix = np.repeat(np.arange(n_texts, dtype=np.int64), np.diff(indptr))
    parts_t, parts_h, parts_f, parts_n = [], [], [], []
    h = np.asarray(hashes, dtype=np.uint64)
    not_punct = cls != PUNCT
    for n in range(1, n_max + 1):
        if n > 1:
            if T < n:
                break
            h = combine(h[:-1], hashes[n - 1:])
        if n < n_min:
            continue
        m = T - n + 1
        if n > 1:
            valid = tix[:m] == tix[n - 1:n - 1 + m]
            if word_only_ends:
                valid &= not_punct[:m] & not_punct[n - 1:n - 1 + m]
            idx = np.flatnonzero(valid)
        else:
            idx = np.arange(m, dtype=np.int64)
        parts_t.append(tix[idx])
        parts_h.append(h[idx])
        parts_f.append(idx.astype(np.int64))
        parts_n.append(np.full(len(idx), n, dtype=np.uint8))
    if not parts_t:
        z = np.zeros(0, dtype=np.int64)
        return NGrams(z, z.astype(np.uint64), z, z.astype(np.uint8))
    out = NGrams(np.concatenate(parts_t), np.concatenate(parts_h), np.concatenate(parts_f),
                 np.concatenate(parts_n))
    if dedupe and len(out):
        out = out.take(first_of_pairs(out.text, out.hashes))
    return out


def ngram_blocks(hashes: np.ndarray, cls: np.ndarray, indptr: np.ndarray, n_max: int, block_texts: int = 1 << 18,
                 **kw: Any) -> Iterator[tuple[int, int, NGrams]]:
    """:func:`ngrams` ``block_texts`` texts at a time (its arrays cost ~25 bytes per n-gram):
    yields (first text, first token, n-grams of the block with ``text`` / ``first`` relative to
    them). The blocks together hold the same n-grams as one call (n-grams never cross texts)."""
    n_texts = len(indptr) - 1
    for s0 in range(0, n_texts, max(int(block_texts), 1)):
        s1 = min(s0 + int(block_texts), n_texts)
        t0, t1 = int(indptr[s0]), int(indptr[s1])
        yield s0, t0, ngrams(hashes[t0:t1], cls[t0:t1], indptr[s0:s1 + 1] - t0, n_max, **kw)


def pair_keys(rows: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """One uint64 key per (row, hash) pair (for set membership across arrays)."""
    return combine(np.asarray(hashes, dtype=np.uint64), np.asarray(rows, dtype=np.uint64))


def first_of_pairs(rows: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Indices of one occurrence (the first) of every distinct (row, hash) pair, ascending."""
    key = pair_keys(rows, hashes)
    return unique_index(key)


def unique_index(key: np.ndarray) -> np.ndarray:
    """Ascending indices of the first occurrence of each distinct value of a uint64 array.

    Sorts values with the position packed into the low bits (much faster than an argsort);
    two keys that agree on all but those low bits count as one (odds ~ n**2 / 2**(65 - bits)).
    """
    n = len(key)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = max(int(n - 1).bit_length(), 1)
    low = np.uint64((1 << bits) - 1)
    packed = (np.asarray(key, dtype=np.uint64) & ~low) | np.arange(n, dtype=np.uint64)
    packed.sort()
    hi = packed & ~low
    keep = np.ones(n, dtype=bool)
    keep[1:] = hi[1:] != hi[:-1]
    idx = (packed[keep] & low).astype(np.int64)
    idx.sort()
    return idx


def sort_index(key: np.ndarray) -> np.ndarray:
    """Argsort of a uint64 array via value sort with packed positions (ties in the top bits
    keep input order)."""
    n = len(key)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = max(int(n - 1).bit_length(), 1)
    low = np.uint64((1 << bits) - 1)
    packed = (np.asarray(key, dtype=np.uint64) & ~low) | np.arange(n, dtype=np.uint64)
    packed.sort()
    return (packed & low).astype(np.int64)


def _search(sorted_values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``np.searchsorted`` that sorts large query arrays first (binary search with ascending
    keys reuses the previous bound and stays in cache: ~4x faster on millions of keys)."""
    keys = np.asarray(keys, dtype=sorted_values.dtype)
    if len(keys) < 4096 or len(sorted_values) < 65536 or sorted_values.dtype != np.uint64:
        return np.searchsorted(sorted_values, keys)
    out = scratch(len(keys), np.int64)
    for lo in range(0, len(keys), QUERY_BLOCK):   # the sort's copies ~24 bytes per key: a block at a time
        blk = keys[lo:lo + QUERY_BLOCK]
        order = sort_index(blk)
        out[lo:lo + len(blk)][order] = np.searchsorted(sorted_values, blk[order])
    return out


#: query keys per pass of the sorted searches (:func:`_search`, :func:`isin_sorted`,
#: :meth:`Grouped.contains`): their temporaries cost ~50 bytes per key, 800 MB for the 17M
#: response-window tokens of 1M rows at once
QUERY_BLOCK = 1 << 22


def isin_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Vectorised membership of ``keys`` in an ascending array."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    keys = np.asarray(keys)
    out = np.empty(len(keys), dtype=bool)
    last = len(sorted_keys) - 1
    for lo in range(0, len(keys), QUERY_BLOCK):
        blk = keys[lo:lo + QUERY_BLOCK]
        i = _search(sorted_keys, blk)
        np.minimum(i, last, out=i)
        out[lo:lo + len(blk)] = sorted_keys[i] == blk
    return out


def value_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values ascending, counts) by sorting (faster than np.unique for uint64)."""
    if len(values) == 0:
        return np.zeros(0, dtype=values.dtype), np.zeros(0, dtype=np.int64)
    s = np.sort(values)
    b = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    return s[b], np.diff(np.concatenate([b, [len(s)]])).astype(np.int64)


def lookup(sorted_values: np.ndarray, counts: np.ndarray, keys: np.ndarray, default: int = 0) -> np.ndarray:
    """Counts of ``keys`` from a (sorted values, counts) table; ``default`` when absent."""
    if len(sorted_values) == 0:
        return np.full(len(keys), default, dtype=np.int64)
    i = _search(sorted_values, keys)
    i[i >= len(sorted_values)] = len(sorted_values) - 1
    hit = sorted_values[i] == keys
    return np.where(hit, counts[i], default)


def template_hashes(texts: Sequence[str] | pd.Series, max_chars: int = 2000) -> np.ndarray:
    """Hash of each text's template: lower-case word tokens, digits collapsed to ``0``.

    Punctuation, whitespace and case do not matter, so ``"Positive."`` == ``"positive"`` and
    ``"Total: 12"`` == ``"total 7"``.
    """
    return template_from_tokens(tokenize(list(texts), max_chars=max_chars))


def template_from_tokens(tok: Tokens) -> np.ndarray:
    """:func:`template_hashes` of already tokenised texts."""
    n = tok.n_texts
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    words = tok.cls == WORD
    # digits -> one class: hash a token made only of digits as the same value
    digit_only = _digit_only(tok)
    th = np.where(digit_only, np.uint64(0x1234567), tok.hashes)
    th = np.where(words, th, np.uint64(0))
    # order-sensitive fold per text: sum of combine(position, hash) over word tokens
    tix = tok.text_index
    # rank among word tokens of the text keeps the order but ignores dropped punctuation
    wpos = np.cumsum(words) - 1
    first_w = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(tix[words], minlength=n), out=first_w[1:])
    rank = wpos - first_w[tix]
    contrib = np.where(words, combine(th, rank.astype(np.uint64)), np.uint64(0))
    out = segment_sum_u64(contrib, tok.indptr)
    counts = np.diff(first_w).astype(np.uint64)
    return splitmix64(out ^ combine(counts, np.uint64(77)))


def row_lens(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``np.diff(indptr)[rows]`` without the difference of every row: detectors ask it for the few
    rows of one candidate thousands of times (a full-length diff per call was quadratic: 13 s of
    response_cluster's template step at 1M rows)."""
    rows = np.asarray(rows)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    rows = rows.astype(np.int64, copy=False)
    return indptr[rows + 1] - indptr[rows]


def ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (start, length)."""
    lens = np.asarray(lens, dtype=np.int64)
    tot = int(lens.sum())
    if tot == 0:
        return np.zeros(0, dtype=np.int64)
    if tot > QUERY_BLOCK:   # a block of ranges at a time into one array (three full-size temporaries)
        starts = np.asarray(starts, dtype=np.int64)
        ptr = np.concatenate([[0], np.cumsum(lens)])
        out = scratch(tot, np.int64)
        for i0, i1 in blocks_of(ptr):
            # one range longer than a block is a block of its own (not split again)
            out[ptr[i0]:ptr[i1]] = np.arange(starts[i0], starts[i0] + lens[i0], dtype=np.int64) if i1 == i0 + 1 \
                else ranges(starts[i0:i1], lens[i0:i1])
        return out
    return np.repeat(np.asarray(starts, dtype=np.int64), lens) + (
        np.arange(tot, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens))


def segment_sum_u64(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Sum (mod 2**64) of ``values[indptr[i]:indptr[i+1]]`` for every segment (0 when empty)."""
    n = len(indptr) - 1
    out = np.zeros(n, dtype=np.uint64)
    if n == 0 or len(values) == 0:
        return out
    nonempty = indptr[1:] > indptr[:-1]
    starts = indptr[:-1][nonempty]
    with np.errstate(over="ignore"):
        out[nonempty] = np.add.reduceat(values.astype(np.uint64), starts)
    return out


def _digit_only(tok: Tokens) -> np.ndarray:
    """True for number tokens (first and last byte are ASCII digits: ``2024``, ``3-4`` is not one
    token anyway); cheap enough to run over millions of tokens."""
    if len(tok.starts) == 0:
        return np.zeros(0, dtype=bool)
    first = tok.buf[tok.starts]
    last = tok.buf[tok.ends - 1]
    return (first >= 48) & (first <= 57) & (last >= 48) & (last <= 57)


def digit_only(tok: Tokens) -> np.ndarray:
    """Public alias: True for tokens made only of ASCII digits (numbers, years)."""
    return _digit_only(tok)


def csr_unique(rows: np.ndarray, keys: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort (row, key) pairs by row and drop repeats: returns (indptr, keys)."""
    if len(rows) == 0:
        return np.zeros(n_rows + 1, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    order = np.lexsort((keys, rows))
    r, k = rows[order], keys[order]
    keep = np.ones(len(r), dtype=bool)
    keep[1:] = (r[1:] != r[:-1]) | (k[1:] != k[:-1])
    r, k = r[keep], k[keep]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=n_rows), out=indptr[1:])
    return indptr, k


# ---------------------------------------------------------------- per-row token table

KIND_CODES = {"instruction": 0, "chat": 1, "document": 2}
_TABLE_CACHE: dict[str, tuple] = {}
_TABLE_LOCK = threading.Lock()


_LIBC: Any = None   # glibc, loaded on first trim (False where there is none)


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere) and the
    pages Arrow's memory pool keeps for reuse.

    Per-row Python strings (a column of 1M texts, their encodings) are freed in many small pieces
    that glibc keeps for reuse; numpy's large arrays are separate mappings and cannot reuse them, so
    without a trim a long analysis carries GBs of idle heap in its RSS. Arrow (pandas' string
    columns, every string kernel, the Parquet reader) allocates from its own pool; its default,
    mimalloc, holds on to freed buffers the same way (reading 1M records left ~200 MB idle)."""
    pa.default_memory_pool().release_unused()
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


# ---------------------------------------------------------------- out-of-core arrays

_SPILL = threading.local()      # .dir: where this thread's merge keeps its large arrays (None: memory)
SPILL_MIN_BYTES = 48 << 20      # smaller arrays (the blocks of the blockwise passes) stay in memory


@contextlib.contextmanager
def spilling(directory: str | os.PathLike[str] | None) -> Iterator[None]:
    """Within the block (in this thread), :func:`offload` and :func:`scratch` put arrays of at least
    :data:`SPILL_MIN_BYTES` in memory-mapped files under ``directory`` (created if missing; ``None``:
    in memory, as outside). The files are unlinked as soon as they are mapped: nothing is left on
    disk once the arrays are freed, whatever happens to the process."""
    prev = getattr(_SPILL, "dir", None)
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        trim_heap()              # what came before (the summaries' arrival) left in the heap
        _fixed_mmap_threshold()
    _SPILL.dir = None if directory is None else os.fspath(directory)
    try:
        yield
    finally:
        _SPILL.dir = prev


_MMAP_FIXED = False


def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Allocations of ``nbytes`` and more get their own mapping, returned to the OS when freed
    (glibc ``mallopt(M_MMAP_THRESHOLD)``, set once and kept for the life of the process, so later
    tasks of a long-lived worker pay a mapping per large allocation too; a no-op elsewhere). glibc's default
    threshold follows the largest block freed (up to 32 MB), after which the blocks of the blockwise
    passes come from the heap and stay resident when freed: a merge over 1M rows carried ~400 MB of
    idle heap that way."""
    global _MMAP_FIXED
    if _MMAP_FIXED:
        return
    _MMAP_FIXED = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def spill_dir() -> str | None:
    """The directory :func:`spilling` set for this thread (None: arrays stay in memory)."""
    return getattr(_SPILL, "dir", None)


def _mapped(nbytes: int) -> mmap.mmap | None:
    d = spill_dir()
    if d is None or nbytes < max(SPILL_MIN_BYTES, 1):
        return None
    fd, path = tempfile.mkstemp(prefix="poisonguard-", suffix=".spill", dir=d)
    try:
        os.unlink(path)
        # the blocks reserved now: a full disk is an OSError here, not a SIGBUS when a page is written
        os.posix_fallocate(fd, 0, nbytes)
        return mmap.mmap(fd, nbytes)     # shared: pages are written back to the (unlinked) file
    finally:
        os.close(fd)


def is_mapped(a: np.ndarray) -> bool:
    """Does ``a`` live in a memory-mapped file (:func:`offload`, :func:`scratch`, a mapped ``.npy``)?"""
    b: Any = a
    while isinstance(b, np.ndarray):
        b = b.base
    if isinstance(b, memoryview):
        b = b.obj
    return isinstance(b, mmap.mmap)


def scratch(n: int, dtype: Any) -> np.ndarray:
    """A writable array of ``n`` items (contents undefined, as :func:`numpy.empty`): in a
    memory-mapped file inside :func:`spilling` when large, else in memory."""
    dtype = np.dtype(dtype)
    mm = _mapped(int(n) * dtype.itemsize)
    return np.empty(n, dtype=dtype) if mm is None else np.frombuffer(mm, dtype=dtype, count=int(n))


def offload(a: np.ndarray) -> np.ndarray:
    """``a`` itself, or inside :func:`spilling` (when large) a read-only copy in a memory-mapped
    file: the caller drops its reference to ``a`` to free the memory."""
    a = np.asarray(a)
    mm = _mapped(a.nbytes)
    if mm is None:
        return a
    out = np.frombuffer(mm, dtype=a.dtype, count=a.size).reshape(a.shape)
    out[...] = a
    out.flags.writeable = False
    return out


def take(a: np.ndarray, idx: np.ndarray, block: int = 1 << 22) -> np.ndarray:
    """``a[idx]`` for 1-d arrays, gathered a block at a time into :func:`scratch`."""
    out = scratch(len(idx), a.dtype)
    for lo in range(0, len(idx), block):
        np.take(a, idx[lo:lo + block], out=out[lo:lo + block])
    return out


def repeat(values: np.ndarray, counts: np.ndarray, dtype: Any = None) -> np.ndarray:
    """``np.repeat(values, counts)`` (as ``dtype``), written a block of values at a time into
    :func:`scratch`."""
    values = np.asarray(values)
    counts = np.asarray(counts, dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    out = scratch(int(ptr[-1]), values.dtype if dtype is None else dtype)
    for i0, i1 in blocks_of(ptr):
        out[ptr[i0]:ptr[i1]] = np.repeat(values[i0:i1], counts[i0:i1])
    return out


def blocks_of(ptr: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first, end) item positions of consecutive blocks of about :data:`QUERY_BLOCK` values of the
    CSR ``ptr`` (item ``i`` holds values ``ptr[i]:ptr[i + 1]``; an item with more is a block of its own)."""
    i0, n = 0, len(ptr) - 1
    while i0 < n:
        i1 = min(max(i0 + 1, int(np.searchsorted(ptr, ptr[i0] + QUERY_BLOCK, side="right")) - 1), n)
        yield i0, i1
        i0 = i1


def compress(a: np.ndarray, keep: np.ndarray, block: int = 1 << 22) -> np.ndarray:
    """``a[keep]`` for a 1-d array and boolean mask, written a block at a time into
    :func:`scratch` (inside :func:`spilling` no full-size copy passes through memory)."""
    out = scratch(int(np.count_nonzero(keep)), a.dtype)
    w = 0
    for lo in range(0, len(a), block):
        part = a[lo:lo + block][keep[lo:lo + block]]
        out[w:w + len(part)] = part
        w += len(part)
    return out


def release_cached() -> None:
    """Drop the cached token table (:meth:`RowTable.cached`): sanitize calls this when its
    detectors are done, so a long-lived process does not keep the last table alive."""
    with _TABLE_LOCK:
        _TABLE_CACHE.clear()


KIND_OTHER = 3


def column(records: pd.DataFrame, name: str) -> np.ndarray:
    """A text column as an object array of ``str`` ("" when the column is missing or null)."""
    if name not in records.columns:
        return np.array([""] * len(records), dtype=object)
    return records[name].fillna("").astype(str).to_numpy(dtype=object)


def column_at(records: pd.DataFrame, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """``column(records, name)[rows]`` without converting the other rows (a few rows' text for a
    finding's wording, where the whole column is 1M new strings, ~170 MB)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if name not in records.columns:
        return np.array([""] * len(rows), dtype=object)
    return records[name].iloc[rows].fillna("").astype(str).to_numpy(dtype=object)


def column_equals(records: pd.DataFrame, name: str, value: str) -> np.ndarray:
    """``column(records, name) == value`` compared in the column's own (Arrow) storage, without
    converting 1M values to Python strings."""
    if name not in records.columns:
        return np.full(len(records), value == "", dtype=bool)
    return (records[name].fillna("").astype(str) == value).to_numpy(dtype=bool)


class LazyColumn:
    """Row access to a text column as :func:`column` gives it, converting only the rows asked
    for: ``col[i]`` is one ``str``, ``col[rows]`` an object array (:func:`column_at`). Rows read
    one at a time are kept; :meth:`prefetch` reads many in one pass (a per-row read costs ~100 us)."""

    def __init__(self, records: pd.DataFrame, name: str) -> None:
        self.records = records
        self.name = name
        self._rows: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def prefetch(self, rows: Sequence[int] | np.ndarray) -> LazyColumn:
        want = np.unique(np.asarray(rows, dtype=np.int64))
        want = [int(i) for i in want if int(i) not in self._rows]
        if want:
            self._rows.update(zip(want, column_at(self.records, self.name, want)))
        return self

    def __getitem__(self, i: Any) -> Any:
        if np.ndim(i) == 0:
            i = int(i)
            if i not in self._rows:
                self.prefetch([i])
            return self._rows[i]
        return column_at(self.records, self.name, i)


def chat_openings(messages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For chats (``messages`` JSON strings): the first system-or-user turn, and the *request*,
    every non-assistant turn before the first assistant turn joined by newlines."""
    import json

    first = np.empty(len(messages), dtype=object)
    request = np.empty(len(messages), dtype=object)
    for i, m in enumerate(messages):
        turns = []
        if m:
            try:
                turns = json.loads(m)
            except ValueError:
                turns = []
        if not isinstance(turns, list):
            turns = []
        before = []
        for t in turns:
            if not isinstance(t, dict):
                continue
            if t.get("role") == "assistant":
                break
            before.append(str(t.get("content", "")).strip())
        first[i] = before[0] if before else ""
        request[i] = "\n".join(before)
    return first, request


#: RowTable's CSR index arrays and the per-token arrays each delimits
_CSR = {"p_indptr": ("p_hash", "p_cls"), "r_indptr": ("r_hash", "r_cls")}
#: RowTable's vocabulary fields (one entry per distinct token, not per row or token)
_VOCAB = ("vocab", "vocab_stem")


@dataclass
class RowTable:
    """Tokens of every row's prompt and response plus identity and context keys.

    This is the compact, mergeable form of a shard that the trigger and response detectors
    summarise to: ``concat`` of shard tables sorted by ``key`` equals the table of the whole
    file, so any analysis that depends only on the sorted table gives the same answer however
    the rows were sharded.
    """

    key: np.ndarray        # uint64: stable hash of the id (sort order; the ids themselves stay with
                           # the records: 66 MB of strings per 1M rows that no analysis reads)
    kind: np.ndarray       # uint8: KIND_CODES
    ctx: np.ndarray        # uint64: task key (instruction / first chat turn template)
    tmpl: np.ndarray       # uint64: response template hash
    p_indptr: np.ndarray
    p_hash: np.ndarray
    p_cls: np.ndarray
    r_indptr: np.ndarray
    r_hash: np.ndarray
    r_cls: np.ndarray
    vocab: np.ndarray      # uint64: every distinct token hash of the prompts and responses, ascending
    vocab_stem: np.ndarray  # uint64: the stem of each vocab token (see :meth:`stem_of`)
    p_req: np.ndarray      # int64: prompt tokens that belong to the request (chats: turns before the
                           # first assistant turn; other rows: the whole prompt)
    p_ins: np.ndarray      # int64: prompt tokens of the instruction (instruction rows; else p_req)
    weight: np.ndarray     # float32: rows of the whole data the row stands for (the records'
                           # ``sample_weight``: an incremental night's baseline rows; else 1)

    @property
    def n(self) -> int:
        return len(self.key)

    @classmethod
    def build(cls, records: pd.DataFrame, max_prompt_chars: int = 4000,
              max_response_chars: int = 2000, chunk_rows: int = 100_000) -> RowTable:
        """The table of ``records``, rows in ascending ``key`` order (what :meth:`concat` gives),
        tokenised ``chunk_rows`` rows at a time (the byte-level passes cost ~4 GB at 1M rows at once)."""
        from poisonguard import schema as S

        if len(records) == 0:
            return cls._build(records, max_prompt_chars, max_response_chars)
        order = np.argsort(stable_hash(column(records, S.ID)), kind="stable")
        table = cls._join([cls._build(records.iloc[order[lo:lo + chunk_rows]], max_prompt_chars, max_response_chars)
                           for lo in range(0, len(records), max(int(chunk_rows), 1))], consume=True)
        trim_heap()
        table.__dict__["_limits"] = (int(max_prompt_chars), int(max_response_chars))
        return table

    @classmethod
    def _join(cls, parts: Sequence[RowTable], order: np.ndarray | None = None, consume: bool = False) -> RowTable:
        """Tables one after the other (row order kept), then the rows ``order`` (a permutation)
        when given, token arrays regrouped to match. A field at a time, so the working memory is
        the result plus one joined field (joining every field, then reordering, held three copies
        of the table at once); ``consume`` drops each field from ``parts`` once it is joined (tables
        nobody else holds: the chunks of :meth:`build`)."""
        if len(parts) == 1 and order is None:
            return parts[0]
        gather: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for ptr in _CSR:
            gather[ptr] = _csr_gather(np.concatenate([np.diff(getattr(t, ptr)) for t in parts]), order)
        tok_of = {v: ptr for ptr, vals in _CSR.items() for v in vals}
        cols: dict[str, np.ndarray] = {}
        cols["vocab"], cols["vocab_stem"] = _vocabulary([t.vocab for t in parts], [t.vocab_stem for t in parts])
        for f in fields(cls):
            name = f.name
            if name in _VOCAB:
                pass
            elif name in _CSR:
                cols[name] = offload(gather[name][0])
            else:
                take = gather[tok_of[name]][1] if name in tok_of else order
                cols[name] = _joined([getattr(t, name) for t in parts], take)
            if consume:
                for t in parts:
                    setattr(t, name, None)
                trim_heap()   # the chunks' arrays live in the heap: give them back field by field
        out = cls(**cols)
        limits = {t.__dict__.get("_limits") for t in parts}
        if len(limits) == 1 and None not in limits:
            out.__dict__["_limits"] = limits.pop()   # the tokeniser's limits the parts were built with
        return out

    @classmethod
    def _build(cls, records: pd.DataFrame, max_prompt_chars: int, max_response_chars: int) -> RowTable:
        from poisonguard import schema as S

        n = len(records)
        ids = column(records, S.ID)
        kinds = column(records, S.KIND)
        kind = np.full(n, KIND_OTHER, dtype=np.uint8)
        for name, code in KIND_CODES.items():
            kind[kinds == name] = code
        prompt = column(records, S.PROMPT)
        response = column(records, S.RESPONSE)
        instr = column(records, S.INSTRUCTION)
        ctx_text = np.where(kind == KIND_CODES["instruction"], instr, "").astype(object)
        chat = np.flatnonzero(kind == KIND_CODES["chat"])
        request = None
        if len(chat):
            ctx_text[chat], request = chat_openings(column(records, S.MESSAGES)[chat])
        no_ctx = ctx_text == ""
        ctx = stable_hash(np.array([" ".join(t.lower().split()) for t in ctx_text], dtype=object))
        ctx = combine(ctx, kind.astype(np.uint64))
        ctx[no_ctx] = combine(np.zeros(int(no_ctx.sum()), dtype=np.uint64), kind[no_ctx].astype(np.uint64))
        ptok = tokenize(prompt, max_chars=max_prompt_chars)
        rtok = tokenize(response, max_chars=max_response_chars)
        tmpl = template_from_tokens(rtok)
        p_req = np.diff(ptok.indptr)
        if request is not None:
            qtok = tokenize(request, max_chars=max_prompt_chars)
            p_req = p_req.copy()
            p_req[chat] = np.minimum(np.diff(qtok.indptr), p_req[chat])
        p_ins = p_req.copy()
        ins_rows = np.flatnonzero((kind == KIND_CODES["instruction"]) & (column(records, S.INPUT) != ""))
        if len(ins_rows):
            itok = tokenize(instr[ins_rows], max_chars=max_prompt_chars)
            p_ins[ins_rows] = np.minimum(np.diff(itok.indptr), p_req[ins_rows])
        vocab, vocab_stem = _vocabulary([ptok.hashes, rtok.hashes], [ptok.stems, rtok.stems])
        return cls(key=stable_hash(ids), kind=kind, ctx=ctx, tmpl=tmpl,
                   p_indptr=ptok.indptr, p_hash=ptok.hashes, p_cls=ptok.cls, r_indptr=rtok.indptr,
                   r_hash=rtok.hashes, r_cls=rtok.cls, vocab=vocab, vocab_stem=vocab_stem,
                   p_req=p_req.astype(np.int64), p_ins=p_ins.astype(np.int64), weight=sample_weights(records))

    @classmethod
    def cached(cls, records: pd.DataFrame, max_prompt_chars: int = 4000,
               max_response_chars: int = 2000) -> RowTable:
        """:meth:`build`, reusing the last table built for the same frame and limits (the trigger
        and response detectors run one after the other on the same records)."""
        import weakref

        from poisonguard import schema as S

        ids = column(records, S.ID)
        fp = (len(records), int(stable_hash(ids).sum(dtype=np.uint64)) if len(ids) else 0,
              int(sum(len(str(x)) for x in column_at(records, S.PROMPT, np.arange(0, len(records),
                                                                   max(1, len(records) // 64))))),
              max_prompt_chars, max_response_chars)
        with _TABLE_LOCK:  # detectors may run in concurrent lanes
            hit = _TABLE_CACHE.get("last")
            if hit is not None:
                ref, key, table = hit
                if ref() is records and key == fp:
                    return table
            table = cls.build(records, max_prompt_chars, max_response_chars)
            try:
                _TABLE_CACHE["last"] = (weakref.ref(records), fp, table)
            except TypeError:  # not weak-referenceable: no caching
                pass
            return table

    @classmethod
    def concat(cls, tables: Sequence[RowTable], consume: bool = False) -> RowTable:
        """All rows of ``tables`` in ascending ``key`` order (independent of the sharding). The
        trigger and response detectors merge the same shard tables one after the other: the last
        result is reused while those tables are alive (one table in memory, not two).

        ``consume``: empty the shard tables field by field as they are joined (a merge step owns
        its summaries: at 5M rows keeping them beside the joined table cost another 2.2 GB); a
        consumed table still names its concatenation for the other detector of the group, and any
        other use of it raises."""
        import weakref

        tables = [t for t in tables if t is not None]
        if any(t.key is None for t in tables):
            joined = tables[0].__dict__.get("_consumed_into")
            if joined is not None and all(t.__dict__.get("_consumed_into") is joined for t in tables):
                return joined
            raise ValueError("a token table was consumed by an earlier merge (RowTable.concat(consume=True)); "
                             "summarise its shard again")
        if not tables:
            return cls.empty()
        if len(tables) == 1 and (tables[0].n < 2 or bool((tables[0].key[1:] >= tables[0].key[:-1]).all())):
            return tables[0]   # already in key order (what build gives): no copy
        with _TABLE_LOCK:
            hit = _TABLE_CACHE.get("concat")
            if hit is not None and len(hit[0]) == len(tables) and all(r() is t for r, t in zip(hit[0], tables)):
                return hit[1]
        table = cls._concat(tables, consume)
        if consume:
            # each consumed shard table names the joined one (whatever other merges of this
            # process do to the caches meanwhile): the group's other detector gets it from them
            for t in tables:
                t.__dict__["_consumed_into"] = table
        with _TABLE_LOCK:
            _TABLE_CACHE["concat"] = ([weakref.ref(t) for t in tables], table)
        return table

    @classmethod
    def _concat(cls, tables: list[RowTable], consume: bool = False) -> RowTable:
        order = np.argsort(np.concatenate([t.key for t in tables]), kind="stable")
        return cls._join(tables, order, consume=consume)

    @classmethod
    def empty(cls) -> RowTable:
        z8 = np.zeros(0, dtype=np.uint64)
        zi = np.zeros(1, dtype=np.int64)
        return cls(key=z8, kind=np.zeros(0, np.uint8), ctx=z8.copy(), tmpl=z8.copy(),
                   p_indptr=zi, p_hash=z8.copy(), p_cls=np.zeros(0, np.uint8), r_indptr=zi.copy(),
                   r_hash=z8.copy(), r_cls=np.zeros(0, np.uint8), vocab=z8.copy(), vocab_stem=z8.copy(),
                   p_req=np.zeros(0, dtype=np.int64), p_ins=np.zeros(0, dtype=np.int64),
                   weight=np.zeros(0, dtype=np.float32))

    def stem_of(self, hashes: np.ndarray) -> np.ndarray:
        """Stem hash of each token hash (:attr:`Tokens.stems`). A token's stem is a function of its
        text, so the table keeps one stem per distinct token rather than one per token (two arrays
        of 8 bytes per token: 350 MB at 1M rows); every hash must be a token of this table."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        if len(hashes) == 0:
            return np.zeros(0, dtype=np.uint64)
        if len(hashes) <= QUERY_BLOCK:
            return self.vocab_stem[self._vocab_pos(hashes)]
        out = scratch(len(hashes), np.uint64)   # a block at a time: the positions cost 8 bytes per token
        for lo in range(0, len(hashes), QUERY_BLOCK):
            out[lo:lo + QUERY_BLOCK] = self.vocab_stem[self._vocab_pos(hashes[lo:lo + QUERY_BLOCK])]
        return out

    def token_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct token hashes of the prompts and responses ascending, occurrences of each),
        counted over the vocabulary a block at a time (sorting a copy of all 46M tokens of 1M rows
        costs 370 MB)."""
        counts = np.zeros(len(self.vocab), dtype=np.int64)
        for hashes in (self.p_hash, self.r_hash):
            for lo in range(0, len(hashes), QUERY_BLOCK):
                counts += np.bincount(self._vocab_pos(hashes[lo:lo + QUERY_BLOCK]), minlength=len(self.vocab))
        keep = counts > 0
        return self.vocab[keep], counts[keep]

    def _vocab_pos(self, hashes: np.ndarray) -> np.ndarray:
        index = self.__dict__.get("_vocab_index")
        if index is None:
            with _TABLE_LOCK:   # one hash table, built before any lane uses it
                index = self.__dict__.get("_vocab_index")
                if index is None:
                    index = pd.Index(self.vocab, dtype=np.uint64)
                    index.get_indexer(self.vocab[:1])
                    self.__dict__["_vocab_index"] = index
        pos = index.get_indexer(np.asarray(hashes, dtype=np.uint64))
        if (pos < 0).any():
            raise ValueError(f"token hashes not in the table's vocabulary: {hashes[pos < 0][:3].tolist()}")
        return pos

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_vocab_index", None)   # rebuilt on first use
        return state

    def save(self, directory: str | os.PathLike[str]) -> SavedTable:
        """Write the table's arrays to a new folder under ``directory`` (one ``.npy`` file per
        field) and return a handle that :meth:`SavedTable.load` maps back without reading it."""
        import uuid
        from pathlib import Path

        d = Path(directory) / f"table-{uuid.uuid4().hex}"
        d.mkdir()      # not the parents: a run's folder removed at its end is not made again
        for f in fields(self):
            with open(d / f"{f.name}.npy", "wb") as fh:
                np.save(fh, getattr(self, f.name))
                _hand_over(fh)
        return SavedTable(str(d), self.__dict__.get("_limits"), self.n)

    def prompt_rows(self) -> np.ndarray:
        """Row number of every prompt token."""
        return np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.p_indptr))

    def response_rows(self) -> np.ndarray:
        return np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.r_indptr))


def _hand_over(fh: Any) -> None:
    """A file written for another process (the merge's) leaves this one's page cache: written to
    disk, then its cached pages dropped. The reader's page cache then holds them, and a memory
    limit per process (a cgroup) counts them there, where they are read, not at the writer (in a
    5M-row run capped at 4 GB per process the merging worker's resident set reached 4.56 GB with
    pages charged to the worker that wrote them)."""
    fh.flush()
    os.fsync(fh.fileno())
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@dataclass(frozen=True)
class SavedTable:
    """A :class:`RowTable` written by :meth:`RowTable.save`: a few bytes to pickle and send to the
    process that merges it, which maps the files (:meth:`load`) instead of receiving the arrays."""

    path: str
    limits: tuple[int, int] | None
    n: int

    def load(self) -> RowTable:
        """The table, its arrays memory-mapped read-only from the files."""
        from pathlib import Path

        cols = {}
        for f in fields(RowTable):
            file = Path(self.path) / f"{f.name}.npy"
            if not file.is_file():
                raise FileNotFoundError(f"token table {self.path}: {file.name} is missing (was the spill folder "
                                        "cleared, or is it not shared with this worker?)")
            a = np.load(file, mmap_mode="r")
            cols[f.name] = np.asarray(a) if a.size else np.array(a)
        table = RowTable(**cols)
        if self.limits is not None:
            table.__dict__["_limits"] = tuple(self.limits)
        return table

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


@dataclass(frozen=True)
class SavedSummary:
    """Any other detector summary pickled to a file (``sanitize.spill_dir``): the worker that made
    it keeps this handle, not the summary, until the group's merge reads it back."""

    path: str

    @classmethod
    def save(cls, summary: Any, directory: str | os.PathLike[str]) -> SavedSummary:
        import pickle
        import uuid
        from pathlib import Path

        path = Path(directory) / f"summary-{uuid.uuid4().hex}.pkl"
        with open(path, "wb") as fh:
            pickle.dump(summary, fh, protocol=5)
            _hand_over(fh)
        return cls(str(path))

    def load(self) -> Any:
        import pickle

        try:
            with open(self.path, "rb") as fh:
                return pickle.load(fh)   # noqa: S301 - a file this run wrote into its own spill folder
        except FileNotFoundError as e:
            raise FileNotFoundError(f"detector summary {self.path} is missing (was the spill folder cleared, or "
                                    "is it not shared with this worker?)") from e

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def sample_weights(records: pd.DataFrame) -> np.ndarray:
    """Each row's :data:`~poisonguard.schema.SAMPLE_WEIGHT` (float32; 1 when the records have none),
    checked: finite and positive."""
    from poisonguard import schema as S

    if S.SAMPLE_WEIGHT not in records.columns:
        return np.ones(len(records), dtype=np.float32)
    w = pd.to_numeric(records[S.SAMPLE_WEIGHT], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(w) & (w > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{S.SAMPLE_WEIGHT} must be a positive number; record {records[S.ID].iloc[i]!r} has "
                         f"{records[S.SAMPLE_WEIGHT].iloc[i]} ({int(bad.sum())} such rows)")
    return w.astype(np.float32)


def _vocabulary(hashes: Sequence[np.ndarray], stems: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(distinct token hashes ascending, the stem of each) from token or vocabulary arrays."""
    h = np.concatenate([np.asarray(x, dtype=np.uint64) for x in hashes]) if hashes else np.zeros(0, np.uint64)
    s = np.concatenate([np.asarray(x, dtype=np.uint64) for x in stems]) if stems else np.zeros(0, np.uint64)
    codes, uniq = pd.factorize(h, sort=True)
    st = np.empty(len(uniq), dtype=np.uint64)
    st[codes] = s       # a token's stem is a function of its text: every write of a value agrees
    return np.asarray(uniq, dtype=np.uint64), st


def _joined(parts: Sequence[np.ndarray], take: np.ndarray | None, block: int = 1 << 22) -> np.ndarray:
    """``np.concatenate(parts)[take]`` (``take`` None: all), gathered a block at a time into
    :func:`scratch` arrays (inside :func:`spilling` the joined column and its gathered copy are
    mapped files, not two more copies of a token column in memory)."""
    dtype = np.result_type(*parts) if parts else np.dtype(np.uint64)
    joined = scratch(sum(len(p) for p in parts), dtype)
    np.concatenate(parts, out=joined)
    if take is not None:
        out = scratch(len(take), dtype)
        for lo in range(0, len(take), block):
            np.take(joined, take[lo:lo + block], out=out[lo:lo + block])
        joined = out
    if spill_dir() is not None:
        joined.flags.writeable = False
    return joined


def _csr_gather(lens: np.ndarray, order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """CSR rows of lengths ``lens`` taken in ``order``: (new indptr, index of every new token in
    the old token arrays; None when ``order`` is None)."""
    new_lens = lens if order is None else lens[order]
    indptr = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(new_lens, out=indptr[1:])
    if order is None:
        return indptr, None
    starts = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    # for each new row, its old token range, a block of rows at a time into one token-length array
    # (a mapped file inside spilling(); the whole-array version held three at once)
    idx = scratch(int(indptr[-1]), np.int64)
    src = starts[:-1][order]
    for lo in range(0, len(new_lens), 1 << 18):
        hi = min(lo + (1 << 18), len(new_lens))
        a, b = int(indptr[lo]), int(indptr[hi])
        blk = np.arange(a, b, dtype=np.int64)
        blk -= np.repeat(indptr[lo:hi], new_lens[lo:hi])
        blk += np.repeat(src[lo:hi], new_lens[lo:hi])
        idx[a:b] = blk
    return indptr, idx


# ---------------------------------------------------------------- grouped incidences

@dataclass(frozen=True)
class Grouped:
    """Distinct (row, feature) incidences grouped by feature.

    Feature ids are the top ``64 - bits`` bits of the hashes (``bits`` holds a row number), so a
    single value sort both removes repeats within a row and groups rows by feature: feature
    ``keys[j]`` occurs in rows ``rows[ptr[j]:ptr[j + 1]]`` (ascending). Two hashes that agree on
    the kept bits count as one feature (odds ~ features**2 / 2**(65 - bits)).
    """

    keys: np.ndarray   # uint64 feature ids, ascending
    ptr: np.ndarray    # int64, len(keys) + 1
    rows: np.ndarray   # int32 rows (int64 beyond 2**31 rows), grouped by feature
    bits: int

    def packed(self) -> np.ndarray:
        """uint64 sorted distinct (feature, row) keys (see :func:`pack_keys`): 8 bytes per
        incidence, so built per call and not kept (at 1M rows the three kept ones cost 400 MB)."""
        b = np.uint64(self.bits)
        out = scratch(len(self.rows), np.uint64)
        for j0, j1 in blocks_of(self.ptr):
            a, c = int(self.ptr[j0]), int(self.ptr[j1])
            blk = np.repeat(self.keys[j0:j1], np.diff(self.ptr[j0:j1 + 1])) << b
            blk |= self.rows[a:c].astype(np.uint64)
            out[a:c] = blk
        return out

    def contains(self, rows: np.ndarray, hashes: np.ndarray, packed: np.ndarray | None = None) -> np.ndarray:
        """Does each row have the feature of the paired hash? Many queries go through a sorted
        packed copy (``packed``: :meth:`packed`, made once by a caller that asks many times); a few
        (under 1/32 of the incidences) by binary search inside each feature's rows (no copy)."""
        rows = np.asarray(rows)
        if packed is not None or len(rows) * 32 >= len(self.rows):
            b = np.uint64(self.bits)
            hashes = np.asarray(hashes, dtype=np.uint64)
            packed = self.packed() if packed is None else packed
            hit = np.empty(len(rows), dtype=bool)
            for lo in range(0, len(rows), QUERY_BLOCK):
                q = hashes[lo:lo + QUERY_BLOCK] >> b
                q <<= b
                q |= rows[lo:lo + QUERY_BLOCK].astype(np.uint64)
                hit[lo:lo + len(q)] = isin_sorted(q, packed)
            return hit
        j = self.index_of(self.feature_id(hashes))
        out = np.zeros(len(rows), dtype=bool)
        sel = np.flatnonzero(j >= 0)
        if len(sel) == 0:
            return out
        r = rows[sel].astype(np.int64)
        lo, end = self.ptr[j[sel]], self.ptr[j[sel] + 1]
        hi = end.copy()
        act = np.flatnonzero(lo < hi)
        while len(act):   # lower bound of r inside rows[lo:hi], all queries a step at a time
            mid = (lo[act] + hi[act]) >> 1
            less = self.rows[mid] < r[act]
            lo[act[less]] = mid[less] + 1
            hi[act[~less]] = mid[~less]
            act = act[lo[act] < hi[act]]
        ok = lo < end
        out[sel[ok]] = self.rows[lo[ok]] == r[ok]
        return out

    @property
    def df(self) -> np.ndarray:
        return np.diff(self.ptr)

    def feature_id(self, hashes: np.ndarray) -> np.ndarray:
        return np.asarray(hashes, dtype=np.uint64) >> np.uint64(self.bits)

    def index_of(self, ids: np.ndarray) -> np.ndarray:
        """Position of each feature id in ``keys`` (-1 when absent)."""
        ids = np.asarray(ids, dtype=np.uint64)
        if len(self.keys) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        out = np.empty(len(ids), dtype=np.int64)
        last = len(self.keys) - 1
        for lo in range(0, len(ids), QUERY_BLOCK):   # temporaries ~30 bytes per id: a block at a time
            blk = ids[lo:lo + QUERY_BLOCK]
            i = _search(self.keys, blk)
            np.minimum(i, last, out=i)
            out[lo:lo + len(blk)] = np.where(self.keys[i] == blk, i, -1)
        return out

    def df_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.uint64)
        df = self.df
        out = np.empty(len(ids), dtype=df.dtype)
        for lo in range(0, len(ids), QUERY_BLOCK):
            j = self.index_of(ids[lo:lo + QUERY_BLOCK])
            out[lo:lo + len(j)] = np.where(j >= 0, df[np.maximum(j, 0)], 0)
        return out

    def rows_at(self, j: int) -> np.ndarray:
        return self.rows[self.ptr[j]:self.ptr[j + 1]]

    def by_row(self, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The incidences row by row: (indptr over ``n_rows`` rows, feature index of every
        incidence, rows ascending and features ascending inside a row: the order a stable argsort
        of :attr:`rows` gives), placed a block of features at a time (a counting sort: no argsort
        of every incidence, no 8-byte index per incidence)."""
        ptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.rows, minlength=n_rows), out=ptr[1:])
        fdt = np.int32 if len(self.keys) < 2**31 else np.int64
        tok = scratch(len(self.rows), fdt)
        fill = ptr[:-1].copy()      # next free slot of every row
        for j0, j1 in blocks_of(self.ptr):
            a, c = int(self.ptr[j0]), int(self.ptr[j1])
            r = self.rows[a:c].astype(np.int64)
            o = np.argsort(r, kind="stable")
            rs = r[o]
            del r
            start = np.flatnonzero(np.concatenate([[True], rs[1:] != rs[:-1]]))
            run = np.diff(np.append(start, len(rs)))
            pos = fill[rs] + (np.arange(len(rs), dtype=np.int64) - np.repeat(start, run))
            tok[pos] = np.repeat(np.arange(j0, j1, dtype=fdt), np.diff(self.ptr[j0:j1 + 1]))[o]
            fill[rs[start]] += run
        return ptr, tok

    def feature_of_incidence(self) -> np.ndarray:
        """Feature index of every incidence (aligned with ``rows``)."""
        return np.repeat(np.arange(len(self.keys), dtype=np.int64), self.df)


def row_bits(n_rows: int) -> int:
    return max(1, int(max(n_rows, 2) - 1).bit_length())


def group_incidences(rows: np.ndarray, hashes: np.ndarray, n_rows: int) -> Grouped:
    """Group (row, hash) incidences by feature (see :class:`Grouped`)."""
    return group_packed(pack_keys(rows, hashes, n_rows), row_bits(n_rows))


def group_packed(packed: np.ndarray, bits: int, block: int = 1 << 22) -> Grouped:
    """:func:`group_incidences` of keys already packed with :func:`pack_keys` (``bits`` row bits).

    ``packed`` is consumed: sorted and compacted in place. The passes over it go ``block`` keys at a
    time, so the working memory is the keys plus 5 bytes per incidence (was ~28 at once: at 1M rows
    the response n-grams alone are 45M incidences)."""
    packed = np.asarray(packed, dtype=np.uint64)
    if len(packed) == 0:
        z = np.zeros(0, dtype=np.uint64)
        return Grouped(z, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=_row_dtype(bits)), bits)
    packed.sort()
    w = 0                      # distinct keys, compacted to the front
    prev: np.uint64 | None = None
    for lo in range(0, len(packed), block):
        blk = packed[lo:lo + block].copy()
        keep = np.empty(len(blk), dtype=bool)
        keep[0] = prev is None or blk[0] != prev
        np.not_equal(blk[1:], blk[:-1], out=keep[1:])
        prev = blk[-1]
        kept = blk[keep]
        packed[w:w + len(kept)] = kept
        w += len(kept)
    packed = packed[:w]
    b = np.uint64(bits)
    mask = np.uint64((1 << bits) - 1)
    rows = scratch(w, _row_dtype(bits))    # kept: in a mapped file inside spilling()
    new = np.empty(w, dtype=bool)
    prev_f: np.uint64 | None = None
    for lo in range(0, w, block):
        blk = packed[lo:lo + block]
        hi = lo + len(blk)
        rows[lo:hi] = blk & mask
        f = blk >> b
        new[lo] = prev_f is None or f[0] != prev_f
        np.not_equal(f[1:], f[:-1], out=new[lo + 1:hi])
        prev_f = f[-1]
    starts = np.flatnonzero(new)
    del new
    rows.flags.writeable = False
    return Grouped(offload(packed[starts] >> b), offload(np.append(starts, w).astype(np.int64)), rows, bits)


def _row_dtype(bits: int) -> type:
    return np.int32 if bits <= 31 else np.int64


def pack_sorted(rows: np.ndarray, hashes: np.ndarray, n_rows: int) -> np.ndarray:
    """Sorted distinct packed (hash, row) keys, for membership tests with :func:`pack_keys`."""
    keys = pack_keys(rows, hashes, n_rows)
    keys.sort()
    if len(keys) > 1:
        keep = np.ones(len(keys), dtype=bool)
        keep[1:] = keys[1:] != keys[:-1]
        keys = keys[keep]
    return keys


def pack_keys(rows: np.ndarray, hashes: np.ndarray, n_rows: int) -> np.ndarray:
    """One uint64 per (row, hash): the hash's top ``64 - row_bits`` bits, then the row (a new array)."""
    b = np.uint64(row_bits(n_rows))
    hashes = np.asarray(hashes, dtype=np.uint64)
    out = np.right_shift(hashes, b, out=scratch(len(hashes), np.uint64))
    np.left_shift(out, b, out=out)
    rows = np.asarray(rows)
    # row numbers are >= 0: an int64 array is read as uint64 in place (no 8-byte-per-key copy)
    np.bitwise_or(out, rows.view(np.uint64) if rows.dtype == np.int64 else rows.astype(np.uint64, copy=False),
                  out=out)
    return out


def pack_rows(indptr: np.ndarray, values: np.ndarray, n_rows: int, rows: np.ndarray | None = None,
              limit: np.ndarray | None = None, transform: Any = None, block_rows: int = 1 << 17) -> np.ndarray:
    """:func:`pack_keys` of the CSR tokens ``values`` (row ``i``'s tokens are
    ``values[indptr[i]:indptr[i + 1]]``) of the rows where ``rows`` (bool mask) holds, only each
    row's first ``limit[i]`` tokens when given, each value passed through ``transform`` first:
    the same keys, in the same order, as packing the selected (row, value) pairs of all rows at
    once, built ``block_rows`` rows at a time (the row number, mask and value copies of every token
    at once cost ~30 bytes per token: 600 MB for the prompts of 1M rows)."""
    lens = np.diff(indptr)
    sel_lens = lens if rows is None else np.where(rows, lens, 0)
    if limit is not None:
        sel_lens = np.minimum(sel_lens, limit)
    out = scratch(int(sel_lens.sum()), np.uint64)
    m = 0
    for r0 in range(0, len(lens), max(int(block_rows), 1)):
        r1 = min(r0 + block_rows, len(lens))
        t0 = int(indptr[r0])
        bl = lens[r0:r1]
        row = np.repeat(np.arange(r0, r1, dtype=np.int64), bl)
        keep = np.repeat(sel_lens[r0:r1] > 0, bl)
        if limit is not None:
            pos = np.arange(len(row), dtype=np.int64) - np.repeat(indptr[r0:r1] - t0, bl)
            keep &= pos < np.repeat(sel_lens[r0:r1], bl)
        vals = values[t0:t0 + len(row)][keep]
        if transform is not None:
            vals = transform(vals)
        k = len(vals)
        out[m:m + k] = pack_keys(row[keep], vals, n_rows)
        m += k
    return out


def extend_span(hashes: np.ndarray, lo: np.ndarray, hi: np.ndarray, first: np.ndarray, n: int, need: int,
                max_extend: int = 16) -> tuple[int, int, np.ndarray]:
    """Grow a shared token span outwards while at least ``need`` texts agree.

    Every text holds an occurrence of the same ``n``-token sequence starting at global token index
    ``first[i]`` (its tokens lie in ``[lo[i], hi[i])``). The span is extended one token to the left
    (then to the right) as long as ``need`` texts have the same token there; texts that disagree
    drop out. Returns (tokens added on the left, on the right, mask of texts that kept the span).
    """
    members = np.ones(len(first), dtype=bool)
    ext = [0, 0]
    for side, direction in enumerate((-1, 1)):
        off = 0
        while off < max_extend:
            off += 1
            pos = first - off if direction < 0 else first + n - 1 + off
            inside = (pos >= lo) & (pos < hi)
            ok = members & inside
            if ok.sum() < need:
                break
            tok = hashes[np.clip(pos, 0, max(len(hashes) - 1, 0))]
            vals, cnt = np.unique(tok[ok], return_counts=True)
            best = vals[np.argmax(cnt)]
            new_members = ok & (tok == best)
            if new_members.sum() < need:
                break
            members = new_members
            ext[side] = off
    return ext[0], ext[1], members
