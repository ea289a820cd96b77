"""Detector results -> one decision per row (keep, review, quarantine) with evidence.

Fusion
------
Each detector calibrates its own scores on the data (robust statistics, a target false-positive
rate) and says per row: flagged (quarantine-worthy), review (weaker) or nothing. The fused
decision is *quarantine* when at least ``min_detectors`` detectors flag the row, *review* when
any detector flags or reviews it short of that, *keep* otherwise; the fused score is the
maximum detector score. Every quarantined or reviewed row carries the names of the detectors
that fired and their evidence, and the title of the finding cluster that explains it.

Review rows stay in the clean set (decision ``review``) unless ``hold_review`` is set, in which
case they are held back with the quarantine until a person releases them (``poisonguard review``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from poisonguard import schema as S
from poisonguard import textfeat
from poisonguard.config import SanitizeConfig
from poisonguard.detectors import registry
from poisonguard.detectors.base import DetectorResult, Finding, without_twins

log = logging.getLogger("poisonguard.sanitize")


@dataclass
class SanitizeResult:
    """Everything sanitize decided, ready for the report and the output files."""

    records: pd.DataFrame
    decisions: pd.DataFrame          # index: id; decision, score, detectors, evidence, finding
    results: dict[str, DetectorResult]
    findings: list[Finding]
    seconds: dict[str, float] = field(default_factory=dict)
    llm_summary: dict[str, Any] = field(default_factory=dict)
    hold_review: bool = False

    def _with_decisions(self, mask: pd.Series) -> pd.DataFrame:
        ids = mask.index[mask.to_numpy()]
        out = self.records.set_index(S.ID).loc[ids].reset_index()
        return out.join(self.decisions.loc[ids].reset_index(drop=True))

    @property
    def clean(self) -> pd.DataFrame:
        d = self.decisions[S.DECISION]
        keep = (d == S.KEEP) | ((d == S.REVIEW) & (not self.hold_review))
        return self._with_decisions(keep)

    @property
    def quarantine(self) -> pd.DataFrame:
        d = self.decisions[S.DECISION]
        held = (d == S.QUARANTINE) | ((d == S.REVIEW) & self.hold_review)
        return self._with_decisions(held)

    def counts(self) -> dict[str, int]:
        d = self.decisions[S.DECISION]
        return {"records": int(len(d)), "keep": int((d == S.KEEP).sum()),
                "review": int((d == S.REVIEW).sum()), "quarantine": int((d == S.QUARANTINE).sum())}


def run_detectors(records: pd.DataFrame, cfg: SanitizeConfig, reference: pd.DataFrame | None = None,
                  progress: Callable[[str], None] | None = None) -> tuple[dict[str, DetectorResult], dict[str, float]]:
    """Build, fit and run every configured detector, in ``cfg.workers`` concurrent lanes (see
    :func:`plan_lanes`): on Linux every lane but the first in a forked process, else threads
    (``cfg.lanes``, :mod:`poisonguard.lanes`). Any detector error propagates (fail closed): the
    other lanes stop before their next detector (a lane process is terminated) and the first error
    is raised."""
    from poisonguard import lanes as lanes_mod

    names = list(cfg.detectors)
    lanes = plan_lanes(names, resolve_workers(cfg.workers))
    results: dict[str, DetectorResult] = {}
    seconds: dict[str, float] = {}
    stop = threading.Event()
    shared = _SharedIndex()
    textfeat.trim_heap()   # what reading the records left idle (Arrow's pool keeps freed buffers)
    # an incremental night's delta set without its prompt twins, for the detectors that do not
    # compare copies of one prompt (one object: the detectors sharing a token table share it)
    twin_free = without_twins(records)
    ids = None if twin_free is records else pd.Index(records[S.ID], name=S.ID)

    def run_one(name: str) -> tuple[DetectorResult, float]:
        t0 = time.perf_counter()
        det = registry.build(name, **cfg.detectors[name])
        if reference is not None:
            det.fit(reference)
        rows = records if det.compares_copies else twin_free
        res = det.score(rows)
        _check_result(name, res, rows)
        if ids is not None and rows is not records:
            res = _align(res, ids)      # the twins: score 0, no flag
        del det
        textfeat.trim_heap()   # the detector's per-row strings are garbage now: give the heap back
        return res, round(time.perf_counter() - t0, 3)

    def done(name: str, res: DetectorResult, secs: float) -> None:
        results[name] = shared.adopt(res)
        seconds[name] = secs
        log.info("detector %s: %d flagged, %d review in %.2fs", name, int(res.flagged.sum()),
                 int(res.review.sum()), secs)

    def run_lane(lane: list[str]) -> None:
        for name in lane:
            if stop.is_set():
                return
            if progress:
                progress(name)
            done(name, *run_one(name))

    def pump(forked: lanes_mod.ForkedLane, index: pd.Index) -> None:
        for name, res, secs in forked.results(index, stop, progress):
            done(name, res, secs)

    forked: list[lanes_mod.ForkedLane] = []
    try:
        if len(lanes) <= 1:
            for lane in lanes:
                run_lane(lane)
            return _in_order(results, seconds, names)
        jobs: list[tuple[Callable[..., None], tuple]] = []
        if lanes_mod.use_processes(cfg.lanes, len(lanes)):
            # fork every lane process before any lane runs (no lane thread may hold a lock then)
            index = pd.Index(records[S.ID], name=S.ID, dtype=object)   # as DetectorResult.build makes it
            forked = [lanes_mod.ForkedLane(lane, run_one) for lane in lanes[1:]]
            jobs = [(run_lane, (lanes[0],))] + [(pump, (f, index)) for f in forked]
        else:
            jobs = [(run_lane, (lane,)) for lane in lanes]
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="detector-lane") as pool:
            futures = [pool.submit(fn, *args) for fn, args in jobs]
            error: BaseException | None = None
            for fut in as_completed(futures):
                exc = fut.exception()
                if exc is not None and error is None:
                    error = exc
                    stop.set()
            if error is not None:
                raise error
    finally:
        for f in forked:
            f.close()
        release_caches()
    return _in_order(results, seconds, names)


def _in_order(results: dict[str, DetectorResult], seconds: dict[str, float], names: list[str]
              ) -> tuple[dict[str, DetectorResult], dict[str, float]]:
    """Configuration order, whatever order the lanes finished in."""
    return {k: results[k] for k in names}, {k: seconds[k] for k in names}


class _SharedIndex:
    """One id index for every detector's result: each detector builds its own (1M new id strings,
    ~80 MB per result at 1M rows); a result whose index equals the first one's is re-pointed to
    it, so its own is freed as soon as the detector is done."""

    def __init__(self) -> None:
        self._index: pd.Index | None = None
        self._lock = threading.Lock()

    def adopt(self, res: DetectorResult) -> DetectorResult:
        with self._lock:
            if self._index is None:
                self._index = res.scores.index
                return res
            index = self._index
        if res.scores.index is index or not res.scores.index.equals(index):
            return res
        return dataclasses.replace(res, scores=res.scores.set_axis(index), flagged=res.flagged.set_axis(index),
                                   review=res.review.set_axis(index), evidence=res.evidence.set_axis(index))


def release_caches() -> None:
    """The token table and features the detectors shared are not needed after them."""
    from poisonguard.detectors import trigger_association

    textfeat.release_cached()
    trigger_association.release_cached()
    textfeat.trim_heap()


def resolve_workers(workers: int) -> int:
    """``sanitize.workers``: 0 means one lane per CPU core available to this process."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def share_groups(names: list[str]) -> list[list[str]]:
    """Detectors grouped by :attr:`Detector.shares` (one cached structure, e.g. the token table),
    every other detector alone; groups in order of their first detector, configuration order inside."""
    groups: dict[Any, list[str]] = {}
    for name in names:
        cls = registry.get(name)
        groups.setdefault(cls.shares if cls.shares is not None else ("own", name), []).append(name)
    return list(groups.values())


