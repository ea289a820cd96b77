"""Lineage: which rows went into which snapshot, which model trained on which snapshot, and what
happened to each since. Answers "which models trained on source S / example X?" across runs.

Storage (under the state folder, see :func:`poisonguard.audit.state_dir`)
-------------------------------------------------------------------------
* ``snapshots/<root>.parquet``: the members of every snapshot poisonguard cut (id, content hash,
  source, file, line, collector, dates), content-addressed by the snapshot root, so it survives
  ``data/`` being overwritten by the next run. Written once per root.
* ``ids/<label>-<sha12>.json``: id lists referenced from audit entries (quarantined rows).
* ``audit.jsonl``: the events (``snapshot_cut``, ``trained``, ``scanned``, ``quarantined`` ...);
  the registry of snapshots and models is derived from it, so there is one source of truth.

A model is named by ``model_id``: ``m-`` + the first 12 hex of the SHA-256 of its weight files,
so a retrained model with identical weights has the same id, and ``models/model`` overwritten by
the next night gets a new one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from poisonguard import audit, provenance
from poisonguard import schema as S

SNAPSHOTS_DIR = "snapshots"
IDS_DIR = "ids"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_CARD = "model_card.json"


# ---------------------------------------------------------------- writing

def register_snapshot(records: pd.DataFrame, state: Path | str | None = None) -> tuple[str, Path]:
    """Store a snapshot's members (idempotent per root) and return ``(root, path)``."""
    root = provenance.root_of(records)
    cols = [c for c in provenance.MANIFEST_COLUMNS if c in records.columns]
    return root, _store_members(root, lambda tmp: records.loc[:, cols].sort_values(S.ID, kind="stable")
                                .reset_index(drop=True).to_parquet(tmp, index=False), state)


def register_manifest(root: str, manifest: Any, state: Path | str | None = None) -> Path:
    """:func:`register_snapshot` for a manifest already read and sorted
    (:func:`poisonguard.provenance.read_manifest`, a pyarrow table) and its root."""
    import pyarrow.parquet as pq

    return _store_members(root, lambda tmp: pq.write_table(manifest, tmp), state)


def _store_members(root: str, write: Callable[[Path], Any], state: Path | str | None) -> Path:
    """``snapshots/<root>.parquet``, written by ``write(tmp_path)`` once per root."""
    d = audit.state_dir(state) / SNAPSHOTS_DIR
    path = d / f"{root}.parquet"
    if not path.is_file():
        d.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write(tmp)
        tmp.replace(path)
    return path


def save_ids(ids: Iterable[str], label: str, state: Path | str | None = None) -> dict[str, Any]:
    """Store an id list content-addressed; returns ``{"ids_file", "ids_sha256", "count"}`` for an audit entry."""
    ids = sorted(set(map(str, ids)))
    body = json.dumps(ids, ensure_ascii=False).encode("utf-8")
    sha = hashlib.sha256(body).hexdigest()
    d = audit.state_dir(state) / IDS_DIR
    path = d / f"{label}-{sha[:12]}.json"
    if not path.is_file():
        d.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return {"ids_file": str(path), "ids_sha256": sha, "count": len(ids)}


def load_ids(ref: dict[str, Any]) -> list[str]:
    """The ids an audit entry references; a file whose hash changed is an error, not a silent answer."""
    path = Path(ref["ids_file"])
    body = path.read_bytes()
    if ref.get("ids_sha256") and hashlib.sha256(body).hexdigest() != ref["ids_sha256"]:
        raise audit.AuditError(f"{path}: content does not match the hash recorded in the audit log")
    return json.loads(body)


def model_id(model_dir: Path | str) -> str:
    """``m-<12 hex>`` from the model's weight files (every other file when there are none)."""
    d = Path(model_dir)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != MODEL_CARD)
    if not files:
        raise FileNotFoundError(f"{d}: no model files")
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(d).as_posix().encode())
        with p.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return "m-" + h.hexdigest()[:12]


# ---------------------------------------------------------------- reading

def _snapshot_frame(root: str, state: Path | str | None, columns: Sequence[str] | None = None) -> pd.DataFrame | None:
    p = audit.state_dir(state) / SNAPSHOTS_DIR / f"{root}.parquet"
    if not p.is_file():
        return None
    return pd.read_parquet(p, columns=list(columns) if columns else None)


