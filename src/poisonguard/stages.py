"""One function per DAG node: ``(config section, input paths, output paths) -> summary``.

The same functions back the DVC stages (``dvc.yaml`` -> ``python -m poisonguard <stage>``) and
the Prefect tasks (``tasks/``); they read and write files and return small JSON-able summaries.
Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from poisonguard import code_version, io, paths, provenance
from poisonguard import report as rpt
from poisonguard import schema as S
from poisonguard.config import IngestConfig, SanitizeConfig, section
from poisonguard.demo import DemoConfig

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

def ingest(cfg: IngestConfig, out_dir: Path = paths.INGESTED, inputs: Sequence[Path | str] | None = None
           ) -> dict[str, Any]:
    """Read deliveries into ``records.parquet`` and ``rejected.parquet`` (+ ``ingest.json``)."""
    files = [Path(p) for p in (inputs if inputs is not None else cfg.inputs)]
    if not files:
        raise io.InputFileError("no input files given (ingest.inputs in params.yaml, or --input)")
    opts = io.ReadOptions(layout=cfg.layout, collector=cfg.collector, collected_at=cfg.collected_at,
                          max_field_chars=cfg.max_field_chars)
    t0 = time.perf_counter()
    res = io.read_inputs(files, opts, fmt=cfg.format, sources=cfg.sources)
    out_dir = Path(out_dir)
    io.write_records(res.records, out_dir / paths.RECORDS_FILE)
    io.write_parquet(res.rejected, out_dir / paths.REJECTED_FILE, S.REJECTED_COLUMNS)
    summary = {"rows_in": res.rows_in, "records": len(res.records), "rejected": len(res.rejected),
               "inputs": [str(f) for f in files], "per_file": res.per_file,
               "seconds": round(time.perf_counter() - t0, 3)}
    _write_json(out_dir / "ingest.json", summary)
    log.info("ingest: %d rows in, %d records, %d rejected", res.rows_in, len(res.records), len(res.rejected))
    return summary


# ---------------------------------------------------------------- provenance

def provenance_stage(in_dir: Path = paths.INGESTED, out_dir: Path = paths.PROVENANCE) -> dict[str, Any]:
    """Manifest (id, hash, source, file, line, times) and the snapshot root of the ingested data."""
    records = io.read_records(Path(in_dir) / paths.RECORDS_FILE)
    man = provenance.manifest(records)
    out_dir = Path(out_dir)
    io.write_parquet(man, out_dir / paths.MANIFEST_FILE, provenance.MANIFEST_COLUMNS)
    snap = {"snapshot_root": provenance.root_of(records), "rows": int(len(records)),
            "sources": records[S.SOURCE].value_counts().sort_index().to_dict(),
            "hash": "sha256", "canonical_form": "see poisonguard.provenance"}
    _write_json(out_dir / paths.SNAPSHOT_FILE, snap)
    return snap


# ---------------------------------------------------------------- sanitize

def sanitize(cfg: SanitizeConfig, in_dir: Path = paths.INGESTED, out_dir: Path = paths.SANITIZED,
             provenance_dir: Path | None = paths.PROVENANCE, progress: Progress = None) -> dict[str, Any]:
    """Run the detectors and write clean/quarantine/rejected parquet files plus the reports."""
    from poisonguard import sanitize as san
    from poisonguard.source_rollup import rollup

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    records = io.read_records(in_dir / paths.RECORDS_FILE)
    rejected = io.read_parquet(in_dir / paths.REJECTED_FILE, S.REJECTED_COLUMNS)
    ingest_summary = read_json(in_dir / "ingest.json")
    snap_root = ""
    if provenance_dir is not None and (Path(provenance_dir) / paths.SNAPSHOT_FILE).is_file():
        snap_root = read_json(Path(provenance_dir) / paths.SNAPSHOT_FILE)["snapshot_root"]
    reference = _load_reference(cfg.reference) if cfg.reference else None
    t0 = time.perf_counter()
    res = san.sanitize(records, cfg, reference=reference, progress=progress)
    per_source = rollup(res.decisions, res.records)
    rep = rpt.sanitize_report(res, rows_in=ingest_summary["rows_in"], rejected=rejected, snapshot_root=snap_root,
                              per_source=per_source, inputs=ingest_summary.get("inputs"))
    rep["seconds"] = round(time.perf_counter() - t0, 3)
    rep["code_version"] = code_version()
    rep["params"] = section(cfg)
    io.write_parquet(res.clean, out_dir / paths.CLEAN_FILE, S.RECORD_COLUMNS)
    io.write_parquet(res.quarantine, out_dir / paths.QUARANTINE_FILE, (S.ID, S.DETECTORS, S.SCORE, S.EVIDENCE))
    io.write_parquet(rejected, out_dir / paths.REJECTED_FILE, S.REJECTED_COLUMNS)
    io.write_parquet(res.decisions.reset_index(), out_dir / paths.DECISIONS_FILE, (S.ID, S.DECISION))
    rpt.write_reports(rep, out_dir)
    return {"verdict": rep["verdict"], "counts": rep["counts"], "findings": len(rep["findings"]),
            "top_findings": [f"{f['title']} ({f['rows']} rows)" for f in rep["findings"][:5]],
            "report": str(out_dir / paths.REPORT_HTML), "seconds": rep["seconds"]}


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
