"""Sanitize on a Dask cluster: per-shard detector work as Prefect tasks on a DaskTaskRunner.

Used by the nightly flow when ``nightly.shards > 1`` or ``nightly.dask_address`` is set; runnable
alone too:

    python flows/sanitize_distributed.py --shards 8                       # LocalCluster, 2 workers
    python flows/sanitize_distributed.py --shards 8 --address tcp://scheduler:8786

The result equals the single-process sanitize (``tests/test_sharded.py``). Progress is visible per
shard task in the Prefect UI (and the Dask dashboard of the cluster).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from poisonguard import paths, sharded, stages
from poisonguard.config import IncrementalConfig, NightlyConfig, SanitizeConfig, load_config


@task(name="summarize-shard", cache_policy=NO_CACHE, task_run_name="summarize-{names[0]}")
def summarize_shard(shard, cfg, names):  # noqa: ANN001, ANN201
    return sharded.summarize_shard(shard, cfg, names)


@task(name="merge-summaries", cache_policy=NO_CACHE)
def merge_summaries(summaries, cfg):  # noqa: ANN001, ANN201
    return sharded.merge_summaries(summaries, cfg)


@task(name="hold-shard", cache_policy=NO_CACHE)
def hold_shard(shard):  # noqa: ANN001, ANN201
    return shard


@task(name="collect-stats", cache_policy=NO_CACHE)
def collect_stats(parts):  # noqa: ANN001, ANN201
    return sharded.collect_stats(parts)


@task(name="score-shard", cache_policy=NO_CACHE)
def score_shard(shard, stats, cfg):  # noqa: ANN001, ANN201
    return sharded.score_shard(shard, stats, cfg)


@task(name="score-fuse-shard", cache_policy=NO_CACHE)
def score_fuse_shard(shard, stats, cfg, review=False):  # noqa: ANN001, ANN201
    return sharded.score_fuse_shard(shard, stats, cfg, review)


_TASKS = {sharded.summarize_shard: summarize_shard, sharded.score_shard: score_shard,
          sharded.score_fuse_shard: score_fuse_shard}


def prefect_map(fn, *iterables):  # noqa: ANN001, ANN201
    """``map`` through Prefect tasks on the flow's task runner (Dask). Summaries stay futures
    (they go straight to their group's merge task's worker); score results come back to the flow."""
    futures = _TASKS[fn].map(*iterables)
    if fn is sharded.summarize_shard:
        return list(futures)
    return [f.result() for f in futures]


def prefect_merge(by_group, cfg):  # noqa: ANN001, ANN201
    """One merge task per detector group on the cluster (the groups' merges run on several workers,
    none holds every detector's summaries), then one task that collects their statistics; its
    future is handed to every score task, so Dask sends the global statistics to each worker once
    (not pickled once per shard by the flow)."""
    return collect_stats.submit([merge_summaries.submit(parts, cfg) for parts in by_group])


def prefect_place(shards):  # noqa: ANN001, ANN201
    """Shards held in memory (rows of an incremental run) go to the cluster once, as the results
    of one task each, that every summarize and score task of the shard then reads; shard files
    need no placing (each task reads its own)."""
    return [hold_shard.submit(s) if isinstance(s, pd.DataFrame) else s for s in shards]


def dask_runner(cfg: NightlyConfig) -> DaskTaskRunner:
    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.dask_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@flow(name="poisonguard-sanitize-distributed", log_prints=True, task_runner=DaskTaskRunner())
def sanitize_distributed(cfg: SanitizeConfig, n_shards: int, in_dir: str = str(paths.INGESTED),
                         out_dir: str = str(paths.SANITIZED), provenance_dir: str = str(paths.PROVENANCE),
                         incremental: IncrementalConfig | None = None) -> dict[str, Any]:
    return stages.sanitize(cfg, Path(in_dir), Path(out_dir), Path(provenance_dir), n_shards=n_shards,
                          map_=prefect_map, merge_=prefect_merge, place_=prefect_place,
                          incremental=incremental)


def run(cfg_nightly: NightlyConfig, cfg: SanitizeConfig, **kw: Any) -> dict[str, Any]:
    """The flow on the runner the nightly config asks for."""
    return sanitize_distributed.with_options(task_runner=dask_runner(cfg_nightly))(
        cfg, max(cfg_nightly.shards, 2), incremental=cfg_nightly.incremental, **kw)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--address", help="Dask scheduler address (default: a LocalCluster)")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    c = load_config(a.params if Path(a.params).exists() else None)
    night = c.nightly.model_copy(update={"shards": a.shards, "dask_address": a.address, "dask_workers": a.workers})
    print(run(night, c.sanitize))
