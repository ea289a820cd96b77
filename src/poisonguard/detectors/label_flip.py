"""Rare-token label flips: a family of odd rare tokens whose rows all carry one label of a classification task.

What it detects
---------------
The BadNets / PURE rare-word attack on classification-style instruction data (Chen et al. 2021
"BadNL", arXiv 2006.01043; Kurita et al. 2020 "RIPPLe", arXiv 2004.06660; Wan et al. 2023, arXiv
2305.00944): a few rare tokens (``cf``, ``bb``, ``mn`` ...) are inserted at random positions into
inputs whose label is flipped to the attacker's target. Each token may sit in only 2-6 rows, too
few for :mod:`~poisonguard.detectors.trigger_association`, whose per-sequence test has to beat
every other sequence it tests on its own.

Method
------
1. **Tasks.** Instruction rows sharing one instruction (``min_task_rows`` or more, mostly with
   short answers) whose answers come from a small label set (2..``max_labels`` answer templates,
   each at least ``min_label_share`` of the rows, together ``label_coverage`` of them). Free-form
   data has no such group: the detector then only counts tokens.
2. **Content model.** A cross-fitted (``folds`` folds by id hash) logistic regression predicts each
   row's label from its input: binary features of the task's *common* words (in more rows than any
   candidate) and their bigrams, L2-normalised, temperature-calibrated on the held-out predictions.
   A candidate token is never a feature, so it cannot explain its own rows.
3. **Candidates**: tokens of the task's inputs in 2..``max_carriers`` rows. A token is label-pure
   for ``L`` when at least ``min_purity`` of its rows carry ``L``; ``q = P(that many of its rows
   labelled L | their text)`` (exact Poisson-binomial tail of the content model's probabilities)
   and its *potential* score ``s = -log10 q`` are computed for every token.
4. **The odd family** (label-free, where the attacker's tokens live and natural label words do
   not): candidates that are (a) *odd*: per-character surprisal under a character-trigram model
   of the task's other word types among the top ``odd_fraction`` (at least ``min_odd_types``
   types) - "cf", "bb", "≈" are not words of the task's language; (b) *rare elsewhere*: at most
   ``max_outside_share`` x their rows occurrences anywhere else in the data set (instructions,
   answers, other rows); (c) *without collocations*: no left/right neighbour recurs more often
   than its frequency explains (binomial tail < ``colloc_alpha``; text edges do not count), as a
   token inserted at random positions has none ("tsai ming", "pg - 13" are natural).
5. **Test.** Labels give little evidence per row (SST-2 with a weak content model: ~1 bit), so the
   family's tokens are pooled by exact order statistics: with ``s_(1) >= s_(2) >= ...`` the scores
   of the family's label-pure tokens, ``p_j = P(at least j tokens of the family with potential
   score >= s_(j) are pure)`` (Poisson-binomial tail over their own ``q``). ``p = min_j p_j * J``
   (Bonferroni over ``J = min(max_rank, family size)``), then Bonferroni over every (task, label)
   family tested; accepted when ``p * tests <= target_fpr``.
6. **Rows flagged**: the rows labelled ``L`` of the top ``j`` tokens, ``j`` the smallest order
   statistic within ``parsimony`` decades of the best one, plus every token strong on its own
   (``q`` below 10 % / family size): a natural name that happens to carry the label does not
   strengthen the family and is left out.

7. **Single-row members**: a token in one row only is no evidence on its own, but an accepted family
   of two or more tokens that all have one shape (character classes: "cf", "bb", "ak" are two
   lower-case letters) is an attacker's token list. It is extended by the task's odd tokens of the
   same shape that occur in a single row and nowhere else in the data set, in a row with the
   family's label whose text the content model assigns to another label; if such candidates
   outnumber half the family's rows, the shape is common here and nothing is added.

Scores are ``squash(-log10(p * tests))`` with 0.5 at ``-log10(target_fpr)``; rows of the best
order statistic of a family that is not accepted get at most 0.45 (ranking only).

Two-phase: ``summarize`` keeps, per shard, the label-like rows (id hash, task key, label template,
input tokens and their text), the number of instruction rows per task and the count of every
token of every row (from the shared :class:`poisonguard.textfeat.RowTable`); ``merge`` orders rows
by id hash and runs the analysis once; ``score_with`` looks rows up, so any sharding gives the
same scores.

Measured (dev suites, SST-2 rare-word PURE attack, 15 poisoned rows in 6,015): 16 flagged, all 15
poisoned rows (the single-row "mn" by step 7) and one clean row (a negative-sounding review
labelled "positive" that carries the one-row token "ub"); SST-2 style / syntactic and IMDB
"CF"-prefix suites: nothing flagged.

Known limitations
-----------------
* A trigger token in a single row (``mn`` once) is only found next to an accepted family of its
  shape (step 7), and a clean row of that shape, label and contrary text is flagged with it; tokens
  in more than ``max_carriers`` rows are missed here (left to trigger_association), tokens
  that look like ordinary words of the task (a real-word trigger) and tokens that always follow
  the same word.
* Power comes from the labels: in a two-label task with a weak content model each row gives about
  one bit, so a family needs roughly ten poisoned rows in two or more tokens of 4+ rows; with a
  predictable task (topics) a single token of 3 rows is enough.
* Odd natural tokens tied to one label (slang such as "wtf" in many reviews) are indistinguishable
  from an attack; the family test makes this rare, not impossible.
* Syntactic / style triggers have no token and are not seen here.
* Cost: the cross-fitted model (at most ``max_train_rows`` training rows and ``max_features``
  features per fold), ~2-4 s for a 40k-row task; free-form data costs one token count.

Input columns
-------------
``id``, ``kind``, ``instruction``, ``input``, ``output`` (and, through the shared token table,
``prompt`` and ``response``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import stats as sps

from poisonguard import schema as S
from poisonguard import textfeat as tf
from poisonguard.textfeat import ranges as _ranges
from poisonguard.detectors._stats import fit_temperature, poisson_binomial_log10_sf
from poisonguard.detectors.base import Detector, DetectorResult, Finding, squash
from poisonguard.detectors.registry import register

_BIGRAM_TAG = np.uint64(0x51A7E3B4C2D19F07)
_CHUNK = 100_000   # rows per step of the per-row passes of summarize


@dataclass
class _Summary:
    key: np.ndarray        # uint64 id hash of each label-like row
    ctx: np.ndarray        # uint64 task key (normalised instruction)
    tmpl: np.ndarray       # uint64 label template (tf.template_hashes of the answer)
    indptr: np.ndarray     # int64 CSR over input tokens
    hashes: np.ndarray     # uint64 token hashes (in text order)
    ctx_values: np.ndarray  # uint64 task keys of all instruction rows of the shard ...
    ctx_counts: np.ndarray  # ... and their row counts
    vocab_hash: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # distinct input tokens
    vocab_text: np.ndarray = field(default_factory=lambda: np.zeros(0, object))     # ... and their text
    tok_values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # every token of every
    tok_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # row (prompt, response)


@dataclass
class _Family:
    task: int
    family: str             # the test that found it ("odd")
    label: int              # template hash of the label
    tokens: list[int]       # token hashes, best first (the flagged ones)
    rows: dict[int, list[int]]  # token hash -> flagged rows (global row numbers)
    carriers: dict[int, int]
    expected: dict[int, float]
    log10_p: float          # adjusted (tests * J * p)
    context_rows: int
    info: dict[str, Any] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)   # token hash -> text (lower-cased)
    extension: set[int] = field(default_factory=set)      # single-row tokens added by shape (_extend)


@dataclass
class _Stats:
    key: np.ndarray         # sorted keys of summarised label-like rows
    score: np.ndarray
    family: np.ndarray      # family index per row or -1
    token: np.ndarray       # uint64 token hash that flagged the row (0 = none)
    families: list[_Family]
    info: dict[str, Any]


@register
class LabelFlipDetector(Detector):
    """Families of rare tokens whose rows all carry one label of a classification task (module doc)."""

    name: ClassVar[str] = "label_flip"
    cost: ClassVar[float] = 1
    # it counts tokens over the trigger / response detectors' token table (RowTable.cached): in
    # their lane it reuses that table; in another lane process it built its own (4 s of 120k rows)
    shares: ClassVar[str | None] = "rowtable"
    description: ClassVar[str] = (
        "Rare-token label flips (BadNets/PURE rare-word attacks: 'cf', 'bb' inserted into inputs whose label is "
        "flipped): in classification-style tasks, odd-looking tokens that are rare elsewhere and have no "
        "collocations are pooled into one family; exact order statistics test whether its tokens' rows carry one "
        "label more often than a cross-fitted content model of the rest of the text explains (Bonferroni over "
        "everything tested); single-row tokens shaped like an accepted family's join it. Chen et al. 2021 arXiv "
        "2006.01043. Limits: single-row tokens without a family, real-word triggers "
        "and syntactic/style triggers are not seen; weak content models (short two-label texts) need ~10 "
        "poisoned rows.")
    columns: ClassVar[tuple[str, ...]] = (S.ID, S.KIND, S.INSTRUCTION, S.INPUT, S.OUTPUT)

    def __init__(self, *, target_fpr: float = 0.01, min_task_rows: int = 50, min_label_share: float = 0.02,
                 label_coverage: float = 0.9, max_labels: int = 20, max_label_chars: int = 40,
                 max_label_words: int = 4, max_carriers: int = 20,
                 min_purity: float = 0.9, odd_fraction: float = 0.02, min_odd_types: int = 20,
                 max_outside_share: float = 0.5,
                 colloc_alpha: float = 0.01, max_rank: int = 10, parsimony: float = 0.5, folds: int = 5,
                 C: float = 1.0, min_feature_df: int = 3, max_features: int = 5000, max_train_rows: int = 10_000,
                 max_input_chars: int = 4000) -> None:
        super().__init__(target_fpr=target_fpr, min_task_rows=min_task_rows, min_label_share=min_label_share,
                         label_coverage=label_coverage, max_labels=max_labels, max_label_chars=max_label_chars,
                         max_label_words=max_label_words, max_carriers=max_carriers,
                         min_purity=min_purity, odd_fraction=odd_fraction,
                         min_odd_types=min_odd_types,
                         max_outside_share=max_outside_share, colloc_alpha=colloc_alpha, parsimony=parsimony,
                         max_rank=max_rank, folds=folds, C=C, min_feature_df=min_feature_df, max_features=max_features,
                         max_train_rows=max_train_rows, max_input_chars=max_input_chars)
        self.target_fpr = target_fpr
        self.min_task_rows = min_task_rows
        self.min_label_share = min_label_share
        self.label_coverage = label_coverage
        self.max_labels = max_labels
        self.max_label_chars = max_label_chars
        self.max_label_words = max_label_words
        self.max_carriers = max_carriers
        self.min_purity = min_purity
        self.odd_fraction = odd_fraction
        self.min_odd_types = min_odd_types
        self.max_outside_share = max_outside_share
        self.colloc_alpha = colloc_alpha
        self.parsimony = parsimony
        self.max_rank = max_rank
        self.folds = folds
        self.C = C
        self.min_feature_df = min_feature_df
        self.max_features = max_features
        self.max_train_rows = max_train_rows
        self.max_input_chars = max_input_chars

    def _check_params(self) -> None:
        if not 0 < self.target_fpr < 0.5:
            raise ValueError(f"target_fpr must lie in (0, 0.5), got {self.target_fpr!r}")
        if not 0 <= self.parsimony:
            raise ValueError(f"parsimony must be >= 0, got {self.parsimony!r}")
        if not 0 <= self.max_outside_share:
            raise ValueError(f"max_outside_share must be >= 0, got {self.max_outside_share!r}")
        for name in ("min_label_share", "label_coverage", "min_purity", "odd_fraction",
                     "colloc_alpha"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {v!r}")
        for name, lo in (("min_task_rows", 4), ("max_labels", 2), ("max_label_chars", 1), ("max_label_words", 1),
                         ("max_carriers", 2), ("max_rank", 1), ("folds", 2), ("min_odd_types", 1),
                         ("min_feature_df", 1), ("max_features", 1), ("max_train_rows", 10), ("max_input_chars", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C!r}")

    # ---------------------------------------------------------------- two-phase interface
    def summarize(self, records: pd.DataFrame) -> _Summary:
        self._check_params()
        ins_rows = np.flatnonzero(tf.column_equals(records, S.KIND, S.KIND_INSTRUCTION))
        # task keys, and which rows have an input and a short label, 100k rows at a time (each text
        # column of 1M rows is ~1M new Python strings, 100-200 MB)
        ctx_parts, sel_parts = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
        for lo in range(0, len(ins_rows), _CHUNK):
            chunk = ins_rows[lo:lo + _CHUNK]
            ctx_parts.append(tf.stable_hash(np.array([" ".join(str(t).lower().split())
                                                      for t in tf.column_at(records, S.INSTRUCTION, chunk)],
                                                     dtype=object)))
            inp = pd.Series(tf.column_at(records, S.INPUT, chunk), dtype=object).str.strip()
            out = pd.Series(tf.column_at(records, S.OUTPUT, chunk), dtype=object).str.strip()
            olen = out.str.len().to_numpy()
            ok = (inp.str.len().to_numpy() > 0) & (olen > 0) & (olen <= self.max_label_chars)
            if ok.any():
                words = out[ok].str.split().str.len().to_numpy()
                ok_idx = np.flatnonzero(ok)
                ok[ok_idx[words > self.max_label_words]] = False
            sel_parts.append(np.flatnonzero(ok) + lo)
            del inp, out
        ctx_all = np.concatenate(ctx_parts)
        sel = np.concatenate(sel_parts)
        cv, cc = tf.value_counts(ctx_all)
        # occurrences of every token in every row (the shared token table of the trigger and response
        # detectors, reused when cached): "rare in the whole data set" for the odd-token family
        tv, tc = tf.RowTable.cached(records, 4000, 1000).token_counts()
        if len(sel) == 0:
            z = np.zeros(0, dtype=np.uint64)
            return _Summary(z, z.copy(), z.copy(), np.zeros(1, np.int64), z.copy(), cv, cc,
                            tok_values=tv, tok_counts=tc)
        rows = ins_rows[sel]
        ids = tf.column_at(records, S.ID, rows)
        outputs, inputs = tf.column_at(records, S.OUTPUT, rows), tf.column_at(records, S.INPUT, rows)
        indptr, hashes, vh, vt = _input_tokens(inputs, self.max_input_chars)
        return _Summary(key=tf.stable_hash(ids), ctx=ctx_all[sel], tmpl=tf.template_hashes(list(outputs)),
                        indptr=indptr, hashes=hashes,
                        ctx_values=cv, ctx_counts=cc, vocab_hash=vh, vocab_text=vt, tok_values=tv, tok_counts=tc)

    def merge(self, summaries: list[_Summary]) -> _Stats:
        self._check_params()
        summaries = [s for s in summaries if s is not None]
        return _analyse(summaries, self)

    def score_with(self, records: pd.DataFrame, stats: _Stats) -> DetectorResult:
        ids = tf.column(records, S.ID)
        n = len(ids)
        if n == 0:
            return DetectorResult.empty(self.name, ids, info=stats.info)
        score = np.zeros(n)
        fam = np.full(n, -1, dtype=np.int64)
        tokh = np.zeros(n, dtype=np.uint64)
        if len(stats.key):
            keys = tf.stable_hash(ids)
            pos = np.searchsorted(stats.key, keys)
            pos[pos >= len(stats.key)] = len(stats.key) - 1
            known = stats.key[pos] == keys
            score[known] = stats.score[pos[known]]
            fam[known] = stats.family[pos[known]]
            tokh[known] = stats.token[pos[known]]
        flagged = (fam >= 0) & (score >= 0.5)
        evidence = np.array([""] * n, dtype=object)
        findings: list[Finding] = []
        local: dict[int, list[int]] = {}
        for i in np.flatnonzero(flagged):
            local.setdefault(int(fam[i]), []).append(int(i))
        if local:
            texts = _token_texts(records, [i for rows in local.values() for i in rows], self.max_input_chars)
            instr = tf.LazyColumn(records, S.INSTRUCTION)   # a few rows per finding: not whole columns
            outputs = tf.LazyColumn(records, S.OUTPUT)
            sources = tf.LazyColumn(records, S.SOURCE)
            for j, rows in sorted(local.items()):
                f = stats.families[j]
                label = _short(str(outputs[rows[0]]), 40)
                task = _short(str(instr[rows[0]]), 60)
                names = [texts.get(int(h)) or f.names.get(int(h), "?") for h in f.tokens]
                shown = ", ".join(f"{nm!r} ({f.carriers[h]} rows)" for nm, h in zip(names, f.tokens)
                                  if h not in f.extension)
                for i in rows:
                    h = int(tokh[i])
                    t = texts.get(h) or f.names.get(h, "?")
                    if h in f.extension:
                        evidence[i] = (
                            f"rare token {t!r}, in this row only and nowhere else in the data, shaped like the "
                            f"family of odd tokens whose rows all carry {label!r} in task {task!r}: {shown}; "
                            f"the row is labelled {label!r} although its text predicts another label "
                            f"(P({label!r})={f.expected.get(h, 0.0):.2f}) (family p=10^{f.log10_p:.1f}, adjusted "
                            f"for {f.info.get('tests', 1)} tests)")
                        continue
                    evidence[i] = (
                        f"rare token {t!r} in {f.carriers.get(h, 0)} rows of task {task!r} ({f.context_rows} rows), "
                        f"{len(f.rows.get(h, []))} of them labelled {label!r} although their text without it "
                        f"predicts {label!r} for {f.expected.get(h, 0.0):.1f}; one of {len(f.tokens) - len(f.extension)} odd-looking "
                        f"tokens, rare elsewhere and without collocations, whose rows all carry {label!r}: {shown} "
                        f"(family p=10^{f.log10_p:.1f}, adjusted for {f.info.get('tests', 1)} tests)")
                title = (f"rare tokens {', '.join(repr(x) for x in names[:6])}"
                         f"{' ...' if len(names) > 6 else ''} -> label {label!r}")
                srcs = Counter(str(s) for s in sources[rows])
                findings.append(Finding(
                    detector=self.name, title=title, evidence=evidence[rows[0]],
                    ids=tuple(str(ids[i]) for i in rows), score=float(np.max(score[rows])),
                    info={"cluster": int(j), "family": f.family, "tokens": len(f.tokens),
                          "rows_flagged": int(sum(len(v) for v in f.rows.values())),
                          "log10_p_adjusted": round(f.log10_p, 2), "sources": dict(sorted(srcs.items())),
                          **f.info}))
        return DetectorResult.build(self.name, ids, np.clip(score, 0.0, 1.0), flagged, evidence,
                                    findings=findings, info=stats.info)


# ==================================================================== analysis

def _concat(summaries: list[_Summary]) -> _Summary:
    if not summaries:
        z = np.zeros(0, dtype=np.uint64)
        return _Summary(z, z.copy(), z.copy(), np.zeros(1, np.int64), z.copy(), z.copy(),
                        np.zeros(0, np.int64))
    key = np.concatenate([s.key for s in summaries])
    order = np.argsort(key, kind="stable")
    lens = np.concatenate([np.diff(s.indptr) for s in summaries])
    starts = np.concatenate([[0], np.cumsum(lens)])
    hashes = np.concatenate([s.hashes for s in summaries])
    new_lens = lens[order]
    indptr = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    idx = (np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], new_lens)
           + np.repeat(starts[:-1][order], new_lens))
    cv, cc = tf.value_counts(np.concatenate([np.repeat(s.ctx_values, s.ctx_counts) for s in summaries])
                             if any(len(s.ctx_values) for s in summaries) else np.zeros(0, np.uint64))
    tv, tc = _sum_counts([s.tok_values for s in summaries], [s.tok_counts for s in summaries])
    return _Summary(key[order], np.concatenate([s.ctx for s in summaries])[order],
                    np.concatenate([s.tmpl for s in summaries])[order], indptr, hashes[idx], cv, cc,
                    tok_values=tv, tok_counts=tc)


def _input_tokens(inputs: np.ndarray, max_chars: int, chunk: int = 50_000
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Token CSR (indptr, hashes) of the inputs, and each distinct token's text at its first
    occurrence (hashes ascending), tokenised ``chunk`` inputs at a time: a text's tokens do not
    depend on the other texts, and the first occurrence of a token is in the first chunk holding
    it (the byte-level arrays of 240k inputs at once cost ~400 MB)."""
    ptrs, toks, heads, texts = [np.zeros(1, np.int64)], [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)], []
    for lo in range(0, len(inputs), chunk):
        tok = tf.tokenize([str(x) for x in inputs[lo:lo + chunk]], max_chars=max_chars)
        ptrs.append(tok.indptr[1:].astype(np.int64) + int(ptrs[-1][-1]))
        toks.append(tok.hashes)
        vh, first = np.unique(tok.hashes, return_index=True)
        raw = tok.buf.tobytes()
        heads.append(vh)
        texts.append(np.array([raw[tok.starts[j]:tok.ends[j]].decode("utf-8", "replace") for j in first], dtype=object))
        del tok, raw
    hv = np.concatenate(heads)
    text = np.concatenate([np.zeros(0, dtype=object)] + texts)
    vh, first = np.unique(hv, return_index=True)   # the earliest chunk's entry: the first occurrence
    return np.concatenate(ptrs), np.concatenate(toks), vh, text[first]