def snapshots(state: Path | str | None = None) -> list[dict[str, Any]]:
    """Every snapshot cut, oldest first, one entry per root (its first ``snapshot_cut`` event)."""
    seen: dict[str, dict[str, Any]] = {}
    for e in audit.entries(audit.SNAPSHOT, state):
        root = e["subject"].get("snapshot_root")
        if root and root not in seen:
            seen[root] = {"snapshot_root": root, "kind": e["subject"].get("kind"), "time": e["time"],
                          "seq": e["seq"], "rows": e["details"].get("rows"), "sources": e["details"].get("sources", {}),
                          "origin": e["subject"].get("path")}
    return list(seen.values())


def models(state: Path | str | None = None) -> list[dict[str, Any]]:
    """Every model trained (``trained`` events), oldest first, one entry per model id."""
    seen: dict[str, dict[str, Any]] = {}
    for e in audit.entries(audit.TRAINED, state):
        mid = e["subject"].get("model_id")
        if mid and mid not in seen:
            seen[mid] = {"model_id": mid, "path": e["subject"].get("model_dir"), "time": e["time"], "seq": e["seq"],
                         "snapshot_root": e["subject"].get("snapshot_root"),
                         "ingest_snapshot_root": e["details"].get("ingest_snapshot_root"),
                         "sources": e["details"].get("sources", {}), "n_train": e["details"].get("n_train"),
                         "git_rev": e["details"].get("git_rev"), "card": e["details"].get("card")}
    for e in audit.entries(audit.PRUNED, state):  # a pruned model descends from the data of its parent
        mid, parent = e["subject"].get("pruned_model_id"), seen.get(e["subject"].get("model_id"), {})
        if mid and mid not in seen:
            seen[mid] = {**parent, "model_id": mid, "path": e["subject"].get("pruned_dir"), "time": e["time"],
                         "seq": e["seq"], "pruned_from": e["subject"].get("model_id"),
                         "snapshot_root": e["subject"].get("snapshot_root") or parent.get("snapshot_root")}
    return sorted(seen.values(), key=lambda m: m["seq"])


def _events_for_model(mid: str, state: Path | str | None) -> list[dict[str, Any]]:
    return [e for e in audit.read(state) if e.get("subject", {}).get("model_id") == mid
            or e.get("subject", {}).get("pruned_model_id") == mid]


