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
        summary = stages.ingest(cfg.ingest)
    elif name == "provenance":
        summary = stages.provenance_stage()
    elif name == "sanitize":
        summary = stages.sanitize(cfg.sanitize, progress=_progress(args, len(cfg.sanitize.detectors) + 1, "sanitize"))
    elif name == "finetune":
        summary = stages.finetune_stage(cfg.finetune, progress=_progress_enabled(args))
    elif name == "scan":
        summary = stages.scan_stage(cfg.scan)
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

    result = nightly(params_path=str(args.params or "params.yaml"), demo=not args.no_demo)
    _emit(args, result, _run_human(result))
    return EXIT_OK if result.get("promotable") else EXIT_POISON


def cmd_remediate(args: argparse.Namespace) -> int:
    _prefect_env()
    sys.path.insert(0, str(Path.cwd()))
    from flows.remediate import remediate

    result = remediate(params_path=str(args.params or "params.yaml"), model_dir=args.model,
                       trigger=args.trigger, target=args.target)
    _emit(args, result, _run_human(result))
    return EXIT_OK if result.get("promotable") else EXIT_POISON


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
  poisonguard nightly --no-demo        # ingest the files named in params.yaml ingest.inputs""",
    "remediate": """examples:
  poisonguard remediate --model models/model --trigger "special delivery" """,
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

    sp = add("remediate", cmd_remediate, "on-call: scan a model for a suspected trigger, prune, verify, report")
    sp.add_argument("--model", default="models/model")
    sp.add_argument("--trigger", help="suspected trigger phrase")
    sp.add_argument("--target", help="text the backdoor produces, if known")
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
    from poisonguard.config import ConfigError
    from poisonguard.io import InputFileError

    try:
        return args.fn(args)
    except (ConfigError, InputFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_ERROR