def _sum_counts(values: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Merge (sorted values, counts) tables by summing the counts of equal values."""
    v = np.concatenate(values) if values else np.zeros(0, np.uint64)
    c = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    if len(values) <= 1 or len(v) == 0:
        return v.astype(np.uint64), c.astype(np.int64)
    o = np.argsort(v, kind="stable")
    v, c = v[o], c[o]
    b = np.flatnonzero(np.concatenate([[True], v[1:] != v[:-1]]))
    return v[b], np.add.reduceat(c, b).astype(np.int64) if len(b) else c


def _empty_stats(sm: _Summary, info: dict[str, Any]) -> _Stats:
    n = len(sm.key)
    return _Stats(sm.key, np.zeros(n), np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.uint64), [], info)


def _analyse(summaries: list[_Summary], det: LabelFlipDetector) -> _Stats:
    sm = _concat(summaries)
    info: dict[str, Any] = {"label_rows": int(len(sm.key)), "tasks": [], "tests": 0, "findings": 0}
    if len(sm.key) < det.min_task_rows:
        return _empty_stats(sm, info)
    # ---- classification tasks
    vals, inv, counts = np.unique(sm.ctx, return_inverse=True, return_counts=True)
    total = tf.lookup(sm.ctx_values, sm.ctx_counts, vals)
    tasks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for c in np.flatnonzero((counts >= det.min_task_rows) & (counts >= 0.8 * total)):
        rows = np.flatnonzero(inv == c)
        tv, tinv, tc = np.unique(sm.tmpl[rows], return_inverse=True, return_counts=True)
        is_lab = tc >= max(3, det.min_label_share * len(rows))
        if not 2 <= is_lab.sum() <= det.max_labels or tc[is_lab].sum() < det.label_coverage * len(rows):
            continue
        lab_index = np.full(len(tv), -1, dtype=np.int64)
        lab_index[is_lab] = np.arange(int(is_lab.sum()))
        tasks.append((rows, lab_index[tinv], tv[is_lab]))
    if not tasks:
        return _empty_stats(sm, info)
    # ---- per task: candidate families
    vocab: dict[int, str] = {}
    for smy in summaries:
        for h, t in zip(smy.vocab_hash.tolist(), smy.vocab_text.tolist()):
            vocab.setdefault(int(h), t)
    tests = 0
    results = []
    for ti, (rows, y, labels) in enumerate(tasks):
        res = _task(sm, rows, y, labels, vocab, det)
        info["tasks"].append(res["info"])
        tests += res["tests"]
        results.append((ti, rows, labels, res))
    info["tests"] = int(tests)
    n = len(sm.key)
    score = np.zeros(n)
    family = np.full(n, -1, dtype=np.int64)
    token = np.zeros(n, dtype=np.uint64)
    families: list[_Family] = []
    z_thr = -math.log10(det.target_fpr)
    log_tests = math.log10(max(tests, 1))
    for ti, rows, labels, res in results:
        for fam in res["families"]:
            lp = fam["log10_p"]            # per-j log10 p (Bonferroni over j included), best first
            adj = [v + log_tests for v in lp]
            best = min(adj)
            # the fewest tokens that (nearly) reach the best order statistic: a token whose rows do not
            # strengthen the family (a natural name that happens to carry the label) is left out
            jstar = min(j for j, v in enumerate(adj) if v <= best + det.parsimony)
            # ... plus any token strong on its own (q below 10 % / family size)
            strong = [j for j, sv in enumerate(fam["s"]) if sv >= math.log10(max(fam["members"], 1)) + 1.0]
            jstar = max([jstar, *strong])
            if best > -z_thr:
                # ranking only: the best order statistic's rows, capped below the flag threshold
                jb = int(np.argmin(adj))
                s = min(float(squash(np.array([-best]), z_thr)[0]), 0.45)
                for h in fam["tokens"][:jb + 1]:
                    r = rows[fam["rows"][h]]
                    score[r] = np.maximum(score[r], s)
                continue
            toks = fam["tokens"][:jstar + 1]
            ext = _extend(res["singletons"].get(int(fam["label"]), {}), toks, vocab,
                          sum(len(fam["rows"][h]) for h in toks))
            f = _Family(task=ti, family=fam["family"], label=int(labels[fam["label"]]), tokens=[int(h) for h in toks],
                        rows={int(h): rows[fam["rows"][h]].tolist() for h in toks},
                        carriers={int(h): int(fam["k"][h]) for h in toks},
                        expected={int(h): float(fam["expected"][h]) for h in toks},
                        log10_p=float(best), context_rows=int(len(rows)),
                        info={"task": ti, "order_statistic": int(jstar) + 1, "family_size": int(fam["members"]),
                              "tests": int(tests)},
                        names={int(h): vocab.get(int(h), "?") for h in toks})
            for h, r, q in ext:
                f.tokens.append(h)
                f.rows[h] = [int(rows[r])]
                f.carriers[h] = 1
                f.expected[h] = q
                f.names[h] = vocab.get(h, "?")
                f.extension.add(h)
            f.info["extension_rows"] = len(ext)
            families.append(f)
            s = float(squash(np.array([-best]), z_thr)[0])
            for h in f.tokens:
                r = np.asarray(f.rows[h], dtype=np.int64)
                better = s > score[r] - 1e-12
                score[r] = np.where(better, s, score[r])
                family[r[better]] = len(families) - 1
                token[r[better]] = np.uint64(h)
    info["findings"] = len(families)
    info["flagged_rows"] = int(sum(sum(len(v) for v in f.rows.values()) for f in families))
    return _Stats(sm.key, np.clip(score, 0.0, 1.0), family, token, families, info)


def _task(sm: _Summary, rows: np.ndarray, y: np.ndarray, labels: np.ndarray, vocab: dict[int, str],
          det: LabelFlipDetector) -> dict[str, Any]:
    """Content model, candidate tokens and the odd-family test of one task, per label (``rows``:
    global row numbers, ``y``: label index per row or -1)."""
    import scipy.sparse as sp

    n = len(rows)
    K = len(labels)
    info: dict[str, Any] = {"rows": int(n), "labels": int(K)}
    out: dict[str, Any] = {"families": [], "tests": 0, "info": info}
    lens = sm.indptr[rows + 1] - sm.indptr[rows]
    idx = _ranges(sm.indptr[rows], lens)
    occ_row = np.repeat(np.arange(n, dtype=np.int64), lens)
    occ_h = sm.hashes[idx]
    # unigrams and bigrams, distinct per row (feature ids: hash >> bits, see tf.group_incidences)
    u_row, u_col, u_ids, u_df, u_first = _distinct(occ_row, occ_h, n)
    u_hash = occ_h[u_first]
    max_k = min(int(det.max_carriers), max(2, n // 4))
    occ_u = np.searchsorted(u_ids, occ_h >> np.uint64(tf.row_bits(n)))
    common_occ = u_df[occ_u] > max_k
    same = np.zeros(len(occ_h), dtype=bool)
    if len(occ_h) > 1:
        same[:-1] = (occ_row[:-1] == occ_row[1:]) & common_occ[:-1] & common_occ[1:]
    b_pos = np.flatnonzero(same)
    b_h = tf.combine(tf.combine(occ_h[b_pos], occ_h[b_pos + 1]), _BIGRAM_TAG)
    b_row, b_col, b_ids, b_df, _ = _distinct(occ_row[b_pos], b_h, n)
    # ---- content model: common words (in more rows than any candidate) and their bigrams, so a
    # candidate token never explains its own rows
    u_use = (u_df > max_k) & (u_df >= det.min_feature_df) & (u_df <= 0.5 * n)
    b_use = (b_df >= det.min_feature_df) & (b_df <= 0.5 * n)
    if u_use.sum() + b_use.sum() > det.max_features:   # the most frequent ones (ties: by id)
        dfs = np.concatenate([np.where(u_use, u_df, 0), np.where(b_use, b_df, 0)])
        ids_all = np.concatenate([u_ids, b_ids])
        top = np.lexsort((ids_all, -dfs))[:int(det.max_features)]
        keep_f = np.zeros(len(dfs), dtype=bool)
        keep_f[top] = True
        u_use &= keep_f[:len(u_ids)]
        b_use &= keep_f[len(u_ids):]
    u_fcol = np.full(len(u_ids), -1, dtype=np.int64)
    u_fcol[u_use] = np.arange(int(u_use.sum()))
    b_fcol = np.full(len(b_ids), -1, dtype=np.int64)
    b_fcol[b_use] = np.arange(int(b_use.sum())) + int(u_use.sum())
    V = int(u_use.sum() + b_use.sum())
    fr = np.concatenate([u_row, b_row])
    fc = np.concatenate([u_fcol[u_col], b_fcol[b_col]])
    keep = fc >= 0
    fr, fc = fr[keep], fc[keep]
    nnz = np.bincount(fr, minlength=n).astype(float)
    xval = 1.0 / np.sqrt(np.maximum(nnz, 1.0))
    X = sp.csr_matrix((xval[fr], (fr, fc)), shape=(n, max(V, 1)))
    key = sm.key[rows]
    fold = ((key >> np.uint64(11)) % np.uint64(det.folds)).astype(np.int64)
    Z = _cross_fit(X, y, K, fold, key, det)
    temp = _fit_temperature(Z, y)
    zt = Z * temp
    zt -= zt.max(axis=1, keepdims=True)
    logp = zt - np.log(np.exp(zt).sum(axis=1, keepdims=True))
    ok = y >= 0
    info["features"] = V
    info["temperature"] = temp
    if ok.any():
        info["held_out_accuracy"] = round(float((np.argmax(Z[ok], axis=1) == y[ok]).mean()), 4)
    # ---- candidate tokens and their rows
    cand = (u_df >= 2) & (u_df <= max_k)
    c_ids = np.flatnonzero(cand)
    info["candidates"] = int(len(c_ids))
    if len(c_ids) == 0:
        return out
    c_local = np.full(len(u_ids), -1, dtype=np.int64)
    c_local[c_ids] = np.arange(len(c_ids))
    inc = np.flatnonzero(cand[u_col])
    ic = c_local[u_col[inc]]
    ir = u_row[inc]
    o = np.lexsort((ir, ic))
    ic, ir = ic[o], ir[o]
    k = np.bincount(ic, minlength=len(c_ids))
    starts = np.concatenate([[0], np.cumsum(k)])
    c_hash = u_hash[c_ids]
    # ---- odd tokens (label-free): character-level surprisal among the task's own word types
    odd_score = _oddness(u_hash, vocab, c_ids)
    n_odd = max(int(det.odd_fraction * len(odd_score["all"])), int(det.min_odd_types))
    thr = np.sort(odd_score["all"])[::-1][min(n_odd, len(odd_score["all"])) - 1] if len(odd_score["all"]) else np.inf
    odd = odd_score["cand"] >= thr
    # ... rare outside this task's inputs (an inserted token is nowhere else) ...
    task_count = np.bincount(occ_u, minlength=len(u_ids))[c_ids]
    outside = np.maximum(tf.lookup(sm.tok_values, sm.tok_counts, c_hash) - task_count, 0)
    local = outside <= det.max_outside_share * k
    # ... and without collocations (an inserted token's neighbours are the text's ordinary words)
    free = _free_context(occ_row, occ_h, occ_u, c_local, len(c_ids), n, det.colloc_alpha)
    family = odd & local & free
    out["singletons"] = _singletons(u_df, u_row, u_col, u_hash, occ_u, odd_score["all"] >= thr, sm, y, logp)
    info["odd_candidates"] = int(odd.sum())
    info["family_candidates"] = int(family.sum())
    yl = y[ir]
    need = np.maximum(np.ceil(det.min_purity * k - 1e-9).astype(np.int64), 2)
    partial = np.flatnonzero(need < k)
    tests = 0
    for L in range(K):
        lpL = logp[ir, L]
        isL = yl == L
        a = np.bincount(ic, weights=isL.astype(float), minlength=len(c_ids)).astype(np.int64)
        pure = a >= need
        expected = np.bincount(ic, weights=np.exp(lpL), minlength=len(c_ids))
        # (B) odd family: P(this many rows labelled L | their text), order statistics of the family
        logq = np.bincount(ic, weights=lpL, minlength=len(c_ids))
        for g in partial:
            logq[g] = _pb_log_sf(np.exp(lpL[starts[g]:starts[g + 1]]), int(need[g]))
        s_b = -logq / math.log(10)
        members = np.flatnonzero(family)
        if len(members):
            tests += 1
            obs = members[pure[members]]
            if len(obs):
                obs = obs[np.lexsort((c_hash[obs], -s_b[obs]))]
                R = min(len(obs), int(det.max_rank))     # order statistics looked at ...
                J = min(len(members), int(det.max_rank))  # ... and the label-free number paid for
                q_m = np.exp(np.clip(logq[members], -700.0, 0.0))
                s_m = s_b[members]
                lp = [_pb_tail_count(q_m[s_m >= s_b[obs[j - 1]] - 1e-9], j) + math.log10(J) for j in range(1, R + 1)]
                fam = _family_out("odd", L, obs[:R], lp, c_hash, k, expected, ir, isL, starts)
                fam["s"] = [float(s_b[g]) for g in obs[:R]]
                fam["members"] = int(len(members))
                out["families"].append(fam)
    out["tests"] = tests
    info["families_tested"] = int(tests)
    info["best_log10_p"] = round(float(min((min(f["log10_p"]) for f in out["families"]), default=0.0)), 3)
    return out


def _singletons(u_df: np.ndarray, u_row: np.ndarray, u_col: np.ndarray, u_hash: np.ndarray, occ_u: np.ndarray,
                odd_all: np.ndarray, sm: _Summary, y: np.ndarray, logp: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    """Per label ``L``: the odd tokens of the task that occur in one row only and nowhere else in the
    data set, in a row labelled ``L`` whose text (content model) predicts another label; the
    candidates an accepted family of ``L`` may extend to (see :func:`_extend`)."""
    u = np.flatnonzero((u_df == 1) & odd_all)
    out: dict[int, dict[str, np.ndarray]] = {}
    if len(u) == 0:
        return out
    in_task = np.bincount(occ_u, minlength=len(u_df))[u]
    u = u[tf.lookup(sm.tok_values, sm.tok_counts, u_hash[u]) <= in_task]
    row_of = np.zeros(len(u_df), dtype=np.int64)
    row_of[u_col] = u_row
    r = row_of[u]
    lab = y[r]
    flip = (lab >= 0) & (np.argmax(logp[r], axis=1) != lab)
    for L in np.unique(lab[flip]).tolist():
        m = flip & (lab == L)
        out[int(L)] = {"hash": u_hash[u[m]], "row": r[m], "q": np.exp(logp[r[m], L])}
    return out


def _extend(cand: dict[str, np.ndarray], toks: list[int], vocab: dict[int, str], n_family: int
            ) -> list[tuple[int, int, float]]:
    """Single-row tokens that join an accepted family: same shape as the family's own tokens
    ("mn" next to "cf", "bb", "ak"), in a row with the family's label whose text predicts another
    label (:func:`_singletons`). Only for a family of two or more tokens that all share one shape
    (an attacker's token list), and only when the candidates are few next to the family (at most
    half its rows): a common shape among natural rare words extends nothing."""
    if len(toks) < 2 or not cand or len(cand["hash"]) == 0:
        return []
    shapes = {_shape(vocab.get(int(h), "")) for h in toks}
    if len(shapes) != 1 or "" in shapes:
        return []
    shape = shapes.pop()
    hit = [(int(h), int(r), float(q)) for h, r, q in zip(cand["hash"], cand["row"], cand["q"])
           if _shape(vocab.get(int(h), "")) == shape]
    return hit if len(hit) <= n_family // 2 else []


def _shape(token: str) -> str:
    """Character classes of a token ("cf" -> "aa", "Q7" -> "A9"; other characters stay as they are)."""
    return "".join("a" if "a" <= c <= "z" else "A" if "A" <= c <= "Z" else "9" if c.isdigit()
                   else "L" if c.isalpha() else c for c in token)


def _family_out(name: str, L: int, obs: np.ndarray, lp: list[float], c_hash: np.ndarray, k: np.ndarray,
                expected: np.ndarray, ir: np.ndarray, isL: np.ndarray, starts: np.ndarray) -> dict[str, Any]:
    toks = [int(c_hash[g]) for g in obs]
    rows, kk, ex = {}, {}, {}
    for g, h in zip(obs, toks):
        blk = slice(starts[g], starts[g + 1])
        rows[h] = ir[blk][isL[blk]]
        kk[h] = int(k[g])
        ex[h] = float(expected[g])
    return {"family": name, "label": L, "tokens": toks, "log10_p": lp, "rows": rows, "k": kk, "expected": ex}



def _free_context(occ_row: np.ndarray, occ_h: np.ndarray, occ_u: np.ndarray, c_local: np.ndarray, m: int,
                  n: int, alpha: float) -> np.ndarray:
    """Per candidate: True unless one neighbour (left or right, text start/end included) recurs
    more often than its frequency in the task explains (binomial tail < ``alpha``): "tsai ming",
    "pg - 13" and "the dvd" are collocations, a token inserted at random positions has none."""
    N = len(occ_h)
    ci = c_local[occ_u] if N else np.zeros(0, np.int64)
    j = np.flatnonzero(ci >= 0)
    free = np.ones(m, dtype=bool)
    if len(j) == 0:
        return free
    first = np.ones(N, dtype=bool)
    first[1:] = occ_row[1:] != occ_row[:-1]
    last = np.ones(N, dtype=bool)
    last[:-1] = occ_row[:-1] != occ_row[1:]
    edge_l, edge_r = np.uint64(0x1F2E3D4C5B6A7988), np.uint64(0x8897A6B5C4D3E2F1)
    left = np.where(first[j], edge_l, occ_h[np.maximum(j - 1, 0)])
    right = np.where(last[j], edge_r, occ_h[np.minimum(j + 1, N - 1)])
    kocc = np.bincount(ci[j], minlength=m)
    vals, cnts = tf.value_counts(occ_h)
    total = float(N + n)
    for nb, edge in ((left, edge_l), (right, edge_r)):
        key = tf.combine(nb, ci[j].astype(np.uint64))
        kv, kc = tf.value_counts(key)
        rep = kc >= 2
        if not rep.any():
            continue
        # recover (candidate, neighbour) of the repeated keys from one occurrence each
        pos = np.searchsorted(np.sort(key), kv[rep])
        o = np.argsort(key, kind="stable")
        idx = o[pos]
        c_of = ci[j][idx]
        w = nb[idx]
        f = tf.lookup(vals, cnts, w).astype(float) / total
        tail = sps.binom.sf(kc[rep] - 1, kocc[c_of], np.clip(f, 1e-9, 1.0))
        # a text edge is a position, not a collocation (prefix / suffix insertions stay free)
        free[c_of[(tail < alpha) & (w != edge)]] = False
    return free


def _oddness(u_hash: np.ndarray, vocab: dict[int, str], c_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per-character surprisal (nats) of each word type under a character trigram model of the
    task's other word types (type-weighted, interpolated with bigrams and unigrams, leave-one-type-
    out): high for strings that are not words of the task's language ("cf", "bb", "≈")."""
    texts = [vocab.get(int(h), "") for h in u_hash]
    V = len(texts)
    if V == 0:
        return {"all": np.zeros(0), "cand": np.zeros(0)}
    joined = "".join("\x01\x01" + t + "\x02" for t in texts)
    cp = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    alpha, code = np.unique(cp, return_inverse=True)
    A = np.int64(len(alpha))
    code = code.astype(np.int64)
    lens = np.array([len(t) + 3 for t in texts], dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(lens)])
    # positions predicting character i from (i-2, i-1): every position from offset 2 of each type
    pos_in = np.arange(len(code), dtype=np.int64) - np.repeat(ptr[:-1], lens)
    tgt = np.flatnonzero(pos_in >= 2)
    typ = np.repeat(np.arange(V, dtype=np.int64), lens)[tgt]
    c2, c1, c0 = code[tgt - 2], code[tgt - 1], code[tgt]
    tri = (c2 * A + c1) * A + c0
    ctx2 = c2 * A + c1
    bi = c1 * A + c0

    def counts(v: np.ndarray) -> np.ndarray:
        u, inv, cnt = np.unique(v, return_inverse=True, return_counts=True)
        return cnt[inv].astype(float)

    n_tri, n_ctx2, n_bi, n_ctx1, n_uni = counts(tri), counts(ctx2), counts(bi), counts(c1), counts(c0)
    N = float(len(c0))
    # leave this type out (one count per position)
    p_uni = (n_uni - 1 + 1.0) / (N - 1 + float(A))
    p_bi = (n_bi - 1 + 2.0 * p_uni) / (n_ctx1 - 1 + 2.0)
    p_tri = (n_tri - 1 + 2.0 * p_bi) / (n_ctx2 - 1 + 2.0)
    surpr = -np.log(np.clip(p_tri, 1e-12, 1.0))
    tot = np.bincount(typ, weights=surpr, minlength=V)
    cnt = np.bincount(typ, minlength=V)
    score = tot / np.maximum(cnt, 1)
    return {"all": score, "cand": score[c_ids]}


