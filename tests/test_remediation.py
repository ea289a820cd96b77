"""Data remediation: a bad source -> quarantine, new snapshot, retrain, rescan, incident report;
a run killed half way and re-run ends in the same state as one uninterrupted run."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from poisonguard import audit, lineage, remediation, stages
from tests.test_lineage import FT, SCAN, run_pipeline


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("remediation")
    mp = pytest.MonkeyPatch()
    mp.setenv(audit.STATE_ENV, str(root / "state"))
    try:
        run = run_pipeline(root / "night", "vendor-acme")
    finally:
        mp.undo()
    return root, run


@pytest.fixture
def env(night, tmp_path, monkeypatch):
    """A private copy of the state folder, so each test starts from the nightly run's history."""
    root, run = night
    shutil.copytree(root / "state", tmp_path / "state")
    monkeypatch.setenv(audit.STATE_ENV, str(tmp_path / "state"))
    return run, tmp_path


def _run(run, out, **kw):
    d = run["dir"]
    return remediation.run(FT, SCAN, model_dir=d / "model", sanitized_dir=d / "san", provenance_dir=d / "prov",
                           out_root=out, **{"source": "vendor-acme", "trigger": "special delivery", **kw})


def test_bad_source_gives_new_snapshot_retrained_model_and_incident_report(env):
    run, tmp = env
    res = _run(run, tmp / "out")
    inc = tmp / "out" / res["incident"]
    clean = pd.read_parquet(inc / "data/clean.parquet")
    quar = pd.read_parquet(inc / "data/quarantine.parquet")
    assert "vendor-acme" not in set(clean["source"]) and len(clean) > 0
    assert not quar["id"].duplicated().any()
    acme_clean = pd.read_parquet(run["dir"] / "san/clean.parquet").query("source == 'vendor-acme'")
    assert set(acme_clean["id"]) <= set(quar["id"]) and len(res["affected"]["rows_removed"]) == len(acme_clean)
    # the original sanitize output is untouched
    assert set(acme_clean["id"]) <= set(pd.read_parquet(run["dir"] / "san/clean.parquet")["id"])
    # affected: the nightly model and the snapshots holding vendor rows
    assert [m["model_id"] for m in res["affected"]["models"]] == [run["finetune"]["model_id"]]
    assert {s["kind"] for s in res["affected"]["snapshots"]} == {"ingest", "train"}
    # new snapshot, new model trained on it, scanned before and after
    card = json.loads((inc / "model/model_card.json").read_text())
    assert card["snapshot_root"] == res["after"]["snapshot_root"] != res["before"]["snapshot_root"]
    assert set(card["sources"]) == {"inhouse"}
    assert res["after"]["model_id"] == card["model_id"] != res["before"]["model_id"]
    assert res["before"]["scan_verdict"] in ("clean", "backdoor") and res["after"]["scan_verdict"] == "clean"
    assert res["passes"] is True, json.dumps([res["before"], res["after"]])[-600:]
    md = (inc / "incident.md").read_text()
    assert res["incident"] in md and "Before / after" in md and card["model_id"] in md
    # lineage now knows the retrained model did not see the source
    assert card["model_id"] not in [m["model_id"] for m in lineage.query_source("vendor-acme")["models"]]
    actions = [e["action"] for e in audit.read()]
    assert actions[-1] == audit.REMEDIATED and audit.verify().ok
    # re-running a finished incident changes nothing
    n = len(audit.read())
    again = _run(run, tmp / "out")
    assert again["done"] == res["done"] and len(audit.read()) == n


def test_killed_half_way_then_rerun_matches_an_uninterrupted_run(env, monkeypatch):
    run, tmp = env
    calls = {"writes": 0}
    real_write = remediation._write_parquet_atomic

    def crash_on_second_write(*a, **k):  # killed between writing quarantine.parquet and clean.parquet
        calls["writes"] += 1
        if calls["writes"] == 2:
            raise KeyboardInterrupt("killed")
        return real_write(*a, **k)

    monkeypatch.setattr(remediation, "_write_parquet_atomic", crash_on_second_write)
    with pytest.raises(KeyboardInterrupt):
        _run(run, tmp / "crashy", incident="inc-crash")
    monkeypatch.setattr(remediation, "_write_parquet_atomic", real_write)

    real_ft = stages.finetune_stage

    def crash_after_training(*a, **k):  # killed after the model was written, before the step was recorded
        real_ft(*a, **k)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(stages, "finetune_stage", crash_after_training)
    with pytest.raises(KeyboardInterrupt):
        _run(run, tmp / "crashy", incident="inc-crash")
    monkeypatch.setattr(stages, "finetune_stage", real_ft)
    state = json.loads((tmp / "crashy/inc-crash/state.json").read_text())
    assert state["completed"] == ["assess", "quarantine", "snapshot"]

    resumed = _run(run, tmp / "crashy", incident="inc-crash")
    assert resumed["resumed"] is True
    straight = _run(run, tmp / "straight", incident="inc-straight")
    assert straight["resumed"] is False

    a, b = tmp / "crashy/inc-crash/data", tmp / "straight/inc-straight/data"
    for name in ("clean.parquet", "quarantine.parquet"):
        da = pd.read_parquet(a / name).drop(columns=["evidence"]).sort_values("id").reset_index(drop=True)
        db = pd.read_parquet(b / name).drop(columns=["evidence"]).sort_values("id").reset_index(drop=True)
        pd.testing.assert_frame_equal(da, db)
    assert not pd.read_parquet(a / "quarantine.parquet")["id"].duplicated().any()
    for k in ("snapshot_root", "model_id", "clean_rows", "scan_verdict", "suspect_asr"):
        assert resumed["after"][k] == straight["after"][k], k
    assert resumed["done"]["quarantined_rows"] == straight["done"]["quarantined_rows"]

    # never double-applied or double-logged: one quarantine entry per incident, one training of each model dir
    for inc in ("inc-crash", "inc-straight"):
        assert len(audit.entries(audit.QUARANTINED, incident=inc)) == 1
        assert len(audit.entries(audit.REMEDIATED, incident=inc)) == 1
    trained = [e for e in audit.entries(audit.TRAINED) if "inc-crash" in e["subject"]["model_dir"]]
    assert len(trained) == 1
    assert audit.verify().ok


def test_rows_and_nothing_matching(env):
    run, tmp = env
    rid = pd.read_parquet(run["dir"] / "san/clean.parquet")["id"].iloc[0]
    res = _run(run, tmp / "rows", source=None, trigger=None, rows=[rid, "no-such-row"])
    assert res["affected"]["rows_removed"] == [rid] and res["affected"]["unknown_rows"] == ["no-such-row"]
    assert rid not in set(pd.read_parquet(tmp / "rows" / res["incident"] / "data/clean.parquet")["id"])
    with pytest.raises(remediation.RemediationError, match="nothing in"):
        _run(run, tmp / "none", source="vendor-nobody", trigger=None)
    with pytest.raises(remediation.RemediationError, match="other inputs"):
        _run(run, tmp / "rows", source="inhouse", trigger=None, incident=res["incident"])
