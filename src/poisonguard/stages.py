"""One function per DAG node: ``(config section, input paths, output paths) -> summary``.

The same functions back the DVC stages (``dvc.yaml`` -> ``python -m poisonguard <stage>``) and
the Prefect tasks (``tasks/``); they read and write files and return small JSON-able summaries.
Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from poisonguard import audit, code_version, io, lineage, overrides, paths, provenance
from poisonguard import report as rpt
from poisonguard import schema as S
from poisonguard.config import IncrementalConfig, IngestConfig, SanitizeConfig, section
from poisonguard.demo import DemoConfig
from poisonguard.model_config import FinetuneConfig, PruneConfig, ScanConfig

log = logging.getLogger("poisonguard.stages")

Progress = Callable[[str], None] | None


def _write_json(path: Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=rpt._default) + "\n", encoding="utf-8")
    return path


def read_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise io.InputFileError(f"{path}: no such file (did the previous stage run?)")
    return json.loads(path.read_text(encoding="utf-8"))


def git_rev(cwd: Path | None = None) -> str:
    """The current git revision (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"


# ---------------------------------------------------------------- demo data

def demo_data(cfg: DemoConfig, out_dir: Path = paths.RAW) -> dict[str, Any]:
    """Write the synthetic in-house corpus and the (poisoned) vendor delivery."""
    from poisonguard import demo

    return demo.write_demo_data(Path(out_dir), cfg)


# ---------------------------------------------------------------- ingest

def ingest(cfg: IngestConfig, out_dir: Path = paths.INGESTED, inputs: Sequence[Path | str] | None = None,
           progress: Progress = None) -> dict[str, Any]:
    """Read deliveries into ``records.parquet`` and ``rejected.parquet`` (+ ``ingest.json``)."""
    files = [Path(p) for p in (inputs if inputs is not None else cfg.inputs)]
    if not files:
        raise io.InputFileError("no input files given (ingest.inputs in params.yaml, or --input)")
    opts = io.ReadOptions(layout=cfg.layout, collector=cfg.collector, collected_at=cfg.collected_at,
                          max_field_chars=cfg.max_field_chars)
    from poisonguard import sharded

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    target = out_dir / paths.RECORDS_FILE
    counts = io.IngestCounts()
    # streamed a batch at a time into the shards (bounded memory at any delivery size); nothing
    # replaces the previous output unless every file was read
    with sharded.FrameSink(target, cfg.shards, empty=io.empty_records()) as records, \
            sharded.FrameSink(out_dir / paths.REJECTED_FILE, 1, empty=io.rejected_frame([])) as rejected:
        for recs, rej in io.read_batches(files, opts, fmt=cfg.format, sources=cfg.sources, progress=progress,
                                         batch_rows=cfg.batch_rows, counts=counts):
            records.write(recs)
            rejected.write(rej)
    summary = {"rows_in": counts.rows_in, "records": counts.records, "rejected": counts.rejected,
               "shards": len(io.shard_files(target)) if target.is_dir() else 1,
               "inputs": [str(f) for f in files], "per_file": counts.per_file,
               "seconds": round(time.perf_counter() - t0, 3)}
    _write_json(out_dir / "ingest.json", summary)
    audit.record(audit.INGESTED, subject={"inputs": summary["inputs"], "out_dir": str(out_dir)},
                 reason="ingest stage", details={k: summary[k] for k in ("rows_in", "records", "rejected", "per_file")})
    log.info("ingest: %d rows in, %d records, %d rejected", counts.rows_in, counts.records, counts.rejected)
    return summary


# ---------------------------------------------------------------- provenance

def provenance_stage(in_dir: Path = paths.INGESTED, out_dir: Path = paths.PROVENANCE) -> dict[str, Any]:
    """Manifest (id, hash, source, file, line, times) and the snapshot root of the ingested data.
    Reads only the manifest columns (one file or ingest's shards; never the texts)."""
    import pyarrow.parquet as pq

    man = provenance.read_manifest(Path(in_dir) / paths.RECORDS_FILE)
    root = provenance.root_of_manifest(man)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(man, out_dir / paths.MANIFEST_FILE)
    vc = man.column(S.SOURCE).value_counts().to_pylist()
    sources = {str(x["values"]): int(x["counts"]) for x in sorted(vc, key=lambda x: x["values"])}
    snap = {"snapshot_root": root, "rows": int(man.num_rows), "sources": sources,
            "hash": "sha256", "canonical_form": "see poisonguard.provenance"}
    _write_json(out_dir / paths.SNAPSHOT_FILE, snap)
    members = lineage.register_manifest(root, man)
    audit.record(audit.SNAPSHOT, subject={"snapshot_root": root, "kind": "ingest", "path": str(out_dir)},
                 reason="ingest snapshot", details={"rows": int(man.num_rows), "members": str(members),
                                                   "sources": sources})
    return snap


def _record_snapshot(records: pd.DataFrame, kind: str, where: Path, reason: str = "") -> str:
    """Keep the snapshot's members in the state folder and log a ``snapshot_cut`` entry."""
    root, members = lineage.register_snapshot(records)
    audit.record(audit.SNAPSHOT, subject={"snapshot_root": root, "kind": kind, "path": str(where)},
                 reason=reason or f"{kind} snapshot", details={
                     "rows": int(len(records)), "members": str(members),
                     "sources": records[S.SOURCE].value_counts().sort_index().to_dict()})
    return root


# ---------------------------------------------------------------- sanitize

def sanitize(cfg: SanitizeConfig, in_dir: Path = paths.INGESTED, out_dir: Path = paths.SANITIZED,
             provenance_dir: Path | None = paths.PROVENANCE, progress: Progress = None,
             n_shards: int = 1, map_: Callable[..., Any] | None = None,
             incremental: IncrementalConfig | None = None, ledger_dir: Path | None = None,
             merge_: Callable[..., Any] | None = None, place_: Callable[..., Any] | None = None,
             stream: bool = True) -> dict[str, Any]:
    """Run the detectors and write clean/quarantine/rejected parquet files plus the reports.

    With ``n_shards > 1`` the detectors run shard by shard (:mod:`poisonguard.sharded`), the
    per-shard steps through ``map_`` (e.g. Prefect tasks on a Dask cluster) and the merge of their
    summaries through ``merge_`` (default: in this process); same result. ``place_`` puts shards
    held in memory on the cluster once (see :func:`poisonguard.sharded.sanitize_sharded`).
    With ``incremental`` (enabled) only rows the ledger has not seen are re-checked
    (:mod:`poisonguard.incremental`; ledger in ``ledger_dir``, default ``<state>/ledger``).
    When the records are ingest's ``n_shards`` shard files (and no reference set) the stage streams:
    the records are never loaded whole (:func:`_sanitize_streamed`, an incremental night through
    :func:`_streamed_night`; the LLM review loads the rows it reviews); ``stream=False`` loads them
    anyway (the in-memory run the streamed one is checked against).
    """
    from poisonguard import sanitize as san
    from poisonguard.source_rollup import rollup

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    rejected = io.read_parquet(in_dir / paths.REJECTED_FILE, S.REJECTED_COLUMNS)
    ingest_summary = read_json(in_dir / "ingest.json")
    snap_root = ""
    if provenance_dir is not None and (Path(provenance_dir) / paths.SNAPSHOT_FILE).is_file():
        snap_root = read_json(Path(provenance_dir) / paths.SNAPSHOT_FILE)["snapshot_root"]
    files = io.shard_files(in_dir / paths.RECORDS_FILE) if (in_dir / paths.RECORDS_FILE).is_dir() else []
    reference = _load_reference(cfg.reference) if cfg.reference else None
    if n_shards > 1 and reference is not None:
        raise ValueError("sanitize.reference is not supported with sharded runs yet; use n_shards=1")
    records: pd.DataFrame | None = None     # loaded below unless the run streams

    def run(rows: pd.DataFrame) -> san.SanitizeResult:
        if n_shards > 1:
            from poisonguard import sharded

            # ingest's shards are the same split: the workers read their own file from disk
            whole = files if len(files) == n_shards and records is not None and len(rows) == len(records) else None
            return sharded.sanitize_sharded(rows, cfg, n_shards=n_shards if whole else _part_shards(rows),
                                            map_=map_ or map, progress=progress,
                                            shard_files=whole, merge_=merge_ or sharded.merge_groups,
                                            place_=place_)
        return san.sanitize(rows, cfg, reference=reference, progress=progress)

    def _part_shards(rows: pd.DataFrame) -> int:
        """Shards for a part of the records (an incremental night's delta set): as many rows per
        shard as ingest's shards hold, at least two (a 120k-row delta of 1.05M rows in 16 shards
        went as 16 shards x 7 detector groups of tasks, each with its fixed cost)."""
        import pyarrow.parquet as pq

        total = sum(pq.ParquetFile(f).metadata.num_rows for f in files) if len(files) == n_shards else \
            (len(records) if records is not None else 0)
        if total <= len(rows):
            return n_shards
        return int(min(n_shards, max(2, math.ceil(n_shards * len(rows) / total))))

    if stream and n_shards > 1 and len(files) == n_shards and reference is None:
        # ingest's shards are the split: the records stay on disk (see _sanitize_streamed); an
        # incremental night loads its delta set only (the LLM review, when it runs, samples that set,
        # as the in-memory night does; a full night's review loads the rows it picks)
        nightly, night = _streamed_night(cfg, files, incremental, ledger_dir, run)
        return _sanitize_streamed(cfg, files, rejected, ingest_summary, snap_root, out_dir, progress,
                                  map_ or map, merge_, nightly, night)
    records = io.read_records(in_dir / paths.RECORDS_FILE)
    t0 = time.perf_counter()

    inc_info: dict[str, Any] | None = None
    if incremental is not None and incremental.enabled:
        from poisonguard import incremental as incr

        ledger = _ledger_dir(ledger_dir)
        res, inc_info = incr.sanitize_incremental(records, cfg, ledger, incremental, run)
    else:
        res = run(records)
    standing = overrides.load(cfg.overrides)
    if standing:
        res.decisions, extra, applied = overrides.apply(res.decisions, res.records, standing)
        res.findings = extra + list(res.findings)
        log.info("overrides (%s): %s", cfg.overrides, applied)
    per_source = rollup(res.decisions, res.records)
    rep = rpt.sanitize_report(res, rows_in=ingest_summary["rows_in"], rejected=rejected, snapshot_root=snap_root,
                              per_source=per_source, inputs=ingest_summary.get("inputs"))
    rep["seconds"] = round(time.perf_counter() - t0, 3)
    if inc_info is not None:
        rep["incremental"] = inc_info
    rep["code_version"] = code_version()
    rep["params"] = section(cfg)
    io.write_parquet(res.clean, out_dir / paths.CLEAN_FILE, S.RECORD_COLUMNS)
    io.write_parquet(res.quarantine, out_dir / paths.QUARANTINE_FILE, (S.ID, S.DETECTORS, S.SCORE, S.EVIDENCE))
    io.write_parquet(rejected, out_dir / paths.REJECTED_FILE, S.REJECTED_COLUMNS)
    io.write_parquet(res.decisions.reset_index(), out_dir / paths.DECISIONS_FILE, (S.ID, S.DECISION))
    rpt.write_reports(rep, out_dir)
    held = res.quarantine
    return _held_and_summary(rep, out_dir, snap_root, held[S.ID], held[S.SOURCE].value_counts().to_dict(), inc_info)


def _held_and_summary(rep: dict[str, Any], out_dir: Path, snap_root: str, held_ids: Any, held_sources: dict[str, int],
                      inc_info: dict[str, Any] | None) -> dict[str, Any]:
    """Audit the rows held out of training (if any) and return the stage's summary."""
    if len(held_ids):
        audit.record(audit.QUARANTINED, subject={"sanitized_dir": str(out_dir), "snapshot_root": snap_root,
                                                 "ids_ref": lineage.save_ids(held_ids, "quarantine")},
                     reason=f"sanitize: {len(held_ids)} rows held out of training by the detectors",
                     details={"counts": rep["counts"], "verdict": rep["verdict"], "sources": held_sources,
                              "findings": [f"{f['title']} ({f['rows']} rows)" for f in rep["findings"][:10]]})
    out = {"verdict": rep["verdict"], "counts": rep["counts"], "findings": len(rep["findings"]),
           "top_findings": [f"{f['title']} ({f['rows']} rows)" for f in rep["findings"][:5]],
           "report": str(out_dir / paths.REPORT_HTML), "seconds": rep["seconds"]}
    if inc_info is not None:
        out["incremental"] = {k: inc_info[k] for k in ("mode", "reason", "new", "delta") if k in inc_info}
    return out


#: rows of a shard read back at a time by a streamed sanitize (its process holds one such batch)
WRITE_BATCH_ROWS = 100_000


def _ledger_dir(ledger_dir: Path | None) -> Path:
    return Path(ledger_dir) if ledger_dir is not None else audit.state_dir() / "ledger"


@dataclass
class _Nightly:
    """A streamed run that is a nightly (incremental runs enabled): the ledger it writes once the
    outputs are written. A full night gathers the ledger as the shards pass (``table`` None)."""

    ledger_dir: Path
    fingerprint: str
    mode: str                       # "full" | "incremental"
    reason: str
    runs_since_full: int
    t0: float
    counts: dict[str, int] | None = None
    table: Any = None


def _streamed_night(cfg: SanitizeConfig, files: list[Path], incremental: IncrementalConfig | None,
                    ledger_dir: Path | None, run: Callable[[pd.DataFrame], Any]) -> tuple[_Nightly | None, Any]:
    """Plan tonight over ingest's shard files without loading the records: (None, None) when
    incremental runs are off; a full night: (its :class:`_Nightly`, None), the detectors then run
    streamed over every row; an incremental night: the plan reads the shards' id, content-hash and
    prompt columns, ``run`` analyses the delta set (the only rows loaded) and the result is every
    row's decision (:class:`poisonguard.incremental.CompletedNight`, written streamed)."""
    if incremental is None or not incremental.enabled:
        return None, None
    from poisonguard import incremental as incr

    t0 = time.perf_counter()
    where = _ledger_dir(ledger_dir)
    fp = incr.fingerprint(cfg)
    reason = incr.settled_full_reason(incr.Ledger.load(where, table=False), fp, incremental)
    if reason is None:
        ledger = incr.Ledger.load(where)      # the table now (a full night needs the meta only)
        assert ledger is not None
        cols = incr.ShardColumns.read(files)
        p = incr.plan(cols.frame(), ledger, fp, incremental, cols.keys)
        log.info("sanitize mode: %s (%s) %s, over %d shard files", p.mode, p.reason, p.counts, len(files))
        if p.mode == "incremental":
            cols.hash_keys = p.hash_keys
            part = run(incr.weighted(incr.read_rows(cols, p.delta), p))
            data, _ = incr.decision_columns(cols.ids, part, ledger, p)
            table = incr.ledger_table(cols.hashes, cols.keys, pd.DataFrame(data), p.hash_keys, p.order_keys)
            cols.hashes = None          # in the ledger table now; the write checks the 64-bit keys
            night = incr.CompletedNight(cols, data, part)
            del part
            return _Nightly(where, fp, p.mode, p.reason, int(ledger.meta.get("runs_since_full", 0)) + 1, t0,
                            p.counts, table), night
        reason = p.reason
    log.info("sanitize mode: full (%s), streamed over %d shard files", reason, len(files))
    return _Nightly(where, fp, "full", reason, 0, t0), None


def _sanitize_streamed(cfg: SanitizeConfig, files: list[Path], rejected: pd.DataFrame, ingest_summary: dict[str, Any],
                       snap_root: str, out_dir: Path, progress: Progress, map_: Callable[..., Any],
                       merge_: Callable[..., Any] | None, nightly: _Nightly | None = None,
                       night: Any = None) -> dict[str, Any]:
    """:func:`sanitize` on ingest's shard files without loading the records: the detectors run
    through :func:`poisonguard.sharded.sanitize_streamed`, then every shard is read back once to
    lay the overrides over its decisions and append its rows to the clean / quarantine /
    decisions files; the report adds the shards' counts up. Same files and report as the
    in-memory sharded run (``tests/test_sharded.py``); this process holds one shard at a time.
    ``nightly``: tonight's ledger is written once the outputs are (a full night's from every row's
    content hash, prompt key and detector decision, gathered as the shards pass, before the
    overrides, as :func:`poisonguard.incremental.sanitize_incremental` does). ``night``: an
    incremental night's decisions (:func:`_streamed_night`) in place of a streamed detector run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from poisonguard import sharded
    from poisonguard import textfeat as tf
    from poisonguard.source_rollup import rollup_counts

    t0 = nightly.t0 if nightly is not None else time.perf_counter()
    st = night if night is not None else sharded.sanitize_streamed(files, cfg, map_, merge_ or sharded.merge_groups,
                                                                   progress)
    gather = nightly is not None and nightly.table is None      # a full night: the ledger as the shards pass
    standing = overrides.load(cfg.overrides)
    if progress:
        progress("write")
    dec_fields = [pa.field(S.DECISION, pa.string()), pa.field(S.SCORE, pa.float64()),
                  pa.field(S.DETECTORS, pa.string()), pa.field(S.EVIDENCE, pa.string()),
                  pa.field(S.FINDING, pa.string())]
    rec_schema = pq.read_schema(files[0]).remove_metadata()
    # the first shard's columns; a column that shard holds only nulls of takes the records' type
    rec_schema = pa.schema([S.RECORD_SCHEMA.field(f.name) if pa.types.is_null(f.type) and f.name in S.RECORD_COLUMNS
                            else f for f in rec_schema if f.name not in {x.name for x in dec_fields}])
    out_schema = pa.schema(list(rec_schema) + dec_fields)
    dec_schema = pa.schema([pa.field(S.ID, pa.string())] + dec_fields)
    # the report's top findings: their rows' source and decision, and the first examples of each
    present = st.keys
    top_ids: set[str] = set()
    example_ids: set[str] = set()
    found_rows: dict[str, tuple[str, str]] = {}
    examples: dict[str, dict[str, Any]] = {}
    applied_parts: list[tuple[list[Any], dict[str, int]]] = []
    per_source: dict[str, list[int]] = {}
    counts = {S.KEEP: 0, S.REVIEW: 0, S.QUARANTINE: 0}
    clean_n = quar_n = 0
    held_ids: list[str] = []
    held_sources: dict[str, int] = {}
    n_top = rpt.TOP_FINDINGS
    led_hashes: list[Any] = []
    led_keys: list[np.ndarray] = []
    led_dec: list[pd.DataFrame] = []
    led_cols = [S.DECISION, S.SCORE, S.DETECTORS, S.EVIDENCE, S.FINDING]

    def note_top(findings: list[Any]) -> None:
        for f in findings[:n_top]:
            h = tf.stable_hash(np.array(f.ids, dtype=object))
            pos = np.minimum(np.searchsorted(present, h), max(len(present) - 1, 0))
            known = present[pos] == h if len(present) else np.zeros(len(h), bool)
            ids = [i for i, k in zip(f.ids, known) if k]
            top_ids.update(ids)
            example_ids.update(ids[:rpt.EXAMPLES_PER_FINDING])

    out_dir.mkdir(parents=True, exist_ok=True)
    with sharded.FrameSink(out_dir / paths.CLEAN_FILE, schema=out_schema) as clean_sink, \
            sharded.FrameSink(out_dir / paths.QUARANTINE_FILE, schema=out_schema) as quar_sink, \
            sharded.FrameSink(out_dir / paths.DECISIONS_FILE, schema=dec_schema) as dec_sink:
        # the override findings lead the list (as in sanitize): their top rows are known only after
        # every shard has been read, so their examples come from a second look at those shards
        note_top(st.findings)
        for records, dec in st.shards(WRITE_BATCH_ROWS):
            if gather:
                from poisonguard import incremental as incr

                led_hashes += _chunks(incr.string_array(records[S.CONTENT_HASH]))
                led_keys.append(incr.prompt_keys(records))
                led_dec.append(dec[led_cols].reset_index(drop=True))
            if standing:
                dec, extra, applied = overrides.apply(dec, records, standing)
                applied_parts.append((extra, applied))
            d = dec[S.DECISION].to_numpy()
            keep = (d == S.KEEP) | ((d == S.REVIEW) & (not cfg.hold_review))
            rec = records.drop(columns=[f.name for f in dec_fields if f.name in records.columns])
            joined = pd.concat([rec.reset_index(drop=True), dec.reset_index(drop=True)], axis=1)
            clean_sink.write(joined[keep])
            quar_sink.write(joined[~keep])
            dec_sink.write(dec.reset_index())
            clean_n += int(keep.sum())
            quar_n += int((~keep).sum())
            for name in counts:
                counts[name] += int((d == name).sum())
            src = records[S.SOURCE].astype(str).to_numpy()
            for s_, q, r, m in zip(*_source_counts(src, d)):
                c = per_source.setdefault(s_, [0, 0, 0])
                c[0] += m
                c[1] += q
                c[2] += r
            ids = records[S.ID].to_numpy(dtype=object)
            held = ~keep
            held_ids += [str(x) for x in ids[held]]
            for s_, m in zip(*np.unique(src[held], return_counts=True)):
                held_sources[s_] = held_sources.get(s_, 0) + int(m)
            _collect_examples(records, dec, top_ids, example_ids, found_rows, examples)
            del records, dec, joined, rec
    findings = list(st.findings)
    if standing:
        extra, applied = overrides.merge_applied(applied_parts, standing)
        findings = extra + findings
        log.info("overrides (%s): %s", cfg.overrides, applied)
        if extra:
            # the override findings change the top list and its rows' decisions: look again
            top_ids.clear()
            example_ids.clear()
            note_top(findings)
            found_rows.clear()
            examples.clear()
            for records, dec in _reread(out_dir / paths.DECISIONS_FILE, st, top_ids):
                _collect_examples(records, dec, top_ids, example_ids, found_rows, examples)
    top = []
    for f in findings[:n_top]:
        ids = [i for i in f.ids if i in found_rows]
        top.append(rpt.finding_entry(f, [found_rows[i][0] for i in ids], [found_rows[i][1] for i in ids],
                                     [examples[i] for i in ids[:rpt.EXAMPLES_PER_FINDING]]))
    src_counts = pd.DataFrame.from_dict(per_source, orient="index", columns=["rows", "quarantined", "review"])
    per_src = rollup_counts(src_counts)
    rep = rpt.build_sanitize_report(
        {"records": st.rows, "keep": counts[S.KEEP], "review": counts[S.REVIEW],
         "quarantine": counts[S.QUARANTINE]}, clean=clean_n, quarantined=quar_n,
        rows_in=ingest_summary["rows_in"], rejected=rejected, findings=top,
        detectors={k: {**v, "info": rpt._jsonable(v["info"])} for k, v in st.detectors.items()},
        histograms=st.histograms, hold_review=cfg.hold_review,
        llm_summary=st.llm_summary, snapshot_root=snap_root,
        per_source=per_src, inputs=ingest_summary.get("inputs"))
    rep["seconds"] = round(time.perf_counter() - t0, 3)
    rep["code_version"] = code_version()
    rep["params"] = section(cfg)
    rep["streamed"] = {"shards": len(files)}
    inc_info: dict[str, Any] | None = None
    if nightly is not None:
        from poisonguard import incremental as incr

        table = nightly.table
        if table is None:
            table = incr.ledger_table(pa.chunked_array(led_hashes, type=pa.large_string()) if led_hashes else
                                      pa.array([], pa.large_string()),
                                      np.concatenate(led_keys) if led_keys else np.zeros(0, np.uint64),
                                      pd.concat(led_dec, ignore_index=True) if led_dec else
                                      pd.DataFrame({c: pd.Series(dtype=float if c == S.SCORE else object)
                                                    for c in led_cols}))
        del led_hashes, led_keys, led_dec
        meta, inc_info = incr.run_record(table, nightly.fingerprint, nightly.mode, nightly.reason,
                                         nightly.runs_since_full, nightly.counts or incr.full_counts(st.rows),
                                         nightly.t0)
        rep["incremental"] = inc_info
    io.write_parquet(rejected, out_dir / paths.REJECTED_FILE, S.REJECTED_COLUMNS)
    rpt.write_reports(rep, out_dir)
    if nightly is not None:     # last: a night whose outputs or report failed leaves the ledger as it was
        incr.write_ledger(nightly.ledger_dir, table, meta)
    return _held_and_summary(rep, out_dir, snap_root, pd.Series(held_ids, dtype=object),
                             dict(sorted(held_sources.items(), key=lambda kv: (-kv[1], kv[0]))), inc_info)


def _chunks(arr: Any) -> list[Any]:
    """An Arrow array's chunks (one for a plain array), as large strings."""
    import pyarrow as pa

    parts = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    return [p if pa.types.is_large_string(p.type) else p.cast(pa.large_string()) for p in parts]


def _source_counts(src: Any, d: Any) -> tuple[list[str], list[int], list[int], list[int]]:
    """Per source of one shard: (sources, quarantined, review, rows)."""
    frame = pd.DataFrame({"s": src, "q": d == S.QUARANTINE, "r": d == S.REVIEW})
    g = frame.groupby("s", sort=True)
    q, r, m = g["q"].sum(), g["r"].sum(), g.size()
    return list(q.index), [int(x) for x in q], [int(x) for x in r], [int(x) for x in m]


def _collect_examples(records: pd.DataFrame, dec: pd.DataFrame, top_ids: set[str], example_ids: set[str],
                      found_rows: dict[str, tuple[str, str]], examples: dict[str, dict[str, Any]]) -> None:
    """Source and decision of the rows of the report's top findings, and their example rows."""
    if not top_ids:
        return
    ids = records[S.ID].to_numpy(dtype=object)
    hit = np.flatnonzero(pd.Index(ids).isin(list(top_ids)))
    if not len(hit):
        return
    sub = records.iloc[hit].set_index(S.ID)
    for rid in sub.index:
        found_rows[rid] = (sub.at[rid, S.SOURCE], dec.at[rid, S.DECISION])
        if rid in example_ids:
            examples[rid] = rpt._example(sub, dec, rid)


def _reread(decisions_file: Path, st: Any, top_ids: set[str]) -> Any:
    """(records, final decisions) of the shards holding some of ``top_ids`` (after overrides)."""
    import pyarrow.parquet as pq

    final = pq.read_table(decisions_file, filters=[(S.ID, "in", sorted(top_ids))]).to_pandas().set_index(S.ID)
    for records, _ in st.shards(WRITE_BATCH_ROWS):
        mask = records[S.ID].isin(final.index).to_numpy()
        if mask.any():
            sub = records[mask]
            yield sub, final.loc[sub[S.ID]]


def _load_reference(path: str) -> pd.DataFrame:
    p = Path(path)
    if p.suffix == ".parquet":
        try:
            return io.read_records(p)
        except io.InputFileError:
            pass
    return io.read_inputs([p]).records


def sanitize_files(ingest_cfg: IngestConfig, cfg: SanitizeConfig, inputs: Sequence[Path | str], out_dir: Path,
                   progress: Progress = None) -> dict[str, Any]:
    """``poisonguard sanitize --input FILE --out DIR``: ingest, hash and sanitize into one folder."""
    out_dir = Path(out_dir)
    work = out_dir / ".work"
    ingest(ingest_cfg, work, inputs)
    provenance_stage(work, work)
    summary = sanitize(cfg, work, out_dir, work, progress=progress)
    shutil.copy(work / paths.MANIFEST_FILE, out_dir / paths.MANIFEST_FILE)
    shutil.copy(work / paths.SNAPSHOT_FILE, out_dir / paths.SNAPSHOT_FILE)
    shutil.rmtree(work)
    return summary


# ---------------------------------------------------------------- model side

def finetune_stage(cfg: FinetuneConfig, sanitized_dir: Path = paths.SANITIZED,
                   provenance_dir: Path = paths.PROVENANCE, out_dir: Path = paths.MODEL,
                   progress: bool = False) -> dict[str, Any]:
    """Train on ``clean.parquet``; the model card ties the model to its exact data and code."""
    from poisonguard import finetune

    clean = io.read_records(Path(sanitized_dir) / paths.CLEAN_FILE)
    ingest_root = ""
    if (Path(provenance_dir) / paths.SNAPSHOT_FILE).is_file():
        ingest_root = read_json(Path(provenance_dir) / paths.SNAPSHOT_FILE)["snapshot_root"]
    extra = {"code_version": code_version(), "git_rev": git_rev(), "ingest_snapshot_root": ingest_root,
             "sources": clean[S.SOURCE].value_counts().sort_index().to_dict(),
             "train_data": str(Path(sanitized_dir) / paths.CLEAN_FILE)}
    extra["dvc_lock"] = lineage.dvc_lock_hashes([Path(sanitized_dir), Path(provenance_dir)])
    card = finetune.train(clean, cfg, Path(out_dir), snapshot_root=provenance.root_of(clean), extra_card=extra,
                          progress=progress)
    card = _register_model(clean, Path(out_dir), card, reason="finetune stage")
    return {k: card.get(k) for k in ("snapshot_root", "train_loss", "val_loss", "n_train", "n_val", "seconds",
                                     "code_version", "model_id")}


def _register_model(train_rows: pd.DataFrame, model_dir: Path, card: dict[str, Any], reason: str) -> dict[str, Any]:
    """Add ``model_id`` to the card, keep the training snapshot, and log ``snapshot_cut`` + ``trained``."""
    root = _record_snapshot(train_rows, "train", model_dir, reason=f"training data of {model_dir}")
    card = {**card, "model_id": lineage.model_id(model_dir)}
    _write_json(model_dir / paths.MODEL_CARD, card)
    audit.record(audit.TRAINED, subject={"model_id": card["model_id"], "model_dir": str(model_dir),
                                         "snapshot_root": root}, reason=reason, details={
        "ingest_snapshot_root": card.get("ingest_snapshot_root"), "sources": card.get("sources", {}),
        "n_train": card.get("n_train"), "git_rev": card.get("git_rev"), "code_version": card.get("code_version"),
        "params": card.get("params"), "dvc_lock": card.get("dvc_lock", {}), "train_data": card.get("train_data"),
        "card": str(model_dir / paths.MODEL_CARD)})
    return card


def _suspects(sanitized_dir: Path) -> list[str]:
    """Trigger strings named by the sanitizer's finding clusters."""
    p = Path(sanitized_dir) / paths.REPORT_JSON
    if not p.is_file():
        return []
    out: list[str] = []
    for f in read_json(p).get("findings", []):
        for t in rpt._triggers(f):
            if t and t not in out and len(t) <= 80:
                out.append(t)
    return out


def _heldout(model_dir: Path, sanitized_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, held-out clean rows) split exactly as fine-tuning split them."""
    from poisonguard import lm
    from poisonguard.finetune import read_card

    clean = io.read_records(Path(sanitized_dir) / paths.CLEAN_FILE)
    clean = clean[clean[S.KIND] != S.KIND_DOCUMENT]
    val_fraction = float(read_card(model_dir).get("params", {}).get("val_fraction", 0.05))
    train, val = lm.split_by_id(clean, val_fraction)
    if len(val) < 8:  # too few held-out rows: fall back to all clean rows
        val = clean
    return train, val


def scan_stage(cfg: ScanConfig, model_dir: Path = paths.MODEL, sanitized_dir: Path = paths.SANITIZED,
               out: Path = paths.SCAN_REPORT, extra_suspects: Sequence[str] | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Scan the trained model for triggers: sanitizer suspects + built-in bank + mined n-grams + search."""
    from poisonguard import lm, scan

    model, tok = lm.load(model_dir, lm.select_device(cfg.device))
    train, val = _heldout(Path(model_dir), Path(sanitized_dir))
    suspects = list(extra_suspects or []) + _suspects(Path(sanitized_dir))
    candidates = scan.build_candidates(suspects, train, cfg)
    # the training rows say what a normal answer looks like (the small held-out set alone over-flags)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="scan", unit="prompt", leave=False)

    def tick(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        rep = scan.scan(model, tok, val, candidates, cfg, references=train, progress=tick).to_dict()
    finally:
        if bar is not None:
            bar.close()
    rep["suspects"] = suspects
    if extra_suspects:
        rep["suspect_asr"] = {s: scan.attack_success(model, tok, val, s, None, cfg) for s in extra_suspects}
    rep["model_dir"] = str(model_dir)
    _write_json(Path(out), rep)
    top = rep["candidates"][0] if rep["candidates"] else {}
    audit.record(audit.SCANNED, subject={"model_id": lineage.model_id(model_dir), "model_dir": str(model_dir),
                                         "scan_report": str(out)},
                 reason="suspected trigger(s): " + ", ".join(map(repr, extra_suspects)) if extra_suspects
                 else "trigger scan", details={
                     "verdict": rep["verdict"], "top_trigger": rep["top_trigger"], "top_anomaly": rep["top_anomaly"],
                     "suspects": suspects[:20], "suspect_asr": rep.get("suspect_asr", {})})
    return {"verdict": rep["verdict"], "top_trigger": rep["top_trigger"], "top_anomaly": rep["top_anomaly"],
            "n_candidates": rep["n_candidates"], "induced_response": top.get("induced_response"),
            "suspect_asr": max(rep.get("suspect_asr", {}).values(), default=0.0), "seconds": rep["seconds"]}


def prune_stage(cfg: PruneConfig, model_dir: Path = paths.MODEL,
                sanitized_dir: Path = paths.SANITIZED, scan_report: Path = paths.SCAN_REPORT,
                out_dir: Path = paths.PRUNED, trigger: str | None = None, target: str | None = None) -> dict[str, Any]:
    """Fine-prune when the scan found a backdoor (or a trigger is given), then verify on unseen variants."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    sc = read_json(scan_report)
    if trigger is None and sc.get("verdict") != "backdoor":
        summary = {"ran": False, "reason": f"scan verdict {sc.get('verdict')!r}: nothing to prune",
                   "promotable": sc.get("verdict") == "clean"}
        _write_json(out_dir / "prune.json", summary)
        return summary
    from poisonguard import lm, prune
    from poisonguard.finetune import read_card

    trigger = trigger or sc["top_trigger"]
    if target is None:
        top = next((c for c in sc.get("candidates", []) if c.get("candidate") == trigger), {})
        # the head of the induced response is what the backdoor reliably emits; the full greedy
        # continuation drifts after a few tokens and would understate ASR
        target = top.get("induced_heads") or top.get("induced_head") or top.get("induced_response") or None
    model, tok = lm.load(model_dir, lm.select_device(cfg.device))
    train, val = _heldout(Path(model_dir), Path(sanitized_dir))
    pruned, prep = prune.prune(model, tok, train, cfg, trigger=trigger, target_text=target, eval_prompts=val)
    lm.save(pruned, tok, out_dir)
    d = prep.to_dict()
    variants_ok = all(v < cfg.target_asr for v in d.get("asr_variants_after", {}).values())
    loss_ok = d["clean_loss_after"] <= d["clean_loss_before"] * (1 + cfg.max_loss_increase)
    d.update({"ran": True, "trigger": trigger, "target": target, "verified": bool(
        prep.success and d["asr_after"] < cfg.target_asr and variants_ok and loss_ok)})
    d["promotable"] = d["verified"]
    card = read_card(model_dir)
    card.update({"pruned_from": str(model_dir), "prune": {k: d[k] for k in ("asr_before", "asr_after",
                 "clean_loss_before", "clean_loss_after", "verified")}, "code_version": code_version()})
    card["model_id"] = d["model_id"] = lineage.model_id(out_dir)
    _write_json(out_dir / paths.MODEL_CARD, card)
    _write_json(out_dir / "prune.json", d)
    audit.record(audit.PRUNED, subject={"model_id": lineage.model_id(model_dir), "model_dir": str(model_dir),
                                        "pruned_model_id": d["model_id"], "pruned_dir": str(out_dir),
                                        "snapshot_root": card.get("snapshot_root")},
                 reason=f"fine-pruned against trigger {trigger!r}", details={
                     k: d.get(k) for k in ("asr_before", "asr_after", "asr_variants_after", "clean_loss_before",
                                           "clean_loss_after", "verified")})
    return {k: d.get(k) for k in ("ran", "trigger", "asr_before", "asr_after", "asr_variants_after",
                                  "clean_loss_before", "clean_loss_after", "verified", "promotable", "seconds",
                                  "model_id")}


def run_report(out_dir: Path = paths.RUN_REPORT, ingest: dict[str, Any] | None = None,
               snapshot: dict[str, Any] | None = None, sanitize_dir: Path | str = paths.SANITIZED,
               model_dir: Path | str = paths.MODEL, scan_report: Path | str = paths.SCAN_REPORT,
               prune: dict[str, Any] | None = None, prune_dir: Path | str = paths.PRUNED) -> dict[str, Any]:
    """One report for a whole run: sanitize + model card + scan + prune, and ``metrics.json`` for DVC."""
    from poisonguard.finetune import read_card

    out_dir = Path(out_dir)
    if ingest is None and (paths.INGESTED / "ingest.json").is_file():
        ingest = read_json(paths.INGESTED / "ingest.json")
    if snapshot is None and (paths.PROVENANCE / paths.SNAPSHOT_FILE).is_file():
        snapshot = read_json(paths.PROVENANCE / paths.SNAPSHOT_FILE)
    san_p = Path(sanitize_dir) / paths.REPORT_JSON
    san = read_json(san_p) if san_p.is_file() else None
    card = read_card(model_dir) if (Path(model_dir) / paths.MODEL_CARD).is_file() else None
    scan = read_json(Path(scan_report)) if Path(scan_report).is_file() else None
    if prune is None and (Path(prune_dir) / "prune.json").is_file():
        prune = read_json(Path(prune_dir) / "prune.json")
    scan_clean = scan is not None and scan.get("verdict") == "clean"
    pruned_ok = bool(prune and prune.get("ran") and prune.get("verified"))
    promotable = bool(card) and (scan_clean or pruned_ok)
    if scan is None:
        verdict = "not scanned"
    elif scan_clean:
        verdict = "promotable"
    elif pruned_ok:
        verdict = "backdoor found and removed (pruned model promotable)"
    else:
        verdict = "backdoor found: not promotable"
    if card is not None and scan is not None:  # the card as the report shows it: with the scan verdict
        card = {**card, "scan_verdict": scan.get("verdict"), "scan_report": str(scan_report)}
    rep = {"kind": "run", "verdict": verdict, "promotable": promotable, "ingest": ingest, "snapshot": snapshot,
           "sanitize": san, "model_card": card, "scan": scan, "prune": prune, "code_version": code_version()}
    paths_ = rpt.write_reports(rep, out_dir)
    metrics = {"promotable": promotable,
               "quarantined": (san or {}).get("counts", {}).get("quarantined"),
               "rows_in": (san or {}).get("counts", {}).get("rows_in"),
               "val_loss": (card or {}).get("val_loss"), "scan_top_anomaly": (scan or {}).get("top_anomaly"),
               "asr_after_prune": (prune or {}).get("asr_after")}
    _write_json(out_dir / "metrics.json", metrics)
    if promotable:
        pruned_id = (prune or {}).get("model_id") if pruned_ok and not scan_clean else None
        promoted = pruned_id or (card or {}).get("model_id") or lineage.model_id(model_dir)
        audit.record(audit.PROMOTED, subject={"model_id": promoted, "model_dir": str(prune_dir if pruned_id
                                                                                      else model_dir)},
                     reason=verdict, details={"report": str(out_dir / paths.REPORT_JSON)})
    return {"verdict": verdict, "promotable": promotable, "report": str(paths_["html"].resolve()),
            "sanitize": (san or {}).get("counts"), "scan": {"verdict": (scan or {}).get("verdict"),
                                                             "top_trigger": (scan or {}).get("top_trigger")},
            "prune": {k: (prune or {}).get(k) for k in ("ran", "asr_before", "asr_after", "verified")}}