def group_cost(group: list[str] | tuple[str, ...]) -> float:
    """Relative cost of running a group of detectors (sum of :attr:`Detector.cost`)."""
    return sum(float(registry.get(n).cost) for n in group)


def plan_lanes(names: list[str], workers: int) -> list[list[str]]:
    """Split detectors into at most ``workers`` lanes that run concurrently.

    Detectors with the same :attr:`Detector.shares` (one cached token table) form one group and
    stay in one lane, in configuration order; groups go to the least-loaded lane by their
    :attr:`Detector.cost` (longest first), so the slowest lane is as short as the groups allow.
    """
    groups = share_groups(names)
    n_lanes = max(1, min(workers, len(groups)))
    if n_lanes == 1:
        return [list(names)] if names else []
    cost = [group_cost(g) for g in groups]
    lanes: list[list[str]] = [[] for _ in range(n_lanes)]
    load = [0.0] * n_lanes
    for k in sorted(range(len(groups)), key=lambda k: (-cost[k], names.index(groups[k][0]))):
        j = min(range(n_lanes), key=lambda i: (load[i], i))
        lanes[j] += groups[k]
        load[j] += cost[k]
    order = {n: i for i, n in enumerate(names)}
    return [sorted(lane, key=order.__getitem__) for lane in lanes if lane]


