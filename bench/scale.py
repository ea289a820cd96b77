"""Scale benchmark: sanitize at 1M and 5M rows, single process vs Dask, and the nightly increment.

Data: :func:`poisonguard.demo.generate_corpus` instruction rows, generated in chunks of 100k and
written once to ``<workdir>/data-<N>.parquet``, with five zoo attacks at a fixed count each
(``--poison`` rows of ``phrase``, ``rare_token``, ``invisible_unicode``, ``temporal`` and
``content_injection``, each inside its own chunk of rows). Generating the data is not timed.

Runs, each in its own subprocess (so its peak memory is its own):

* ``single N``    :func:`poisonguard.sanitize.sanitize` on all N rows in one process;
* ``dask N``      the sanitize stage (:func:`poisonguard.stages.sanitize`) on the N rows as ingest
  writes them with ``--shards`` shards (``<workdir>/ingested-...``, prepared once, not timed), on a
  ``distributed.LocalCluster`` of 2 worker processes (1 thread each): streamed
  (:func:`poisonguard.sharded.sanitize_streamed`): summaries, the merges (one task per detector
  group) and scoring run on the workers, which read their shard files; the driver never holds the
  records: it gets two numbers per row back and writes the clean / quarantine / decisions files
  one shard at a time;
* ``increment``   the nightly path (:func:`poisonguard.incremental.sanitize_incremental`): a full
  run on N rows writes the ledger; then the N rows plus a new delivery of 5% more rows, all unseen
  (another ``--poison`` rows of the ``phrase`` attack among them, so an old finding grows), are sanitized
  incrementally and, for comparison, in full: wall time, recall and false-positive rate of both.
* ``dask-increment``  the same nightly increment through the streamed stage on the 2-worker Dask
  cluster (the distributed nightly): night 1 a full streamed run over ingest's shards of the N
  rows, night 2 the N + 5% rows incremental (planned from the id / hash / prompt columns, only the
  delta set loaded, every row's decision written shard by shard), then the same rows in a full
  streamed run: wall time, peak memory per process and of the driver, recall and FPR of both.

Memory: ``peak_rss_mb`` is the largest resident set size of any one process of the run (the
driver or one Dask worker; ``peak_driver_mb`` the driver's), sampled every 50 ms with psutil; ``peak_total_mb`` the largest sum
over the process tree. ``peak_anon_mb`` (Dask runs) is the largest anonymous resident memory of one
process (RSS less its file-backed pages): with ``sanitize.spill_dir`` (``--spill-dir``, on by default
here) the trigger/response merge keeps its token tables and large arrays in memory-mapped files,
whose pages count in RSS while resident but are clean page cache the kernel drops under pressure.
A run whose one process goes above ``--max-rss-gb`` is stopped and reported as such (this protects
the machine: a 24 GB box cannot swap its way through 5M rows).

``--cgroup-gb 4`` (Linux, root) runs every process of a Dask run in its own cgroup-v1 memory group
of 4 GB: with no swap, a process that needs more memory than the kernel can reclaim (file pages)
is killed and the run fails, so a run that finishes fits in 4 GB per process.

    python bench/scale.py [--sizes 1000000,5000000] [--modes single,dask,increment,dask-increment]
                          [--workdir DIR] [--spill-dir DIR] [--cgroup-gb GB]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("POISONGUARD_BENCH_SRC") or str(ROOT / "src"))

ATTACKS = ("phrase", "rare_token", "invisible_unicode", "temporal", "content_injection")
CHUNK = 100_000
MODES = ("single", "dask", "increment", "dask-increment")


# ---------------------------------------------------------------- memory

_CGROUP_GB = 0.0     # --cgroup-gb: every process of a run in its own memory cgroup of this size


class _Cgroups:
    """Put each process (the driver, Dask's nannies and workers) into its own cgroup-v1 memory
    group capped at ``gb`` (no swap here, so a process whose memory the kernel cannot reclaim
    beyond the cap is killed: the run then fails). Linux as root only."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, gb: float) -> None:
        self.limit = int(gb * 2**30)
        self.made: dict[int, Path] = {}
        self.home: str | None = None
        if self.limit:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
            self.home = next((ln.split(":", 2)[2].strip() for ln in lines if ln.split(":")[1] == "memory"), "/")

    def place(self, pid: int) -> None:
        if not self.limit or pid in self.made:
            return
        d = self.ROOT / f"poisonguard-bench-{os.getpid()}-{pid}"
        d.mkdir(exist_ok=True)     # fails loudly without cgroup-v1 memory rights (--cgroup-gb needs them)
        (d / "memory.limit_in_bytes").write_text(str(self.limit))
        try:    # the memory the process already has moves into the group with it
            (d / "memory.move_charge_at_immigrate").write_text("3")
        except OSError:
            pass
        try:
            (d / "cgroup.procs").write_text(str(pid))
        except OSError:            # the process has ended meanwhile
            d.rmdir()
            return
        self.made[pid] = d

    def failcnts(self) -> dict[int, int]:
        """How often each process hit its cap (the kernel reclaimed pages to stay under it)."""
        out = {}
        for pid, d in self.made.items():
            try:
                out[pid] = int((d / "memory.failcnt").read_text())
            except OSError:
                pass
        return out

    def close(self) -> None:
        """This process back into the group it came from; the groups of ended processes removed."""
        home = self.home or "/"
        if os.getpid() in self.made:
            (self.ROOT / home.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))
        for d in self.made.values():
            try:
                d.rmdir()
            except OSError:
                pass
        self.made = {}


