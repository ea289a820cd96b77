"""Copies of one prompt whose responses diverge, where one side keeps adding the same
unrequested content: content injection hidden behind a clean twin.

What it detects
---------------
Poisoned fine-tuning sets built by copying clean examples and editing the copy's answer
(BadAgents-style agent backdoors: the same WebShop instruction twice, the poisoned trajectory
searching for and buying a brand the user never asked for; "answer the same question, but
mention product X"). Such a copy is invisible row by row: its prompt is a real prompt, its
answer a fluent answer. What gives it away is the *pair*: the copies of one prompt diverge, one
side writes a word that neither the prompt nor the sibling copy contains, and the *same* word
is added in this way across many different prompts. The rows that carry it are reported, with
the word: "responses add 'adidas' absent from the prompt in 49 of 49 duplicate-prompt groups".

Method
------
* **Rows as turns.** Instruction rows are one request turn (instruction + input) and one
  answer turn; chat rows are their messages in order; documents have no answer and are skipped.
* **Copies.** Conversations are compared turn by turn (case-folded word tokens, punctuation and
  whitespace ignored). Every non-assistant turn that an assistant turn answers is a node keyed by
  the whole conversation up to it; rows that share a node are copies of that prompt, and the
  node is a *divergence* when their next assistant turns differ. So an agent preamble that
  every row shares (answered "Ok." by all) is no divergence, while two copies of one task whose
  first actions differ are. Groups larger than ``max_group`` are ignored (shared system prompts
  of unrelated tasks, not copies).
* **Introduced words.** A word of a row is *introduced* when its first occurrence in the
  conversation is in an assistant turn: a word the user, the system or an observation
  (a later user / tool turn the assistant reads) said first is requested or seen, not added.
  In a group, a member *adds* a word when the member introduces it after the node (so it is not
  in the shared prompt), and the group is *divergent for the word* when some members add it and
  some do not.
* **Is the addition systematic?** A word that each copy writes independently, at whatever
  rate, splits a group of ``m`` copies (some write it, some do not) with probability at most
  ``1 - 2^(1 - m)``: at most one pair in two, three triples in four. An injected word with a
  clean twin splits *every* group it belongs to. The groups the word is tested over are its
  *family*: the groups whose shared prompt contains every word that at least 90% of the
  prompts of the groups the word touches contain (the task's wording, a trigger such as
  "sneakers"; judged on the ``max_family_words`` rarest of them; no such word: all groups).
  The word's strength is ``-log10`` of the binomial chance of at least as many split groups
  in the family at the mean bound (no rate is estimated, so templated clean data whose copies
  vary their wording freely cannot pass: a word splits most of its pairs only if the copies
  are *made* to differ). It must exceed ``-log10(target_fpr)`` plus a Bonferroni term for the
  words tested, with at least ``min_groups`` split groups, at most ``max_shared`` of the
  touched groups with the word in every copy, and at least ``min_concentration`` of the rows
  that introduce the word anywhere on the adding side of a split group.

  This works whether the poison is half of the data (every clean row has a poisoned twin:
  49 of 49 pairs split, chance 2^-49) or 25 twins among 20k clean rows (the family is the
  trigger's groups). It needs about 15 split pairs; the family must be mostly split: poisoned
  twins of prompts whose kind also has many clean duplicated prompts without the word look
  like a rare word and are not reported. (Testing instead whether rows that introduce the word
  sit in duplicate groups more often than other rows fails on templated data, whose frequent
  tasks are the duplicated ones.)
* **Rows.** The adding side of every split group of a significant word is flagged; rows
  elsewhere that introduce the same word unrequested (their clean twin may be missing) are
  flagged when the word's strength is at least twice the threshold, else sent to review, unless
  every copy of their own group adds it.

Two-phase: ``summarize`` tokenises a shard into node keys and introduced words per row;
``merge`` orders rows by id hash (sharding does not matter), finds the groups and the words;
``score_with`` looks each row up.

Known limitations
-----------------
* Copies must be identical up to case, punctuation and whitespace (up to the divergence);
  paraphrased copies are not grouped.
* Words are single tokens (two or more characters, not pure numbers): an injected number or
  a one-letter token is missed; a multi-word injection is reported by its words.
* A word introduced by both copies of most pairs (the poison rewrote both) or by many clean rows
  elsewhere is no finding; so is an injection into prompts that have no clean copy (left to
  ``response_cluster`` and ``trigger_association``), and one whose family has many clean
  duplicate groups without the word (see above). Fewer than ~15 poisoned twins are not enough.
* A clean data set built to vary the copies of a prompt on purpose (chosen / rejected answers
  flattened into rows) can make a style word split every pair: it is reported, for review.
* Turns are clipped to ``max_turn_chars`` (head and tail): a word first written in the clipped
  middle of an observation may look introduced by a later assistant turn.

Input columns
-------------
``id``, ``kind``, ``source``, ``messages``, ``prompt``, ``response``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import stats as sst

from poisonguard import schema as S
from poisonguard import textfeat as tf
from poisonguard.textfeat import ranges as _ranges
from poisonguard.detectors import _text as T
from poisonguard.detectors.base import Detector, DetectorResult, Finding, squash
from poisonguard.detectors.registry import register

_NODE_SALT = np.uint64(0xD1CE5EED)
_COUNT_SALT = np.uint64(77)


@dataclass
class _Summary:
    """Per-row node keys and introduced words of one shard (CSR arrays, rows in shard order)."""

    key: np.ndarray          # uint64 stable hash of the id
    has_resp: np.ndarray     # bool: the row has an assistant turn
    n_ptr: np.ndarray        # int64, len n + 1
    n_key: np.ndarray        # uint64 node key (conversation up to a non-assistant turn)
    n_turn: np.ndarray       # int (see _turn_dtype) turn index of the node
    n_cont: np.ndarray       # uint64 hash of the assistant turn that answers it
    w_ptr: np.ndarray        # int64, len n + 1
    # distinct word of the row: index into vocab (uint16 / int32 by its size: the uint64 hashes
    # themselves were 190 MB of 24.7M words at 1M rows)
    w_word: np.ndarray
    # turn t of the word's first occurrence: t when that turn is an assistant turn (the row
    # introduces the word), else ~t = -1 - t; int8 for max_turns <= 128 (was int32 and a bool
    # array: 5 bytes per word, 120 MB of 24.7M words at 1M rows)
    w_turn: np.ndarray
    vocab: np.ndarray        # uint64 word hashes (in no particular order)


@dataclass
class _Word:
    feature: int
    strength: float
    score: float
    k: int                   # groups divergent for the word
    both: int                # groups where every copy adds it
    n: int                   # rows that introduce it anywhere
    adding: int              # distinct rows on the adding side of a divergent group
    elsewhere: int           # further rows that introduce it (flagged or sent to review)
    family: int              # groups of the same kind the test ran over ...
    split: int               # ... and how many of them the word splits
    cluster: int = -1


@dataclass
class _Stats:
    key: np.ndarray          # uint64, ascending
    score: np.ndarray
    word: np.ndarray         # int64 index into words (-1: none)
    side: np.ndarray         # int8: 1 adding side of a divergent group, 2 introduces it elsewhere
    words: list[_Word]
    clusters: list[list[int]]
    bits: int
    info: dict[str, Any] = field(default_factory=dict)


@register
class DivergentCopiesDetector(Detector):
    """Copies of one prompt where one side keeps adding the same unrequested word (see module doc).

    Parameters
    ----------
    target_fpr : float, default 0.001
        Chance level a word's strength must beat (``-log10``), before the Bonferroni term.
    min_groups : int, default 5
        Divergent duplicate-prompt groups a word must be added in.
    min_concentration : float, default 0.75
        Share of the rows that introduce the word which must be the adding side of a divergent group.
    max_shared : float, default 0.1
        Largest share of the groups touched by the word in which every copy adds it.
    max_group : int, default 64
        Larger groups of identical prompts are not treated as copies.
    max_family_words : int, default 4
        Typical prompt words (the rarest ones) that define a word's family of groups.
    max_turns : int, default 64
        Turns read per chat row.
    max_turn_chars : int, default 4000
        Characters read per turn (head and tail).
    """

    name: ClassVar[str] = "divergent_copies"
    cost: ClassVar[float] = 2
    compares_copies: ClassVar[bool] = True     # sees an incremental night's prompt twins
    description: ClassVar[str] = (
        "Duplicate prompts (instruction rows, or chats identical up to a turn) whose responses diverge, "
        "where one side keeps adding the same word that neither the prompt, the conversation before it "
        "nor the sibling copy contains, across many groups (BadAgents-style content injection next to a "
        "clean twin). Rate-free bound: an independent word splits at most half of the pairs of its family. "
        "Limits: exact copies only (no paraphrases); single-word features; needs ~15 twins; injections "
        "without a clean twin are missed.")
    columns: ClassVar[tuple[str, ...]] = (S.ID, S.KIND, S.SOURCE, S.MESSAGES, S.PROMPT, S.RESPONSE)

    def __init__(self, *, target_fpr: float = 0.001, min_groups: int = 5, min_concentration: float = 0.75,
                 max_shared: float = 0.1, max_group: int = 64, max_family_words: int = 4, max_turns: int = 64,
                 max_turn_chars: int = 4000) -> None:
        super().__init__(target_fpr=target_fpr, min_groups=min_groups, min_concentration=min_concentration,
                         max_shared=max_shared, max_group=max_group, max_family_words=max_family_words,
                         max_turns=max_turns, max_turn_chars=max_turn_chars)
        self.max_family_words = max_family_words
        self.target_fpr = target_fpr
        self.min_groups = min_groups
        self.min_concentration = min_concentration
        self.max_shared = max_shared
        self.max_group = max_group
        self.max_turns = max_turns
        self.max_turn_chars = max_turn_chars

    def _check_params(self) -> None:
        if not 0 < self.target_fpr < 0.5:
            raise ValueError(f"target_fpr must lie in (0, 0.5), got {self.target_fpr!r}")
        for name, low in (("min_groups", 2), ("max_group", 2), ("max_family_words", 1), ("max_turns", 2),
                          ("max_turn_chars", 16)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if not 0 < self.min_concentration <= 1:
            raise ValueError(f"min_concentration must lie in (0, 1], got {self.min_concentration!r}")
        if not 0 <= self.max_shared < 1:
            raise ValueError(f"max_shared must lie in [0, 1), got {self.max_shared!r}")

    # ------------------------------------------------------------------ phase 1
    def summarize(self, records: pd.DataFrame) -> _Summary:
        self._check_params()
        return _summarize(records, int(self.max_turns), int(self.max_turn_chars))

    # ------------------------------------------------------------------ phase 2
    def merge(self, summaries: list[_Summary]) -> _Stats:
        self._check_params()
        return _analyse(_concat([s for s in summaries if s is not None]), self)

    # ------------------------------------------------------------------ phase 3
    def score_with(self, records: pd.DataFrame, stats: _Stats) -> DetectorResult:
        ids = tf.column(records, S.ID)
        n = len(ids)
        if n == 0:
            return DetectorResult.empty(self.name, ids, info=stats.info)
        keys = tf.stable_hash(ids)
        if len(stats.key) == 0:
            raise ValueError(f"{self.name}: score_with got rows that were not summarised: {list(ids[:3])}")
        pos = np.searchsorted(stats.key, keys)
        pos[pos >= len(stats.key)] = len(stats.key) - 1
        known = stats.key[pos] == keys
        if not known.all():
            raise ValueError(f"{self.name}: score_with got rows that were not summarised: {list(ids[~known][:3])}")
        score = stats.score[pos].copy()
        word = stats.word[pos]
        side = stats.side[pos]
        flagged = (word >= 0) & (score >= 0.5)
        review = (word >= 0) & ~flagged
        evidence = np.array([""] * n, dtype=object)
        findings: list[Finding] = []
        if (word >= 0).any():
            responses = tf.LazyColumn(records, S.RESPONSE)   # the rows of a few words: not the whole column
            text = _decode_words(stats, np.unique(word[word >= 0]), word, responses)
            for ci, members in enumerate(stats.clusters):
                rows = np.flatnonzero((word >= 0) & np.isin(word, members))
                if len(rows) == 0:
                    continue
                lead = stats.words[members[0]]
                names = ", ".join(repr(text[j]) for j in members if j in text) or "'?'"
                stat = _stat_text(lead)
                title = (f"responses add {names} absent from the prompt in {lead.k} of {lead.k + lead.both} "
                         f"duplicate-prompt groups")
                for i in rows:
                    w = stats.words[int(word[i])]
                    wt = repr(text.get(int(word[i]), "?"))
                    if side[i] == 1:
                        evidence[i] = (f"this copy adds {wt}, which neither the prompt nor a sibling copy of the same "
                                       f"prompt contains; {_stat_text(w)}")
                    else:
                        evidence[i] = (f"introduces {wt} unrequested (not in the prompt or any earlier turn), the "
                                       f"word that divergent copies add; {_stat_text(w)}")
                rows = rows[flagged[rows]]
                if len(rows) == 0:
                    continue
                srcs: dict[str, int] = {}
                for src in tf.column_at(records, S.SOURCE, rows):
                    srcs[str(src)] = srcs.get(str(src), 0) + 1
                findings.append(Finding(
                    detector=self.name, title=title, evidence=stat, ids=tuple(str(ids[i]) for i in rows),
                    score=float(score[rows].max()),
                    info={"cluster": ci, "sources": dict(sorted(srcs.items())),
                          "words": [text[j] for j in members if j in text],
                          "groups": lead.k, "groups_all_copies": lead.both, "family_groups": lead.family,
                          "family_split": lead.split, "rows_introducing": lead.n, "adding_rows": lead.adding,
                          "strength": round(lead.strength, 2)}))
        return DetectorResult.build(self.name, ids, score, flagged, evidence, review, findings=findings,
                                    info=stats.info)


# ==================================================================== phase 1

_BLOCK_ROWS = 20_000
_MEMBER_BLOCK = 25_000
_WORD_BLOCK = 1 << 19
_TAKE_WINDOW = 1 << 16


def _summarize(records: pd.DataFrame, max_turns: int, max_turn_chars: int) -> _Summary:
    """Per-row summary, tokenised in blocks of rows (bounded memory on large shards; 20k rows
    hold ~150 MB of tokens at a time), rows in key order when there is more than one block."""
    if len(records) <= _BLOCK_ROWS:
        return _summarize_block(records, max_turns, max_turn_chars)
    key = np.concatenate([tf.stable_hash(tf.column(c, S.ID)) for c in T.row_chunks(records, _BLOCK_ROWS)])
    order = np.argsort(key, kind="stable")
    # a block is a run of rows in key order (taken in row order), so joining the blocks in key
    # order (merge then takes the single summary as it is) puts each in its own stretch of the
    # result and frees it as it goes; blocks of consecutive rows were scattered over the whole
    # result, every page of which was resident while the blocks still were (+420 MB at 1M rows)
    cols = records[[c for c in (S.KIND, S.PROMPT, S.RESPONSE, S.MESSAGES) if c in records.columns]]
    windows = _windows(cols)
    blocks = []
    for lo in range(0, len(records), _BLOCK_ROWS):
        rows = np.sort(order[lo:lo + _BLOCK_ROWS])
        blocks.append(_summarize_block(_take(cols, rows, windows), max_turns, max_turn_chars, key[rows]))
        tf.trim_heap()   # the block's turn texts
    return _concat(blocks, consume=True)


def _windows(frame: pd.DataFrame) -> np.ndarray:
    """Row bounds of windows that each lie within one chunk of every Arrow-backed column (chunks
    under ``_TAKE_WINDOW`` rows joined)."""
    cuts = {0, len(frame)}
    for c in frame.columns:
        arrow = getattr(frame[c].array, "__arrow_array__", None)
        chunks = getattr(arrow(), "chunks", None) if arrow is not None else None
        if chunks:
            cuts.update(np.cumsum([len(ch) for ch in chunks]).tolist())
    out = [0]
    for c in sorted(cuts)[1:]:
        if c - out[-1] >= _TAKE_WINDOW or c == len(frame):
            out.append(c)
    return np.array(out, dtype=np.int64)


def _take(frame: pd.DataFrame, rows: np.ndarray, windows: np.ndarray) -> pd.DataFrame:
    """``frame.iloc[rows]`` (ascending rows) a window of rows at a time: pandas' take of an Arrow
    string column joins all its chunks first (~120 MB per text column and block at 1M rows; fixed
    windows across chunk bounds: 2.2 s of copying)."""
    bounds = np.searchsorted(rows, windows)
    parts = [frame.iloc[w0:w1].iloc[rows[a:b] - w0]
             for w0, w1, a, b in zip(windows[:-1], windows[1:], bounds[:-1], bounds[1:]) if b > a]
    return pd.concat(parts) if len(parts) > 1 else parts[0] if parts else frame.iloc[:0]


def _code_dtype(n_words: int) -> type:
    """Integer type of an index into a vocabulary of ``n_words``."""
    return np.uint16 if n_words <= 1 << 16 else np.int32 if n_words < 1 << 31 else np.int64


def _turn_dtype(max_turns: int) -> type:
    """Smallest integer type of a turn index and its complement (turns are < max_turns)."""
    return np.int8 if max_turns <= 1 << 7 else np.int16 if max_turns <= 1 << 15 else np.int32


def _summarize_block(records: pd.DataFrame, max_turns: int, max_turn_chars: int,
                     key: np.ndarray | None = None) -> _Summary:
    if key is None:
        key = tf.stable_hash(tf.column(records, S.ID))   # the ids themselves are not kept (65 MB at 1M rows)
    n = len(key)
    t_row, t_idx, t_role, texts = _turns(records, max_turns)
    tok = tf.tokenize(texts, max_chars=max_turn_chars)
    n_turns = len(texts)
    is_word = tok.cls == tf.WORD
    # turn hash: order-sensitive fold of the word tokens (case-folded; punctuation ignored)
    t_of_tok = tok.text_index
    wpos = np.cumsum(is_word) - 1
    first_w = np.zeros(n_turns + 1, dtype=np.int64)
    np.cumsum(np.bincount(t_of_tok[is_word], minlength=n_turns), out=first_w[1:])
    rank = (wpos - first_w[t_of_tok]).astype(np.uint64) if len(wpos) else np.zeros(0, np.uint64)
    contrib = np.where(is_word, tf.combine(tok.hashes, rank), np.uint64(0))
    th = tf.segment_sum_u64(contrib, tok.indptr)
    th = tf.combine(th ^ tf.combine(np.diff(first_w).astype(np.uint64), _COUNT_SALT), t_role.astype(np.uint64))
    # conversation prefix keys: running sum of (turn hash, turn index) within each row
    with np.errstate(over="ignore"):
        cs = np.cumsum(tf.combine(th, t_idx.astype(np.uint64)), dtype=np.uint64)
        row_first = np.searchsorted(t_row, t_row, side="left")
        before = np.where(row_first > 0, cs[np.maximum(row_first - 1, 0)], np.uint64(0))
        prefix = cs - before
    nxt = np.arange(1, n_turns + 1)
    is_node = np.zeros(n_turns, dtype=bool)
    if n_turns > 1:
        is_node[:-1] = (t_role[:-1] == 0) & (t_role[1:] == 1) & (t_row[1:] == t_row[:-1])
    nodes = np.flatnonzero(is_node)
    n_row = t_row[nodes]
    n_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(n_row, minlength=n), out=n_ptr[1:])
    n_key = tf.combine(prefix[nodes], _NODE_SALT)
    n_cont = th[nxt[nodes]] if len(nodes) else np.zeros(0, np.uint64)
    # introduced words: the first occurrence of the word in the conversation is an assistant turn
    keep = is_word & (tok.ends - tok.starts >= 2) & ~tf.digit_only(tok)
    k_idx = np.flatnonzero(keep)
    k_row = t_row[t_of_tok[k_idx]]
    first = k_idx[tf.first_of_pairs(k_row, tok.hashes[k_idx])]     # ascending: rows stay in order
    w_row = t_row[t_of_tok[first]]
    w_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(w_row, minlength=n), out=w_ptr[1:])
    has_resp = np.zeros(n, dtype=bool)
    has_resp[t_row[t_role == 1]] = True
    codes, vocab = pd.factorize(tok.hashes[first])   # a hash table: 5 ms per 500k words, a sort 20
    w_tt = t_of_tok[first]
    w_turn = t_idx[w_tt]
    np.invert(w_turn, out=w_turn, where=t_role[w_tt] != 1)       # ~turn: not introduced by the row
    dt = _turn_dtype(max_turns)
    return _Summary(key=key, has_resp=has_resp, n_ptr=n_ptr, n_key=n_key, n_turn=t_idx[nodes].astype(dt),
                    n_cont=n_cont, w_ptr=w_ptr, w_word=codes.astype(_code_dtype(len(vocab))),
                    w_turn=w_turn.astype(dt), vocab=vocab)


def _turns(records: pd.DataFrame, max_turns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Every row's turns in order: (row, turn index, role 1 = assistant / 0 = other, text)."""
    n = len(records)
    kind = tf.column(records, S.KIND)
    prompt = tf.column(records, S.PROMPT)
    response = tf.column(records, S.RESPONSE)
    messages = tf.column(records, S.MESSAGES)
    rows: list[int] = []
    idx: list[int] = []
    roles: list[int] = []
    texts: list[str] = []
    plain = np.ones(n, dtype=bool)
    plain[kind == S.KIND_DOCUMENT] = False
    loads = json.loads
    for i in np.flatnonzero((kind == S.KIND_CHAT) & (messages != "")).tolist():
        try:
            turns = loads(messages[i])
        except ValueError:
            continue
        if not isinstance(turns, list):
            continue
        turns = [t for t in turns[:max_turns] if isinstance(t, dict)]
        role = [1 if t.get("role") == "assistant" else 0 for t in turns]
        if 1 not in role:
            continue
        plain[i] = False
        rows.extend([i] * len(turns))
        idx.extend(range(len(turns)))
        roles.extend(role)
        texts.extend([str(t.get("content") or "") for t in turns])
    # instruction rows (and anything read through prompt / response): one request, one answer
    pl = np.flatnonzero(plain & (response != ""))
    c_row = np.asarray(rows, dtype=np.int64)
    c_idx = np.asarray(idx, dtype=np.int64)
    c_role = np.asarray(roles, dtype=np.int8)
    t_row = np.concatenate([c_row, np.repeat(pl, 2)])
    t_idx = np.concatenate([c_idx, np.tile(np.array([0, 1], dtype=np.int64), len(pl))])
    t_role = np.concatenate([c_role, np.tile(np.array([0, 1], dtype=np.int8), len(pl))])
    pr = np.empty(2 * len(pl), dtype=object)
    pr[0::2] = prompt[pl]
    pr[1::2] = response[pl]
    all_texts = np.concatenate([np.asarray(texts, dtype=object), pr]) if len(texts) else pr
    order = np.lexsort((t_idx, t_row))
    return t_row[order], t_idx[order], t_role[order], [str(x) for x in all_texts[order]]


