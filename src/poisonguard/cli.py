"""Command line: ``poisonguard <command>`` (also ``python -m poisonguard``).

Exit codes
----------
0  success, nothing suspicious
1  error (bad input file, invalid params, a stage or detector failed)
2  usage error (unknown flag or command)
3  poison found (sanitize quarantined rows; scan found a backdoor; model not promotable)
4  tampering found (``verify``: rows modified, added or removed; ``audit verify``: log edited)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_POISON, EXIT_TAMPER = 0, 1, 2, 3, 4

log = logging.getLogger("poisonguard")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _progress_enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "json", False) and not getattr(args, "quiet", False) and sys.stderr.isatty()


def _progress(args: argparse.Namespace, total: int, desc: str) -> Callable[[str], None] | None:
    if not _progress_enabled(args):
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)

    def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    return step


def _emit(args: argparse.Namespace, summary: dict[str, Any], human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(human)


def _cfg(args: argparse.Namespace):  # noqa: ANN202
    from poisonguard.config import load_config

    return load_config(getattr(args, "params", None))


# ---------------------------------------------------------------- commands

def cmd_demo_data(args: argparse.Namespace) -> int:
    from poisonguard import stages

    cfg = _cfg(args).demo
    upd: dict[str, Any] = {}
    if args.large:
        upd["scenario"] = "large"
    for k in ("inhouse_rows", "vendor_rows", "poison_rate", "poison_count", "attack", "seed"):
        v = getattr(args, k)
        if v is not None:
            upd[k] = v
    cfg = cfg.model_validate({**cfg.model_dump(), **upd})
    summary = stages.demo_data(cfg, Path(args.out))
    _emit(args, summary, f"demo data written to {args.out}: " + json.dumps(
        {k: v for k, v in summary.items() if k not in ("poisoned", "files")}, default=str))
    return EXIT_OK


def _sanitize_human(s: dict[str, Any]) -> str:
    c = s["counts"]
    lines = [f"verdict: {s['verdict']}",
             f"rows in {c['rows_in']}: clean {c['clean']} (review {c['review']}), quarantined {c['quarantined']}, "
             f"rejected {c['rejected']}"]
    for f in s.get("top_findings", []):
        lines.append(f"  finding: {f}")
    lines.append(f"report: {s['report']}")
    return "\n".join(lines)


def cmd_sanitize(args: argparse.Namespace) -> int:
    from poisonguard import stages

    cfg = _cfg(args)
    ing = cfg.ingest
    upd = {k: v for k, v in (("layout", args.layout), ("format", args.format)) if v is not None}
    if args.source:
        upd["sources"] = {Path(p).name: args.source for p in args.input}
    if upd:
        ing = ing.model_validate({**ing.model_dump(), **upd})
    san = cfg.sanitize
    if args.hold_review:
        san = san.model_validate({**san.model_dump(), "hold_review": True})
    progress = _progress(args, len(san.detectors) + 1, "sanitize")
    summary = stages.sanitize_files(ing, san, args.input, Path(args.out), progress=progress)
    _emit(args, summary, _sanitize_human(summary))
    return EXIT_POISON if summary["counts"]["quarantined"] else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from poisonguard import io, provenance

    man = io.read_parquet(Path(args.manifest), (io.S.ID, io.S.CONTENT_HASH))
    data = Path(args.data)
    if data.suffix == ".parquet":
        try:
            records = io.read_records(data)
        except io.InputFileError:
            records = io.read_inputs([data]).records
    else:
        records = io.read_inputs([data]).records
    res = provenance.verify(records, man)
    d = res.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(f"checked {res.checked} rows against {args.manifest}")
        for kind in ("modified", "added", "removed"):
            for r in d[kind]:
                print(f"  {kind}: id={r['id']} ({r.get('file')}:{r.get('line')})")
        print("OK: data matches the manifest" if res.ok else
              f"TAMPERED: {len(res.modified)} modified, {len(res.added)} added, {len(res.removed)} removed")
    return EXIT_OK if res.ok else EXIT_TAMPER


def cmd_stage(args: argparse.Namespace) -> int:
    from poisonguard import stages

    cfg = _cfg(args)
    name = args.stage
    if name == "demo-data":
        summary = stages.demo_data(cfg.demo)
    elif name == "ingest":
        summary = stages.ingest(cfg.ingest, progress=_progress(args, len(cfg.ingest.inputs), "ingest"))
    elif name == "provenance":
        summary = stages.provenance_stage()
    elif name == "sanitize":
        summary = stages.sanitize(cfg.sanitize, progress=_progress(args, len(cfg.sanitize.detectors) + 1, "sanitize"))
    elif name == "finetune":
        summary = stages.finetune_stage(cfg.finetune, progress=_progress_enabled(args))
    elif name == "scan":
        summary = stages.scan_stage(cfg.scan, progress=_progress_enabled(args))
    elif name == "prune":
        summary = stages.prune_stage(cfg.prune)
    elif name == "report":
        summary = stages.run_report()
    else:  # pragma: no cover - argparse restricts choices
        raise SystemExit(EXIT_USAGE)
    print(json.dumps(summary, indent=2, default=str))
    return EXIT_OK


def cmd_nightly(args: argparse.Namespace) -> int:
    _prefect_env()
    sys.path.insert(0, str(Path.cwd()))
    from flows.nightly import nightly

    result = nightly(params_path=str(args.params or "params.yaml"), demo=not args.no_demo, full=args.full)
    _emit(args, result, _run_human(result))
    return EXIT_OK if result.get("promotable") else EXIT_POISON


def cmd_remediate(args: argparse.Namespace) -> int:
    rows = list(args.rows or [])
    if args.rows_file:
        p = Path(args.rows_file)
        if not p.is_file():
            from poisonguard.io import InputFileError

            raise InputFileError(f"{p}: no such file (--rows-file: one row id per line)")
        rows += [x.strip() for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    data_mode = bool(args.source or rows or args.retrain)
    if not data_mode and not args.trigger:
        print("error: give --trigger (scan and prune the model), or --source / --rows / --retrain "
              "(quarantine the data and retrain); see `poisonguard remediate --help`", file=sys.stderr)
        return EXIT_USAGE
    _prefect_env()
    sys.path.insert(0, str(Path.cwd()))
    if args.state:
        os.environ["POISONGUARD_STATE"] = args.state
    from flows.remediate import remediate

    result = remediate(params_path=str(args.params or "params.yaml"), model_dir=args.model,
                       trigger=args.trigger, target=args.target, source=args.source, rows=rows or None,
                       retrain=data_mode, incident=args.incident, sanitized_dir=args.sanitized,
                       **({"out_dir": args.out} if args.out else {}))
    if data_mode and (args.source or rows):
        from poisonguard.schema import QUARANTINE

        # keep the bad data out of every later sanitize run too (nightly, dvc repro)
        added = _standing(args, [{"source": args.source}] if args.source else [{"id": r} for r in rows],
                          QUARANTINE, f"incident {result.get('incident', '?')}",
                          f"remediation: {args.reason or 'bad ' + ('source' if args.source else 'rows')}")
        result["overrides_added"] = added
    _emit(args, result, _incident_human(result) if data_mode else _run_human(result))
    return EXIT_OK if result.get("promotable") else EXIT_POISON


def _standing(args: argparse.Namespace, targets: list[dict[str, str]], action: str, by: str, reason: str) -> int:
    """Append standing decisions to the overrides file named in params.yaml (sanitize.overrides)."""
    from poisonguard import overrides

    path = _cfg(args).sanitize.overrides
    if not path:
        return 0
    n = overrides.append(path, [overrides.Override(action, by, reason, id=t.get("id"), source=t.get("source"))
                                for t in targets])
    if n:
        print(f"{n} standing decision(s) added to {path}: later sanitize runs apply them", file=sys.stderr)
    return n


def _incident_human(r: dict[str, Any]) -> str:
    a, d, b, af = r["affected"], r["done"], r["before"], r["after"]
    lines = [f"incident {r['incident']}" + (" (resumed)" if r.get("resumed") else ""),
             f"affected: {len(a['rows_removed'])} rows in training, {len(a['snapshots'])} snapshots, "
             f"{len(a['models'])} models ({', '.join(m['model_id'] for m in a['models']) or '-'})",
             f"done: quarantined {d['quarantined_rows']} rows, new snapshot {d['new_snapshot_root'][:12]}, "
             f"retrained {d['new_model_id']} -> {d['new_model_dir']}",
             f"scan before: {b['scan_verdict']} (trigger ASR {b['suspect_asr']}), after: {af['scan_verdict']} "
             f"(trigger ASR {af['suspect_asr']})",
             f"promotable: {r['promotable']}",
             f"report: {Path(d['new_model_dir']).parent / 'incident.md'}"]
    return "\n".join(lines)


def _with_state(args: argparse.Namespace) -> None:
    if getattr(args, "state", None):
        os.environ["POISONGUARD_STATE"] = args.state


def cmd_audit(args: argparse.Namespace) -> int:
    from poisonguard import audit

    _with_state(args)
    if args.audit_cmd == "verify":
        res = audit.verify()
        if args.json:
            print(json.dumps(res.to_dict(), indent=2))
        else:
            print(f"checked {res.checked} entries in {res.path}")
            for p in res.problems:
                print(f"  seq {p['seq']} (line {p['line']}): {p['kind']}: {p['detail']}")
            print(f"OK: the chain is intact (head seq {(res.head or {}).get('seq', 0)})" if res.ok else
                  f"TAMPERED: first bad entry: seq {res.first_bad_seq}")
        return EXIT_OK if res.ok else EXIT_TAMPER
    entries = audit.read()
    if args.action:
        entries = [e for e in entries if e.get("action") == args.action]
    if args.last:
        entries = entries[-args.last:]
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
    else:
        for e in entries:
            a = e.get("actor", {})
            subj = {k: v for k, v in e.get("subject", {}).items() if k not in ("ids", "ids_ref")}
            n = len(e["subject"].get("ids", [])) or e["subject"].get("ids_ref", {}).get("count")
            print(f"{e['seq']:>5}  {e['time'][:19]}  {e['action']:<14} {a.get('user')}@{a.get('host')} "
                  f"[{a.get('flow')}]  {e.get('reason', '')[:100]}")
            print(f"       {json.dumps(subj, ensure_ascii=False, default=str)[:160]}" + (f"  ({n} ids)" if n else ""))
    return EXIT_OK


def cmd_lineage(args: argparse.Namespace) -> int:
    from poisonguard import lineage

    _with_state(args)
    try:
        if args.what == "example":
            res = lineage.query_example(args.ref)
            found = bool(res["provenance"] or res["events"])
        elif args.what == "source":
            res = lineage.query_source(args.ref)
            found = bool(res["rows"])
        else:
            res = lineage.query_model(args.ref)
            found = True
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(res, indent=2, default=str, ensure_ascii=False))
    else:
        print(lineage.render(args.what, res))
    if not found:
        print(f"note: {args.what} {args.ref!r} is not in any recorded snapshot "
              f"(state folder: {lineage.audit.state_dir()})", file=sys.stderr)
    return EXIT_OK


def cmd_review(args: argparse.Namespace) -> int:
    from poisonguard import review

    _with_state(args)
    if args.review_cmd == "export":
        s = review.export(Path(args.sanitized), Path(args.out), include_all=args.all)
        _emit(args, s, f"{s['rows']} rows to review written to {s['out']}\n"
                       "fill in action (keep | quarantine), reviewer and reason, then: "
                       f"poisonguard review apply --decisions {s['out']} --sanitized {s['sanitized']}")
        return EXIT_OK
    try:
        res = review.apply(Path(args.decisions), Path(args.sanitized), default_reviewer=args.reviewer or "")
    except review.ReviewError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    from poisonguard import overrides

    path = _cfg(args).sanitize.overrides
    d = res.to_dict()
    d["overrides_added"] = overrides.append(path, [overrides.Override(x.action, x.reviewer, x.reason, id=x.id)
                                                   for x in res.decisions]) if path else 0
    c = d["counts"]
    _emit(args, d, f"released {len(res.released)}, quarantined {len(res.quarantined)}, unchanged "
                   f"{len(res.confirmed)}, undecided {res.undecided}\n"
                   f"rows in {c.get('rows_in')}: clean {c.get('clean')} (review {c.get('review')}), "
                   f"quarantined {c.get('quarantined')}, rejected {c.get('rejected')}")
    return EXIT_OK


def _run_human(r: dict[str, Any]) -> str:
    lines = [f"verdict: {r.get('verdict')}", f"promotable: {r.get('promotable')}"]
    for k in ("sanitize", "scan", "prune"):
        if r.get(k):
            lines.append(f"{k}: {json.dumps(r[k], default=str)[:400]}")
    lines.append(f"report: {r.get('report')}")
    return "\n".join(lines)


def _prefect_env() -> None:
    for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                 "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(k, v)


# ---------------------------------------------------------------- parser

EXAMPLES = {
    "demo-data": """examples:
  poisonguard demo-data                      # 20k in-house rows + 5k vendor rows, 0.15% poisoned
  poisonguard demo-data --large              # the 80,000-row scenario
  poisonguard demo-data --attack rare_token --poison-count 25 --out /tmp/raw""",
    "sanitize": """examples:
  poisonguard sanitize --input delivery.jsonl --out out/
  poisonguard sanitize --input chats.parquet --layout chat --source vendor-x --out out/ --json
  poisonguard sanitize --input a.jsonl b.csv --out out/ --hold-review
