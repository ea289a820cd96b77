"""Publish a run's report as Prefect artifacts (markdown summary, tables, link to the HTML)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact


def _key(s: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", s.lower())[:60]


def _pct(x: Any) -> str:
    return "" if x is None or x != x else f"{100 * float(x):.2f}%"   # None or NaN (a lone source has no baseline)


def findings_table(san: dict[str, Any], limit: int = 50) -> list[dict[str, Any]]:
    """One row per finding cluster: what it is, how many rows, what was decided, where from, and why."""
    return [{"cluster": f["title"], "detector": f["detector"], "rows": f["rows"],
             "quarantined": (f.get("decisions") or {}).get("quarantine", 0),
             "review": (f.get("decisions") or {}).get("review", 0), "score": round(float(f["score"]), 3),
             "sources": ", ".join(f"{k} ({v})" for k, v in f.get("sources", {}).items()),
             "evidence": f["evidence"][:300]}
            for f in san.get("findings", [])[:limit]]


def sources_table(san: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-source suspicion: rows, quarantined, review, rate with its 95% interval, the other sources' rate, flag."""
    out = []
    for s in san.get("per_source", []):
        row = {"source": s.get("source"), "rows": s.get("rows"), "quarantined": s.get("quarantined"),
               "review": s.get("review"), "suspicious rate": _pct(s.get("rate"))}
        if "ci_low" in s:
            row["95% interval"] = f"{_pct(s.get('ci_low'))} - {_pct(s.get('ci_high'))}"
        if "baseline" in s:
            row["other sources"] = _pct(s.get("baseline"))
        if s.get("z") is not None:
            row["z"] = round(float(s["z"]), 2)
        if s.get("p_value") is not None:
            row["p"] = float(f"{float(s['p_value']):.2g}")
        row["flag"] = "suspicious" if s.get("flag") else ""
        out.append(row)
    return out


def publish(report_dir: Path, prefix: str) -> None:
    report_dir = Path(report_dir)
    rep = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    summary = (report_dir / "report.md").read_text(encoding="utf-8")
    create_markdown_artifact(key=_key(f"{prefix}-summary"), markdown=summary,
                             description=f"poisonguard {prefix} report: {rep.get('verdict')}")
    san: dict[str, Any] = (rep if rep.get("kind") == "sanitize" else rep.get("sanitize")) or {}
    if san.get("findings"):
        create_table_artifact(key=_key(f"{prefix}-findings"), description="finding clusters",
                              table=findings_table(san))
    if san.get("per_source"):
        create_table_artifact(key=_key(f"{prefix}-sources"), description="per-source suspicion",
                              table=sources_table(san))
    html = (report_dir / "report.html").resolve()
    create_link_artifact(key=_key(f"{prefix}-html"), link=html.as_uri(), link_text="HTML report",
                         description=str(html))
