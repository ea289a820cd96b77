"""Default locations of the pipeline's artifacts (relative to the project root).

The DVC stages and the Prefect flows use the same layout; every path can be overridden on the
command line. ``data/``, ``models/`` and ``reports/`` are DVC outputs, ignored by git.
"""

from __future__ import annotations

from pathlib import Path

RAW = Path("data/raw")
INGESTED = Path("data/interim/ingested")
PROVENANCE = Path("data/interim/provenance")
SANITIZED = Path("data/processed/sanitized")
MODEL = Path("models/model")
PRUNED = Path("models/pruned")
REPORTS = Path("reports")
SCAN_REPORT = REPORTS / "scan.json"
PRUNE_REPORT = PRUNED / "prune.json"
RUN_REPORT = REPORTS / "run"
STATE = Path(".poisonguard")
AUDIT_LOG = STATE / "audit.jsonl"

RECORDS_FILE = "records.parquet"
REJECTED_FILE = "rejected.parquet"
MANIFEST_FILE = "manifest.parquet"
SNAPSHOT_FILE = "snapshot.json"
CLEAN_FILE = "clean.parquet"
QUARANTINE_FILE = "quarantine.parquet"
DECISIONS_FILE = "decisions.parquet"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
MODEL_CARD = "model_card.json"