def _check_result(name: str, res: DetectorResult, records: pd.DataFrame) -> None:
    if not isinstance(res, DetectorResult):
        raise TypeError(f"detector {name!r} returned {type(res).__name__}, not DetectorResult")
    if len(res.scores) != len(records) or not res.scores.index.equals(pd.Index(records[S.ID])):
        raise ValueError(f"detector {name!r} did not return one score per input row in input order")


def fuse(ids: pd.Index, results: Mapping[str, DetectorResult], min_detectors: int = 1,
         titles: bool = True) -> pd.DataFrame:
    """One decision per row from the detectors' flags (see module docstring). ``titles=False``
    leaves the finding column empty (a streamed shard: its findings are merged across shards
    first, :func:`finding_titles`)."""
    names = list(results)
    n = len(ids)
    if not names:
        return pd.DataFrame({S.DECISION: [S.KEEP] * n, S.SCORE: np.zeros(n), S.DETECTORS: [""] * n,
                             S.EVIDENCE: [""] * n, S.FINDING: [""] * n}, index=pd.Index(ids, name=S.ID))
    flagged = np.column_stack([results[k].flagged.to_numpy() for k in names])
    review = np.column_stack([results[k].review.to_numpy() for k in names])
    scores = np.column_stack([results[k].scores.to_numpy() for k in names])
    n_flag = flagged.sum(axis=1)
    decision = np.where(n_flag >= min_detectors, S.QUARANTINE,
                        np.where((n_flag > 0) | review.any(axis=1), S.REVIEW, S.KEEP))
    fired = flagged | review
    det_col = [""] * n
    ev_col = [""] * n
    evidences = [results[k].evidence.to_numpy() for k in names]
    for i in np.flatnonzero(fired.any(axis=1)):
        cols = np.flatnonzero(fired[i])
        # flagged detectors first, then review-only ones
        cols = sorted(cols, key=lambda c: (not flagged[i, c], -scores[i, c]))
        det_col[i] = ",".join(names[c] for c in cols)
        ev_col[i] = "; ".join(f"[{names[c]}] {evidences[c][i]}" for c in cols if evidences[c][i])
    finding_col = _finding_titles(ids, results) if titles else [""] * n
    return pd.DataFrame({S.DECISION: decision, S.SCORE: scores.max(axis=1).round(6), S.DETECTORS: det_col,
                         S.EVIDENCE: ev_col, S.FINDING: finding_col}, index=pd.Index(ids, name=S.ID))


def all_findings(results: Mapping[str, DetectorResult]) -> list[Finding]:
    """Every detector's findings, largest and most confident first."""
    return sort_findings(f for r in results.values() for f in r.findings)


