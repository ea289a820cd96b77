"""Sharded sanitization: the same detectors over many Parquet shards, in bounded pieces.

Records are split into shards by their content hash (so a row always lands in the same shard,
whatever else arrives with it). Each detector runs in two phases (:class:`Detector` contract):

1. ``summarize`` every shard (independent: any worker, any order);
2. ``merge`` the summaries into global statistics;
3. ``score_with`` every shard against them (independent again).

Steps 1 and 2 go by detector group (:func:`poisonguard.sanitize.share_groups`: the detectors that
share the token table together, every other detector alone): a shard is summarised once per group
and each group's summaries merge in their own step, so on a cluster no process holds every
detector's summaries of every shard (at 1M rows the one merge step of all detectors peaked at
11.9 GB), and the groups' merges run on several workers at once.

Out of core (``sanitize.spill_dir``): the token table a shard summarises to for the trigger and
response detectors is written to files under a folder of the run (:func:`spill_run`), so the
merging process receives a few bytes per shard and maps the tables; the merge then keeps the
joined table and its large arrays in memory-mapped files (:func:`poisonguard.textfeat.spilling`).
Its memory is then mostly clean file pages that the kernel drops under pressure instead of heap
that must stay resident (at 5M rows the group's merge held ~9.5 GB of heap before). The
statistics, and so every decision, are the same bit for bit (``tests/test_sharded.py``).

The per-shard steps are plain functions of picklable arguments, so any parallel map runs them:
the built-in ``map``, a Dask client, or Prefect's ``task.map`` on a Dask task runner
(``flows/sanitize_sharded.py``). The combined result equals :func:`poisonguard.sanitize.sanitize`
on the concatenated data (``tests/test_sharded.py``): the same decision, score and detectors for
every row and the same finding clusters. One difference is wording: a detector that quotes the
trigger from the rows it sees (``trigger_association``) may quote another surface form ("Special
Delivery" vs "special delivery") when a cluster's rows are spread over several shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from poisonguard import io
from poisonguard import schema as S
from poisonguard import textfeat as tf
from poisonguard.config import SanitizeConfig
from poisonguard.detectors import registry
from poisonguard.detectors.base import DetectorResult, Finding, HandedOver, without_twins
from poisonguard.textfeat import RowTable, SavedSummary, SavedTable

Summaries = dict[str, Any]
Stats = dict[str, Any]
Results = dict[str, DetectorResult]


def shard_index(content_hashes: pd.Series, n_shards: int) -> np.ndarray:
    """Shard number of each row: the first 8 hex digits of its content hash, modulo ``n_shards``."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    return np.array([int(h[:8], 16) % n_shards for h in content_hashes], dtype=np.int64)


def split(records: pd.DataFrame, n_shards: int) -> list[pd.DataFrame]:
    """Split records into ``n_shards`` frames by content hash (input order kept inside a shard)."""
    idx = shard_index(records[S.CONTENT_HASH], n_shards)
    return [records[idx == k].reset_index(drop=True) for k in range(n_shards)]