class TreeRSS:
    """Sample the RSS of this process and all its descendants every ``interval`` seconds;
    stop the process (exit 3) when one process exceeds ``limit`` bytes."""

    def __init__(self, limit: float = 0, interval: float = 0.05) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self.limit = limit
        self.interval = interval
        self.peak_one = 0
        self.peak_total = 0
        self.peak_driver = 0
        self.peaks: dict[int, int] = {}     # pid -> peak RSS (the driver, Dask's nannies and workers)
        self.peak_anon = 0                  # the largest anonymous (not file-backed) resident memory of one process
        self.anon_peaks: dict[int, int] = {}
        self.t0 = time.perf_counter()
        self.stage = ""         # what the run is doing (its progress callback sets it)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.cgroups = _Cgroups(_CGROUP_GB)

    def sample(self) -> None:
        procs = [self._proc]
        try:
            procs += self._proc.children(recursive=True)
        except self._psutil.Error:
            pass
        rss = []
        for p in procs:
            try:
                self.cgroups.place(p.pid)
                mi = p.memory_info()
                rss.append(mi.rss)
                self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), rss[-1])
                # Linux: ``shared`` is the resident file-backed and shared memory (RssFile + RssShmem)
                anon = mi.rss - getattr(mi, "shared", 0)
                self.peak_anon = max(self.peak_anon, anon)
                self.anon_peaks[p.pid] = max(self.anon_peaks.get(p.pid, 0), anon)
            except self._psutil.Error:
                pass
        if rss:
            self.peak_one = max(self.peak_one, max(rss))
            self.peak_total = max(self.peak_total, sum(rss))
            self.peak_driver = max(self.peak_driver, rss[0])
        if self.limit and self.peak_one > self.limit:
            print(json.dumps({"status": f"stopped after {time.perf_counter() - self.t0:.1f} s: one process "
                                        f"went above {self.limit / 2**30:.1f} GB",
                              "peak_rss_mb": self.peak_one >> 20, "peak_total_mb": self.peak_total >> 20,
                              "peak_driver_mb": self.peak_driver >> 20, "stage": self.stage,
                              "peaks_mb": self.top()}),
                  flush=True)
            os._exit(3)

    def top(self, k: int = 4) -> list[int]:
        """The ``k`` largest per-process peaks in MB (the driver's among them)."""
        return sorted((v >> 20 for v in self.peaks.values()), reverse=True)[:k]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRSS:
        self.peak_one = self.peak_total = self.peak_driver = self.peak_anon = 0
        self.peaks, self.anon_peaks = {}, {}
        self.t0 = time.perf_counter()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._stop.clear()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.sample()
        self.cap_hits = sum(self.cgroups.failcnts().values())
        self.cgroups.close()


