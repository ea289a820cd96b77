"""The command line: exit codes, outputs, --json, errors that name the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from poisonguard import attacks, demo
from poisonguard.cli import EXIT_ERROR, EXIT_OK, EXIT_POISON, EXIT_TAMPER, EXIT_USAGE, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def poisoned(tmp_path: Path) -> tuple[Path, set[str]]:
    rows = demo.generate_corpus(1500, seed=3, source="vendor-x", id_prefix="v")
    rows, res = attacks.apply_attack(rows, "phrase", 6, seed=1)
    return _write(tmp_path / "delivery.jsonl", rows), set(res.poisoned_ids)


def test_sanitize_quarantines_poison_and_exits_3(tmp_path, poisoned, capsys):
    path, truth = poisoned
    out = tmp_path / "out"
    rc = main(["sanitize", "--input", str(path), "--out", str(out), "--json"])
    assert rc == EXIT_POISON
    summary = json.loads(capsys.readouterr().out)
    for name in ("clean.parquet", "quarantine.parquet", "rejected.parquet", "report.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    q = pd.read_parquet(out / "quarantine.parquet")
    assert truth <= set(q["id"]), "every poisoned row is quarantined"
    c = summary["counts"]
    assert c["rows_in"] == 1500 == c["clean"] + c["quarantined"] + c["rejected"]
    assert "special delivery" in (out / "report.md").read_text()


def test_sanitize_clean_delivery_exits_0_and_bad_rows_are_rejected_not_fatal(tmp_path, capsys):
    rows = [{"id": f"r{i}", "instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"}
            for i in range(40)]
    path = _write(tmp_path / "d.jsonl", rows)
    with path.open("a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"id": "e", "instruction": "x", "input": "", "output": ""}) + "\n")
    rc = main(["sanitize", "--input", str(path), "--out", str(tmp_path / "o"), "--json"])
    assert rc == EXIT_OK
    s = json.loads(capsys.readouterr().out)
    assert s["counts"]["rejected"] == 2 and s["counts"]["clean"] == 40
    rej = pd.read_parquet(tmp_path / "o" / "rejected.parquet")
    assert sorted(rej["line"].tolist()) == [41, 42]
    assert {r.split(":")[0] for r in rej["reason"]} == {"bad_json", "empty_output"}
    assert set(rej["field"]) >= {"output"}


def test_unreadable_file_is_named_with_exit_1(tmp_path, capsys):
    rc = main(["sanitize", "--input", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == EXIT_ERROR
    assert "missing.jsonl" in capsys.readouterr().err


def test_invalid_params_exit_1_with_the_key(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text("sanitize:\n  detectors:\n    nosuch: {}\n")
    rc = main(["demo-data", "--params", str(p), "--out", str(tmp_path / "raw")])
    assert rc == EXIT_ERROR
    err = capsys.readouterr().err
    assert "sanitize.detectors" in err and "nosuch" in err


def test_verify_names_tampered_rows_exit_4(tmp_path, capsys):
    rows = demo.generate_corpus(50, seed=1, source="s", id_prefix="r")
    raw = _write(tmp_path / "d.jsonl", rows)
    out = tmp_path / "o"
    assert main(["sanitize", "--input", str(raw), "--out", str(out), "-q"]) in (EXIT_OK, EXIT_POISON)
    capsys.readouterr()
    manifest = out / "manifest.parquet"
    assert manifest.is_file()
    assert main(["verify", "--manifest", str(manifest), "--data", str(raw)]) == EXIT_OK
    rows[7]["output"] += " (edited)"
    del rows[3]
    _write(raw, rows + [{"id": "new", "instruction": "a", "input": "", "output": "b", "source": "s"}])
    capsys.readouterr()
    assert main(["verify", "--manifest", str(manifest), "--data", str(raw), "--json"]) == EXIT_TAMPER
    d = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in d["modified"]] == ["r-000007"]
    assert [r["id"] for r in d["removed"]] == ["r-000003"]
    assert [r["id"] for r in d["added"]] == ["new"]


def test_demo_data_writes_files_and_truth(tmp_path, capsys):
    rc = main(["demo-data", "--out", str(tmp_path), "--inhouse-rows", "300", "--vendor-rows", "200",
               "--poison-count", "4", "--attack", "rare_token", "--json"])
    assert rc == EXIT_OK
    s = json.loads(capsys.readouterr().out)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["attack"] == "rare_token" and len(truth["poisoned"]) == 4 == s["n_poisoned"]
    vendor = [json.loads(x) for x in (tmp_path / "vendor-acme.jsonl").read_text().splitlines()]
    assert len(vendor) == 200 and set(truth["poisoned"]) <= {r["id"] for r in vendor}


def test_every_command_has_help_with_examples():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():
        text = sp.format_help()
        assert "examples" in text, f"{name} --help has no examples"


def test_usage_error_exit_2_and_module_entry_point():
    with pytest.raises(SystemExit) as e:
        main(["sanitize", "--nope"])
    assert e.value.code == EXIT_USAGE
    r = subprocess.run([sys.executable, "-m", "poisonguard", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "sanitize" in r.stdout


def test_a_failing_detector_fails_the_command_with_a_clear_error(tmp_path, capsys, monkeypatch):
    from poisonguard.detectors import registry
    from poisonguard.detectors.base import Detector

    class Broken(Detector):
        name = "broken"
        description = "always fails"

        def score_with(self, records, stats):  # noqa: ANN001, ANN201
            raise RuntimeError("model file missing")

    monkeypatch.setitem(registry._REGISTRY, "broken", Broken)
    p = tmp_path / "params.yaml"
    p.write_text("sanitize:\n  detectors:\n    broken: {}\n")
    rows = [{"id": f"r{i}", "instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(5)]
    path = _write(tmp_path / "d.jsonl", rows)
    rc = main(["sanitize", "--params", str(p), "--input", str(path), "--out", str(tmp_path / "o")])
    assert rc == EXIT_ERROR
    err = capsys.readouterr().err
    assert "RuntimeError: model file missing" in err and "-v" in err
    assert not (tmp_path / "o" / "clean.parquet").exists(), "fail closed: no clean set from a failed run"
