"""Nightly sanitize-and-train: ingest -> provenance -> sanitize -> finetune -> scan -> (prune) -> report.

Run once:            poisonguard nightly            (or: python flows/nightly.py)
Serve on a schedule: python flows/nightly.py --serve   (cron from params.yaml nightly.cron)
Deploy:              prefect deploy --name nightly  (see prefect.yaml)

A model that fails its scan is never marked promotable: prune runs only when the scan finds a
backdoor, and the pruned model is promotable only if the verification re-scan passes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, get_run_logger

from flows._artifacts import publish
from poisonguard import paths
from poisonguard.config import load_config
from tasks import pipeline as t


@flow(name="poisonguard-nightly", log_prints=True)
def nightly(params_path: str = "params.yaml", demo: bool = True, full: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = load_config(params_path if Path(params_path).exists() else None)
    if demo and cfg.nightly.use_demo_data:
        t.demo_data(cfg.demo, str(paths.RAW))
    ingest_cfg = cfg.ingest
    if cfg.nightly.shards > 1 and ingest_cfg.shards == 1:  # shards on disk: each worker reads its own
        ingest_cfg = ingest_cfg.model_copy(update={"shards": cfg.nightly.shards})
    ing = t.ingest(ingest_cfg, list(cfg.ingest.inputs), str(paths.INGESTED))
    prov = t.provenance(str(paths.INGESTED), str(paths.PROVENANCE))
    if full:  # on request (poisonguard nightly --full): every row is re-checked; the ledger is rewritten
        inc = cfg.nightly.incremental.model_copy(update={"force_full": True})
        cfg = cfg.model_copy(update={"nightly": cfg.nightly.model_copy(update={"incremental": inc})})
    if cfg.nightly.shards > 1 or cfg.nightly.dask_address:
        from flows import sanitize_distributed

        san = sanitize_distributed.run(cfg.nightly, cfg.sanitize, in_dir=str(paths.INGESTED),
                                       out_dir=str(paths.SANITIZED), provenance_dir=str(paths.PROVENANCE))
    else:
        san = t.sanitize(cfg.sanitize, str(paths.INGESTED), str(paths.SANITIZED), str(paths.PROVENANCE),
                         incremental=cfg.nightly.incremental)
    logger.info("sanitize: %s %s", san["counts"], san.get("incremental", ""))
    ft = t.finetune(cfg.finetune, str(paths.SANITIZED), str(paths.PROVENANCE), str(paths.MODEL))
    sc = t.scan(cfg.scan, str(paths.MODEL), str(paths.SANITIZED), str(paths.SCAN_REPORT))
    if sc["verdict"] == "backdoor":
        logger.warning("scan found a backdoor (top trigger %r): fine-pruning", sc.get("top_trigger"))
        pr = t.prune(cfg.prune, str(paths.MODEL), str(paths.SANITIZED), str(paths.SCAN_REPORT),
                     str(paths.PRUNED))
    else:
        pr = {"ran": False, "reason": "scan verdict clean"}
    rep = t.report(str(paths.RUN_REPORT), ingest=ing, snapshot=prov, sanitize_dir=str(paths.SANITIZED),
                   model_dir=str(paths.MODEL), scan_report=str(paths.SCAN_REPORT), prune=pr)
    publish(paths.RUN_REPORT, "nightly")
    print(f"report: {rep['report']}")
    return {**rep, "finetune": {k: ft.get(k) for k in ("train_loss", "val_loss", "snapshot_root")}}


if __name__ == "__main__":
    if "--serve" in sys.argv:
        cfg = load_config()
        nightly.serve(name="nightly", cron=cfg.nightly.cron, parameters={"params_path": "params.yaml"})
    else:
        print(nightly())