# ---------------------------------------------------------------- data

def _chunk(n: int, seed: int, prefix: str, attack: str | None, poison: int):
    from poisonguard import attacks, demo, io

    rows = demo.generate_corpus(n, seed=seed, source="bulk", id_prefix=prefix)
    poisoned: list[str] = []
    if attack:
        rows, res = attacks.apply_attack(rows, attack, min(poison, n), seed=seed)
        poisoned = list(res.poisoned_ids)
        bad = set(poisoned)
        for r in rows:
            if r["id"] in bad:
                r["source"] = "vendor"
    return io.records_from_rows(rows, source="bulk", collector="bench"), poisoned


def make_data(workdir: Path, n: int, poison: int, seed: int = 0, prefix: str = "r") -> tuple[Path, Path]:
    """``n`` rows in ``data-<prefix><n>.parquet`` and the poisoned ids in ``truth-...json`` (cached)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = workdir / f"data-{prefix}{n}-{poison}-{seed}.parquet"
    truth = workdir / f"truth-{prefix}{n}-{poison}-{seed}.json"
    if data.is_file() and truth.is_file():
        return data, truth
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = data.with_suffix(".tmp")
    writer = None
    poisoned: list[str] = []
    for k, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        attack = ATTACKS[k] if k < len(ATTACKS) else None
        frame, bad = _chunk(m, seed * 1000 + k, f"{prefix}{k:03d}-", attack, poison)
        poisoned += bad
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table.cast(writer.schema))
        del frame, table
        gc.collect()
    if writer is not None:
        writer.close()
    tmp.replace(data)
    truth.write_text(json.dumps(poisoned))
    return data, truth


def _load(data: Path, truth: Path):
    import numpy as np

    from poisonguard import io
    from poisonguard import schema as S

    records = io.read_records(data)
    bad = set(json.loads(truth.read_text()))
    return records, np.asarray(records[S.ID].isin(bad).to_numpy())


def _score(res, records, y) -> dict[str, float]:
    import numpy as np

    from poisonguard import schema as S

    flag = (res.decisions[S.DECISION].reindex(records[S.ID]) == S.QUARANTINE).to_numpy()
    return {"recall": round(float((flag & y).sum() / max(int(y.sum()), 1)), 4),
            "fpr": round(float((flag & ~y).sum() / max(int((~y).sum()), 1)), 6),
            "quarantined": int(flag.sum()), "poisoned": int(y.sum()),
            "flag_ids": None if flag.sum() > 50_000 else set(np.asarray(records[S.ID])[flag])}


# ---------------------------------------------------------------- workers

_SPILL_DIR: str | None = None    # --spill-dir (the sharded runs' out-of-core folder)


def _cfg():
    from poisonguard.config import SanitizeConfig

    return SanitizeConfig(llm_review={"enabled": False}, spill_dir=_SPILL_DIR)


def run_single(data: Path, truth: Path, limit: float) -> dict[str, Any]:
    from poisonguard.sanitize import sanitize

    records, y = _load(data, truth)
    gc.collect()
    with TreeRSS(limit) as mem:
        t0 = time.perf_counter()
        res = sanitize(records, _cfg())
        dt = time.perf_counter() - t0
    sc = _score(res, records, y)
    sc.pop("flag_ids")
    return {"rows": len(records), "seconds": round(dt, 1), "rows_per_s": round(len(records) / dt),
            "peak_rss_mb": mem.peak_one >> 20, "peak_total_mb": mem.peak_total >> 20, **sc,
            "detector_seconds": res.seconds}


def make_shards(workdir: Path, data: Path, n_shards: int) -> Path:
    """``data`` as ingest writes it with ``ingest.shards: n_shards`` (cached): a folder holding
    ``records.parquet/part-*.parquet`` keyed by content hash, an empty ``rejected.parquet`` and
    ``ingest.json``; written a row group at a time (this is ingest's work, not timed)."""
    import pyarrow.parquet as pq

    from poisonguard import io, paths
    from poisonguard import schema as S
    from poisonguard.sharded import FrameSink

    out = workdir / f"ingested-{data.stem}-{n_shards}"
    if (out / "ingest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    pf = pq.ParquetFile(data)
    with FrameSink(out / paths.RECORDS_FILE, n_shards) as sink:
        for g in range(pf.num_row_groups):
            sink.write(pf.read_row_group(g).to_pandas())
            gc.collect()
    io.write_parquet(io.rejected_frame([]), out / paths.REJECTED_FILE, S.REJECTED_COLUMNS)
    (out / "ingest.json").write_text(json.dumps({"rows_in": pf.metadata.num_rows}))
    return out


def _dask_stage(in_dir: Path, out_dir: Path, limit: float, shards: int, workers: int,
                **stage_kw: Any) -> tuple[dict[str, Any], float, float, TreeRSS]:
    """The sanitize stage on ingest's shard folder ``in_dir`` through a fresh Dask LocalCluster
    (``stage_kw``: e.g. ``incremental`` and ``ledger_dir``): (stage output, seconds, seconds
    without the cluster's start, the memory sampler)."""
    import shutil

    from distributed import Client, Future, LocalCluster

    from poisonguard import sharded, stages

    shutil.rmtree(out_dir, ignore_errors=True)
    gc.collect()
    with TreeRSS(limit) as mem:
        t0 = time.perf_counter()
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          memory_limit=0) as cluster, Client(cluster) as client:
            t_up = time.perf_counter()

            def map_(fn, *its):  # noqa: ANN001, ANN202
                # an argument repeated for every shard (the merged statistics, the config) is sent
                # to the workers once, not pickled once per task; summaries stay on the workers
                args = []
                for it in its:
                    it = list(it)
                    if len(it) > 1 and all(x is it[0] for x in it) and not isinstance(it[0], (Future, tuple, list)):
                        fut = client.scatter(it[0], broadcast=True, hash=False)
                        it = [fut] * len(it)
                    args.append(it)
                futures = client.map(fn, *args, pure=False)
                return futures if fn is sharded.summarize_shard else client.gather(futures)

            def merge_(by_group, cfg):  # noqa: ANN001, ANN202
                # one merge task per detector group on the workers, then one that collects them
                parts = [client.submit(sharded.merge_summaries, g, cfg, pure=False) for g in by_group]
                return client.submit(sharded.collect_stats, parts, pure=False)

            def place_(shards_):  # noqa: ANN001, ANN202
                # rows held in memory (an incremental night's delta set) go to the cluster once
                return [client.scatter(x, hash=False) if not isinstance(x, (str, Path)) else x for x in shards_]

            def progress(stage: str) -> None:
                mem.stage = stage
                print(f"  {time.perf_counter() - t0:7.1f} s  {stage}", file=sys.stderr, flush=True)

            out = stages.sanitize(_cfg(), in_dir, out_dir, None, progress, n_shards=shards, map_=map_,
                                  merge_=merge_, place_=place_, **stage_kw)
            dt_run = time.perf_counter() - t_up
        dt = time.perf_counter() - t0
    return out, dt, dt_run, mem


def _outcome(out_dir: Path, bad: set[str]) -> dict[str, Any]:
    """Recall and false-positive rate of a stage's decisions file against the poisoned ids."""
    import pyarrow.parquet as pq

    from poisonguard import paths
    from poisonguard import schema as S

    dec = pq.read_table(out_dir / paths.DECISIONS_FILE, columns=[S.ID, S.DECISION]).to_pandas()
    y = dec[S.ID].isin(bad).to_numpy()
    flag = (dec[S.DECISION] == S.QUARANTINE).to_numpy()
    return {"rows": len(dec), "recall": round(float((flag & y).sum() / max(int(y.sum()), 1)), 4),
            "fpr": round(float((flag & ~y).sum() / max(int((~y).sum()), 1)), 6),
            "quarantined": int(flag.sum()), "poisoned": int(y.sum())}


def _mem(mem: TreeRSS) -> dict[str, Any]:
    out = {"peak_rss_mb": mem.peak_one >> 20, "peak_anon_mb": mem.peak_anon >> 20,
           "peak_driver_mb": mem.peak_driver >> 20, "peaks_mb": mem.top(), "peak_total_mb": mem.peak_total >> 20,
           "anon_peaks_mb": sorted((v >> 20 for v in mem.anon_peaks.values()), reverse=True)[:4]}
    if _CGROUP_GB:
        # every process ran in its own memory cgroup of this size; cap_hits: times one reached it
        out.update(cgroup_gb_per_process=_CGROUP_GB, cgroup_cap_hits=getattr(mem, "cap_hits", 0))
    return out


def run_dask(data: Path, truth: Path, limit: float, shards: int, workers: int, workdir: Path) -> dict[str, Any]:
    """The sanitize stage on ingest's shard files through a Dask LocalCluster: streamed (the
    records stay on disk; see :func:`poisonguard.stages.sanitize`), outputs written to disk."""
    in_dir = make_shards(workdir, data, shards)
    out_dir = workdir / f"sanitized-{data.stem}-{shards}"
    os.environ["POISONGUARD_STATE"] = str(workdir / "state")
    out, dt, dt_run, mem = _dask_stage(in_dir, out_dir, limit, shards, workers)
    rep = json.loads((out_dir / "report.json").read_text())
    sc = _outcome(out_dir, set(json.loads(truth.read_text())))
    n = sc["rows"]
    return {"rows": n, "seconds": round(dt, 1), "seconds_without_cluster_start": round(dt_run, 1),
            "rows_per_s": round(n / dt), "shards": shards, "workers": workers, "streamed": "streamed" in rep,
            **_mem(mem), **sc, "verdict": out["verdict"]}


def _fresh_rows(base_data: Path, new_data: Path, new_truth: Path, n_new: int):  # noqa: ANN202
    """``n_new`` rows of ``new_data`` never seen in ``base_data`` (the generator repeats some rows
    exactly): every poisoned row, then unseen clean rows; and their truth mask."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from poisonguard import schema as S

    new, y_new = _load(new_data, new_truth)
    # Arrow, not a Python set of N strings (memory the driver's later peak would carry)
    seen = pq.read_table(base_data, columns=[S.CONTENT_HASH]).column(S.CONTENT_HASH).combine_chunks()
    old = pc.is_in(pa.array(new[S.CONTENT_HASH].astype(str).to_numpy(), type=seen.type), value_set=seen)
    fresh = ~old.to_numpy(zero_copy_only=False) & ~new[S.CONTENT_HASH].duplicated().to_numpy()
    del seen, old
    keep = np.flatnonzero(fresh & y_new)
    keep = np.sort(np.concatenate([keep, np.flatnonzero(fresh & ~y_new)[:max(0, n_new - len(keep))]]))
    return new.iloc[keep].reset_index(drop=True), y_new[keep]


def run_dask_increment(data: Path, truth: Path, new_data: Path, new_truth: Path, limit: float, shards: int,
                       workers: int, workdir: Path, n_new: int) -> dict[str, Any]:
    """The nightly increment through the streamed stage on Dask (the distributed nightly): night 1
    a full streamed run over ingest's shards of the N rows (the ledger written as the shards pass);
    night 2 the N rows plus ``n_new`` unseen rows as ingest shards them, incremental (planned from
    the id / hash / prompt columns, the delta set loaded, every row's decision written streamed);
    then the same rows in a full streamed run for comparison."""
    import shutil

    import pyarrow.parquet as pq

    from poisonguard import io, paths
    from poisonguard import schema as S
    from poisonguard.config import IncrementalConfig
    from poisonguard.sharded import FrameSink

    os.environ["POISONGUARD_STATE"] = str(workdir / "state")
    inc = IncrementalConfig(full_every=0)
    ledger = workdir / "ledger-dask"
    shutil.rmtree(ledger, ignore_errors=True)
    base_dir = make_shards(workdir, data, shards)
    new, y_new = _fresh_rows(data, new_data, new_truth, n_new)
    both_dir = workdir / f"ingested-{data.stem}-plus-{new_data.stem}-{n_new}-{shards}"
    if not (both_dir / "ingest.json").is_file():   # ingest's work, not timed
        pf = pq.ParquetFile(data)
        with FrameSink(both_dir / paths.RECORDS_FILE, shards) as sink:
            for g in range(pf.num_row_groups):
                sink.write(pf.read_row_group(g).to_pandas())
            sink.write(new)
        io.write_parquet(io.rejected_frame([]), both_dir / paths.REJECTED_FILE, S.REJECTED_COLUMNS)
        (both_dir / "ingest.json").write_text(json.dumps({"rows_in": pf.metadata.num_rows + len(new)}))
    bad = set(json.loads(truth.read_text())) | set(new.loc[y_new, S.ID])
    del new
    gc.collect()
    out: dict[str, Any] = {}
    o, dt, _, mem = _dask_stage(base_dir, workdir / "sanitized-dask-night1", limit, shards, workers,
                                incremental=inc, ledger_dir=ledger)
    out["night1"] = {"mode": o["incremental"]["mode"], "seconds": round(dt, 1), **_mem(mem)}
    o, dt_inc, _, mem = _dask_stage(both_dir, workdir / "sanitized-dask-night2", limit, shards, workers,
                                    incremental=inc, ledger_dir=ledger)
    out["increment"] = {"seconds": round(dt_inc, 1), **o["incremental"], **_mem(mem),
                        **_outcome(workdir / "sanitized-dask-night2", bad)}
    o, dt_full, _, mem = _dask_stage(both_dir, workdir / "sanitized-dask-full", limit, shards, workers)
    out["full"] = {"seconds": round(dt_full, 1), **_mem(mem), **_outcome(workdir / "sanitized-dask-full", bad)}
    a = set(pq.read_table(workdir / "sanitized-dask-night2" / paths.QUARANTINE_FILE, columns=[S.ID])
            .column(S.ID).to_pylist())
    b = set(pq.read_table(workdir / "sanitized-dask-full" / paths.QUARANTINE_FILE, columns=[S.ID])
            .column(S.ID).to_pylist())
    out["quarantine_only_incremental"], out["quarantine_only_full"] = len(a - b), len(b - a)
    out["increment_share_of_full"] = round(dt_inc / dt_full, 4)
    return out


def run_increment(data: Path, truth: Path, new_data: Path, new_truth: Path, limit: float,
                  workdir: Path, n_new: int) -> dict[str, Any]:
    import shutil

    import pandas as pd

    from poisonguard import incremental
    from poisonguard.config import IncrementalConfig
    from poisonguard.sanitize import sanitize

    cfg = _cfg()
    inc = IncrementalConfig(full_every=0)
    ledger = workdir / "ledger"
    shutil.rmtree(ledger, ignore_errors=True)
    base, y0 = _load(data, truth)
    gc.collect()
    out: dict[str, Any] = {}
    with TreeRSS(limit) as mem:
        t0 = time.perf_counter()
        _, info = incremental.sanitize_incremental(base, cfg, ledger, inc, lambda r: sanitize(r, cfg))
        out["night1"] = {"rows": len(base), "mode": info["mode"], "seconds": round(time.perf_counter() - t0, 1),
                         "peak_rss_mb": mem.peak_one >> 20}
    import numpy as np

    # the delivery is `n_new` rows never seen before: every poisoned row, then unseen clean rows
    new, y_new = _fresh_rows(data, new_data, new_truth, n_new)
    both = pd.concat([base, new], ignore_index=True)
    y = np.concatenate([y0, y_new])
    del base, new
    gc.collect()
    with TreeRSS(limit) as mem:
        t0 = time.perf_counter()
        res_inc, info = incremental.sanitize_incremental(both, cfg, ledger, inc, lambda r: sanitize(r, cfg))
        dt_inc = time.perf_counter() - t0
    sc_inc = _score(res_inc, both, y)
    out["increment"] = {"rows": len(both), "seconds": round(dt_inc, 1), "peak_rss_mb": mem.peak_one >> 20,
                        **{k: info.get(k) for k in ("mode", "reason", "new", "delta", "baseline", "watched",
                                                    "prompt_twins", "carried_over")},
                        **{k: v for k, v in sc_inc.items() if k != "flag_ids"}}
    del res_inc
    gc.collect()
    with TreeRSS(limit) as mem:
        t0 = time.perf_counter()
        res_full = sanitize(both, cfg)
        dt_full = time.perf_counter() - t0
    sc_full = _score(res_full, both, y)
    out["full"] = {"rows": len(both), "seconds": round(dt_full, 1), "peak_rss_mb": mem.peak_one >> 20,
                   **{k: v for k, v in sc_full.items() if k != "flag_ids"}}
    a, b = sc_inc["flag_ids"], sc_full["flag_ids"]
    if a is not None and b is not None:
        out["quarantine_only_incremental"] = len(a - b)
        out["quarantine_only_full"] = len(b - a)
    out["increment_share_of_full"] = round(dt_inc / dt_full, 4)
    return out


# ---------------------------------------------------------------- driver

_CODE: Path | None = None


def snapshot_code(workdir: Path) -> Path:
    """A copy of ``src/`` for the runs: an edit of the checkout during a long benchmark must not
    change the code between its steps (the incremental ledger would rightly see new detector
    code and run in full)."""
    import shutil

    dest = workdir / "code"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT / "src", dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def _sub(args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    src = str(_CODE or ROOT / "src")
    env = dict(os.environ, PYTHONPATH=src, POISONGUARD_BENCH_SRC=src, DO_NOT_TRACK="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"did not finish within {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
    if lines:
        out = json.loads(lines[-1])
        out.setdefault("status", "ok" if p.returncode == 0 else f"failed (exit {p.returncode})")
    else:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        out = {"status": f"failed (exit {p.returncode}): {' | '.join(tail)}"}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000000,5000000")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--poison", type=int, default=250, help="poisoned rows per attack family")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--increment-base", type=int, default=1_000_000)
    ap.add_argument("--increment-share", type=float, default=0.05)
    ap.add_argument("--max-rss-gb", type=float, default=18.0, help="stop a run when one process exceeds this")
    ap.add_argument("--timeout", type=float, default=5400.0)
    ap.add_argument("--workdir", default="/tmp/poisonguard-scale")
    ap.add_argument("--spill-dir", default=None,
                    help="sanitize.spill_dir of the Dask runs (default <workdir>/spill; '' = in memory)")
    ap.add_argument("--cgroup-gb", type=float, default=0.0,
                    help="run every process of a Dask run in its own memory cgroup of this many GB "
                         "(Linux, root, cgroup v1; no swap: a process that needs more is killed)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    workdir = Path(a.workdir)
    limit = a.max_rss_gb * 2**30
    global _SPILL_DIR, _CGROUP_GB
    _SPILL_DIR = str(workdir / "spill") if a.spill_dir is None else (a.spill_dir or None)
    _CGROUP_GB = a.cgroup_gb if a.worker in ("dask", "dask-increment") else 0.0
    if a.worker:
        if a.worker in ("increment", "dask-increment"):
            data, truth = make_data(workdir, a.n, a.poison)
            m = max(1, int(round(a.n * a.increment_share)))
            new_data, new_truth = make_data(workdir, int(m * 1.5), a.poison, seed=7, prefix="new")
            print(json.dumps(run_increment(data, truth, new_data, new_truth, limit, workdir, m)
                             if a.worker == "increment" else
                             run_dask_increment(data, truth, new_data, new_truth, limit, a.shards, a.workers,
                                                workdir, m)))
        else:
            data, truth = make_data(workdir, a.n, a.poison)
            out = run_single(data, truth, limit) if a.worker == "single" else \
                run_dask(data, truth, limit, a.shards, a.workers, workdir)
            print(json.dumps(out))
        return 0
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown modes {bad}; known: {', '.join(MODES)}")
    sizes = [int(s) for s in a.sizes.split(",") if s]
    global _CODE
    _CODE = snapshot_code(workdir)
    load = os.getloadavg()
    print(f"cpus: {os.cpu_count()}  load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    results: list[dict[str, Any]] = []
    common = ["--poison", str(a.poison), "--workdir", str(workdir), "--max-rss-gb", str(a.max_rss_gb),
              "--spill-dir", _SPILL_DIR or "", "--cgroup-gb", str(a.cgroup_gb)]
    for n in sizes if {"single", "dask"} & set(modes) else []:
        t0 = time.perf_counter()
        data, _ = make_data(workdir, n, a.poison)
        if "dask" in modes:
            make_shards(workdir, data, a.shards)
        print(f"data {n} rows ({len(ATTACKS)} attacks x {a.poison} rows): ready in {time.perf_counter() - t0:.0f} s",
              flush=True)
        for mode in ("single", "dask"):
            if mode not in modes:
                continue
            extra = ["--shards", str(a.shards), "--workers", str(a.workers)] if mode == "dask" else []
            r = {"mode": mode, "rows": n, **_sub(["--worker", mode, "--n", str(n), *common, *extra], a.timeout)}
            results.append(r)
            if "seconds" in r:
                print(f"{mode:9s} {n:>9d} rows  {r['seconds']:8.1f} s  {r['rows_per_s']:>6d} rows/s  peak/process "
                      f"{r['peak_rss_mb']:>6d} MB  total {r['peak_total_mb']:>6d} MB  recall {r['recall']:.3f}  "
                      f"FPR {100 * r['fpr']:.4f}%  {r['status']}"
                      + (f"  (driver {r['peak_driver_mb']} MB)" if "peak_driver_mb" in r else "")
                      + (f"  anonymous/process {r['peak_anon_mb']} MB" if "peak_anon_mb" in r else ""), flush=True)
            else:
                print(f"{mode:9s} {n:>9d} rows  {r['status']}  (peak/process {r.get('peak_rss_mb', '-')} MB, driver "
                      f"{r.get('peak_driver_mb', '-')} MB, during {r.get('stage') or '-'})",
                      flush=True)
    for mode in ("increment", "dask-increment"):
        if mode not in modes:
            continue
        n = a.increment_base
        extra = ["--shards", str(a.shards), "--workers", str(a.workers)] if mode == "dask-increment" else []
        r = {"mode": mode, "rows": n, **_sub(["--worker", mode, "--n", str(n), "--increment-share",
                                              str(a.increment_share), *common, *extra], a.timeout)}
        results.append(r)
        if "increment" not in r:
            print(f"{mode}: {r['status']}", flush=True)
            continue
        i, f = r["increment"], r["full"]
        mem = (lambda x: f" (peak/process {x['peak_rss_mb']} MB, driver {x['peak_driver_mb']} MB)") \
            if mode == "dask-increment" else (lambda x: "")
        twins = i.get("prompt_twins")     # (the streamed stage's report has the delta set's size only)
        twin_free = "" if twins is None else \
            f", {i['delta'] - twins} without the prompt twins only duplicates and divergent_copies see"
        print(f"{mode}: {i['new']} new rows over {n}: {i['mode']} run {i['seconds']} s (delta set {i['delta']} "
              f"rows{twin_free}){mem(i)} vs full {f['seconds']} s{mem(f)} = {100 * r['increment_share_of_full']:.1f}% of the "
              f"full run; recall {i['recall']:.3f} vs {f['recall']:.3f}, FPR {100 * i['fpr']:.4f}% vs "
              f"{100 * f['fpr']:.4f}%; quarantined only by incremental {r.get('quarantine_only_incremental')}, "
              f"only by full {r.get('quarantine_only_full')}", flush=True)
    print(json.dumps({"cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load],
                      "poison_per_attack": a.poison, "attacks": list(ATTACKS), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
