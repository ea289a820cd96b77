"""Publish a run's report as Prefect artifacts (markdown summary, tables, link to the HTML)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact


def _key(s: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", s.lower())[:60]


def publish(report_dir: Path, prefix: str) -> None:
    report_dir = Path(report_dir)
    rep = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    create_markdown_artifact(key=_key(f"{prefix}-summary"), markdown=(report_dir / "report.md").read_text(encoding="utf-8"),
                             description=f"poisonguard {prefix} report")
    san: dict[str, Any] = rep.get("sanitize") or {}
    if san.get("findings"):
        create_table_artifact(key=_key(f"{prefix}-findings"), description="finding clusters", table=[
            {"title": f["title"], "detector": f["detector"], "rows": f["rows"], "score": f["score"],
             "sources": ", ".join(f"{k} ({v})" for k, v in f.get("sources", {}).items()), "evidence": f["evidence"][:300]}
            for f in san["findings"][:50]])
    if san.get("per_source"):
        create_table_artifact(key=_key(f"{prefix}-sources"), description="per-source suspicion", table=san["per_source"])
    html = (report_dir / "report.html").resolve()
    create_link_artifact(key=_key(f"{prefix}-html"), link=html.as_uri(), link_text="HTML report",
                         description=str(html))