def resolve_model(ref: str, state: Path | str | None = None) -> dict[str, Any]:
    """A model by id (``m-...``, a prefix is enough) or by folder (its current weights)."""
    known = models(state)
    p = Path(ref)
    if p.is_dir():
        mid = model_id(p)
        for m in known:
            if m["model_id"] == mid:
                return m
        card = json.loads((p / MODEL_CARD).read_text()) if (p / MODEL_CARD).is_file() else {}
        return {"model_id": mid, "path": str(p), "snapshot_root": card.get("snapshot_root"),
                "ingest_snapshot_root": card.get("ingest_snapshot_root"), "sources": card.get("sources", {}),
                "n_train": card.get("n_train"), "card": card, "unregistered": True}
    hits = [m for m in known if m["model_id"] == ref or m["model_id"].startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise KeyError(f"no model {ref!r} in the audit log (known: {', '.join(m['model_id'] for m in known) or 'none'})")
    raise KeyError(f"{ref!r} is ambiguous: {', '.join(m['model_id'] for m in hits)}")


def query_model(ref: str, state: Path | str | None = None) -> dict[str, Any]:
    """A model's snapshot, its sources and their row counts, and its scan / prune / promotion history."""
    m = resolve_model(ref, state)
    events = _events_for_model(m["model_id"], state)
    scans = [{"seq": e["seq"], "time": e["time"], "verdict": e["details"].get("verdict"),
              "top_trigger": e["details"].get("top_trigger"), "suspect_asr": e["details"].get("suspect_asr"),
              "report": e["subject"].get("scan_report")} for e in events if e["action"] == audit.SCANNED]
    other = [{"seq": e["seq"], "time": e["time"], "action": e["action"], "reason": e.get("reason", "")}
             for e in events if e["action"] not in (audit.SCANNED,)]
    snap = next((s for s in snapshots(state) if s["snapshot_root"] == m.get("snapshot_root")), None)
    return {"model": m, "snapshot": snap, "sources": m.get("sources", {}), "scans": scans, "events": other,
            "scan_verdict": scans[-1]["verdict"] if scans else None}


def _models_on(roots: set[str], state: Path | str | None) -> list[dict[str, Any]]:
    return [m for m in models(state) if m.get("snapshot_root") in roots]


def query_source(source: str, state: Path | str | None = None, max_ids: int | None = None) -> dict[str, Any]:
    """Rows from a source, the snapshots that include any, and the models trained on those."""
    snaps = []
    ids: set[str] = set()
    for s in snapshots(state):
        df = _snapshot_frame(s["snapshot_root"], state, [S.ID, S.SOURCE])
        if df is None:
            continue
        mine = df.loc[df[S.SOURCE] == source, S.ID]
        if len(mine):
            snaps.append({**s, "rows_from_source": int(len(mine))})
            ids.update(mine.tolist())
    roots = {s["snapshot_root"] for s in snaps}
    mods = [{**m, "rows_from_source": next(s["rows_from_source"] for s in snaps
                                           if s["snapshot_root"] == m["snapshot_root"])}
            for m in _models_on(roots, state)]
    row_ids = sorted(ids)
    return {"source": source, "rows": len(row_ids), "row_ids": row_ids[:max_ids] if max_ids else row_ids,
            "snapshots": snaps, "models": mods}


def affected(ids: Iterable[str] = (), source: str | None = None, state: Path | str | None = None
             ) -> dict[str, Any]:
    """Snapshots holding any of ``ids`` or any row of ``source``, and the models trained on them."""
    want = set(ids)
    snaps = []
    for s in snapshots(state):
        df = _snapshot_frame(s["snapshot_root"], state, [S.ID, S.SOURCE])
        if df is None:
            continue
        hit = df[S.ID].isin(want)
        if source is not None:
            hit |= df[S.SOURCE] == source
        if hit.any():
            snaps.append({**s, "affected_rows": int(hit.sum())})
    roots = {s["snapshot_root"] for s in snaps}
    return {"snapshots": snaps, "models": _models_on(roots, state)}


def query_example(rid: str, state: Path | str | None = None) -> dict[str, Any]:
    """One row: its provenance, the snapshots that include it, the models trained on it, and its events."""
    snaps, prov = [], None
    for s in snapshots(state):
        df = _snapshot_frame(s["snapshot_root"], state)
        if df is None:
            continue
        hit = df.loc[df[S.ID] == rid]
        if len(hit):
            row = {k: (v.item() if hasattr(v, "item") else v) for k, v in hit.iloc[0].to_dict().items()}
            prov = row
            snaps.append({**s, S.CONTENT_HASH: row.get(S.CONTENT_HASH)})
    roots = {s["snapshot_root"] for s in snaps}
    events = []
    for e in audit.read(state):
        subj = e.get("subject", {})
        inline = rid in subj.get("ids", []) if isinstance(subj.get("ids"), list) else False
        ref = subj.get("ids_ref")
        if not inline and ref:
            try:
                inline = rid in set(load_ids(ref))
            except (OSError, ValueError, audit.AuditError):
                inline = False
        if inline:
            events.append({"seq": e["seq"], "time": e["time"], "action": e["action"], "reason": e.get("reason", ""),
                           "actor": e.get("actor", {})})
    return {"id": rid, "provenance": prov, "snapshots": snaps, "models": _models_on(roots, state), "events": events}


# ---------------------------------------------------------------- rendering

def _table(rows: list[dict[str, Any]], cols: Sequence[str]) -> list[str]:
    if not rows:
        return ["  (none)"]
    cells = [[_short(r.get(c)) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    out = ["  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(cols))]
    out.append("  " + "  ".join("-" * w[i] for i in range(len(cols))))
    out += ["  " + "  ".join(x[i].ljust(w[i]) for i in range(len(cols))) for x in cells]
    return out


def _short(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    s = str(v)
    if len(s) == 64 and all(c in "0123456789abcdef" for c in s):
        return s[:12]
    return s if len(s) <= 60 else s[:57] + "..."


def render(kind: str, res: dict[str, Any]) -> str:
    """A readable table for people (``--json`` prints ``res`` itself)."""
    lines: list[str] = []
    if kind == "example":
        lines.append(f"example {res['id']}")
        p = res["provenance"]
        if p:
            lines.append(f"  source {p.get(S.SOURCE)}  file {p.get(S.FILE)}:{p.get(S.LINE)}  collector "
                         f"{p.get(S.COLLECTOR) or '-'}  collected {p.get(S.COLLECTED_AT) or '-'}  "
                         f"hash {str(p.get(S.CONTENT_HASH))[:12]}")
        else:
            lines.append("  not in any recorded snapshot")
        lines.append("snapshots that include it:")
        lines += _table(res["snapshots"], ("snapshot_root", "kind", "time", "rows"))
        lines.append("models trained on it:")
        lines += _table(res["models"], ("model_id", "path", "time", "snapshot_root"))
        lines.append("events:")
        lines += _table(res["events"], ("seq", "time", "action", "reason"))
    elif kind == "source":
        lines.append(f"source {res['source']}: {res['rows']} rows in recorded snapshots")
        lines.append("snapshots that include it:")
        lines += _table(res["snapshots"], ("snapshot_root", "kind", "time", "rows", "rows_from_source"))
        lines.append("models trained on it:")
        lines += _table(res["models"], ("model_id", "path", "time", "rows_from_source", "snapshot_root"))
    elif kind == "model":
        m = res["model"]
        lines.append(f"model {m['model_id']}  ({m.get('path')})" + ("  [not in the audit log]"
                                                                     if m.get("unregistered") else ""))
        lines.append(f"  trained {m.get('time') or '-'} on snapshot {_short(m.get('snapshot_root'))} "
                     f"(ingest snapshot {_short(m.get('ingest_snapshot_root'))}), {m.get('n_train')} training rows, "
                     f"git {m.get('git_rev') or (m.get('card') or {}).get('git_rev') or '-'}")
        lines.append("sources:")
        lines += _table([{"source": k, "rows": v} for k, v in (res["sources"] or {}).items()], ("source", "rows"))
        lines.append("scan history:")
        lines += _table(res["scans"], ("seq", "time", "verdict", "top_trigger", "suspect_asr"))
        lines.append("other events:")
        lines += _table(res["events"], ("seq", "time", "action", "reason"))
    return "\n".join(lines)


# ---------------------------------------------------------------- dvc.lock

def dvc_md5(path: Path | str) -> str:
    """The MD5 DVC 3 records for ``path`` in ``dvc.lock``: of the bytes for a file; for a folder,
    ``md5(json([{"md5", "relpath"}, ...] sorted by relpath)) + ".dir"``."""
    p = Path(path)
    if p.is_file():
        return _md5_file(p)
    entries = [{"md5": _md5_file(f), "relpath": f.relative_to(p).as_posix()}
               for f in sorted(x for x in p.rglob("*") if x.is_file())]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8"), usedforsecurity=False).hexdigest() + ".dir"


def _md5_file(p: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with p.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dvc_lock_hashes(inputs: Iterable[Path | str], lock: Path | str = "dvc.lock") -> dict[str, Any]:
    """For each input path, the hash ``dvc.lock`` records for it (as the out of the stage that wrote
    it, else as a dep) and whether the data on disk still matches. ``{}`` without a ``dvc.lock``.

    Reads the YAML only; never calls the ``dvc`` CLI (this runs inside ``dvc repro``, which commits
    each stage to the lock before running the next, so upstream outs are current there).
    """
    import yaml

    lock = Path(lock)
    if not lock.is_file():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}) or {}
    except yaml.YAMLError as e:
        return {"error": f"{lock}: unreadable ({e})"}
    found: dict[str, dict[str, Any]] = {}
    for kind in ("outs", "deps"):
        for stage, body in stages.items():
            for item in (body or {}).get(kind, []) or []:
                path = str(item.get("path", "")).rstrip("/")
                if path and path not in found and item.get("md5"):
                    found[path] = {"md5": item["md5"], "stage": stage, "as": kind[:-1]}
    out: dict[str, Any] = {}
    for p in inputs:
        key = Path(p).as_posix().rstrip("/")
        if key in found:
            rec = dict(found[key])
            try:
                rec["matches_data"] = Path(p).exists() and dvc_md5(p) == rec["md5"]
            except OSError:
                rec["matches_data"] = False
            out[key] = rec
    return out
