"""The review loop: rows the sanitizer put in "review" go to a person, who marks each keep or
quarantine; the decisions are re-applied to the sanitize output and recorded in the audit log.

``export`` writes one CSV row per reviewed row with its evidence and empty ``action``, ``reviewer``
and ``reason`` columns. ``apply`` reads that file back (CSV, or JSONL with the same keys), checks
every line first (an unknown id, a bad action, a repeated id: each named with its line and field,
and nothing is changed), then moves rows between ``clean.parquet`` and ``quarantine.parquet``,
updates ``decisions.parquet`` and the report counts, and appends audit entries (``released``,
``quarantined``, then one ``review_applied``) saying who decided and why. Applying the same file
twice changes nothing the second time. A blank ``action`` leaves the row undecided.

Note: a fresh ``sanitize`` run rewrites its output folder; decisions applied to an earlier output
stay in the audit log (and in ``reviews/`` under the state folder) but are not re-applied.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from poisonguard import audit, io, paths
from poisonguard import report as rpt
from poisonguard import schema as S

ACTIONS = (S.KEEP, S.QUARANTINE)
COLUMNS = ("id", "source", "location", "decision", "score", "detectors", "finding", "evidence", "prompt",
           "response", "action", "reviewer", "reason")
TEXT_LIMIT = 500


class ReviewError(ValueError):
    """A decisions file that cannot be applied; ``problems`` name each line and field."""

    def __init__(self, path: Path, problems: list[str]):
        self.problems = problems
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path}: {len(problems)} problem(s), nothing applied:\n  " + "\n  ".join(problems[:20]) + more)


def _load(sanitized: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    clean = io.read_records(sanitized / paths.CLEAN_FILE)
    quar = io.read_parquet(sanitized / paths.QUARANTINE_FILE, S.RECORD_COLUMNS)
    dec = io.read_parquet(sanitized / paths.DECISIONS_FILE, (S.ID, S.DECISION))
    return clean, quar, dec


def export(sanitized: Path | str, out: Path | str, include_all: bool = False) -> dict[str, Any]:
    """Write the rows in review (``include_all``: also the quarantined ones) with their evidence."""
    sanitized, out = Path(sanitized), Path(out)
    clean, quar, dec = _load(sanitized)
    frames = []
    for loc, df in (("clean", clean), ("quarantine", quar)):
        if len(df):
            frames.append(df.assign(location=loc))
    rows = pd.concat(frames, ignore_index=True) if frames else clean.assign(location=[])
    current = dec.set_index(S.ID)[S.DECISION]
    rows[S.DECISION] = rows[S.ID].map(current).fillna(S.KEEP)
    wanted = rows[S.DECISION] == S.REVIEW
    if include_all:
        wanted |= rows[S.DECISION] == S.QUARANTINE
    rows = rows.loc[wanted].sort_values([S.DECISION, S.ID], kind="stable")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows.to_dict("records"):
            w.writerow({"id": r[S.ID], "source": r[S.SOURCE], "location": r["location"], "decision": r[S.DECISION],
                        "score": r.get(S.SCORE, ""), "detectors": r.get(S.DETECTORS, ""),
                        "finding": r.get(S.FINDING, ""), "evidence": r.get(S.EVIDENCE, ""),
                        "prompt": rpt.visible(str(r[S.PROMPT]))[:TEXT_LIMIT],
                        "response": rpt.visible(str(r[S.RESPONSE]))[:TEXT_LIMIT],
                        "action": "", "reviewer": "", "reason": ""})
    return {"rows": int(len(rows)), "out": str(out), "sanitized": str(sanitized)}


@dataclass
class Decision:
    id: str
    action: str
    reviewer: str
    reason: str
    line: int


@dataclass
class ApplyResult:
    released: list[str] = field(default_factory=list)       # quarantine -> clean
    quarantined: list[str] = field(default_factory=list)    # clean -> quarantine
    confirmed: list[str] = field(default_factory=list)      # already where the reviewer wants it
    undecided: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)   # every keep/quarantine decision applied

    def to_dict(self) -> dict[str, Any]:
        return {"released": self.released, "quarantined": self.quarantined, "confirmed": len(self.confirmed),
                "undecided": self.undecided, "counts": self.counts}


def read_decisions(path: Path | str, default_reviewer: str = "") -> tuple[list[Decision], int]:
    """Parse and check a decisions file (CSV or JSONL); returns (decisions, undecided rows)."""
    path = Path(path)
    if not path.is_file():
        raise io.InputFileError(f"{path}: no such file")
    problems: list[str] = []
    raw: list[tuple[int, dict[str, Any]]] = []
    if path.suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                problems.append(f"line {n}: not JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"line {n}: expected an object with id and action")
                continue
            raw.append((n, obj))
    else:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("id", "action") if c not in (reader.fieldnames or [])]
            if missing:
                raise ReviewError(path, [f"line 1 (header): missing column(s) {missing}; "
                                         "export one with `poisonguard review export`"])
            for obj in reader:
                raw.append((reader.line_num, obj))
    out: list[Decision] = []
    seen: dict[str, int] = {}
    undecided = 0
    for n, obj in raw:
        rid = str(obj.get("id") or "").strip()
        action = str(obj.get("action") or "").strip().lower()
        if not rid:
            problems.append(f"line {n}, field 'id': empty")
            continue
        if not action:
            undecided += 1
            continue
        if action not in ACTIONS:
            problems.append(f"line {n}, field 'action': {obj.get('action')!r} is not one of {', '.join(ACTIONS)}")
            continue
        if rid in seen:
            problems.append(f"line {n}, field 'id': {rid!r} already decided on line {seen[rid]}")
            continue
        seen[rid] = n
        reviewer = str(obj.get("reviewer") or "").strip() or default_reviewer
        if not reviewer:
            problems.append(f"line {n}, field 'reviewer': empty (fill it in or pass --reviewer)")
            continue
        out.append(Decision(rid, action, reviewer, str(obj.get("reason") or "").strip(), n))
    if problems:
        raise ReviewError(path, problems)
    return out, undecided


def apply(decisions_path: Path | str, sanitized: Path | str, default_reviewer: str = "",
          state: Path | str | None = None) -> ApplyResult:
    """Re-apply a person's keep/quarantine decisions to a sanitize output folder (see module docstring)."""
    sanitized = Path(sanitized)
    decisions, undecided = read_decisions(decisions_path, default_reviewer)
    clean, quar, dec = _load(sanitized)
    where = {**{i: "clean" for i in clean[S.ID]}, **{i: "quarantine" for i in quar[S.ID]}}
    unknown = [f"line {d.line}, field 'id': {d.id!r} is not a row of {sanitized} (clean or quarantine)"
               for d in decisions if d.id not in where]
    if unknown:
        raise ReviewError(Path(decisions_path), unknown)
    res = ApplyResult(undecided=undecided, decisions=list(decisions))
    by_id = {d.id: d for d in decisions}
    for d in decisions:
        at = where[d.id]
        if d.action == S.KEEP and at == "quarantine":
            res.released.append(d.id)
        elif d.action == S.QUARANTINE and at == "clean":
            res.quarantined.append(d.id)
        else:
            res.confirmed.append(d.id)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")

    def note(df: pd.DataFrame, ids: list[str], verb: str) -> pd.DataFrame:
        df = df.copy()
        for col in (S.EVIDENCE, S.DETECTORS):
            if col not in df.columns:
                df[col] = ""
        m = df[S.ID].isin(ids)
        df.loc[m, S.EVIDENCE] = [f"{(e or '').strip()}; [review] {verb} by {by_id[i].reviewer} on {stamp}: "
                                 f"{by_id[i].reason or 'no reason given'}".lstrip("; ")
                                 for i, e in zip(df.loc[m, S.ID], df.loc[m, S.EVIDENCE], strict=True)]
        return df

    new_dec = dec.set_index(S.ID)
    changed = 0
    for d in decisions:
        if d.id in new_dec.index and new_dec.at[d.id, S.DECISION] != d.action:
            new_dec.at[d.id, S.DECISION] = d.action
            changed += 1
    if not (changed or res.released or res.quarantined):  # applied before: nothing to do, nothing to log
        res.counts = json.loads((sanitized / paths.REPORT_JSON).read_text()).get("counts", {}) \
            if (sanitized / paths.REPORT_JSON).is_file() else {}
        return res
    if res.released or res.quarantined:
        to_clean = note(quar[quar[S.ID].isin(res.released)], res.released, "released")
        to_quar = note(clean[clean[S.ID].isin(res.quarantined)], res.quarantined, "quarantined")
        clean = pd.concat([clean[~clean[S.ID].isin(res.quarantined)], to_clean], ignore_index=True)
        quar = pd.concat([quar[~quar[S.ID].isin(res.released)], to_quar], ignore_index=True)
        for df in (clean, quar):
            df[S.DECISION] = df[S.ID].map(new_dec[S.DECISION]).fillna(df.get(S.DECISION))
        io.write_parquet(clean.sort_values(S.ID, kind="stable"), sanitized / paths.CLEAN_FILE, S.RECORD_COLUMNS)
        io.write_parquet(quar.sort_values(S.ID, kind="stable"), sanitized / paths.QUARANTINE_FILE,
                         (S.ID, S.DETECTORS, S.SCORE, S.EVIDENCE))
    io.write_parquet(new_dec.reset_index(), sanitized / paths.DECISIONS_FILE, (S.ID, S.DECISION))
    res.counts = _update_report(sanitized, clean, quar, new_dec, decisions_path, res)
    reviewers = sorted({d.reviewer for d in decisions})
    for action, ids in ((audit.RELEASED, res.released), (audit.QUARANTINED, res.quarantined)):
        if ids:
            audit.record(action, subject={"sanitized_dir": str(sanitized), "ids": sorted(ids)},
                         reason="; ".join(sorted({f"{by_id[i].reviewer}: {by_id[i].reason or 'no reason given'}"
                                                  for i in ids}))[:2000],
                         details={"by": {i: by_id[i].reviewer for i in sorted(ids)}, "decisions_file":
                                  str(decisions_path)}, state=state)
    if decisions:
        audit.record(audit.REVIEW_APPLIED, subject={"sanitized_dir": str(sanitized),
                                                    "ids": sorted(d.id for d in decisions)},
                     reason=f"review decisions by {', '.join(reviewers)}",
                     details={"decisions_file": str(decisions_path), "released": len(res.released),
                              "quarantined": len(res.quarantined), "confirmed": len(res.confirmed),
                              "undecided": undecided, "counts": res.counts,
                              "decisions": [{"id": d.id, "action": d.action, "reviewer": d.reviewer,
                                             "reason": d.reason} for d in decisions]}, state=state)
    return res