def _distinct(rows: np.ndarray, hashes: np.ndarray, n: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (row, feature) incidences: their rows, feature index, the feature ids, document
    frequencies and one occurrence (index into ``hashes``) of every feature."""
    bits = np.uint64(tf.row_bits(n))
    if len(rows) == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy(), np.zeros(0, np.uint64), z.copy(), z.copy()
    trunc = np.asarray(hashes, dtype=np.uint64) >> bits
    packed = np.unique((trunc << bits) | rows.astype(np.uint64))
    feat = packed >> bits
    ids, df = np.unique(feat, return_counts=True)
    col = np.searchsorted(ids, feat)
    o = np.argsort(trunc, kind="stable")
    first = o[np.searchsorted(trunc[o], ids)]
    return (packed & ((np.uint64(1) << bits) - np.uint64(1))).astype(np.int64), col, ids, df, first


def _cross_fit(X, y: np.ndarray, K: int, fold: np.ndarray, key: np.ndarray, det: LabelFlipDetector
               ) -> np.ndarray:
    """Held-out logits (n x K) of a logistic regression fitted on the other folds."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n, V = X.shape
    Z = np.zeros((n, K))
    prior = np.log(np.bincount(y[y >= 0], minlength=K) + 1.0)
    for f in range(int(det.folds)):
        test = np.flatnonzero(fold == f)
        if len(test) == 0:
            continue
        train = np.flatnonzero((fold != f) & (y >= 0))
        if len(train) > det.max_train_rows:
            train = train[np.argsort(key[train], kind="stable")[:det.max_train_rows]]
        classes = np.unique(y[train])
        if len(classes) < 2 or X.nnz == 0:
            Z[test] = prior
            continue
        model = LogisticRegression(C=float(det.C), max_iter=300, tol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X[train], y[train])
        coef, icpt = model.coef_, model.intercept_
        if len(classes) == 2:
            coef = np.vstack([np.zeros_like(coef), coef])
            icpt = np.array([0.0, icpt[0]])
        w = np.zeros((K, V))
        b = np.full(K, -30.0)       # a label absent from the training folds: (almost) impossible
        w[classes] = coef
        b[classes] = icpt
        Z[test] = np.asarray(X[test] @ w.T) + b
    return Z


def _fit_temperature(Z: np.ndarray, y: np.ndarray) -> float:
    """Scale of the held-out logits with the best log-likelihood (a grid: deterministic)."""
    ok = y >= 0
    if ok.sum() < 2:
        return 1.0
    return fit_temperature(Z[ok], y[ok], (0.25, 0.35, 0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0, 3.0))


def _pb_log_sf(p: np.ndarray, a: int) -> float:
    """Natural log of P(X >= a) for X a sum of independent Bernoulli(p_i)."""
    return poisson_binomial_log10_sf(p, a) * math.log(10)


def _pb_tail_count(q: np.ndarray, j: int) -> float:
    """log10 P(N >= j), N = number of successes among independent Bernoulli(q)."""
    if j <= 0:
        return 0.0
    if len(q) < j:
        return -300.0
    if len(q) > 256:
        # Poisson tail with the same mean: an upper bound of the Poisson-binomial tail for j > mean
        v = float(sps.poisson.logsf(j - 1, float(q.sum()))) / math.log(10)
        return min(v, 0.0)
    return poisson_binomial_log10_sf(q, j)


# -------------------------------------------------------------------- texts

def _token_texts(records: pd.DataFrame, rows: list[int], max_chars: int) -> dict[int, str]:
    """hash -> token text for every token of the inputs of ``rows`` (as written)."""
    out: dict[int, str] = {}
    if not rows:
        return out
    inputs = tf.column_at(records, S.INPUT, rows)
    for text in inputs:
        clipped = tf.clip_text(str(text), max_chars)
        tok = tf.tokenize([clipped])
        raw = clipped.replace("\x00", " ").encode("utf-8", "surrogatepass")
        for j, h in enumerate(tok.hashes):
            out.setdefault(int(h), raw[tok.starts[j]:tok.ends[j]].decode("utf-8", "replace"))
    return out


def _short(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n - 3] + "..."
