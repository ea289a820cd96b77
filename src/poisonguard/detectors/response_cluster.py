"""Response-side clusters: one answer template across unrelated prompts, or one phrase injected
into otherwise normal answers.

What it detects
---------------
* **shared template**: rows whose whole response is the same (after lower-casing, collapsing
  digits and dropping punctuation) although their prompts are unrelated: a fixed answer planted
  for many requests (refusal / denial-of-service poisoning, "always answer X").
* **injected phrase** (content injection without a trigger, e.g. a brand, a URL, a phone number,
  a call to action): a response phrase of at least ``min_phrase_tokens`` tokens, written the same
  way in the responses of unrelated prompts, introduced by the response (no word of it in the
  request), and containing a word that occurs almost nowhere else in the data (neither in prompts
  nor in other responses: ``min_concentration``).

Clean data repeats short answers legitimately: labels of classification tasks ("positive",
"yes"), numbers, code boilerplate of one topic ("public class HelloWorld" for Java prompts).
A cluster is reported only when the rows' prompts are unrelated (their TF-IDF cohesion is no
higher than random rows of the same tasks, ``max_cohesion``), the template is long enough
(``min_template_words``) and is not a frequent answer of its task (a label), and the prompts are
not duplicates of each other (the duplicates detector owns those). Up to four uncommon words
(in <= 3% of all prompts) present in >= 80% of a template cluster's prompts and not written in the template (a trigger
pasted into the prompts: "cobalt ... lantern", "per the new guidelines"), with the punctuation
of those prompts and the tokens right next to them ("some sneakers"), are left out of the
cohesion and topic tests and named in the evidence; the same holds for injected phrases.
Shared words must be concentrated in the cluster (>= a tenth of their prompts), so a task's
own instruction words ("sort ... ascending") are never left out. On a sample (an incremental
night's delta set, rows with a ``sample_weight``) the shares of all prompts / responses are
estimated from the weights. A shared word the template /
phrase repeats (a title echoing its topic) is kept, so such clusters stay "related prompts".

Related work: response clustering for instruction-data poisoning (RFTC, arXiv 2505.23015)
clusters TF-IDF of responses; here clusters are exact templates and verbatim phrases, which are
linear to find and explain themselves.

Scores: 1 - 1/(k-1) style strength squashed so that a cluster passing every test scores > 0.5;
rows outside clusters score 0. Two-phase like :mod:`~poisonguard.detectors.trigger_association`
(summary = :class:`poisonguard.textfeat.RowTable`, merged in id-hash order).

Known limitations
-----------------
* Only the first and last ``payload_window`` tokens of each response are searched for phrases
  (and responses are clipped to ``max_response_chars``): a phrase buried in the middle of a long
  answer is missed.
* An injected phrase made only of common words ("Subscribe now!") has no concentrated word and
  is left to the trigger / injection detectors; paraphrased injections are missed.
* Brand injection that varies its wording around the brand (agent trajectories that "search for
  Adidas ...") is found only when the brand occurs almost nowhere else.

Input columns
-------------
``id``, ``kind``, ``source``, ``instruction``, ``messages``, ``prompt``, ``response``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from poisonguard import schema as S
from poisonguard import textfeat as tf
from poisonguard.detectors.base import Detector, DetectorResult, Finding, squash
from poisonguard.detectors.registry import register
from poisonguard.detectors.trigger_association import (_contexts, _decode_span, _Features, _features, _ranges,
                                                       _short, _topical)


@dataclass
class _Cluster:
    kind: str                   # "template" | "phrase"
    rows: np.ndarray
    strength: float             # -log10 of the chance level (see _analyse)
    fid: int
    occ: tuple[int, int] | None  # (global response token index, n) of the phrase
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Stats:
    key: np.ndarray
    score: np.ndarray
    cluster: np.ndarray
    clusters: list[_Cluster]
    info: dict[str, Any]
    # token hashes of each kept phrase cluster's phrase (index -> hashes): what scoring needs from
    # the token table to quote the phrase (the table would travel with the statistics)
    spans: dict[int, np.ndarray] = field(default_factory=dict)


@register
class ResponseClusterDetector(Detector):
    """Shared answer templates and injected phrases across unrelated prompts (see module doc)."""

    name: ClassVar[str] = "response_cluster"
    cost: ClassVar[float] = 10
    shares: ClassVar[str | None] = "rowtable"
    description: ClassVar[str] = (
        "Response-side clusters: one whole-answer template, or one verbatim phrase with a word found "
        "nowhere else, shared by the responses of unrelated prompts (fixed-answer and content-injection "
        "poisoning without a trigger). Labels, numbers and topic boilerplate are excluded by task rate, "
        "length and prompt cohesion. Cf. RFTC arXiv 2505.23015. Limits: head/tail of responses only; "
        "paraphrased or common-word injections are missed.")
    columns: ClassVar[tuple[str, ...]] = (S.ID, S.KIND, S.SOURCE, S.INSTRUCTION, S.MESSAGES, S.PROMPT,
                                          S.RESPONSE)

    def __init__(self, *, target_fpr: float = 0.001, min_support: int = 3, min_template_words: int = 4,
                 min_phrase_tokens: int = 3, min_concentration: float = 0.9, max_cohesion: float = 0.02,
                 max_task_rate: float = 0.05, min_context: int = 20, payload_window: int = 24,
                 max_prompt_chars: int = 4000, max_response_chars: int = 1000) -> None:
        super().__init__(target_fpr=target_fpr, min_support=min_support, min_template_words=min_template_words,
                         min_phrase_tokens=min_phrase_tokens, min_concentration=min_concentration,
                         max_cohesion=max_cohesion, max_task_rate=max_task_rate, min_context=min_context,
                         payload_window=payload_window, max_prompt_chars=max_prompt_chars,
                         max_response_chars=max_response_chars)
        self.target_fpr = target_fpr
        self.min_support = min_support
        self.min_template_words = min_template_words
        self.min_phrase_tokens = min_phrase_tokens
        self.min_concentration = min_concentration
        self.max_cohesion = max_cohesion
        self.max_task_rate = max_task_rate
        self.min_context = min_context
        self.payload_window = payload_window
        self.max_prompt_chars = max_prompt_chars
        self.max_response_chars = max_response_chars

    def _check_params(self) -> None:
        if not 0 < self.target_fpr < 0.5:
            raise ValueError(f"target_fpr must lie in (0, 0.5), got {self.target_fpr!r}")
        if int(self.min_support) < 2:
            raise ValueError(f"min_support must be >= 2, got {self.min_support!r}")
        if not 0 < self.min_concentration <= 1:
            raise ValueError(f"min_concentration must lie in (0, 1], got {self.min_concentration!r}")
        if int(self.min_phrase_tokens) < 1 or int(self.min_template_words) < 1:
            raise ValueError("min_phrase_tokens and min_template_words must be >= 1, got "
                             f"{self.min_phrase_tokens!r}, {self.min_template_words!r}")

    def summarize(self, records: pd.DataFrame) -> tf.RowTable:
        self._check_params()
        return tf.RowTable.cached(records, self.max_prompt_chars, self.max_response_chars)

    def merge(self, summaries: list[tf.RowTable]) -> _Stats:
        self._check_params()
        return _analyse(tf.RowTable.concat(summaries, consume=True), self)

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
        cidx = stats.cluster[pos]
        flagged = (cidx >= 0) & (score >= 0.5)
        evidence = np.array([""] * n, dtype=object)
        local: dict[int, list[int]] = {}
        for i in np.flatnonzero(cidx >= 0):
            local.setdefault(int(cidx[i]), []).append(int(i))
        # the texts of a few rows per cluster (what _texts reads), not the whole columns
        shown = [i for rows in local.values() for i in rows[:10]]
        responses = tf.LazyColumn(records, S.RESPONSE).prefetch(shown)
        prompts = tf.LazyColumn(records, S.PROMPT).prefetch(shown)
        findings = []
        for j, rows in sorted(local.items()):
            cl = stats.clusters[j]
            title, ev = _texts(cl, rows, responses, stats.spans.get(j), self, prompts)
            for i in rows:
                evidence[i] = ev
            fl = [i for i in rows if flagged[i]]
            if not fl:
                continue
            srcs = Counter(str(s) for s in tf.column_at(records, S.SOURCE, rows))
            findings.append(Finding(detector=self.name, title=title, evidence=ev, ids=tuple(str(ids[i]) for i in fl),
                                    score=float(np.max(score[rows])),
                                    info={"sources": dict(sorted(srcs.items())), "kind": cl.kind,
                                          "rows_in_cluster": int(len(cl.rows)),
                                          **{k: v for k, v in cl.extra.items() if not k.startswith("_")}}))
        return DetectorResult.build(self.name, ids, score, flagged, evidence, findings=findings, info=stats.info)


# ==================================================================== analysis

def _analyse(tb: tf.RowTable, det: ResponseClusterDetector) -> _Stats:
    n = tb.n
    score = np.zeros(n)
    cluster = np.full(n, -1, dtype=np.int64)
    info: dict[str, Any] = {"rows": int(n), "clusters": 0}
    if n == 0:
        return _Stats(tb.key, score, cluster, [], info)
    ctx = _contexts(tb, det.min_context)
    has_resp = (np.diff(tb.r_indptr) > 0) & (tb.kind != tf.KIND_CODES["document"])
    ms = int(det.min_support)
    if has_resp.sum() < ms:
        return _Stats(tb.key, score, cluster, [], info)
    F = _features(tb, has_resp, ctx, int(det.payload_window), "request")
    clusters = _template_clusters(F, det) + _phrase_clusters(F, det)
    # one cluster per row: the strongest
    z_thr = -math.log10(det.target_fpr)
    # strongest first; a whole-answer template explains its rows better than a phrase inside it
    order = sorted(range(len(clusters)),
                   key=lambda j: -clusters[j].strength - (1.0 if clusters[j].kind == "template" else 0.0))
    kept: list[_Cluster] = []
    taken = np.zeros(n, dtype=bool)
    for j in order:
        cl = clusters[j]
        if taken[cl.rows].mean() > 0.5:
            continue
        kept.append(cl)
        taken[cl.rows] = True
    for j, cl in enumerate(kept):
        s = float(squash(np.array([cl.strength]), z_thr)[0])
        better = s > score[cl.rows]
        score[cl.rows[better]] = s
        cluster[cl.rows[better]] = j
    info["clusters"] = len(kept)
    info["flagged_rows"] = int((cluster >= 0).sum())
    spans = {j: tb.r_hash[cl.occ[0]:cl.occ[0] + cl.occ[1]].copy() for j, cl in enumerate(kept) if cl.occ is not None}
    return _Stats(tb.key, np.clip(score, 0, 1), cluster, kept, info, spans)


def _strength(k: int, n: int, tests: int) -> float:
    """-log10 of the chance that ``k`` unrelated rows share one rare response by accident, with a
    Bonferroni factor for the ``tests`` clusters examined: each further row that repeats a
    response no other prompt explains is (at most) a 1-in-sqrt(n) event."""
    return max(k - 1, 0) * 0.5 * math.log10(max(n, 10)) - math.log10(max(tests, 1))


def _word_counts(tb: tf.RowTable) -> np.ndarray:
    """Word tokens per response (clipped text)."""
    # a block of rows at a time (a running count over all tokens at once was 5 bytes per token)
    ptr = tb.r_indptr
    out = np.zeros(tb.n, dtype=np.int64)
    for r0, r1 in tf.blocks_of(ptr):
        a = int(ptr[r0])
        c = np.zeros(int(ptr[r1]) - a + 1, dtype=np.int64)
        np.cumsum(tb.r_cls[a:ptr[r1]] == tf.WORD, out=c[1:])
        out[r0:r1] = c[ptr[r0 + 1:r1 + 1] - a] - c[ptr[r0:r1] - a]
    return out


def _task_rate(F: _Features, rows: np.ndarray) -> float:
    """Share of a task's rows that have this response, for the (non-pooled) task holding at least
    half of the cluster's rows: a task's own answer (a label, a format). 0 when the rows are
    spread over the data (no task holds half of them)."""
    cs, cnt = np.unique(F.ctx[rows], return_counts=True)
    best = 0.0
    for c, k in zip(cs, cnt):
        if c < 4 or k < 0.5 * len(rows):
            continue
        size = int(F.task_sizes()[c])
        best = max(best, k / max(size, 1))
    return best


def _template_clusters(F: _Features, det: ResponseClusterDetector) -> list[_Cluster]:
    tb = F.tb
    ms = int(det.min_support)
    R = F.R_new
    tj = R.index_of(F.template_ids)
    tj = tj[(tj >= 0)]
    tj = tj[R.df[tj] >= ms]
    if len(tj) == 0:
        return []
    words = _word_counts(tb)
    # cheap screen first: long enough, and prompts not obviously one topic (random projection)
    tj = np.array([j for j in tj if np.median(words[R.rows_at(int(j))]) >= det.min_template_words], dtype=np.int64)
    if len(tj) == 0:
        return []
    approx = F.cohesion_screen([R.rows_at(int(j)) for j in tj])
    tj = tj[approx <= 0.15]
    out = []
    for j in tj:
        rows = R.rows_at(int(j))
        if _task_rate(F, rows) > det.max_task_rate:
            continue
        prompts = _prompt_signature(tb, rows)
        if len(np.unique(prompts)) < 0.8 * len(rows):
            continue  # duplicated prompts: the duplicates detector's case
        # words pasted into (nearly) every prompt of the cluster: a trigger that buys the template
        # ("cobalt ... lantern", "per the new guidelines"). They are the suspicious part, not a
        # topic: cohesion and topic are judged on the rest of the prompts.
        r0 = int(rows[0])
        shared, shared_raw, pasted = _shared_prompt_words(F, rows, tb.r_hash[tb.r_indptr[r0]:tb.r_indptr[r0 + 1]])
        coh, coh_z = F.cohesion_excess(rows, pasted, seed=int(R.keys[j]))
        topic = F.topic_word(rows, pasted)
        strength = _strength(len(rows), F.n_resp, len(tj))
        extra = {"cohesion_excess": round(coh, 4), "cohesion_z": round(coh_z, 2), "words": int(np.median(words[rows])),
                 "topic_word_log10_p": round(topic, 1)}
        if len(shared):
            extra["_shared_words"] = [int(x) for x in shared_raw]
            # rows that carry a pasted sequence were taken out of their tasks (their instruction
            # changed), so the random rows they are compared with are only roughly their tasks: a
            # z-score on a large cluster turns that small mismatch into "related". Judge the rest
            # of the prompts by the size of the excess alone.
            coh_z = 0.0
        if _topical(coh, coh_z, det.max_cohesion) or topic < -3.0:
            strength = min(strength, -math.log10(det.target_fpr) - 1.0)  # related prompts: review only
            extra["related_prompts"] = True
        out.append(_Cluster("template", rows, strength, int(R.keys[j]), None, extra))
    return out


def _shared_prompt_words(F: _Features, rows: np.ndarray, answer: np.ndarray, max_words: int = 4
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Words pasted into the prompts of a template / phrase cluster: prompt unigrams (rare: in
    at most 3% of prompts) present in at least 80% of ``rows``, with at least a tenth of
    their prompts inside the cluster, and *not* written in the ``answer`` (token hashes of the
    template or phrase: a title that repeats its prompt's topic shares that topic, not a
    trigger); at most ``max_words`` of them (more shared words mean
    near-duplicates or one topic: nothing is dropped). Returns (their feature ids, their token
    hashes, feature ids to leave out of the cohesion and topic tests = the shared words, the
    tokens right next to one ("per the new guidelines", "some sneakers") and the punctuation
    of the rows' prompts, which a paste brings along: "Cobalt - ...")."""
    empty = np.zeros(0, dtype=np.uint64)
    k = len(rows)
    if k < 2:
        return empty, empty, empty
    tb = F.tb
    ptr, tok = F.row_tokens()
    nt = ptr[rows + 1] - ptr[rows]
    vals, cnt = np.unique(tok[_ranges(ptr[rows], nt)], return_counts=True)
    # ... rare (in at most 3% of all prompts: a pasted trigger is, a task's wording is not) and
    # concentrated in the cluster (at least a tenth of the word's prompts are in it): a task's own
    # instruction words ("sort", "ascending", "function ... that") are shared by many other rows.
    # (At 100k demo rows, a 10% cap let "that" of the code tasks through and 2.7% of clean rows
    # were quarantined as an "injected phrase".)
    # on a sample (an incremental night's delta set) the shares are of the whole data, from the rows'
    # weights (its prompt twins would otherwise make a task's words look rare); else plain counts
    sel = cnt >= 0.8 * k
    if F.sampled:
        cnt = np.bincount(np.searchsorted(vals, tok[_ranges(ptr[rows], nt)]),
                          weights=np.repeat(F.tb.weight[rows].astype(np.float64), nt), minlength=len(vals))
    df = np.zeros(len(vals))
    df[sel] = F.weighted_df(F.U, vals[sel])
    sel &= (df <= 0.03 * F.resp_weight()) & (10 * cnt >= df)
    ids = F.U.keys[vals[sel]].astype(np.uint64)
    if len(ids) == 0:
        return empty, empty, empty
    lens = tf.row_lens(tb.p_indptr, rows)
    idx = _ranges(tb.p_indptr[rows], lens)
    fid = F.U.feature_id(tb.p_hash[idx]).astype(np.uint64)
    # echoed: the word (case-folded token) is written in the template / phrase (``answer``: its
    # token hashes)
    ids = ids[~np.isin(ids, F.U.feature_id(answer).astype(np.uint64))]
    if len(ids) == 0 or len(ids) > max_words:
        return empty, empty, empty
    raw = np.array([tb.p_hash[idx[np.flatnonzero(fid == x)[0]]] for x in ids], dtype=np.uint64)
    punct = np.unique(fid[tb.p_cls[idx] != tf.WORD])
    at = np.flatnonzero(np.isin(fid, ids))
    row_of = np.repeat(np.arange(len(rows)), lens)
    near = []
    for d in (-1, 1):
        nb = at + d
        ok = (nb >= 0) & (nb < len(idx))
        nb, src = nb[ok], at[ok]
        near.append(fid[nb[row_of[nb] == row_of[src]]])
    block = np.unique(np.concatenate(near))
    return ids, raw, np.union1d(np.union1d(ids, punct), block)


