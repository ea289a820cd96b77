"""One Prefect task per pipeline stage, each a few lines over :mod:`poisonguard.stages`.

Caching: every task keys on the content of its input files, its own params section and the
library's code version (:func:`poisonguard.cachekey.stage_key`); a missing output disables the
cache hit. Retries: only for failures that can be transient I/O (file systems, the network,
the Anthropic API); a detector or training error fails at once (fail closed, no retry).
"""

from __future__ import annotations

import functools
import inspect
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


def _key(stage: str, inputs):  # noqa: ANN001, ANN202
    def fn(ctx: Any, p: dict[str, Any]) -> str | None:
        params = {k: section(v) if isinstance(v, BaseModel) else v for k, v in p.items()}
        return cachekey.stage_key(stage, inputs(p), params)
    return fn


def _stage(name: str, inputs, outputs, **opts: Any):  # noqa: ANN001, ANN202
    """A cached Prefect task for one stage, refreshed when any of its outputs is gone.

    The cache key covers input contents + params + code version, so a result is reused only for
    the same data and settings; a cached summary whose files were deleted would mislead the next
    stage, so a missing output turns on ``refresh_cache`` for that call.
    """
    def deco(fn):  # noqa: ANN001, ANN202
        t = task(name=name, persist_result=True, cache_key_fn=_key(name, inputs), **opts)(fn)
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kw: Any) -> Any:
            bound = sig.bind(*args, **kw)
            bound.apply_defaults()
            missing = any(not Path(o).exists() for o in outputs(bound.arguments))
            return (t.with_options(refresh_cache=True) if missing else t)(*args, **kw)

        call.task = t  # type: ignore[attr-defined]
        call.fn = fn  # type: ignore[attr-defined]
        return call
    return deco


@_stage("demo-data", lambda p: [], lambda p: [p["out_dir"]])
def demo_data(cfg, out_dir: str = str(paths.RAW)) -> dict[str, Any]:  # noqa: ANN001
    return stages.demo_data(cfg, Path(out_dir))


@_stage("ingest", lambda p: p["inputs"], lambda p: [p["out_dir"]],
        retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient)
def ingest(cfg, inputs: list[str], out_dir: str = str(paths.INGESTED)) -> dict[str, Any]:  # noqa: ANN001
    return stages.ingest(cfg, Path(out_dir), inputs)


@_stage("provenance", lambda p: [p["in_dir"]], lambda p: [p["out_dir"]])
def provenance(in_dir: str = str(paths.INGESTED), out_dir: str = str(paths.PROVENANCE)) -> dict[str, Any]:
    return stages.provenance_stage(Path(in_dir), Path(out_dir))


@_stage("sanitize", lambda p: [p["in_dir"], p["provenance_dir"]], lambda p: [p["out_dir"]],
        retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_transient)
def sanitize(cfg, in_dir: str = str(paths.INGESTED), out_dir: str = str(paths.SANITIZED),  # noqa: ANN001
             provenance_dir: str = str(paths.PROVENANCE), incremental=None) -> dict[str, Any]:  # noqa: ANN001
    return stages.sanitize(cfg, Path(in_dir), Path(out_dir), Path(provenance_dir), incremental=incremental)


@_stage("finetune", lambda p: [Path(p["sanitized_dir"]) / paths.CLEAN_FILE], lambda p: [p["out_dir"]])
def finetune(cfg, sanitized_dir: str = str(paths.SANITIZED), provenance_dir: str = str(paths.PROVENANCE),  # noqa: ANN001
             out_dir: str = str(paths.MODEL)) -> dict[str, Any]:
    return stages.finetune_stage(cfg, Path(sanitized_dir), Path(provenance_dir), Path(out_dir))


@_stage("scan", lambda p: [p["model_dir"], p["sanitized_dir"]], lambda p: [p["out"]])
def scan(cfg, model_dir: str = str(paths.MODEL), sanitized_dir: str = str(paths.SANITIZED),  # noqa: ANN001
         out: str = str(paths.SCAN_REPORT), suspects: list[str] | None = None) -> dict[str, Any]:
    return stages.scan_stage(cfg, Path(model_dir), Path(sanitized_dir), Path(out), extra_suspects=suspects)


@_stage("prune", lambda p: [p["model_dir"], p["scan_report"], p["sanitized_dir"]], lambda p: [p["out_dir"]])
def prune(cfg, model_dir: str = str(paths.MODEL), sanitized_dir: str = str(paths.SANITIZED),  # noqa: ANN001
          scan_report: str = str(paths.SCAN_REPORT), out_dir: str = str(paths.PRUNED),
          trigger: str | None = None, target: str | None = None) -> dict[str, Any]:
    return stages.prune_stage(cfg, Path(model_dir), Path(sanitized_dir), Path(scan_report), Path(out_dir),
                              trigger=trigger, target=target)


@task(name="report")
def report(out_dir: str = str(paths.RUN_REPORT), **kw: Any) -> dict[str, Any]:
    return stages.run_report(out_dir=Path(out_dir), **kw)