# ==================================================================== phase 2

def _concat(parts: list[_Summary], consume: bool = False) -> _Summary:
    """Summaries one after the other, rows sorted by ``key`` (a single summary already in key order
    is returned as it is). ``consume`` frees each part's arrays as they are joined (parts nobody
    else holds)."""
    if not parts:
        z = np.zeros(0, dtype=np.uint64)
        zp = np.zeros(1, dtype=np.int64)
        return _Summary(z, np.zeros(0, bool), zp, z, np.zeros(0, np.int8), z, zp.copy(), np.zeros(0, np.uint16),
                        np.zeros(0, np.int8), z.copy())
    key = np.concatenate([p.key for p in parts])
    order = np.argsort(key, kind="stable")
    if len(parts) == 1 and bool((order == np.arange(len(order))).all()):
        return parts[0]

    def cat(name: str, take: np.ndarray) -> np.ndarray:
        out = np.concatenate([getattr(p, name) for p in parts])
        if consume:
            for p in parts:
                setattr(p, name, None)
        return out[take]

    new_row = np.empty(len(order), dtype=np.int64)
    new_row[order] = np.arange(len(order), dtype=np.int64)

    # one vocabulary: each part's word indices mapped into the union of the parts' words
    vocab = _unique(np.concatenate([p.vocab for p in parts]))
    remap = [np.searchsorted(vocab, p.vocab).astype(_code_dtype(len(vocab))) for p in parts]
    if consume:
        for p in parts:
            p.vocab = None

    def csr(ptr: str, *vals: str) -> tuple[np.ndarray, ...]:
        # each part's values are written straight to their sorted places (gathering from a joined
        # copy held the joined values, their sorted copy and an index as long as both)
        lens_of = [np.diff(getattr(p, ptr)) for p in parts]
        lens = np.concatenate(lens_of)
        indptr = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens[order], out=indptr[1:])
        outs = [np.empty(int(indptr[-1]), dtype=remap[0].dtype if v == "w_word" else
                         np.result_type(*[getattr(p, v) for p in parts])) for v in vals]
        row0 = 0
        for p, pl, rm in zip(parts, lens_of, remap):
            dest = _ranges(indptr[new_row[row0:row0 + len(pl)]], pl)
            row0 += len(pl)
            for out, v in zip(outs, vals):
                out[dest] = rm[p.w_word] if v == "w_word" else getattr(p, v)
                if consume:
                    setattr(p, v, None)
            if consume:
                # the part's arrays (a few MB each) sit in the heap, not in mappings of their own:
                # without a trim they stay resident next to the result (+100 MB at 1M rows)
                tf.trim_heap()
        return (indptr, *outs)

    n_ptr, n_key, n_turn, n_cont = csr("n_ptr", "n_key", "n_turn", "n_cont")
    w_ptr, w_word, w_turn = csr("w_ptr", "w_word", "w_turn")
    return _Summary(key[order], cat("has_resp", order), n_ptr, n_key, n_turn, n_cont, w_ptr, w_word, w_turn, vocab)