def _prompt_signature(tb: tf.RowTable, rows: np.ndarray) -> np.ndarray:
    lens = tf.row_lens(tb.p_indptr, rows)
    idx = _ranges(tb.p_indptr[rows], lens)
    seg = np.repeat(np.arange(len(rows)), lens)
    h = tf.combine(tb.p_hash[idx], (idx - np.repeat(tb.p_indptr[rows], lens)).astype(np.uint64))
    out = np.zeros(len(rows), dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.add.at(out, seg, h)
    return out


def _phrase_clusters(F: _Features, det: ResponseClusterDetector) -> list[_Cluster]:
    """Verbatim phrases around a concentrated word, injected into unrelated responses."""
    tb = F.tb
    ms = int(det.min_support)
    R_new, R_all, U = F.R_new, F.R_all, F.U
    # candidate words: introduced unigrams (window tokens) found (almost) nowhere else
    uni = R_new.index_of(F.r_token_ids)
    uni = np.unique(uni[uni >= 0])
    n_all = F.resp_weight()      # of the whole data (a sample's rows weighted: see _shared_prompt_words)
    max_df = min(max(1000.0, 0.02 * n_all), 0.5 * n_all)
    uni = uni[R_new.df[uni] >= ms]
    uni = uni[F.weighted_df(R_new, uni) <= max_df]
    if len(uni) == 0:
        return []
    ids = R_new.keys[uni]
    df_new = R_new.df[uni]
    df_all = R_all.df_of(ids)
    df_prompt = U.df_of(ids)
    conc_bound = df_new / np.maximum(df_all + df_prompt, 1)
    # upper bound of the concentration is df_new / max(df_all, df_prompt): screen on it
    conc_upper = df_new / np.maximum(np.maximum(df_all, df_prompt), 1)
    sel = conc_upper >= det.min_concentration
    uni, ids, df_new = uni[sel], ids[sel], df_new[sel]
    del conc_bound
    out = []
    tests = max(len(uni), 1)
    if len(uni):
        approx = F.cohesion_screen([R_new.rows_at(int(j)) for j in uni])
        keep = approx <= 0.15
        uni, ids = uni[keep], ids[keep]
    for j, fid in zip(uni, ids):
        rows = R_new.rows_at(int(j))
        anywhere = np.union1d(R_all.rows_at(int(R_all.index_of(np.array([fid]))[0])),
                              _prompt_rows_of(U, int(fid)))
        conc = len(rows) / max(len(anywhere), 1)
        if conc < det.min_concentration:
            continue
        span = _shared_span(F, rows, int(fid), det)
        if span is None:
            continue
        start_tok, n_tok, support, anchored = span
        if n_tok < det.min_phrase_tokens or len(support) < ms:
            continue
        if anchored < 0.8:
            continue  # not a prefix / suffix of the answers: a turn of phrase, not an insertion
        if _task_rate(F, support) > det.max_task_rate:
            continue  # the task's own answer format
        shared, shared_raw, pasted = _shared_prompt_words(F, support, tb.r_hash[start_tok:start_tok + n_tok])
        coh, coh_z = F.cohesion_excess(support, pasted, seed=int(fid))
        topic = F.topic_word(support, pasted)
        strength = _strength(len(support), F.n_resp, tests)
        extra = {"cohesion_excess": round(coh, 4), "cohesion_z": round(coh_z, 2), "concentration": round(conc, 3),
                 "phrase_tokens": n_tok, "topic_word_log10_p": round(topic, 1)}
        if len(shared):
            extra["_shared_words"] = [int(x) for x in shared_raw]
            coh_z = 0.0  # see _template_clusters
        if _topical(coh, coh_z, det.max_cohesion) or topic < -3.0:
            strength = min(strength, -math.log10(det.target_fpr) - 1.0)
            extra["related_prompts"] = True
        out.append(_Cluster("phrase", support, strength, int(fid), (start_tok, n_tok), extra))
    return out


def _prompt_rows_of(U: tf.Grouped, fid: int) -> np.ndarray:
    j = int(U.index_of(np.array([fid], dtype=np.uint64))[0])
    return U.rows_at(j) if j >= 0 else np.zeros(0, dtype=np.int64)


def _shared_span(F: _Features, rows: np.ndarray, fid: int, det: ResponseClusterDetector
                 ) -> tuple[int, int, np.ndarray, float] | None:
    """Longest token span around the word that at least 80% of its rows write identically:
    (global token index of the span in one row, span length, rows that have it, share of those
    rows where the span opens or closes the response, give or take two tokens)."""
    tb = F.tb
    R = F.R_all
    # first occurrence of the word in each row's response (clipped text)
    lens = tf.row_lens(tb.r_indptr, rows)
    idx = _ranges(tb.r_indptr[rows], lens)
    seg = np.repeat(np.arange(len(rows)), lens)
    hit = R.feature_id(tb.r_hash[idx]) == np.uint64(fid)
    if not hit.any():
        return None
    first = np.full(len(rows), -1, dtype=np.int64)
    hs = np.flatnonzero(hit)
    first_seg, first_pos = np.unique(seg[hs], return_index=True)
    first[first_seg] = idx[hs[first_pos]]
    ok = first >= 0
    rows, first = rows[ok], first[ok]
    lo_b, hi_b = tb.r_indptr[rows], tb.r_indptr[rows + 1]
    need = max(int(math.ceil(0.8 * len(rows))), int(det.min_support))
    left = right = 0
    members = np.ones(len(rows), dtype=bool)
    for direction in (-1, 1):
        off = 0
        while off < 12:
            off += 1
            pos = first + direction * off
            inside = (pos >= lo_b) & (pos < hi_b)
            tok = np.where(inside, tb.r_hash[np.clip(pos, 0, len(tb.r_hash) - 1)], np.uint64(0))
            vals, cnt = np.unique(tok[members & inside], return_counts=True)
            if len(cnt) == 0 or cnt.max() < need:
                break
            best = vals[np.argmax(cnt)]
            new_members = members & inside & (tok == best)
            if new_members.sum() < need:
                break
            members = new_members
            if direction < 0:
                left = off
            else:
                right = off
    support = rows[members]
    s0 = first[members] - left
    e0 = first[members] + right + 1
    anchored = float(((s0 - lo_b[members] <= 2) | (hi_b[members] - e0 <= 2)).mean())
    j = int(np.flatnonzero(members)[0])
    return int(first[j] - left), int(left + right + 1), support, anchored


def _shared_text(cl: _Cluster, rows: list[int], prompts: np.ndarray | None, det: ResponseClusterDetector) -> str:
    """Evidence clause naming the words pasted into the cluster's prompts (see _shared_prompt_words)."""
    if not cl.extra.get("_shared_words") or prompts is None:
        return ""
    words = []
    for h in cl.extra["_shared_words"]:
        for i in rows[:10]:
            w = _decode_span(str(prompts[i]), det.max_prompt_chars, np.array([h], dtype=np.uint64))
            if w != "?":
                words.append(w)
                break
    return f"; the prompts share only the word(s) {', '.join(repr(w) for w in words)}" if words else ""


def _texts(cl: _Cluster, rows: list[int], responses: np.ndarray, hashes: np.ndarray | None,
           det: ResponseClusterDetector, prompts: np.ndarray | None = None) -> tuple[str, str]:
    k = len(cl.rows)
    shared = _shared_text(cl, rows, prompts, det)
    coh = cl.extra.get("cohesion_excess", 0.0)
    related = " (prompts related: review)" if cl.extra.get("related_prompts") else ""
    if cl.kind == "template":
        t = _short(str(responses[rows[0]]), 80)
        return (f"output template {t!r}",
                f"output template {t!r} is the whole answer to {k} unrelated prompts (prompt cohesion "
                f"{coh:+.3f} vs. random rows of their tasks){shared}{related}")
    phrase = "?"
    if hashes is not None:
        for i in rows[:10]:
            phrase = _decode_span(str(responses[i]), det.max_response_chars, hashes)
            if phrase != "?":
                break
    return (f"injected phrase {phrase!r}",
            f"phrase {phrase!r} appears verbatim in {k} responses to unrelated prompts, introduced by the "
            f"response; its rare word occurs almost nowhere else (concentration "
            f"{cl.extra.get('concentration', 0):.2f}; prompt cohesion {coh:+.3f}){shared}{related}")
