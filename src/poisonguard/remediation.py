"""On-call data remediation: a bad source, bad rows or a trigger -> a clean model and an incident report.

Steps (:data:`STEPS`), each recorded in ``<out>/<incident>/state.json`` when it completes:

1. ``assess``: the rows to remove (every row of the source, the given ids, rows whose prompt or
   response contains the trigger) and, from the lineage store, every snapshot and model that
   included any of them.
2. ``quarantine``: a working copy of the sanitize output (``<incident>/data/``) with those rows
   moved from ``clean.parquet`` to ``quarantine.parquet`` (evidence says which incident and why).
3. ``snapshot``: the new clean snapshot (root hash, members kept in the state folder).
4. ``retrain``: :func:`poisonguard.stages.finetune_stage` on the new clean data -> ``<incident>/model``.
5. ``scan_before`` / ``scan_after``: the old and the new model scanned with the trigger as a suspect.
6. ``report``: ``incident.json`` and ``incident.md`` (what was affected, what was done, before/after).

Safe to re-run after a crash: completed steps are skipped; the quarantine is a set operation
(a row already in quarantine is never added twice) written by atomic replace, and every audit
entry carries the incident id and step and is written only if that (incident, step) has none yet.
A retrain whose model is complete and logged is not repeated. The same inputs give the same
incident id, so running the same command again resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from poisonguard import audit, io, lineage, paths, provenance
from poisonguard import schema as S
from poisonguard.model_config import FinetuneConfig, ScanConfig

STEPS = ("assess", "quarantine", "snapshot", "retrain", "scan_before", "scan_after", "report")
STATE_FILE = "state.json"
DEFAULT_OUT = Path("reports/remediation")


class RemediationError(ValueError):
    """The remediation cannot start (nothing matches) or its state belongs to other inputs."""


def incident_id(source: str | None, rows: Iterable[str], trigger: str | None, sanitized_dir: Path | str,
                model_dir: Path | str) -> str:
    key = json.dumps({"source": source, "rows": sorted(set(rows)), "trigger": trigger,
                      "sanitized": str(sanitized_dir), "model": str(model_dir)}, sort_keys=True)
    return "inc-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def _save_state(path: Path, st: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(st, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_parquet_atomic(df: pd.DataFrame, path: Path, required: Iterable[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    io.write_parquet(df, tmp, tuple(required))
    os.replace(tmp, path)


def _record_once(action: str, incident: str, step: str, **kw: Any) -> dict[str, Any]:
    """Append an audit entry unless this incident's step already has one (re-runs never double-log)."""
    done = audit.entries(action, incident=incident, step=step)
    if done:
        return done[0]
    subject = {"incident": incident, "step": step, **kw.pop("subject", {})}
    return audit.record(action, subject=subject, **kw)


def _matches(df: pd.DataFrame, source: str | None, rows: set[str], trigger: str | None) -> pd.Series:
    m = df[S.ID].isin(rows)
    if source is not None:
        m |= df[S.SOURCE] == source
    if trigger:
        t = trigger.lower()
        m |= df[S.PROMPT].str.lower().str.contains(t, regex=False) | df[S.RESPONSE].str.lower().str.contains(
            t, regex=False)
    return m