def _update_report(sanitized: Path, clean: pd.DataFrame, quar: pd.DataFrame, dec: pd.DataFrame,
                   decisions_path: Path | str, res: ApplyResult) -> dict[str, int]:
    """Recompute the report's row accounting (it must still reconcile) and re-render it."""
    rp = sanitized / paths.REPORT_JSON
    rep = json.loads(rp.read_text(encoding="utf-8")) if rp.is_file() else {"kind": "sanitize", "counts": {}}
    old = rep.get("counts", {})
    counts = {"rows_in": int(old.get("rows_in", len(clean) + len(quar))), "clean": int(len(clean)),
              "review": int((dec[S.DECISION] == S.REVIEW).sum()), "quarantined": int(len(quar)),
              "rejected": int(old.get("rejected", 0))}
    if counts["clean"] + counts["quarantined"] + counts["rejected"] != counts["rows_in"]:
        raise RuntimeError(f"{sanitized}: row accounting does not reconcile after review: {counts}")
    rep["counts"] = counts
    rep["verdict"] = rpt.VERDICT_POISON if counts["quarantined"] else rpt.VERDICT_CLEAN
    rep.setdefault("reviews", []).append({
        "time": datetime.now(UTC).isoformat(timespec="seconds"), "file": str(decisions_path),
        "released": len(res.released), "quarantined": len(res.quarantined), "confirmed": len(res.confirmed)})
    rpt.write_reports(rep, sanitized)
    return counts