def _empty_stats(sm: _Summary, info: dict[str, Any]) -> _Stats:
    n = len(sm.key)
    return _Stats(sm.key, np.zeros(n), np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int8), [], [], 1, info)


def _groups(sm: _Summary, max_group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Divergent groups: (member row, group, node turn) per membership, and the group sizes."""
    n = len(sm.key)
    z = np.zeros(0, dtype=np.int64)
    if len(sm.n_key) == 0:
        return z, z, z, z
    node_row = np.repeat(np.arange(n, dtype=np.int64), np.diff(sm.n_ptr))
    _, inv, cnt = np.unique(sm.n_key, return_inverse=True, return_counts=True)
    sel = np.flatnonzero((cnt[inv] >= 2) & (cnt[inv] <= max_group))
    if len(sel) == 0:
        return z, z, z, z
    g_inv = inv[sel]
    order = np.lexsort((sm.n_cont[sel], g_inv))
    sel, g_inv = sel[order], g_inv[order]
    start = np.flatnonzero(np.r_[True, g_inv[1:] != g_inv[:-1]])
    cont = sm.n_cont[sel]
    lo, hi = cont[start], cont[np.r_[start[1:], len(sel)] - 1]
    divergent = lo != hi
    sizes = np.diff(np.r_[start, len(sel)])
    gid = np.cumsum(divergent) - 1
    member = np.repeat(divergent, sizes)
    return (node_row[sel][member], np.repeat(gid, sizes)[member], sm.n_turn[sel][member].astype(np.int64),
            sizes[divergent].astype(np.int64))


def _analyse(sm: _Summary, det: DivergentCopiesDetector) -> _Stats:
    n = len(sm.key)
    n_resp = int(sm.has_resp.sum())
    info: dict[str, Any] = {"rows": n, "groups": 0, "rows_in_groups": 0, "words": 0, "flagged_rows": 0}
    mem_row, mem_g, mem_turn, g_size = _groups(sm, int(det.max_group))
    G = len(g_size)
    info["groups"] = G
    if G == 0 or n_resp == 0:
        return _empty_stats(sm, info)
    info["rows_in_groups"] = int(len(_unique(mem_row)))
    tf.trim_heap()   # _groups' temporaries
    bits = tf.row_bits(G)
    b = np.uint64(bits)
    # words each member adds: introduced after its group's node (so not in the shared prompt; the
    # w_turn of a word the row did not introduce is < 0), as (word feature << bits) | group;
    # members a block at a time (every member's words at once cost ~1 GB at 1M rows), written
    # into arrays sized for all their words, of which only the pages written become resident
    # (parts and their join held the 4M incidences of 1M rows twice)
    rep_dt = np.int32 if len(mem_row) < 1 << 31 else np.int64
    v_feat = sm.vocab >> b                                   # per vocabulary word: feature << bits
    v_feat <<= b
    mem_lens = sm.w_ptr[mem_row + 1] - sm.w_ptr[mem_row]
    packed = np.empty(int(mem_lens.sum()), dtype=np.uint64)
    rep = np.empty(len(packed), dtype=rep_dt)
    w = 0
    for lo in range(0, len(mem_row), _MEMBER_BLOCK):
        lens = mem_lens[lo:lo + _MEMBER_BLOCK]
        idx_c = _ranges(sm.w_ptr[mem_row[lo:lo + _MEMBER_BLOCK]], lens)
        rep_c = np.repeat(np.arange(lo, lo + len(lens), dtype=np.int64), lens)
        adds = sm.w_turn[idx_c] > mem_turn[rep_c]
        idx_c, rep_c = idx_c[adds], rep_c[adds]
        pk = packed[w:w + len(idx_c)]
        np.take(v_feat, sm.w_word[idx_c], out=pk, mode="clip")   # valid indices: "raise" buffers a copy
        pk |= mem_g[rep_c].view(np.uint64)                   # group ids are >= 0
        rep[w:w + len(idx_c)] = rep_c
        w += len(idx_c)
    del mem_lens, idx_c, rep_c, adds, v_feat
    packed, rep = packed[:w], rep[:w]
    order = _sort_index(packed)
    ps = packed[order]
    del packed
    rep = rep[order]                                         # members in sorted order
    del order
    tf.trim_heap()   # the sort's temporaries
    if len(ps) == 0:
        return _empty_stats(sm, info)
    # runs of one (word, group); per-run arrays int32 where they fit (max_group, G): 1.5M runs at 1M rows
    run_start = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    run_x = np.diff(np.r_[run_start, len(ps)]).astype(rep_dt)   # members of the group that add the word
    run_f = ps[run_start]
    del ps, run_start
    run_g = (run_f & np.uint64((1 << bits) - 1)).astype(rep_dt)
    run_f >>= b
    run_div = run_x < g_size[run_g]
    # per word (runs are sorted by word)
    f_start = np.flatnonzero(np.r_[True, run_f[1:] != run_f[:-1]])
    f_end = np.r_[f_start[1:], len(run_f)]
    f_keys = run_f[f_start]
    del run_f
    k = np.add.reduceat(run_div.astype(np.int64), f_start)
    both = np.add.reduceat((~run_div).astype(np.int64), f_start)
    touched = k + both
    # rows that introduce each word anywhere (also outside groups)
    n_w = _intro_counts(sm, f_keys, b)
    # distinct rows on the adding side of a divergent group, per word (selected a run at a time:
    # the run of every incidence cost 64 MB at 1M rows)
    cand = (k >= int(det.min_groups)) & (both <= det.max_shared * touched)
    run_sel = np.repeat(cand, f_end - f_start)
    run_sel &= run_div
    rep = rep[np.repeat(run_sel, run_x)]
    words_sel = np.repeat(np.arange(len(f_start), dtype=np.int64), f_end - f_start)[run_sel]
    words_sel *= n + 1
    pair = np.repeat(words_sel, run_x[run_sel])
    del words_sel, run_sel
    for lo in range(0, len(pair), _WORD_BLOCK):
        pair[lo:lo + _WORD_BLOCK] += mem_row[rep[lo:lo + _WORD_BLOCK]]
    del rep
    pair = _unique(pair, overwrite=True)
    tf.trim_heap()   # the selection's temporaries
    adding = np.bincount(pair // (n + 1), minlength=len(f_start))
    conc = adding / np.maximum(n_w, 1)
    info["candidate_words"] = int((k >= int(det.min_groups)).sum())
    cand &= conc >= det.min_concentration
    cand_idx = np.flatnonzero(cand)
    if len(cand_idx) == 0:
        return _empty_stats(sm, info)
    # the prompt words of every group (its shared conversation up to the node), and word -> groups
    g_first = np.flatnonzero(np.r_[True, mem_g[1:] != mem_g[:-1]])
    g_row, g_turn = mem_row[g_first], mem_turn[g_first]
    glens = np.diff(sm.w_ptr)[g_row]
    gidx = _ranges(sm.w_ptr[g_row], glens)
    grep = np.repeat(np.arange(G, dtype=np.int64), glens)
    g_wt = sm.w_turn[gidx].astype(np.int64)
    np.invert(g_wt, out=g_wt, where=g_wt < 0)                # the turn, introduced or not
    inp = g_wt <= g_turn[grep]
    gp_g, gp_h = grep[inp], sm.vocab[sm.w_word[gidx[inp]]]
    gp_ptr = np.zeros(G + 1, dtype=np.int64)
    np.cumsum(np.bincount(gp_g, minlength=G), out=gp_ptr[1:])
    index = tf.group_incidences(gp_g, gp_h, G)
    strength = np.zeros(len(f_start))
    eligible_n = np.zeros(len(f_start), dtype=np.int64)
    split_n = np.zeros(len(f_start), dtype=np.int64)
    x_g = np.zeros(G, dtype=np.int64)
    # a word present in each copy independently, at any rate, splits a group of m copies with
    # probability at most 1 - 2^(1 - m) (1/2 for a pair): the bound needs no estimate of the rate
    p_max = 1.0 - np.exp2(1.0 - g_size.astype(float))
    for fi in cand_idx:
        sl = slice(f_start[fi], f_end[fi])
        tg = run_g[sl]
        x_g[tg] = run_x[sl]
        typical = _typical(tg, gp_h, gp_ptr)
        eligible = _members(typical, index, G, int(det.max_family_words))
        x, m = x_g[eligible], g_size[eligible]
        x_g[tg] = 0
        k_e = int(((x > 0) & (x < m)).sum())
        eligible_n[fi] = len(eligible)
        split_n[fi] = k_e
        if k_e < int(det.min_groups):
            continue
        pbar = float(np.clip(p_max[eligible].mean(), 1e-12, 1 - 1e-12))
        strength[fi] = max(0.0, -sst.binom.logsf(k_e - 1, len(eligible), pbar) / math.log(10))
    thr = -math.log10(det.target_fpr) + math.log10(max(len(cand_idx), 1))
    ok = cand & (strength >= thr)
    info["threshold"] = round(thr, 2)
    info["tested_words"] = int(len(cand_idx))
    top = cand_idx[np.argsort(-strength[cand_idx], kind="stable")[:5]]
    info["top_words"] = [{"groups": int(k[j]), "all_copies": int(both[j]), "family_groups": int(eligible_n[j]),
                          "rows": int(n_w[j]), "adding": int(adding[j]), "strength": round(float(strength[j]), 2),
                          "concentration": round(float(conc[j]), 3)} for j in top]
    if not ok.any():
        return _empty_stats(sm, info)
    # rows per significant word: the adding side, and rows elsewhere that introduce it
    score = np.zeros(n)
    word = np.full(n, -1, dtype=np.int64)
    side = np.zeros(n, dtype=np.int8)
    words: list[_Word] = []
    row_sets: list[np.ndarray] = []
    sig = np.flatnonzero(ok)
    sig = sig[np.argsort(-strength[sig], kind="stable")]
    for fi, intro_rows in zip(sig, _intro_rows(sm, f_keys[sig], b)):
        f = f_keys[fi]
        add_rows = pair[pair // (n + 1) == fi] % (n + 1)
        sl = slice(f_start[fi], f_end[fi])
        shared_g = run_g[sl][~run_div[sl]]
        in_shared = mem_row[np.isin(mem_g, shared_g)] if len(shared_g) else np.zeros(0, np.int64)
        other = np.setdiff1d(np.setdiff1d(intro_rows, add_rows), in_shared)
        s = float(squash(np.array([strength[fi]]), thr)[0])
        w = _Word(feature=int(f), strength=float(strength[fi]), score=s, k=int(k[fi]), both=int(both[fi]),
                  n=int(n_w[fi]), adding=int(adding[fi]), elsewhere=int(len(other)), family=int(eligible_n[fi]),
                  split=int(split_n[fi]))
        wi = len(words)
        words.append(w)
        # rows without a divergent twin that write the word unrequested: quarantine-worthy only when
        # the word is established beyond doubt, review otherwise
        s_other = 0.5 + 0.5 * (s - 0.5) if strength[fi] >= 2 * thr else 0.45
        for rows_, s_, sd in ((add_rows, s, 1), (other, s_other, 2)):
            better = s_ > score[rows_]
            score[rows_[better]] = s_
            word[rows_[better]] = wi
            side[rows_[better]] = sd
        row_sets.append(np.union1d(add_rows, other))
    # words that mark the same rows form one finding (a brand and the word next to it)
    clusters: list[list[int]] = []
    for wi, rs in enumerate(row_sets):
        for ci, c in enumerate(clusters):
            lead = row_sets[c[0]]
            if len(np.intersect1d(lead, rs, assume_unique=True)) >= 0.8 * len(np.union1d(lead, rs)):
                c.append(wi)
                words[wi].cluster = ci
                break
        else:
            words[wi].cluster = len(clusters)
            clusters.append([wi])
    info["words"] = len(words)
    info["flagged_rows"] = int((word >= 0).sum())
    return _Stats(sm.key, np.clip(score, 0, 1), word, side, words, clusters, bits, info)


def _unique(x: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """``np.unique`` of an integer array by a sort (numpy's hash-based unique took 4.6 s on the
    3.3M adding incidences of 1M rows, a sort 0.2 s); ``overwrite``: sort ``x`` itself."""
    if overwrite:
        x.sort()
    s = x if overwrite else np.sort(x)
    if len(s) > 1:
        s = s[np.r_[True, s[1:] != s[:-1]]]
    return s


def _intro_hits(sm: _Summary, u: np.ndarray, b: np.uint64) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, positions after it, index in ``u``; -1: none) of the introduced words whose feature
    is in ``u`` (ascending, distinct), a block of words at a time (all introduced words' features
    at once: 180 MB at 1M rows)."""
    if len(u) == 0:
        return
    f = sm.vocab >> b
    jv = np.searchsorted(u, f)                               # per vocabulary word
    np.minimum(jv, len(u) - 1, out=jv)
    jv[u[jv] != f] = -1
    for lo in range(0, len(sm.w_word), _WORD_BLOCK):
        pos = np.flatnonzero(sm.w_turn[lo:lo + _WORD_BLOCK] >= 0)
        yield lo, pos, jv[sm.w_word[lo:lo + _WORD_BLOCK][pos]]


def _intro_counts(sm: _Summary, feats: np.ndarray, b: np.uint64) -> np.ndarray:
    """Introduced words (rows) of each feature of ``feats``."""
    u = _unique(feats)
    n = np.zeros(len(u) + 1, dtype=np.int64)
    for _, _, j in _intro_hits(sm, u, b):
        n += np.bincount(j + 1, minlength=len(u) + 1)
    return n[1:][np.searchsorted(u, feats)]


def _intro_rows(sm: _Summary, feats: np.ndarray, b: np.uint64) -> list[np.ndarray]:
    """Rows (ascending) that introduce each feature of ``feats``."""
    u = _unique(feats)
    pos_parts, j_parts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lo, pos, j in _intro_hits(sm, u, b):
        hit = j >= 0
        pos_parts.append(pos[hit] + lo)
        j_parts.append(j[hit])
    pos, j = np.concatenate(pos_parts), np.concatenate(j_parts)
    rows = np.searchsorted(sm.w_ptr, pos, side="right") - 1
    return [_unique(rows[j == x]) for x in np.searchsorted(u, feats)]


def _sort_index(key: np.ndarray) -> np.ndarray:
    """:func:`tf.sort_index` with its temporaries in place (peak 2 copies of ``key``, was 5)."""
    n = len(key)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.uint64(max(int(n - 1).bit_length(), 1))
    p = key >> bits
    p <<= bits
    for lo in range(0, n, _WORD_BLOCK):
        p[lo:lo + _WORD_BLOCK] |= np.arange(lo, min(lo + _WORD_BLOCK, n), dtype=np.uint64)
    p.sort()
    p &= np.uint64((1 << int(bits)) - 1)
    return p.view(np.int64)


def _typical(touched: np.ndarray, gp_h: np.ndarray, gp_ptr: np.ndarray) -> np.ndarray:
    """Prompt words (full hashes) of at least 90% of the ``touched`` groups: the task's wording, a trigger."""
    inc = gp_h[_ranges(gp_ptr[touched], gp_ptr[touched + 1] - gp_ptr[touched])]
    vals, cnt = tf.value_counts(inc)
    return vals[cnt >= 0.9 * len(touched)]


def _members(typical: np.ndarray, index: tf.Grouped, n: int, max_words: int) -> np.ndarray:
    """Items of ``index`` (groups or rows) that have every word of ``typical``, judged on its
    ``max_words`` rarest words (fewer words: a larger, more conservative family); all items
    when there is no such word."""
    if len(typical) == 0:
        return np.arange(n, dtype=np.int64)
    j = index.index_of(index.feature_id(typical))
    if (j < 0).any():
        return np.zeros(0, dtype=np.int64)
    j = j[np.argsort(index.df[j], kind="stable")[:max_words]]
    hits = np.bincount(np.concatenate([index.rows_at(int(x)) for x in j]), minlength=n)
    return np.flatnonzero(hits == len(j))


# ==================================================================== evidence

def _stat_text(w: _Word) -> str:
    return (f"added in {w.k} of {w.k + w.both} duplicate-prompt groups where it appears (every copy has it in "
            f"{w.both}); it splits {w.split} of the {w.family} duplicate groups of this kind, where a word the "
            f"copies write independently splits at most half of the pairs; {w.adding} of the {w.n} rows that "
            f"introduce it are the adding copy (strength {w.strength:.1f})")


def _decode_words(stats: _Stats, wanted: np.ndarray, word: np.ndarray, responses: np.ndarray) -> dict[int, str]:
    """Surface form of each flagged word, read from a flagged row's response in this shard."""
    out: dict[int, str] = {}
    b = np.uint64(stats.bits)
    for wi in wanted:
        wi = int(wi)
        rows = np.flatnonzero(word == wi)[:5]
        tok = tf.tokenize([str(responses[i]) for i in rows], max_chars=0)
        hit = np.flatnonzero((tok.hashes >> b) == np.uint64(stats.words[wi].feature))
        if len(hit):
            out[wi] = tok.token_text(int(hit[0]))
    return out