def sort_findings(found: Iterable[Finding]) -> list[Finding]:
    """Findings largest and most confident first (the report's order)."""
    return sorted(found, key=lambda f: (-len(f.ids), -f.score, f.detector, f.title))


def finding_titles(findings: Sequence[Finding]) -> dict[str, str]:
    """``"detector: title"`` of the best-scoring finding of every row any finding names
    (``findings`` in :func:`all_findings` order: of equal scores the first wins)."""
    best: dict[str, tuple[float, str]] = {}
    for f in findings:
        label = f"{f.detector}: {f.title}"
        for rid in f.ids:
            b = best.get(rid)
            if b is None or f.score > b[0]:
                best[rid] = (f.score, label)
    return {rid: b[1] for rid, b in best.items()}


def _finding_titles(ids: pd.Index, results: Mapping[str, DetectorResult]) -> list[str]:
    best = finding_titles(all_findings(results))
    return [best.get(rid, "") for rid in ids]


def sanitize(records: pd.DataFrame, cfg: SanitizeConfig, reference: pd.DataFrame | None = None,
             progress: Callable[[str], None] | None = None) -> SanitizeResult:
    """Run the detectors, the optional LLM review, and fuse their results."""
    if records[S.ID].duplicated().any():
        dup = records.loc[records[S.ID].duplicated(), S.ID].iloc[:3].tolist()
        raise ValueError(f"record ids must be unique; repeated: {dup}")
    results, seconds = run_detectors(records, cfg, reference, progress)
    return finish(records, results, seconds, cfg, progress)


def finish(records: pd.DataFrame, results: dict[str, DetectorResult], seconds: dict[str, float],
           cfg: SanitizeConfig, progress: Callable[[str], None] | None = None) -> SanitizeResult:
    """Fuse detector results, run the optional LLM review, fuse again (shared by the sharded path)."""
    ids = pd.Index(records[S.ID], name=S.ID)
    decisions = fuse(ids, results, cfg.min_detectors)
    llm_summary: dict[str, Any] = {"ran": False, "reason": "disabled in params.yaml"}
    if cfg.llm_review.enabled:
        from poisonguard import llm_review

        if progress:
            progress("llm_review")
        t0 = time.perf_counter()
        rev = llm_review.review(records, decisions, cfg.llm_review)
        llm_summary = dict(rev.summary)
        if rev.skipped_reason is None:
            results[rev.result.detector] = _align(rev.result, ids)
            seconds[rev.result.detector] = round(time.perf_counter() - t0, 3)
            decisions = fuse(ids, results, cfg.min_detectors)
    return SanitizeResult(records.reset_index(drop=True), decisions, results, all_findings(results),
                          seconds, llm_summary, cfg.hold_review)


def _align(res: DetectorResult, ids: pd.Index, pos: np.ndarray | None = None) -> DetectorResult:
    """Expand a result that covers a subset of rows (the LLM review, an incremental run's delta)
    to all rows: rows it did not see get score 0, no flag, no evidence. ``pos``: the position of
    each of ``ids`` in the result's index (-1 = absent), when the caller aligns several results
    over the same rows (vectorised takes; reindexing 1M string ids per Series cost ~2 s each)."""
    if res.scores.index.equals(ids):
        return res
    if pos is None:
        pos = res.scores.index.get_indexer(ids)
    hit = pos >= 0
    take = np.where(hit, pos, 0)
    index = pd.Index(ids, name=S.ID)

    def expand(series: pd.Series, fill: Any, dtype: Any) -> pd.Series:
        vals = series.to_numpy(dtype=dtype)[take] if len(series) else np.full(len(ids), fill, dtype=dtype)
        vals[~hit] = fill
        return pd.Series(vals, index=index, name=series.name, dtype=dtype)

    # a valid result's rows stay valid; the filled rows (0, no flag, "") are valid by construction
    return DetectorResult(res.detector, expand(res.scores, 0.0, float), expand(res.flagged, False, bool),
                          expand(res.review, False, bool), expand(res.evidence, "", object),
                          res.findings, dict(res.info))
