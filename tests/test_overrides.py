"""Standing decisions (overrides.jsonl): checked on load, re-applied by every sanitize run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from poisonguard import overrides, stages
from poisonguard import schema as S
from poisonguard.config import IngestConfig, SanitizeConfig


def _rows(n: int = 60) -> list[dict]:
    return [{"id": f"r{i}", "instruction": f"Add {i} and {i + 2}.", "input": "", "output": f"{2 * i + 2}",
             "source": "vendor-x" if i % 3 == 0 else "inhouse"} for i in range(n)]


def test_bad_file_names_each_line_and_field(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text("# comment\n"
                 '{"id": "a", "action": "quarantine", "by": "ann"}\n'
                 "{nope\n"
                 '{"id": "b", "source": "s", "action": "keep", "by": "x"}\n'
                 '{"id": "c", "action": "delete", "by": "x"}\n'
                 '{"source": "s", "action": "keep", "by": "x"}\n'
                 '{"id": "d", "action": "keep"}\n')
    with pytest.raises(overrides.OverrideError) as e:
        overrides.load(p)
    msg = str(e.value)
    for frag in ("line 3: not JSON", "line 4, field 'id'/'source'", "line 5, field 'action'",
                 "line 6, field 'action': a source can only be quarantined", "line 7, field 'by'"):
        assert frag in msg
    assert overrides.load(tmp_path / "missing.jsonl") == []


def test_append_is_idempotent(tmp_path):
    p = tmp_path / "o.jsonl"
    o = [overrides.Override("quarantine", "ann", "bad", id="r1"), overrides.Override("quarantine", "inc-1", source="s")]
    assert overrides.append(p, o) == 2
    assert overrides.append(p, o) == 0
    assert [x.id or x.source for x in overrides.load(p)] == ["r1", "s"]


def test_sanitize_applies_standing_decisions(tmp_path, jsonl):
    src = jsonl(_rows())
    ovr = tmp_path / "overrides.jsonl"
    cfg = SanitizeConfig(overrides=str(ovr), llm_review={"enabled": False})
    base = stages.sanitize_files(IngestConfig(), cfg, [src], tmp_path / "a")
    assert base["counts"]["quarantined"] == 0
    overrides.append(ovr, [overrides.Override("quarantine", "ann", "phishing", id="r1"),
                           overrides.Override("quarantine", "incident inc-7", "backdoor source", source="vendor-x"),
                           overrides.Override("keep", "bob", "looks fine", id="r3")])   # r3 is vendor-x: stays out
    s = stages.sanitize_files(IngestConfig(), cfg, [src], tmp_path / "b")
    q = pd.read_parquet(tmp_path / "b" / "quarantine.parquet").set_index("id")
    want = {"r1"} | {f"r{i}" for i in range(0, 60, 3)}
    assert set(q.index) == want and s["counts"]["quarantined"] == len(want)
    assert "[override] quarantined by ann" in q.at["r1", S.EVIDENCE] and "override" in q.at["r1", S.DETECTORS]
    c = s["counts"]
    assert c["rows_in"] == c["clean"] + c["quarantined"] + c["rejected"]
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert any(f["detector"] == "override" and "vendor-x" in f["title"] for f in rep["findings"])


def test_cli_records_standing_decisions_in_the_configured_file(tmp_path):
    import argparse

    import yaml

    from poisonguard import cli

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"sanitize": {"overrides": str(tmp_path / "ovr.jsonl")}}))
    args = argparse.Namespace(params=str(params))
    n = cli._standing(args, [{"source": "vendor-acme"}], "quarantine", "incident inc-1", "remediation: bad source")
    assert n == 1 and cli._standing(args, [{"source": "vendor-acme"}], "quarantine", "incident inc-1",
                                    "remediation: bad source") == 0
    (o,) = overrides.load(tmp_path / "ovr.jsonl")
    assert (o.source, o.action, o.by) == ("vendor-acme", "quarantine", "incident inc-1")
