"""Whole-flow tests on tiny params: the nightly flow end to end under a Prefect test server
(tasks, caching, artifacts, reports), and the remediation flow on the model it produced.

Kept to one Prefect session (~12 s of start-up); the per-stage logic is tested elsewhere
through the library directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

TINY_PARAMS = {
    "demo": {"inhouse_rows": 400, "vendor_rows": 300, "poison_count": 6, "attack": "phrase"},
    "finetune": {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 400, "n_positions": 64, "max_len": 64,
                 "epochs": 1, "batch_size": 32, "val_fraction": 0.1, "num_threads": 1},
    "scan": {"n_prompts": 6, "min_candidates": 30, "max_candidates": 60, "top_k": 3, "gen_tokens": 8,
             "match_tokens": 4, "search": False, "num_threads": 1},
    "prune": {"finetune_epochs": 1, "max_clean_rows": 200, "n_eval_prompts": 6, "gen_tokens": 8, "num_threads": 1},
}


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("project")
    (d / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return d


def test_nightly_flow_end_to_end_then_cached(prefect_server, project, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.nightly import nightly

    monkeypatch.chdir(project)
    monkeypatch.setenv("POISONGUARD_STATE", str(project / ".state"))  # a ledger of its own
    state = nightly(params_path="params.yaml", return_state=True)
    assert state.is_completed(), state
    res = state.result()
    first = json.loads((project / "data/processed/sanitized/report.json").read_text())["incremental"]
    assert first["mode"] == "full" and first["reason"].startswith("no ledger")
    truth = json.loads((project / "data/raw/truth.json").read_text())
    q = __import__("pandas").read_parquet(project / "data/processed/sanitized/quarantine.parquet")
    assert set(truth["poisoned"]) <= set(q["id"]), "the planted rows never reach training"
    rep = json.loads((project / "reports/run/report.json").read_text())
    c = rep["sanitize"]["counts"]
    assert c["rows_in"] == 700 == c["clean"] + c["quarantined"] + c["rejected"]
    assert (project / "reports/run/report.html").is_file() and Path(res["report"]).is_file()
    card = json.loads((project / "models/model/model_card.json").read_text())
    assert card["snapshot_root"] and card["n_train"] > 0
    assert rep["scan"]["verdict"] in ("clean", "backdoor") and isinstance(res["promotable"], bool)
    metrics = json.loads((project / "reports/run/metrics.json").read_text())
    assert metrics["rows_in"] == 700

    # artifacts: summary markdown, finding table, per-source table, link to the HTML report
    import anyio

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()
    keys = {a.key for a in anyio.run(artifacts)}
    assert {"nightly-summary", "nightly-findings", "nightly-sources", "nightly-html"} <= keys

    # second run: every stage is a cache hit; the model is not retrained
    model_file = next((project / "models/model").glob("*.safetensors"))
    mtime = model_file.stat().st_mtime_ns
    state2 = nightly(params_path="params.yaml", return_state=True)
    assert state2.is_completed()
    assert model_file.stat().st_mtime_ns == mtime

    # a changed sanitize param invalidates sanitize and what follows, not ingest
    ingested = project / "data/interim/ingested/records.parquet"
    sanitized = project / "data/processed/sanitized/report.json"
    ing_mtime, san_mtime = ingested.stat().st_mtime_ns, sanitized.stat().st_mtime_ns
    params = dict(TINY_PARAMS, sanitize={"hold_review": True})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert nightly(params_path="params.yaml", return_state=True).is_completed()
    assert ingested.stat().st_mtime_ns == ing_mtime
    assert sanitized.stat().st_mtime_ns != san_mtime
    # hold_review does not decide a row's fate: the ledger stays valid, nothing is new
    again = json.loads(sanitized.read_text())["incremental"]
    assert again["mode"] == "incremental" and again["new"] == 0

    # a deleted output is rebuilt, not served from the cache
    import shutil

    shutil.rmtree(project / "models/model")
    assert nightly(params_path="params.yaml", return_state=True).is_completed()
    assert (project / "models/model/model_card.json").is_file()


def test_remediation_flow_with_a_suspected_trigger(prefect_server, project, monkeypatch):
    from flows.remediate import remediate

    monkeypatch.chdir(project)
    assert (project / "models/model").is_dir(), "runs after the nightly test"
    res = remediate(params_path="params.yaml", trigger="special delivery", out_dir="reports/remediation")
    scan = json.loads((project / "reports/remediation/scan.json").read_text())
    assert "special delivery" in scan["suspects"]
    assert "special delivery" in scan.get("suspect_asr", {})
    assert (project / "reports/remediation/report/report.html").is_file()
    assert isinstance(res["promotable"], bool)


def test_sanitize_on_a_dask_local_cluster_matches_single_process(prefect_server, project, monkeypatch):
    import pandas as pd

    from flows import sanitize_distributed
    from poisonguard.config import NightlyConfig, load_config

    import shutil

    from poisonguard import io, sharded

    monkeypatch.chdir(project)
    ing = project / "data/interim/ingested"
    assert (ing / "records.parquet").is_file(), "runs after the nightly test"
    # the same rows as ingest writes them with `ingest.shards: 3`: the stage streams them (the
    # records stay on disk; each task reads its shard, the flow one shard at a time)
    sharded_in = project / "data/interim/ingested-sharded"
    sharded.write_shards(io.read_records(ing / "records.parquet"), sharded_in / "records.parquet", 3)
    for name in ("rejected.parquet", "ingest.json"):
        shutil.copy(ing / name, sharded_in / name)
    cfg = load_config("params.yaml").sanitize
    res = sanitize_distributed.run(NightlyConfig(shards=3, dask_workers=2, incremental={"enabled": False}), cfg,
                                   in_dir=str(sharded_in),
                                   out_dir="data/processed/sanitized-dask")
    assert res["counts"]["rows_in"] == 700
    rep = json.loads((project / "data/processed/sanitized-dask/report.json").read_text())
    assert rep["streamed"] == {"shards": 3}
    cols = ["id", "decision", "detectors"]
    a = pd.read_parquet(project / "data/processed/sanitized-dask/decisions.parquet")[cols]
    b = pd.read_parquet(project / "data/processed/sanitized/decisions.parquet")[cols]
    pd.testing.assert_frame_equal(a.sort_values("id", ignore_index=True), b.sort_values("id", ignore_index=True))

    # the default nightly (incremental runs on) streams too: the ledger the single-process nightly
    # wrote plans an incremental night over the shard files, its delta set goes to the cluster
    # through hold-shard tasks, and every row gets the nightly's decision
    monkeypatch.setenv("POISONGUARD_STATE", str(project / ".state"))   # the nightly test's ledger
    sanitize_distributed.run(NightlyConfig(shards=3, dask_workers=2), cfg, in_dir=str(sharded_in),
                             out_dir="data/processed/sanitized-dask-nightly")
    rep = json.loads((project / "data/processed/sanitized-dask-nightly/report.json").read_text())
    assert rep["streamed"] == {"shards": 3}
    assert rep["incremental"]["mode"] == "incremental" and rep["incremental"]["new"] == 0, rep["incremental"]
    c = pd.read_parquet(project / "data/processed/sanitized-dask-nightly/decisions.parquet")[cols]
    pd.testing.assert_frame_equal(c.sort_values("id", ignore_index=True), b.sort_values("id", ignore_index=True))
