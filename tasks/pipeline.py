"""One Prefect task per pipeline stage, each a few lines over :mod:`poisonguard.stages`.

Caching: every task keys on the content of its input files, its own params section and the
library's code version (:func:`poisonguard.cachekey.stage_key`); a missing output disables the
cache hit. Retries: only for failures that can be transient I/O (file systems, the network,
the Anthropic API); a detector or training error fails at once (fail closed, no retry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel

from poisonguard import cachekey, paths, stages
from poisonguard.config import section


def _transient(task_, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    try:
        state.result()
    except (ConnectionError, TimeoutError) as e:
        return bool(e)
    except OSError as e:
        return not isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError))
    except Exception as e:  # noqa: BLE001 - classify, never swallow: the state stays failed
        return type(e).__name__ in {"APIConnectionError", "APITimeoutError", "RateLimitError",
                                    "InternalServerError", "OverloadedError"}
    return False


def _key(stage: str, inputs, outputs):  # noqa: ANN001, ANN202
    def fn(ctx: Any, p: dict[str, Any]) -> str | None:
        params = {k: section(v) if isinstance(v, BaseModel) else v for k, v in p.items()}
        return cachekey.stage_key(stage, inputs(p), params, outputs(p))
    return fn


@task(name="demo-data", cache_key_fn=_key("demo-data", lambda p: [], lambda p: [p["out_dir"]]))
def demo_data(cfg, out_dir: str = str(paths.RAW)) -> dict[str, Any]:  # noqa: ANN001
    return stages.demo_data(cfg, Path(out_dir))


@task(name="ingest", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
      cache_key_fn=_key("ingest", lambda p: p["inputs"], lambda p: [p["out_dir"]]))
def ingest(cfg, inputs: list[str], out_dir: str = str(paths.INGESTED)) -> dict[str, Any]:  # noqa: ANN001
    return stages.ingest(cfg, Path(out_dir), inputs)


@task(name="provenance", cache_key_fn=_key("provenance", lambda p: [p["in_dir"]], lambda p: [p["out_dir"]]))
def provenance(in_dir: str = str(paths.INGESTED), out_dir: str = str(paths.PROVENANCE)) -> dict[str, Any]:
    return stages.provenance_stage(Path(in_dir), Path(out_dir))


@task(name="sanitize", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_transient,
      cache_key_fn=_key("sanitize", lambda p: [p["in_dir"], p["provenance_dir"]], lambda p: [p["out_dir"]]))
def sanitize(cfg, in_dir: str = str(paths.INGESTED), out_dir: str = str(paths.SANITIZED),  # noqa: ANN001
             provenance_dir: str = str(paths.PROVENANCE)) -> dict[str, Any]:
    return stages.sanitize(cfg, Path(in_dir), Path(out_dir), Path(provenance_dir))


@task(name="finetune", cache_key_fn=_key("finetune", lambda p: [Path(p["sanitized_dir"]) / paths.CLEAN_FILE],
                                         lambda p: [p["out_dir"]]))
def finetune(cfg, sanitized_dir: str = str(paths.SANITIZED), provenance_dir: str = str(paths.PROVENANCE),  # noqa: ANN001
             out_dir: str = str(paths.MODEL)) -> dict[str, Any]:
    return stages.finetune_stage(cfg, Path(sanitized_dir), Path(provenance_dir), Path(out_dir))


@task(name="scan", cache_key_fn=_key("scan", lambda p: [p["model_dir"], p["sanitized_dir"]], lambda p: [p["out"]]))
def scan(cfg, model_dir: str = str(paths.MODEL), sanitized_dir: str = str(paths.SANITIZED),  # noqa: ANN001
         out: str = str(paths.SCAN_REPORT), suspects: list[str] | None = None) -> dict[str, Any]:
    return stages.scan_stage(cfg, Path(model_dir), Path(sanitized_dir), Path(out), extra_suspects=suspects)


@task(name="prune", cache_key_fn=_key("prune", lambda p: [p["model_dir"], p["scan_report"], p["sanitized_dir"]],
                                      lambda p: [p["out_dir"]]))
def prune(cfg, model_dir: str = str(paths.MODEL), sanitized_dir: str = str(paths.SANITIZED),  # noqa: ANN001
          scan_report: str = str(paths.SCAN_REPORT), out_dir: str = str(paths.PRUNED),
          trigger: str | None = None, target: str | None = None) -> dict[str, Any]:
    return stages.prune_stage(cfg, Path(model_dir), Path(sanitized_dir), Path(scan_report), Path(out_dir),
                              trigger=trigger, target=target)


@task(name="report")
def report(out_dir: str = str(paths.RUN_REPORT), **kw: Any) -> dict[str, Any]:
    return stages.run_report(out_dir=Path(out_dir), **kw)