def run(finetune_cfg: FinetuneConfig, scan_cfg: ScanConfig, *, source: str | None = None,
        rows: Iterable[str] = (), trigger: str | None = None, model_dir: Path | str = paths.MODEL,
        sanitized_dir: Path | str = paths.SANITIZED, provenance_dir: Path | str = paths.PROVENANCE,
        out_root: Path | str = DEFAULT_OUT, incident: str | None = None, scan: bool = True,
        reason: str = "") -> dict[str, Any]:
    """Run (or resume) a remediation; returns the incident summary (see module docstring)."""
    rows = sorted({str(r) for r in rows})
    if source is None and not rows and not trigger:
        raise RemediationError("give a bad source, bad row ids or a trigger")
    model_dir, sanitized_dir, provenance_dir = Path(model_dir), Path(sanitized_dir), Path(provenance_dir)
    inc = incident or incident_id(source, rows, trigger, sanitized_dir, model_dir)
    out = Path(out_root) / inc
    out.mkdir(parents=True, exist_ok=True)
    sp = out / STATE_FILE
    inputs = {"source": source, "rows": rows, "trigger": trigger, "model_dir": str(model_dir),
              "sanitized_dir": str(sanitized_dir), "provenance_dir": str(provenance_dir)}
    st: dict[str, Any] = json.loads(sp.read_text()) if sp.is_file() else {
        "incident": inc, "inputs": inputs, "completed": [], "results": {}}
    if st["inputs"] != inputs:
        raise RemediationError(f"{sp}: incident {inc} was started with other inputs {st['inputs']}; "
                               "use another --incident or remove that folder")
    st["resumed"] = bool(st["completed"]) and "report" not in st["completed"]
    why = reason or ", ".join(x for x in (source and f"bad source {source!r}", rows and f"{len(rows)} bad rows",
                                         trigger and f"trigger {trigger!r}") if x)
    work = out / "data"
    new_model = out / "model"
    R = st["results"]

    def done(step: str, result: dict[str, Any]) -> None:
        R[step] = result
        if step not in st["completed"]:
            st["completed"].append(step)
        _save_state(sp, st)

    # 1. assess
    if "assess" not in st["completed"]:
        clean = io.read_records(sanitized_dir / paths.CLEAN_FILE)
        quar = io.read_parquet(sanitized_dir / paths.QUARANTINE_FILE, S.RECORD_COLUMNS)
        hit_clean = clean.loc[_matches(clean, source, set(rows), trigger), S.ID].tolist()
        hit_quar = quar.loc[_matches(quar, source, set(rows), trigger), S.ID].tolist()
        if not hit_clean and not hit_quar:
            raise RemediationError(f"nothing in {sanitized_dir} matches {why}: check the source name or ids "
                                   "(`poisonguard lineage source S`)")
        known = set(clean[S.ID]) | set(quar[S.ID])
        aff = lineage.affected(set(hit_clean) | set(hit_quar), source)
        done("assess", {"to_quarantine": sorted(hit_clean), "already_quarantined": sorted(hit_quar),
                        "unknown_rows": [r for r in rows if r not in known],
                        "sources": clean.loc[clean[S.ID].isin(hit_clean), S.SOURCE].value_counts().to_dict(),
                        "affected_snapshots": aff["snapshots"], "affected_models": aff["models"],
                        "old_snapshot_root": provenance.root_of(clean), "old_clean_rows": int(len(clean))})
    targets = set(R["assess"]["to_quarantine"])

    # 2. quarantine (in a working copy of the sanitize output)
    if "quarantine" not in st["completed"]:
        if not (work / paths.CLEAN_FILE).is_file():
            tmp = out / "data.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name in (paths.CLEAN_FILE, paths.QUARANTINE_FILE, paths.REJECTED_FILE, paths.DECISIONS_FILE,
                         paths.REPORT_JSON):
                if (sanitized_dir / name).is_file():
                    shutil.copy2(sanitized_dir / name, tmp / name)
            shutil.rmtree(work, ignore_errors=True)
            os.replace(tmp, work)
        clean = io.read_records(work / paths.CLEAN_FILE)
        quar = io.read_parquet(work / paths.QUARANTINE_FILE, S.RECORD_COLUMNS)
        moving = clean[clean[S.ID].isin(targets) & ~clean[S.ID].isin(quar[S.ID])].copy()
        if len(moving):
            moving[S.DECISION] = S.QUARANTINE
            moving[S.DETECTORS] = "remediation"
            moving[S.EVIDENCE] = f"[remediation {inc}] {why}"
            quar = pd.concat([quar, moving], ignore_index=True)
            _write_parquet_atomic(quar, work / paths.QUARANTINE_FILE, (S.ID, S.DETECTORS, S.SCORE, S.EVIDENCE))
        clean = clean[~clean[S.ID].isin(targets)]
        _write_parquet_atomic(clean, work / paths.CLEAN_FILE, S.RECORD_COLUMNS)
        if (work / paths.DECISIONS_FILE).is_file():
            dec = pd.read_parquet(work / paths.DECISIONS_FILE)
            dec.loc[dec[S.ID].isin(targets), S.DECISION] = S.QUARANTINE
            _write_parquet_atomic(dec, work / paths.DECISIONS_FILE, (S.ID, S.DECISION))
        if (work / paths.REPORT_JSON).is_file():
            rep = json.loads((work / paths.REPORT_JSON).read_text(encoding="utf-8"))
            c = rep.get("counts", {})
            c.update({"clean": int(len(clean)), "quarantined": int(len(quar))})
            rep["remediation"] = {"incident": inc, "moved": len(targets), "reason": why}
            (work / paths.REPORT_JSON).write_text(json.dumps(rep, indent=2, default=str) + "\n", encoding="utf-8")
        entry = _record_once(audit.QUARANTINED, inc, "quarantine", subject={
            "sanitized_dir": str(work), "ids_ref": lineage.save_ids(targets, "remediation")},
            reason=f"remediation {inc}: {why}", details={"rows": len(targets), "sources": R["assess"]["sources"]})
        done("quarantine", {"moved": len(targets), "quarantine_rows": int(len(quar)), "clean_rows": int(len(clean)),
                            "audit_seq": entry["seq"], "data": str(work)})

    # 3. new clean snapshot
    if "snapshot" not in st["completed"]:
        clean = io.read_records(work / paths.CLEAN_FILE)
        root, members = lineage.register_snapshot(clean)
        leaked = sorted(set(clean[S.ID]) & targets)
        if leaked:  # never train on what we just removed
            raise RuntimeError(f"remediation {inc}: {len(leaked)} removed rows are still in {work}: {leaked[:5]}")
        _record_once(audit.SNAPSHOT, inc, "snapshot", subject={"snapshot_root": root, "kind": "remediation",
                                                               "path": str(work)},
                     reason=f"clean snapshot without the rows of remediation {inc}",
                     details={"rows": int(len(clean)), "members": str(members),
                              "sources": clean[S.SOURCE].value_counts().sort_index().to_dict()})
        done("snapshot", {"snapshot_root": root, "rows": int(len(clean)),
                          "sources": clean[S.SOURCE].value_counts().sort_index().to_dict()})

    # 4. retrain
    if "retrain" not in st["completed"]:
        from poisonguard import stages
        from poisonguard.finetune import read_card

        card = read_card(new_model) if (new_model / paths.MODEL_CARD).is_file() else {}
        finished = (card.get("snapshot_root") == R["snapshot"]["snapshot_root"] and card.get("model_id")
                    and audit.entries(audit.TRAINED, model_id=card["model_id"]))
        if not finished:  # absent, or killed before its card and audit entry were written: train (again)
            stages.finetune_stage(finetune_cfg, work, provenance_dir, new_model)
            card = read_card(new_model)
        done("retrain", {"model_id": card["model_id"], "model_dir": str(new_model),
                         "snapshot_root": card["snapshot_root"], "val_loss": card.get("val_loss"),
                         "n_train": card.get("n_train")})

    # 5. scans, before and after
    suspects = [trigger] if trigger else None
    for step, mdir, sdir in (("scan_before", model_dir, sanitized_dir), ("scan_after", new_model, work)):
        if step in st["completed"]:
            continue
        if not scan or not (mdir / paths.MODEL_CARD).is_file():
            done(step, {"ran": False, "reason": "scan disabled" if not scan else f"{mdir}: no model"})
            continue
        from poisonguard import stages

        s = stages.scan_stage(scan_cfg, mdir, sdir, out / f"{step}.json", extra_suspects=suspects)
        done(step, {"ran": True, **s})

    # 6. incident report
    if "report" not in st["completed"]:
        summary = _summary(st, scan_cfg)
        (out / "incident.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        (out / "incident.md").write_text(to_markdown(summary), encoding="utf-8")
        _record_once(audit.REMEDIATED, inc, "report", subject={"model_id": R["retrain"]["model_id"],
                                                               "replaces": [m["model_id"] for m in
                                                                            R["assess"]["affected_models"]]},
                     reason=why, details={"report": str(out / "incident.json"), "passes": summary["passes"],
                                          "moved": R["quarantine"]["moved"]})
        done("report", {"incident_json": str(out / "incident.json"), "incident_md": str(out / "incident.md")})
    res = json.loads((out / "incident.json").read_text(encoding="utf-8"))
    res["resumed"] = st["resumed"]
    return res


def _summary(st: dict[str, Any], scan_cfg: ScanConfig) -> dict[str, Any]:
    R = st["results"]
    a, q, sn, rt = R["assess"], R["quarantine"], R["snapshot"], R["retrain"]
    before, after = R.get("scan_before", {}), R.get("scan_after", {})
    old_card: dict[str, Any] = {}
    mdir = Path(st["inputs"]["model_dir"])
    if (mdir / paths.MODEL_CARD).is_file():
        old_card = json.loads((mdir / paths.MODEL_CARD).read_text())
    # the verdict decides (it calibrates every candidate against the others); the suspected trigger's
    # own attack success is reported beside it: without a known target text it counts prompts whose
    # first tokens the trigger changes, which is noisy on a barely trained model
    passes = bool(after.get("ran") and after.get("verdict") == "clean")
    trigger_ok = None if after.get("suspect_asr") is None or not st["inputs"]["trigger"] else \
        bool(after["suspect_asr"] < scan_cfg.min_asr)
    return {
        "incident": st["incident"], "inputs": st["inputs"], "passes": passes, "promotable": passes,
        "trigger_asr_below_threshold": trigger_ok,
        "affected": {"rows_removed": a["to_quarantine"], "rows_already_quarantined": a["already_quarantined"],
                     "unknown_rows": a["unknown_rows"], "sources": a["sources"],
                     "snapshots": a["affected_snapshots"], "models": a["affected_models"]},
        "done": {"quarantined_rows": q["moved"], "data": q["data"], "new_snapshot_root": sn["snapshot_root"],
                 "new_model_id": rt["model_id"], "new_model_dir": rt["model_dir"]},
        "before": {"snapshot_root": a["old_snapshot_root"], "clean_rows": a["old_clean_rows"],
                   "model_id": old_card.get("model_id"), "val_loss": old_card.get("val_loss"),
                   "scan_verdict": before.get("verdict"), "top_trigger": before.get("top_trigger"),
                   "suspect_asr": before.get("suspect_asr")},
        "after": {"snapshot_root": sn["snapshot_root"], "clean_rows": sn["rows"], "model_id": rt["model_id"],
                  "val_loss": rt.get("val_loss"), "scan_verdict": after.get("verdict"),
                  "top_trigger": after.get("top_trigger"), "suspect_asr": after.get("suspect_asr")},
        "steps": list(st["completed"]) + ["report"],
    }


def to_markdown(s: dict[str, Any]) -> str:
    i, a, d, b, af = s["inputs"], s["affected"], s["done"], s["before"], s["after"]
    lines = [f"# Incident {s['incident']}", "",
             f"**Outcome**: {'the retrained model passes the scan' if s['passes'] else 'the retrained model does NOT pass the scan (or was not scanned)'}"
             + ("" if s.get("trigger_asr_below_threshold") in (None, True) else
                "; the suspected trigger's attack success is still at or above scan.min_asr: check by hand"),
             "", "## Suspicion", "",
             f"- source: {i['source'] or '-'}", f"- rows given: {len(i['rows'])}", f"- trigger: {i['trigger'] or '-'}",
             f"- model: `{i['model_dir']}`, data: `{i['sanitized_dir']}`", "", "## What was affected", "",
             f"- {len(a['rows_removed'])} rows in the clean training set ({', '.join(f'{k}: {v}' for k, v in a['sources'].items()) or '-'}), "
             f"{len(a['rows_already_quarantined'])} already quarantined, {len(a['unknown_rows'])} ids not found",
             f"- snapshots: {', '.join(x['snapshot_root'][:12] + ' (' + str(x.get('kind')) + ')' for x in a['snapshots']) or 'none recorded'}",
             f"- models: {', '.join(m['model_id'] + ' (' + str(m.get('path')) + ')' for m in a['models']) or 'none recorded'}",
             "", "## What was done", "",
             f"- quarantined {d['quarantined_rows']} rows in `{d['data']}`",
             f"- new clean snapshot `{d['new_snapshot_root']}`",
             f"- retrained: model {d['new_model_id']} in `{d['new_model_dir']}`",
             "", "## Before / after", "", "| | before | after |", "|---|---|---|"]
    for k in ("snapshot_root", "clean_rows", "model_id", "val_loss", "scan_verdict", "top_trigger", "suspect_asr"):
        fb, fa = b.get(k), af.get(k)
        if k == "snapshot_root":
            fb, fa = (str(fb)[:12], str(fa)[:12])
        elif k == "top_trigger":  # invisible characters made visible
            fb, fa = json.dumps(fb), json.dumps(fa)
        lines.append(f"| {k} | {fb} | {fa} |")
    return "\n".join(lines) + "\n"