def write_shards(records: pd.DataFrame, out_dir: Path, n_shards: int) -> list[Path]:
    """Write ``part-00000.parquet`` ... into ``out_dir`` (empty shards are skipped)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    paths = []
    for k, shard in enumerate(split(records, n_shards)):
        if len(shard):
            paths.append(io.write_records(shard, out_dir / f"part-{k:05d}.parquet"))
    return paths


class FrameSink:
    """Write a stream of frames to ``target``: one Parquet file (``n_shards == 1``) or a folder of
    ``part-00000.parquet`` ... shards keyed by content hash (:func:`shard_index`; a shard nobody
    landed in is not written), each batch a row group, input order kept inside a file.

    Nothing is visible at ``target`` until :meth:`close`: the files are written under
    ``<target>.partial`` and moved into place at the end (an ingest that fails half-way leaves the
    previous output as it was). Used as a context manager, an error discards the partial output.
    """

    def __init__(self, target: Path, n_shards: int = 1, empty: pd.DataFrame | None = None,
                 schema: Any = None) -> None:
        if n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {n_shards}")
        self.target = Path(target)
        self.n_shards = n_shards
        self.empty = empty
        self.schema = schema    # a pyarrow schema for every batch and for an empty output (else the
                                # first batch's, others cast to it, and ``empty`` for no rows)
        self.partial = self.target.with_name(self.target.name + ".partial")
        _remove(self.partial)
        if n_shards > 1:
            self.partial.mkdir(parents=True)
        else:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._writers: dict[int, Any] = {}
        self.rows = 0

    def _writer(self, k: int, table: Any) -> Any:
        import pyarrow.parquet as pq

        w = self._writers.get(k)
        if w is None:
            path = self.partial / f"part-{k:05d}.parquet" if self.n_shards > 1 else self.partial
            w = self._writers[k] = pq.ParquetWriter(path, table.schema)
        return w

    def write(self, frame: pd.DataFrame) -> None:
        import pyarrow as pa

        if len(frame) == 0:
            return
        if self.n_shards > 1:
            idx = shard_index(frame[S.CONTENT_HASH], self.n_shards)
            parts = [(k, frame[idx == k]) for k in np.unique(idx)]
        else:
            parts = [(0, frame)]
        for k, part in parts:
            table = pa.Table.from_pandas(part.reset_index(drop=True), schema=self.schema, preserve_index=False)
            w = self._writer(int(k), table)
            if not table.schema.equals(w.schema, check_metadata=False):
                table = table.cast(w.schema)
            w.write_table(table)
        self.rows += len(frame)

    def close(self) -> None:
        """Finish the files and move them to ``target`` (an empty stream writes the ``empty`` frame,
        as one file or as ``part-00000.parquet``)."""
        for w in self._writers.values():
            w.close()
        if not self._writers and self.schema is not None:
            import pyarrow.parquet as pq

            pq.write_table(self.schema.empty_table(),
                           self.partial / "part-00000.parquet" if self.n_shards > 1 else self.partial)
        elif not self._writers and self.empty is not None:
            io.write_parquet(self.empty, self.partial / "part-00000.parquet" if self.n_shards > 1 else self.partial)
        self._writers = {}
        _remove(self.target)
        self.partial.rename(self.target)

    def abort(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}
        _remove(self.partial)

    def __enter__(self) -> FrameSink:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _load(shard: pd.DataFrame | Path | str) -> pd.DataFrame:
    return shard if isinstance(shard, pd.DataFrame) else io.read_records(Path(shard))


def _detectors(cfg: SanitizeConfig) -> dict[str, Any]:
    return {name: registry.build(name, **params) for name, params in cfg.detectors.items()}


def groups(cfg: SanitizeConfig) -> list[tuple[str, ...]]:
    """The detector groups summarised and merged together (see the module docstring), the most
    costly first (:attr:`Detector.cost`): a cluster starts the longest merge first."""
    from poisonguard.sanitize import group_cost, share_groups

    gs = share_groups(list(cfg.detectors))
    return [tuple(gs[k]) for k in sorted(range(len(gs)), key=lambda k: (-group_cost(gs[k]), k))]


def summarize_shard(shard: pd.DataFrame | Path | str, cfg: SanitizeConfig,
                    names: Sequence[str] | None = None) -> Summaries:
    """Phase 1 on one shard: the summary of every detector (or of the detectors ``names``)."""
    from poisonguard.sanitize import release_caches

    records = _load(shard)
    twin_free = without_twins(records)      # an incremental delta set: see Detector.compares_copies
    try:
        out = {name: det.summarize(records if det.compares_copies else twin_free)
               for name, det in _detectors(cfg).items() if names is None or name in names}
    finally:
        release_caches()
    out = _share_tables(out)
    if cfg.spill_dir:
        # out of core: the token table goes to files the merge maps (at 5M rows the 16 shards'
        # tables are ~3 GB that one merging process would otherwise receive at once), any other
        # summary to a pickle the merge reads (a worker holds handles, not the summaries of the
        # groups it has not merged yet)
        saved: dict[int, SavedTable | SavedSummary] = {}
        for name, summary in out.items():
            if id(summary) not in saved:
                saved[id(summary)] = summary.save(cfg.spill_dir) if isinstance(summary, RowTable) else \
                    SavedSummary.save(summary, cfg.spill_dir)
            out[name] = saved[id(summary)]
    return ShardSummaries(out)


class ShardSummaries(dict):
    """One shard's summaries (detector name -> summary). A dict subclass so that Dask pickles it
    whole: a plain dict is serialised value by value, which turns the one token table the trigger
    and response detectors share into two copies on the merging worker (twice the transfer and
    memory, and the merge's consumed table no longer names its join for the other detector)."""

    def __reduce__(self):  # noqa: ANN204 - pickle as this class, not as a plain dict
        return (ShardSummaries, (dict(self),))


def _share_tables(summaries: dict[str, Any]) -> dict[str, Any]:
    """Point the detectors whose token tables were built with the same limits from the same rows
    at one table object (the table cache has one slot: concurrent summaries in one process may
    have built it twice), so the merge that consumes it (``RowTable.concat(consume=True)``) hands
    the joined table to the group's other detector."""
    same: dict[tuple[int, int], Any] = {}
    for name, summary in summaries.items():
        limits = summary.__dict__.get("_limits") if isinstance(summary, RowTable) else None
        if limits is not None:
            summaries[name] = same.setdefault(limits, summary)
    return summaries


def merge_summaries(summaries: Sequence[Summaries], cfg: SanitizeConfig) -> Stats:
    """Phase 2: the global statistics of the detectors summarised in ``summaries`` (one per shard,
    all with the same detectors), from all shards' summaries."""
    from poisonguard.sanitize import release_caches

    present = set(summaries[0]) if summaries else set(cfg.detectors)
    # token tables a summary step saved to the spill folder are mapped, once per file (a shard's
    # detectors sharing one table share one handle)
    saved = {v.path: v for s in summaries for v in s.values() if isinstance(v, SavedTable)}
    loaded = {path: ref.load() for path, ref in saved.items()}
    # whatever carried them here (a transport that copies value by value), a shard's detectors
    # sharing one token table read one object again
    summaries = [_share_tables({k: loaded[v.path] if isinstance(v, SavedTable) else v
                                for k, v in s.items()}) for s in summaries]
    del loaded

    def parts(name: str) -> list[Any]:
        """The shards' summaries of detector ``name``. Pickled ones are read back just before its
        merge, and handed over (:class:`HandedOver`): nothing else holds them, so the merge may
        take them apart as it joins them (at 5M rows duplicates' 16 summaries and their join were
        ~2 GB at once) and the other detectors' are not in memory meanwhile."""
        vals = [s[name] for s in summaries]
        if vals and all(isinstance(v, SavedSummary) for v in vals):
            return HandedOver(v.load() for v in vals)
        return [v.load() if isinstance(v, SavedSummary) else v for v in vals]

    try:
        # the saved summaries stay until the run's folder goes (spill_run): a merge that a cluster
        # runs again (its worker died before its result was used) reads them again
        with tf.spilling(cfg.spill_dir or None):
            return {name: det.merge(parts(name)) for name, det in _detectors(cfg).items() if name in present}
    finally:
        release_caches()


@contextlib.contextmanager
def spill_run(cfg: SanitizeConfig) -> Iterator[SanitizeConfig]:
    """``cfg`` with its ``spill_dir`` pointing at a new folder for this run, removed when the run
    ends however it ends (``cfg`` itself when there is no spill folder)."""
    if not cfg.spill_dir:
        yield cfg
        return
    run_dir = Path(cfg.spill_dir) / f"run-{uuid.uuid4().hex[:12]}"
    run_dir.mkdir(parents=True)
    try:
        yield cfg.model_copy(update={"spill_dir": str(run_dir)})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def merge_groups(by_group: Sequence[Sequence[Summaries]], cfg: SanitizeConfig) -> Stats:
    """Phase 2 of every group (one group after the other in this process): one statistics dict."""
    return collect_stats([merge_summaries(list(parts), cfg) for parts in by_group])


def collect_stats(parts: Sequence[Stats]) -> Stats:
    """The groups' statistics as one dict (detector name -> statistics)."""
    out: Stats = {}
    for part in parts:
        out.update(part)
    return out


def score_shard(shard: pd.DataFrame | Path | str, stats: Stats, cfg: SanitizeConfig) -> Results:
    """Phase 3 on one shard: every detector's result against the global statistics."""
    from poisonguard.sanitize import _align

    records = _load(shard)
    twin_free = without_twins(records)      # an incremental delta set: see Detector.compares_copies
    ids = None if twin_free is records else pd.Index(records[S.ID], name=S.ID)
    out: Results = {}
    for name, det in _detectors(cfg).items():
        rows = records if det.compares_copies else twin_free
        res = det.score_with(rows, stats[name])
        if not isinstance(res, DetectorResult) or len(res.scores) != len(rows):
            raise ValueError(f"detector {name!r} did not return one score per row of the shard")
        out[name] = res if ids is None or rows is records else _align(res, ids)     # twins: score 0, no flag
    return out


def _merge_findings(parts: Iterable[Finding]) -> tuple[Finding, ...]:
    """One finding per global cluster (``info["cluster"]`` when the detector gives it, else the
    title): ids and per-source counts united across shards, highest score kept; the wording of
    the shard holding most of the rows is kept."""
    merged: dict[tuple[str, Any], Finding] = {}
    for f in parts:
        key = (f.detector, f.info.get("cluster", f.title))
        if key in merged:
            g = merged[key]
            lead = g if len(g.ids) >= len(f.ids) else f
            info = dict(lead.info)
            if "sources" in g.info or "sources" in f.info:
                src: dict[str, int] = dict(g.info.get("sources", {}))
                for k, v in f.info.get("sources", {}).items():
                    src[k] = src.get(k, 0) + v
                info["sources"] = dict(sorted(src.items()))
            merged[key] = Finding(g.detector, lead.title, lead.evidence, tuple(dict.fromkeys(g.ids + f.ids)),
                                  max(g.score, f.score), info)
        else:
            merged[key] = f
    return tuple(merged.values())


def combine(ids: pd.Index, shard_results: Sequence[Results]) -> Results:
    """Per-detector results of all shards, in the order of ``ids``. The rows of every shard are
    looked up in ``ids`` once (every detector scores a shard's rows in the shard's order), not once
    per detector and field (at 1M rows that was half a minute of label look-ups)."""
    names = list(shard_results[0]) if shard_results else []
    out: Results = {}
    if not names:
        return out
    shard_ids = [r[names[0]].scores.index for r in shard_results]
    found = pd.Index(np.concatenate([x.to_numpy(dtype=object) for x in shard_ids]), dtype=object).get_indexer(ids)
    for name in names:
        parts = [r[name] for r in shard_results]
        if any(not p.scores.index.equals(x) for p, x in zip(parts, shard_ids)):
            raise ValueError(f"detector {name!r} scored other rows of a shard than {names[0]!r}")
        if (found < 0).any():
            missing = list(ids[found < 0][:3])
            raise ValueError(f"detector {name!r}: no score for rows {missing} after combining shards")
        cat = {k: np.concatenate([getattr(p, k).to_numpy() for p in parts])[found]
               for k in ("scores", "flagged", "review", "evidence")}
        info = dict(parts[0].info) if parts else {}
        out[name] = DetectorResult.build(name, ids, cat["scores"], cat["flagged"].astype(bool), cat["evidence"],
                                         cat["review"].astype(bool),
                                         _merge_findings(f for p in parts for f in p.findings), info)
    return out


MapFn = Callable[..., Iterable[Any]]


def sanitize_sharded(records: pd.DataFrame, cfg: SanitizeConfig, n_shards: int = 4, map_: MapFn = map,
                     progress: Callable[[str], None] | None = None,
                     shard_files: Sequence[Path] | None = None,
                     merge_: Callable[[list[list[Any]], SanitizeConfig], Any] = merge_groups,
                     place_: Callable[[list[Any]], list[Any]] | None = None
                     ):  # noqa: ANN201 - SanitizeResult
    """:func:`poisonguard.sanitize.sanitize` run shard by shard; ``map_`` may be parallel.

    ``shard_files``: the same rows already written as shards (ingest with ``shards``); the
    per-shard steps then read their own file (on a Dask worker: from disk, not from the driver).
    ``map_(summarize_shard, shards, cfgs, names)`` runs once per detector group (:func:`groups`).
    ``merge_``: how the summaries (one list of per-shard summaries per group) become the global
    statistics; a distributed runner may merge each group in its own task and return a handle (a
    future) instead of the statistics, which ``map_`` then passes to every score step, so
    summaries and statistics move between workers and never through this process.
    ``place_``: puts the shards on the cluster once (e.g. ``client.scatter``) and returns handles
    that every summarize and score step then takes instead of the shard itself; without it a
    distributed ``map_`` would ship a shard held in memory once per detector group.
    """
    from poisonguard import sanitize as san

    if records[S.ID].duplicated().any():
        dup = records.loc[records[S.ID].duplicated(), S.ID].iloc[:3].tolist()
        raise ValueError(f"record ids must be unique; repeated: {dup}")
    t0 = time.perf_counter()
    shards: list[Any] = list(shard_files) if shard_files else \
        [s for s in split(records, n_shards) if len(s)] or [records.iloc[:0]]
    if progress:
        progress("summarize")
    if place_ is not None:
        shards = list(place_(shards))
    k = len(shards)
    with spill_run(cfg) as run_cfg:
        summaries = [list(map_(summarize_shard, shards, [run_cfg] * k, [g] * k)) for g in groups(cfg)]
        stats = merge_(summaries, run_cfg)
        del summaries           # a cluster may drop each group's summaries once its merge is done
        if progress:
            progress("score")
        parts = list(map_(score_shard, shards, [stats] * len(shards), [cfg] * len(shards)))
    ids = pd.Index(records[S.ID], name=S.ID)
    results = combine(ids, parts)
    seconds = {"sharded_total": round(time.perf_counter() - t0, 3)}
    return san.finish(records, results, seconds, cfg, progress)


# ---------------------------------------------------------------- streamed runs

#: decision codes of :class:`ShardOutcome` (int8 per row)
DECISIONS = (S.KEEP, S.REVIEW, S.QUARANTINE)


@dataclass
class ShardOutcome:
    """What the score step of one shard of a streamed run sends back: two numbers per row and
    the rows some detector fired on, never the records (see :func:`sanitize_streamed`)."""

    shard: str                  # the shard file
    n: int
    keys: np.ndarray            # uint64 stable hash of every id (shard order): the driver's duplicate check
    decision: np.ndarray        # int8 index into DECISIONS
    score: np.ndarray           # float64 fused score
    fired: pd.DataFrame         # rows a detector flagged or marked: index id; detectors, evidence
    flagged: dict[str, int]     # per detector: rows flagged
    review: dict[str, int]      # per detector: rows marked for review
    hist: dict[str, np.ndarray]  # per detector: score histogram (20 bins over [0, 1])
    findings: dict[str, tuple[Finding, ...]]
    info: dict[str, dict[str, Any]]
    # with the LLM review to run: the rows its precheck flags (positions in the shard) and, per fired
    # row, each fired detector's (name, flagged, review, score, evidence), so the driver can fuse
    # the review's verdict into a row's decision as :func:`poisonguard.sanitize.fuse` would
    precheck: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    parts: dict[str, tuple[tuple[str, bool, bool, float, str], ...]] = field(default_factory=dict)


def score_fuse_shard(shard: Path | str, stats: Stats, cfg: SanitizeConfig, review: bool = False) -> ShardOutcome:
    """Phase 3 of a streamed run on one shard: score it, fuse the detectors' decisions (row by
    row, as :func:`poisonguard.sanitize.fuse`; the finding titles wait for the merged findings)
    and keep only what the driver needs (``review``: and what the LLM review will need)."""
    from poisonguard import llm_review
    from poisonguard import textfeat as tf
    from poisonguard.report import score_histogram
    from poisonguard.sanitize import fuse

    records = _load(shard)
    ids = pd.Index(records[S.ID], name=S.ID)
    if ids.duplicated().any():
        raise ValueError(f"{shard}: record ids must be unique; repeated: {list(ids[ids.duplicated()][:3])}")
    results = score_shard(records, stats, cfg)
    checked = np.asarray(llm_review.precheck_rows(records, cfg.llm_review) if review else [], dtype=np.int64)
    del records
    dec = fuse(ids, results, cfg.min_detectors, titles=False)
    code = np.zeros(len(dec), dtype=np.int8)
    for c, name in enumerate(DECISIONS):
        code[(dec[S.DECISION] == name).to_numpy()] = c
    is_fired = dec[S.DETECTORS].to_numpy() != ""
    fired = dec.loc[is_fired, [S.DETECTORS, S.EVIDENCE]]
    parts: dict[str, tuple[tuple[str, bool, bool, float, str], ...]] = {}
    if review:
        cols = [(k, r.flagged.to_numpy(), r.review.to_numpy(), r.scores.to_numpy(dtype=float), r.evidence.to_numpy())
                for k, r in results.items()]
        for i in np.flatnonzero(is_fired).tolist():
            parts[str(ids[i])] = tuple((k, bool(f[i]), bool(v[i]), float(sc[i]), str(e[i]))
                                       for k, f, v, sc, e in cols if f[i] or v[i])
    return ShardOutcome(
        shard=str(shard), n=len(ids), keys=tf.stable_hash(ids.to_numpy(dtype=object)), decision=code,
        score=dec[S.SCORE].to_numpy(dtype=float, copy=True), fired=fired,   # writable: the LLM review updates it
        flagged={k: int(r.flagged.sum()) for k, r in results.items()},
        review={k: int(r.review.sum()) for k, r in results.items()},
        hist={k: score_histogram(r.scores.to_numpy()) for k, r in results.items()},
        findings={k: r.findings for k, r in results.items()}, info={k: dict(r.info) for k, r in results.items()},
        precheck=checked, parts=parts)


@dataclass
class Streamed:
    """The result of :func:`sanitize_streamed`: per-shard outcomes plus the merged findings. The
    records stay in their shard files; :meth:`shards` reads them back one shard at a time with
    their full decisions (the frame :func:`poisonguard.sanitize.fuse` gives)."""

    outcomes: list[ShardOutcome]
    findings: list[Finding]             # every detector's, merged across shards, largest first
    detectors: dict[str, dict[str, Any]]  # per detector: flagged, review, findings, info
    histograms: dict[str, list[int]]
    seconds: dict[str, float]
    keys: np.ndarray                    # uint64 id hash of every row, ascending (one per row: ids are unique)
    titles: dict[str, str] = field(default_factory=dict)   # id -> title of its best finding
    llm_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(o.n for o in self.outcomes)

    def decisions(self, k: int, ids: pd.Index, start: int = 0) -> pd.DataFrame:
        """The decisions of the rows ``start`` .. ``start + len(ids)`` of shard ``k`` (``ids``:
        theirs, in file order)."""
        o = self.outcomes[k]
        n = len(ids)
        if start + n > o.n:
            raise ValueError(f"{o.shard}: more rows now than the {o.n} it had when it was scored "
                             "(did the file change?)")
        index = pd.Index(ids, name=S.ID)
        det = np.full(n, "", dtype=object)
        ev = np.full(n, "", dtype=object)
        if len(o.fired):
            pos = index.get_indexer(o.fired.index)
            hit = pos >= 0
            det[pos[hit]] = o.fired[S.DETECTORS].to_numpy()[hit]
            ev[pos[hit]] = o.fired[S.EVIDENCE].to_numpy()[hit]
        titles = self.titles
        return pd.DataFrame({S.DECISION: np.asarray(DECISIONS, dtype=object)[o.decision[start:start + n]],
                             S.SCORE: o.score[start:start + n], S.DETECTORS: det, S.EVIDENCE: ev,
                             S.FINDING: [titles.get(rid, "") for rid in index] if titles else [""] * n},
                            index=index)

    def shards(self, batch_rows: int = 100_000) -> Iterable[tuple[pd.DataFrame, pd.DataFrame]]:
        """(records, decisions) of every shard, ``batch_rows`` rows at a time (a shard file read
        a batch at a time: this process holds one batch, whatever the shard's size)."""
        import pyarrow as pa

        for k, o in enumerate(self.outcomes):
            seen = fired = 0
            for batch in record_batches(Path(o.shard), batch_rows):
                records = pa.Table.from_batches([batch]).to_pandas()
                dec = self.decisions(k, pd.Index(records[S.ID]), seen)
                seen += len(records)
                fired += int((dec[S.DETECTORS].to_numpy() != "").sum())
                yield records, dec
            if seen != o.n or fired != len(o.fired):
                raise ValueError(f"{o.shard}: {seen} rows now, {o.n} when it was scored; the ids changed "
                                 "(did the file change?)")


def record_batches(path: Path, batch_rows: int) -> Iterable[Any]:
    """The Arrow record batches of a records file, ``batch_rows`` rows at a time (its record
    columns checked first; an unreadable file is named)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        io.require_columns(path, pf.schema_arrow.names, S.RECORD_COLUMNS)
        yield from pf.iter_batches(batch_size=max(int(batch_rows), 1))
    except (pa.ArrowException, OSError) as e:
        raise io.InputFileError(f"{path}: cannot read Parquet: {e}") from e


def sanitize_streamed(shard_files: Sequence[Path | str], cfg: SanitizeConfig, map_: MapFn = map,
                      merge_: Callable[[list[list[Any]], SanitizeConfig], Any] = merge_groups,
                      progress: Callable[[str], None] | None = None) -> Streamed:
    """:func:`sanitize_sharded` for data that stays on disk: the per-shard steps read their shard
    file, the score step fuses its decisions and returns a :class:`ShardOutcome`, so this process
    holds about 9 bytes per row (decision and score) plus the fired rows and the findings, never
    the records (at 5M rows the records alone are ~3 GB in pandas). Same decisions and findings
    as :func:`sanitize_sharded` over the same shards (``tests/test_sharded.py``), the LLM review's
    included when it runs (:func:`_review_streamed`: the rows it picks and the rows its precheck
    catches are the only records this process loads)."""
    from poisonguard import llm_review

    skipped = llm_review.skip_reason(cfg.llm_review)
    review = skipped is None
    t0 = time.perf_counter()
    shards = [Path(p) for p in shard_files]
    if not shards:
        raise ValueError("sanitize_streamed: no shard files")
    k = len(shards)
    if progress:
        progress("summarize")
    with spill_run(cfg) as run_cfg:
        summaries = [list(map_(summarize_shard, shards, [run_cfg] * k, [g] * k)) for g in groups(cfg)]
        stats = merge_(summaries, run_cfg)
        del summaries
        if progress:
            progress("score")
        outcomes: list[ShardOutcome] = list(map_(score_fuse_shard, shards, [stats] * k, [cfg] * k, [review] * k))
        del stats
    n_rows = sum(o.n for o in outcomes)
    keys = np.unique(np.concatenate([o.keys for o in outcomes]))
    if len(keys) != n_rows:
        _raise_repeated(outcomes)
    from poisonguard.sanitize import finding_titles, sort_findings

    names = list(outcomes[0].flagged)
    merged = {name: _merge_findings(f for o in outcomes for f in o.findings[name]) for name in names}
    findings = sort_findings(f for fs in merged.values() for f in fs)

    detectors = {name: {"flagged": sum(o.flagged[name] for o in outcomes),
                        "review": sum(o.review[name] for o in outcomes),
                        "seconds": None, "findings": len(merged[name]), "info": outcomes[0].info[name]}
                 for name in names}
    hist = {name: np.sum([o.hist[name] for o in outcomes], axis=0).astype(int).tolist() for name in names}
    llm_summary: dict[str, Any] = {"ran": False, "reason": skipped}
    if review:
        if progress:
            progress("llm_review")
        res, t_review = _review_streamed(shards, outcomes, names, cfg)
        llm_summary = dict(res.info)
        if llm_summary.get("ran"):
            from poisonguard.report import score_histogram

            findings = sort_findings(list(findings) + list(res.findings))
            detectors[res.detector] = {"flagged": int(res.flagged.sum()), "review": int(res.review.sum()),
                                       "seconds": t_review, "findings": len(res.findings), "info": res.info}
            h = np.asarray(score_histogram(res.scores.to_numpy()), dtype=np.int64)
            h[0] += n_rows - len(res.scores)      # rows the review did not see score 0
            hist[res.detector] = h.astype(int).tolist()
    seconds = {"sharded_total": round(time.perf_counter() - t0, 3)}
    return Streamed(outcomes, findings, detectors, hist, seconds, keys, finding_titles(findings), llm_summary)


def _review_streamed(shards: Sequence[Path], outcomes: list[ShardOutcome], names: list[str],
                     cfg: SanitizeConfig) -> tuple[DetectorResult, float]:
    """The LLM review of a streamed run, as :func:`poisonguard.sanitize.finish` runs it over all
    rows: the rows it would pick are gathered from the shards' id and source columns and the
    outcomes' decisions (:class:`poisonguard.llm_review.StreamedSelection`); only those and the rows
    the precheck caught (:attr:`ShardOutcome.precheck`) are loaded and reviewed; their decisions
    are fused again with the review's result (from each fired detector's part, :attr:`ShardOutcome.parts`)
    and written back into ``outcomes``. Returns the review's result over the loaded rows (every other
    row: score 0, nothing flagged) and its seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from poisonguard import llm_review
    from poisonguard.sanitize import fuse

    t0 = time.perf_counter()
    rc = cfg.llm_review
    sel = llm_review.StreamedSelection(rc)
    labels = np.asarray(DECISIONS, dtype=object)
    for k, (path, o) in enumerate(zip(shards, outcomes)):
        cols = pq.read_table(path, columns=[S.ID, S.SOURCE]).to_pandas()
        sel.add(cols[S.ID].astype(str).tolist(), cols[S.SOURCE].astype(str).tolist(), labels[o.decision], o.score,
                part=k)
        del cols
    wanted = sel.wanted()
    picked: dict[int, list[int]] = {}
    for k, i in sel.located().values():
        picked.setdefault(k, []).append(i)
    frames: list[pd.DataFrame] = []
    where: list[tuple[int, np.ndarray]] = []
    for k, (path, o) in enumerate(zip(shards, outcomes)):
        pos = np.union1d(np.asarray(picked.get(k, []), dtype=np.int64), o.precheck)
        if not len(pos):
            continue
        taken, start = [], 0
        for batch in record_batches(Path(path), 100_000):
            inside = pos[(pos >= start) & (pos < start + batch.num_rows)] - start
            if len(inside):
                taken.append(batch.take(pa.array(inside)))
            start += batch.num_rows
        frames.append(pa.Table.from_batches(taken).to_pandas())
        where.append((k, pos))
    sub = pd.concat(frames, ignore_index=True) if frames else io.empty_records()
    sub_ids = pd.Index(sub[S.ID].astype(str).to_numpy(dtype=object), name=S.ID)
    old_dec = np.concatenate([labels[outcomes[k].decision[p]] for k, p in where]) if where else np.zeros(0, object)
    old_score = np.concatenate([outcomes[k].score[p] for k, p in where]) if where else np.zeros(0)
    rev = llm_review.review(sub, pd.DataFrame({S.DECISION: old_dec, S.SCORE: old_score}, index=sub_ids), rc,
                            wanted=wanted)
    seconds = round(time.perf_counter() - t0, 3)
    if rev.skipped_reason is not None:
        return dataclasses.replace(rev.result, info=dict(rev.summary)), seconds
    # the loaded rows fused again: every fired detector's part, then the review's result
    m, col = len(sub_ids), {name: j for j, name in enumerate(names)}
    fl, rv = np.zeros((m, len(names)), bool), np.zeros((m, len(names)), bool)
    sc, ev = np.zeros((m, len(names))), np.full((m, len(names)), "", dtype=object)
    i = 0
    for k, p in where:
        for rid in sub_ids[i:i + len(p)]:
            for name, *values in outcomes[k].parts.get(rid, ()):
                fl[i, col[name]], rv[i, col[name]], sc[i, col[name]], ev[i, col[name]] = values
            i += 1
    results = {name: DetectorResult(name, pd.Series(sc[:, j], index=sub_ids), pd.Series(fl[:, j], index=sub_ids),
                                    pd.Series(rv[:, j], index=sub_ids), pd.Series(ev[:, j], index=sub_ids, dtype=object))
               for name, j in col.items()}
    results[rev.result.detector] = rev.result
    dec = fuse(sub_ids, results, cfg.min_detectors, titles=False)
    # the fused score is the maximum over every detector; a row's others are in its old score
    score = np.maximum(old_score, rev.result.scores.to_numpy(dtype=float).round(6))
    code = np.zeros(m, dtype=np.int8)
    for c, name in enumerate(DECISIONS):
        code[dec[S.DECISION].to_numpy() == name] = c
    at = 0
    for k, p in where:
        o = outcomes[k]
        sl = slice(at, at + len(p))
        o.decision[p] = code[sl]
        o.score[p] = score[sl]
        part = dec.iloc[sl]
        now = part.loc[part[S.DETECTORS].to_numpy() != "", [S.DETECTORS, S.EVIDENCE]]
        o.fired = pd.concat([o.fired.drop(index=o.fired.index.intersection(now.index)), now])
        at += len(p)
    return dataclasses.replace(rev.result, info=dict(rev.summary)), seconds


def _raise_repeated(outcomes: Sequence[ShardOutcome]) -> None:
    """Name the repeated ids (a shared 64-bit id hash is checked on the ids themselves)."""
    keys = np.concatenate([o.keys for o in outcomes])
    vals, counts = np.unique(keys, return_counts=True)
    rep = set(vals[counts > 1].tolist())
    seen: dict[str, int] = {}
    dup: list[str] = []
    for o in outcomes:
        hit = np.flatnonzero(np.isin(o.keys, list(rep)))
        if not len(hit):
            continue
        import pyarrow.parquet as pq

        ids = pq.read_table(o.shard, columns=[S.ID]).column(S.ID).to_numpy(zero_copy_only=False)[hit]
        for rid in ids:
            seen[rid] = seen.get(rid, 0) + 1
            if seen[rid] == 2:
                dup.append(str(rid))
    if dup:
        raise ValueError(f"record ids must be unique; repeated: {dup[:3]}")