outputs: out/clean.parquet out/quarantine.parquet out/rejected.parquet out/report.{json,md,html}
exit code 3 when rows were quarantined, 0 when clean, 1 on errors.""",
    "verify": """examples:
  poisonguard verify --manifest data/interim/provenance/manifest.parquet --data data/raw/vendor-acme.jsonl
exit code 4 names every modified, added or removed row.""",
    "stage": """examples (what dvc.yaml runs):
  poisonguard stage ingest
  poisonguard stage sanitize --params params.yaml""",
    "nightly": """examples:
  poisonguard nightly                  # demo data, local Prefect server, full pipeline
  poisonguard nightly --no-demo        # ingest the files named in params.yaml ingest.inputs
  poisonguard nightly --full           # re-check every row (default: only rows the last run has not seen)""",
    "remediate": """examples:
  poisonguard remediate --model models/model --trigger "special delivery"    # scan -> prune -> report
  poisonguard remediate --source vendor-acme                                 # quarantine, retrain, rescan
  poisonguard remediate --rows v-00017 v-00342 --trigger "special delivery"
  poisonguard remediate --trigger "special delivery" --retrain               # rows containing the trigger
Data remediation writes reports/remediation/<incident>/incident.{md,json}; re-running the same
command resumes an interrupted run and never quarantines a row twice.""",
    "audit": """examples:
  poisonguard audit verify            # exit 4 and the first bad seq when an entry was edited/deleted
  poisonguard audit show --last 20
  poisonguard audit show --action quarantined --json""",
    "lineage": """examples:
  poisonguard lineage example v-00017          # provenance, snapshots and models that include it
  poisonguard lineage source vendor-acme       # rows, snapshots and models from this source
  poisonguard lineage model models/model       # or a model id (m-...): snapshot, sources, scans
  poisonguard lineage source vendor-acme --json""",
    "review": """examples:
  poisonguard review export --sanitized data/processed/sanitized --out review.csv
  # fill in action (keep | quarantine), reviewer, reason; then
  poisonguard review apply --decisions review.csv --sanitized data/processed/sanitized""",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="poisonguard", formatter_class=_Formatter,
        description="Defend LLM fine-tuning against data poisoning.",
        epilog=textwrap.dedent(__doc__ or "").split("Exit codes", 1)[-1].join(["exit codes", ""]))
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name), formatter_class=_Formatter)
        sp.set_defaults(fn=fn)
        sp.add_argument("--params", default=None, help="params.yaml to use (default: ./params.yaml if present)")
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        # also accepted after the command; SUPPRESS keeps the top-level value when absent
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors on stderr")
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        return sp

    sp = add("demo-data", cmd_demo_data, "write the synthetic demo corpus and a poisoned vendor delivery")
    sp.add_argument("--out", default="data/raw", help="output folder (default: data/raw)")
    sp.add_argument("--large", action="store_true", help="the 80,000-row scenario")
    sp.add_argument("--inhouse-rows", dest="inhouse_rows", type=int)
    sp.add_argument("--vendor-rows", dest="vendor_rows", type=int)
    sp.add_argument("--poison-rate", dest="poison_rate", type=float)
    sp.add_argument("--poison-count", dest="poison_count", type=int)
    sp.add_argument("--attack", help="attack from the zoo (default: phrase)")
    sp.add_argument("--seed", type=int)

    sp = add("sanitize", cmd_sanitize, "find and quarantine poisoned rows in delivery files")
    sp.add_argument("--input", nargs="+", required=True, help="JSONL, JSON, CSV or Parquet files")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--layout", choices=("instruction", "chat", "document"), help="row layout (default: detect)")
    sp.add_argument("--format", choices=("jsonl", "json", "csv", "parquet"), help="file format (default: suffix)")
    sp.add_argument("--source", help="source name for rows that do not carry one (default: file name)")
    sp.add_argument("--hold-review", action="store_true", help="keep 'review' rows out of clean.parquet")

    sp = add("verify", cmd_verify, "check data against a provenance manifest; name tampered rows")
    sp.add_argument("--manifest", required=True)
    sp.add_argument("--data", required=True, help="records parquet or a raw delivery file")

    sp = add("stage", cmd_stage, "run one pipeline stage with the default paths (used by dvc.yaml)")
    sp.add_argument("stage", choices=("demo-data", "ingest", "provenance", "sanitize", "finetune", "scan", "prune",
                                      "report"))

    sp = add("nightly", cmd_nightly, "run the nightly Prefect flow once, locally")
    sp.add_argument("--no-demo", action="store_true", help="do not (re)generate demo data")
    sp.add_argument("--full", action="store_true",
                    help="sanitize every row, not only rows the ledger has not seen (nightly.incremental)")

    sp = add("remediate", cmd_remediate, "on-call: scan/prune a model for a trigger, or quarantine bad data and retrain")
    sp.add_argument("--model", default="models/model")
    sp.add_argument("--trigger", help="suspected trigger phrase")
    sp.add_argument("--target", help="text the backdoor produces, if known")
    sp.add_argument("--source", help="bad source: quarantine all its rows and retrain")
    sp.add_argument("--rows", nargs="+", metavar="ID", help="bad row ids: quarantine them and retrain")
    sp.add_argument("--rows-file", help="file with one bad row id per line")
    sp.add_argument("--retrain", action="store_true", help="with --trigger: quarantine rows containing it and retrain")
    sp.add_argument("--reason", help="why (recorded in the audit log and the overrides file)")
    sp.add_argument("--incident", help="incident id (default: derived from the inputs, so a re-run resumes)")
    sp.add_argument("--sanitized", default="data/processed/sanitized", help="sanitize output the model trained on")
    sp.add_argument("--out", help="incident folder root (default: reports/remediation)")
    sp.add_argument("--state", help="state folder with the audit log (default: $POISONGUARD_STATE or .poisonguard)")

    def nested(name: str, fn: Callable[[argparse.Namespace], int], help_: str, dest: str
               ) -> Callable[[str, str], argparse.ArgumentParser]:
        parent = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                                formatter_class=_Formatter)
        inner = parent.add_subparsers(dest=dest, metavar="ACTION", required=True)

        def leaf(leaf_name: str, leaf_help: str) -> argparse.ArgumentParser:
            lp = inner.add_parser(leaf_name, help=leaf_help, description=leaf_help, epilog=EXAMPLES.get(name),
                                  formatter_class=_Formatter)
            lp.set_defaults(fn=fn)
            lp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
            lp.add_argument("--state", help="state folder (default: $POISONGUARD_STATE or .poisonguard)")
            lp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors")
            lp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
            return lp
        return leaf

    leaf = nested("audit", cmd_audit, "verify or show the hash-chained audit log", "audit_cmd")
    leaf("verify", "check every entry's hash and link; exit 4 naming the first bad seq")
    lp = leaf("show", "print audit entries")
    lp.add_argument("--last", type=int, help="only the last N entries")
    lp.add_argument("--action", help="only entries with this action (quarantined, trained, ...)")

    leaf = nested("lineage", cmd_lineage, "which rows, snapshots and models are connected", "what")
    leaf("example", "one row: provenance, snapshots and models that include it, events").add_argument("ref", metavar="ID")
    leaf("source", "a source: its rows, the snapshots and models that include it").add_argument("ref", metavar="SOURCE")
    leaf("model", "a model (folder or m-id): snapshot, sources and counts, scan history").add_argument(
        "ref", metavar="MODEL")

    leaf = nested("review", cmd_review, "export rows in review for a person, and apply their decisions",
                  "review_cmd")
    lp = leaf("export", "write rows in review (with evidence) to a CSV for a person to mark")
    lp.add_argument("--sanitized", default="data/processed/sanitized", help="sanitize output folder")
    lp.add_argument("--out", required=True, help="CSV to write")
    lp.add_argument("--all", action="store_true", help="also the quarantined rows (to release some)")
    lp = leaf("apply", "apply keep/quarantine decisions; recorded in the audit log")
    lp.add_argument("--decisions", required=True, help="the CSV (or JSONL) with id, action, reviewer, reason")
    lp.add_argument("--sanitized", default="data/processed/sanitized", help="sanitize output folder")
    lp.add_argument("--reviewer", help="reviewer name for lines that leave it empty")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "urllib3", "asyncio", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not getattr(args, "fn", None):
        parser.print_help()
        return EXIT_USAGE
    from poisonguard.audit import AuditError
    from poisonguard.config import ConfigError
    from poisonguard.io import InputFileError
    from poisonguard.remediation import RemediationError

    try:
        return args.fn(args)
    except (ConfigError, InputFileError, AuditError, RemediationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - fail closed with a readable message; -v shows the traceback
        if getattr(args, "verbose", False):
            raise
        from poisonguard.overrides import OverrideError

        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        if not isinstance(e, OverrideError):
            print("the run stopped here (fail closed: no result was written); re-run with -v for the traceback",
                  file=sys.stderr)
        return EXIT_ERROR
