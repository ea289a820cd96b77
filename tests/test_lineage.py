"""Lineage across runs: two nightly-style runs through the library with different vendor
deliveries, then "which snapshots and models include source S / example X / what is model M"."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from poisonguard import audit, lineage, stages
from poisonguard.config import IngestConfig, SanitizeConfig
from poisonguard.demo import DemoConfig
from poisonguard.model_config import FinetuneConfig, ScanConfig
from tests.test_flows import TINY_PARAMS

FT = FinetuneConfig(**TINY_PARAMS["finetune"])
SCAN = ScanConfig(**TINY_PARAMS["scan"])
DEMO = {**TINY_PARAMS["demo"], "inhouse_rows": 250, "vendor_rows": 200}


def run_pipeline(d: Path, vendor: str = "vendor-acme", seed: int = 0, scan: bool = True) -> dict:
    """demo data -> ingest -> provenance -> sanitize -> finetune (-> scan -> report) under ``d``."""
    stages.demo_data(DemoConfig(**DEMO, vendor_source=vendor, seed=seed), d / "raw")
    stages.ingest(IngestConfig(inputs=[str(d / "raw/inhouse.jsonl"), str(d / f"raw/{vendor}.jsonl")]), d / "ing")
    snap = stages.provenance_stage(d / "ing", d / "prov")
    san = stages.sanitize(SanitizeConfig(), d / "ing", d / "san", d / "prov")
    ft = stages.finetune_stage(FT, d / "san", d / "prov", d / "model")
    out = {"dir": d, "snapshot": snap, "sanitize": san, "finetune": ft,
           "truth": json.loads((d / "raw/truth.json").read_text())}
    if scan:
        out["scan"] = stages.scan_stage(SCAN, d / "model", d / "san", d / "scan.json")
        out["report"] = stages.run_report(d / "report", sanitize_dir=d / "san", model_dir=d / "model",
                                          scan_report=d / "scan.json", prune_dir=d / "pruned")
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    mp = pytest.MonkeyPatch()
    mp.setenv(audit.STATE_ENV, str(root / "state"))
    try:
        r1 = run_pipeline(root / "night1", "vendor-acme", seed=0)
        r2 = run_pipeline(root / "night2", "vendor-beta", seed=1, scan=False)
        yield root, r1, r2
    finally:
        mp.undo()


@pytest.fixture
def state(two_runs, monkeypatch):
    root = two_runs[0]
    monkeypatch.setenv(audit.STATE_ENV, str(root / "state"))
    return root / "state"


def test_every_stage_left_an_audit_entry_and_the_chain_verifies(two_runs, state):
    actions = [e["action"] for e in audit.read()]
    night1 = ["ingested", "snapshot_cut", "quarantined", "snapshot_cut", "trained", "scanned"]
    night1 += ["promoted"] if two_runs[1]["report"]["promotable"] else []
    assert actions == night1 + ["ingested", "snapshot_cut", "quarantined", "snapshot_cut", "trained"]
    assert audit.verify().ok
    q = audit.entries(audit.QUARANTINED)[0]
    assert set(two_runs[1]["truth"]["poisoned"]) <= set(lineage.load_ids(q["subject"]["ids_ref"]))


def test_model_card_has_model_id_and_lineage(two_runs, state):
    r1 = two_runs[1]
    card = json.loads((r1["dir"] / "model/model_card.json").read_text())
    assert card["model_id"] == lineage.model_id(r1["dir"] / "model") == r1["finetune"]["model_id"]
    assert card["ingest_snapshot_root"] == r1["snapshot"]["snapshot_root"]
    assert card["dvc_lock"] == {}  # no dvc.lock in the working directory
    rep = json.loads((r1["dir"] / "report/report.json").read_text())
    assert rep["model_card"]["scan_verdict"] == r1["scan"]["verdict"]


def test_lineage_source_names_only_the_models_that_saw_it(two_runs, state):
    _, r1, r2 = two_runs
    m1, m2 = r1["finetune"]["model_id"], r2["finetune"]["model_id"]
    assert m1 != m2
    acme = lineage.query_source("vendor-acme")
    assert [m["model_id"] for m in acme["models"]] == [m1]
    assert {s["snapshot_root"] for s in acme["snapshots"]} == {r1["snapshot"]["snapshot_root"],
                                                               r1["finetune"]["snapshot_root"]}
    assert acme["rows"] == 200 and all(i.startswith("vendor-acme") for i in acme["row_ids"])
    beta = lineage.query_source("vendor-beta")
    assert [m["model_id"] for m in beta["models"]] == [m2]
    inhouse = lineage.query_source("inhouse")
    assert [m["model_id"] for m in inhouse["models"]] == [m1, m2]
    assert lineage.query_source("nobody") == {"source": "nobody", "rows": 0, "row_ids": [], "snapshots": [],
                                              "models": []}


def test_lineage_example_poisoned_row_was_quarantined_not_trained(two_runs, state):
    r1 = two_runs[1]
    pid = r1["truth"]["poisoned"][0]
    ex = lineage.query_example(pid)
    assert ex["provenance"]["source"] == "vendor-acme" and ex["provenance"]["line"] >= 1
    assert [s["kind"] for s in ex["snapshots"]] == ["ingest"]  # never in a training snapshot
    assert ex["models"] == []
    assert [e["action"] for e in ex["events"]] == ["quarantined"]
    clean_id = pd.read_parquet(r1["dir"] / "san/clean.parquet").query("source == 'vendor-acme'")["id"].iloc[0]
    ex = lineage.query_example(clean_id)
    assert [m["model_id"] for m in ex["models"]] == [r1["finetune"]["model_id"]]
    assert sorted(s["kind"] for s in ex["snapshots"]) == ["ingest", "train"]


def test_lineage_model_by_folder_and_by_id(two_runs, state):
    _, r1, r2 = two_runs
    q = lineage.query_model(str(r1["dir"] / "model"))
    assert q["model"]["model_id"] == r1["finetune"]["model_id"]
    assert q["snapshot"]["snapshot_root"] == r1["finetune"]["snapshot_root"] and q["snapshot"]["kind"] == "train"
    assert set(q["sources"]) == {"inhouse", "vendor-acme"} and sum(q["sources"].values()) == \
        r1["sanitize"]["counts"]["clean"]
    assert [s["verdict"] for s in q["scans"]] == [r1["scan"]["verdict"]] and q["scan_verdict"] == r1["scan"]["verdict"]
    q2 = lineage.query_model(r2["finetune"]["model_id"][:6])
    assert q2["model"]["model_id"] == r2["finetune"]["model_id"] and q2["scans"] == []
    with pytest.raises(KeyError, match="no model"):
        lineage.query_model("m-ffffffffffff")


def test_cli_lineage_json_and_table(two_runs, state, capsys):
    from poisonguard.cli import main

    r1 = two_runs[1]
    assert main(["lineage", "source", "vendor-acme", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [m["model_id"] for m in res["models"]] == [r1["finetune"]["model_id"]]
    assert main(["lineage", "model", r1["finetune"]["model_id"]]) == 0
    out = capsys.readouterr().out
    assert "scan history:" in out and "vendor-acme" in out and r1["finetune"]["model_id"] in out
    assert main(["lineage", "example", r1["truth"]["poisoned"][0]]) == 0
    assert "quarantined" in capsys.readouterr().out
    assert main(["lineage", "model", "m-nope"]) == 1


def test_dvc_lock_hashes_are_read_and_checked_against_the_data(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    data = Path("data/sanitized")
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_bytes(b"hello\r\n")
    (data / "sub/b.bin").write_bytes(b"zz")
    # the hash `dvc repro` (DVC 3.67) wrote for exactly these two files, checked once against the dvc CLI
    lock = {"schema": "2.0", "stages": {"sanitize": {"cmd": "x", "outs": [
        {"path": "data/sanitized", "hash": "md5", "md5": "e1ff8e9ae6decec19991076941402754.dir"}]}}}
    Path("dvc.lock").write_text(yaml.safe_dump(lock))
    got = lineage.dvc_lock_hashes(["data/sanitized", "data/other"], "dvc.lock")
    assert got == {"data/sanitized": {"md5": "e1ff8e9ae6decec19991076941402754.dir", "stage": "sanitize",
                                      "as": "out", "matches_data": True}}
    (data / "a.txt").write_text("changed")
    assert lineage.dvc_lock_hashes(["data/sanitized"], "dvc.lock")["data/sanitized"]["matches_data"] is False
    assert lineage.dvc_lock_hashes(["data/sanitized"], "missing.lock") == {}
