"""Standing decisions that outlive a sanitize run: rows and sources a person or an incident decided.

A fresh ``sanitize`` recomputes every decision from the detectors; without this file, a person's
review ("keep row X, it is fine") or an on-call quarantine ("everything from vendor-acme is bad")
would be lost on the next nightly run or ``dvc repro``. ``overrides.jsonl`` (``sanitize.overrides``
in ``params.yaml``; a dependency of the DVC sanitize stage, versioned with the code) holds them, one
JSON object per line::

    {"id": "vendor-acme-000245", "action": "quarantine", "by": "alice", "reason": "phishing link", "at": "2026-12-01"}
    {"source": "vendor-acme", "action": "quarantine", "by": "incident inc-3f2a", "reason": "backdoor source"}

``action`` is ``keep`` or ``quarantine`` for a row id; a source can only be quarantined (keeping a
whole source regardless of the detectors would switch the sanitizer off for it). For the same row,
a later line wins over an earlier one; a row-level ``keep`` does not release a row of a quarantined
source. Every applied override shows as the detector ``override`` with who and why in the evidence.
``poisonguard review apply`` and ``poisonguard remediate --source`` append to the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from poisonguard import schema as S
from poisonguard.detectors.base import Finding

DEFAULT_PATH = Path("overrides.jsonl")
NAME = "override"


class OverrideError(ValueError):
    """An overrides file that cannot be read; the message names each bad line and field."""


@dataclass(frozen=True)
class Override:
    action: str                 # keep | quarantine
    by: str
    reason: str = ""
    id: str | None = None
    source: str | None = None
    at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def load(path: Path | str | None) -> list[Override]:
    """Read and check the file; a missing file means no overrides. Every problem is named at once."""
    if path is None or not Path(path).is_file():
        return []
    path = Path(path)
    out: list[Override] = []
    problems: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: expected an object")
            continue
        rid, src, action = obj.get("id"), obj.get("source"), str(obj.get("action", "")).strip().lower()
        if (rid is None) == (src is None):
            problems.append(f"line {n}, field 'id'/'source': give exactly one of them")
            continue
        if action not in (S.KEEP, S.QUARANTINE):
            problems.append(f"line {n}, field 'action': {obj.get('action')!r} is not keep or quarantine")
            continue
        if src is not None and action != S.QUARANTINE:
            problems.append(f"line {n}, field 'action': a source can only be quarantined")
            continue
        if not str(obj.get("by", "")).strip():
            problems.append(f"line {n}, field 'by': say who decided")
            continue
        out.append(Override(action, str(obj["by"]), str(obj.get("reason", "")), None if rid is None else str(rid),
                            None if src is None else str(src), str(obj.get("at", ""))))
    if problems:
        raise OverrideError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]))
    return out


def append(path: Path | str, new: list[Override]) -> int:
    """Add overrides not already in the file (same target, action, author and reason); returns how many."""
    path = Path(path)
    have = {(o.id, o.source, o.action, o.by, o.reason) for o in load(path)}
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = []
    for o in new:
        key = (o.id, o.source, o.action, o.by, o.reason)
        if key in have:
            continue
        have.add(key)
        d = o.to_dict()
        d.setdefault("at", stamp)
        lines.append(json.dumps(d, ensure_ascii=False))
    if lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write("".join(x + "\n" for x in lines))
    return len(lines)


def apply(decisions: pd.DataFrame, records: pd.DataFrame, overrides: list[Override]
          ) -> tuple[pd.DataFrame, list[Finding], dict[str, int]]:
    """Lay the overrides over fused decisions (index: id). Returns (decisions, findings, counts)."""
    if not overrides:
        return decisions, [], {"rows": 0, "quarantined": 0, "kept": 0}
    dec = decisions.copy()
    src = pd.Series(records[S.SOURCE].to_numpy(), index=pd.Index(records[S.ID]))
    final: dict[str, Override] = {}
    for o in overrides:                           # row-level: the later line wins
        if o.id is not None and o.id in dec.index:
            final[o.id] = o
    findings: list[Finding] = []
    for o in overrides:                           # a quarantined source wins over a row-level keep
        if o.source is not None:
            ids = src.index[src.to_numpy() == o.source]
            for rid in ids:
                final[rid] = o
            if len(ids):
                findings.append(Finding(NAME, f"source '{o.source}' quarantined by {o.by}",
                                        f"every row of source '{o.source}' held back: {o.reason or 'no reason given'}"
                                        f" ({o.by}, {o.at or 'undated'})", tuple(ids), 1.0,
                                        {"source": o.source, "by": o.by}))
    kept = quarantined = 0
    for rid, o in final.items():
        what = "quarantined" if o.action == S.QUARANTINE else "kept"
        ev = f"[{NAME}] {what} by {o.by}{' on ' + o.at if o.at else ''}: {o.reason or 'no reason given'}"
        dec.at[rid, S.DECISION] = o.action
        dec.at[rid, S.DETECTORS] = ",".join(x for x in [NAME, dec.at[rid, S.DETECTORS]] if x)
        dec.at[rid, S.EVIDENCE] = "; ".join(x for x in [ev, dec.at[rid, S.EVIDENCE]] if x)
        if o.action == S.QUARANTINE:
            dec.at[rid, S.SCORE] = 1.0
            quarantined += 1
            if o.source is not None:
                dec.at[rid, S.FINDING] = f"source '{o.source}' quarantined by {o.by}"
        else:
            kept += 1
    row_q = [rid for rid, o in final.items() if o.source is None and o.action == S.QUARANTINE]
    if row_q:
        findings.append(Finding(NAME, f"{len(row_q)} rows quarantined by a person", "standing review decisions "
                                f"in the overrides file", tuple(sorted(row_q)), 1.0, {}))
    return dec, findings, {"rows": len(final), "quarantined": quarantined, "kept": kept}


def merge_applied(parts: list[tuple[list[Finding], dict[str, int]]], overrides: list[Override]
                  ) -> tuple[list[Finding], dict[str, int]]:
    """The findings and counts of :func:`apply` run shard by shard (a streamed sanitize), as one
    call over all rows gives them: a source's finding unites its rows of every shard (in the
    order of the overrides file), the person's row-level quarantines make one finding."""
    by_source: dict[str, Finding] = {}
    rows: list[str] = []
    counts = {"rows": 0, "quarantined": 0, "kept": 0}
    for found, applied in parts:
        for k in counts:
            counts[k] += int(applied.get(k, 0))
        for f in found:
            if f.info.get("source") is None:
                rows += list(f.ids)
            elif f.title in by_source:
                g = by_source[f.title]
                by_source[f.title] = Finding(g.detector, g.title, g.evidence, g.ids + f.ids, g.score, g.info)
            else:
                by_source[f.title] = f
    order = {(o.source, o.by): i for i, o in reversed(list(enumerate(overrides))) if o.source is not None}
    out = sorted(by_source.values(), key=lambda f: order.get((f.info["source"], f.info.get("by")), len(order)))
    if rows:
        out.append(Finding(NAME, f"{len(rows)} rows quarantined by a person", "standing review decisions "
                           "in the overrides file", tuple(sorted(rows)), 1.0, {}))
    return out, counts
