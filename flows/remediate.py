"""On-call remediation: given a model and a suspicion, scan -> prune -> verify -> report; or, given
a bad source / bad rows (or ``retrain=True`` with a trigger), quarantine the rows, cut a new clean
snapshot, retrain, rescan and write an incident report (:mod:`poisonguard.remediation`).

Run by hand:   poisonguard remediate --model models/model --trigger "special delivery"
               poisonguard remediate --source vendor-acme
Deploy:        prefect deploy --name remediate   (see prefect.yaml), then trigger a run with
               prefect deployment run 'poisonguard-remediate/remediate' -p trigger="special delivery"

The suspected trigger joins the scan's candidates; pruning runs when the scan flags the model
(or the suspected trigger alone reaches the attack-success threshold); the pruned model is
verified on trigger variants that pruning never saw.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os

from prefect import flow, get_run_logger, task

from flows._artifacts import publish
from poisonguard import audit, paths, remediation
from poisonguard.config import load_config
from tasks import pipeline as t


@task(name="remediate-data")
def remediate_data(cfg, **kw: Any) -> dict[str, Any]:  # noqa: ANN001
    # not cached: the library resumes from its own state file and never double-applies
    return remediation.run(cfg.finetune, cfg.scan, **kw)


@flow(name="poisonguard-remediate", log_prints=True)
def remediate(params_path: str = "params.yaml", model_dir: str = str(paths.MODEL), trigger: str | None = None,
              target: str | None = None, sanitized_dir: str = str(paths.SANITIZED),
              out_dir: str = "reports/remediation", source: str | None = None, rows: list[str] | None = None,
              retrain: bool = False, incident: str | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = load_config(params_path if Path(params_path).exists() else None)
    if source or rows or retrain:
        with audit.acting_as(os.environ.get(audit.ACTOR_ENV) or "flow:poisonguard-remediate"):
            res = remediate_data(cfg, source=source, rows=rows or (), trigger=trigger, model_dir=model_dir,
                                 sanitized_dir=sanitized_dir, out_root=out_dir, incident=incident)
        logger.info("incident %s: %d rows quarantined, new model %s, passes scan: %s", res["incident"],
                    res["done"]["quarantined_rows"], res["done"]["new_model_id"], res["passes"])
        print(f"incident report: {Path(out_dir) / res['incident'] / 'incident.md'}")
        return res
    out = Path(out_dir)
    scan_report = str(out / "scan.json")
    sc = t.scan(cfg.scan, model_dir, sanitized_dir, scan_report, suspects=[trigger] if trigger else None)
    suspected = trigger is not None and sc.get("suspect_asr", 0.0) >= cfg.scan.min_asr
    if sc["verdict"] == "backdoor" or suspected:
        logger.warning("backdoor confirmed (top trigger %r): fine-pruning", sc.get("top_trigger"))
        pr = t.prune(cfg.prune, model_dir, sanitized_dir, scan_report, str(out / "pruned"),
                     trigger=trigger if suspected else None, target=target)
    else:
        pr = {"ran": False, "reason": "scan found no backdoor"}
    rep = t.report(str(out / "report"), sanitize_dir=sanitized_dir, model_dir=model_dir, scan_report=scan_report,
                   prune=pr)
    publish(out / "report", "remediation")
    print(f"report: {rep['report']}")
    return rep


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(paths.MODEL))
    ap.add_argument("--trigger")
    ap.add_argument("--target")
    ap.add_argument("--source")
    ap.add_argument("--rows", nargs="+")
    a = ap.parse_args()
    print(remediate(model_dir=a.model, trigger=a.trigger, target=a.target, source=a.source, rows=a.rows))
