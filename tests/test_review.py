"""The review loop: export rows in review, a person marks them, apply moves rows and is audited."""

from __future__ import annotations

import csv
import json
import shutil

import pandas as pd
import pytest

from poisonguard import audit, review, stages
from poisonguard import schema as S
from poisonguard.config import IngestConfig, SanitizeConfig
from tests.conftest import write_jsonl
from tests.fixtures import mixed_rows


@pytest.fixture(scope="module")
def _base(tmp_path_factory):
    """A sanitize output where 3 clean rows are in review (the sanitizer's own "review" decision)."""
    tmp = tmp_path_factory.mktemp("review")
    mp = pytest.MonkeyPatch()
    mp.setenv(audit.STATE_ENV, str(tmp / "state"))
    try:
        rows, _ = mixed_rows(90, seed=3, poison=5)
        src = write_jsonl(tmp / "delivery.jsonl", rows)
        stages.sanitize_files(IngestConfig(), SanitizeConfig(), [src], tmp / "san")
    finally:
        mp.undo()
    out = tmp / "san"
    dec = pd.read_parquet(out / "decisions.parquet")
    review_ids = sorted(pd.read_parquet(out / "clean.parquet")["id"])[:3]
    dec.loc[dec["id"].isin(review_ids), "decision"] = S.REVIEW
    dec.to_parquet(out / "decisions.parquet", index=False)
    rep = json.loads((out / "report.json").read_text())
    rep["counts"]["review"] = 3
    (out / "report.json").write_text(json.dumps(rep))
    return out, review_ids, sorted(pd.read_parquet(out / "quarantine.parquet")["id"])


@pytest.fixture
def sanitized(_base, tmp_path, monkeypatch):
    monkeypatch.setenv(audit.STATE_ENV, str(tmp_path / "state"))
    out = tmp_path / "san"
    shutil.copytree(_base[0], out)
    return out, _base[1], _base[2]


def _mark(path, actions: dict[str, tuple[str, str, str]]):
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        if r["id"] in actions:
            r["action"], r["reviewer"], r["reason"] = actions[r["id"]]
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def test_export_apply_round_trip(sanitized, tmp_path):
    out, review_ids, quarantined = sanitized
    csv_path = tmp_path / "review.csv"
    s = review.export(out, csv_path)
    assert s["rows"] == 3
    rows = _mark(csv_path, {review_ids[0]: ("quarantine", "alice", "odd phone number"),
                            review_ids[1]: ("keep", "alice", "fine")})
    assert [r["id"] for r in rows] == review_ids and all(r["location"] == "clean" for r in rows)
    before = json.loads((out / "report.json").read_text())["counts"]

    res = review.apply(csv_path, out)
    assert res.quarantined == [review_ids[0]] and res.released == [] and res.undecided == 1
    clean = pd.read_parquet(out / "clean.parquet")
    quar = pd.read_parquet(out / "quarantine.parquet")
    assert review_ids[0] in set(quar["id"]) and review_ids[0] not in set(clean["id"])
    assert "[review] quarantined by alice" in quar.set_index("id").at[review_ids[0], "evidence"]
    counts = json.loads((out / "report.json").read_text())["counts"]
    assert counts["quarantined"] == before["quarantined"] + 1 and counts["clean"] == before["clean"] - 1
    assert counts["review"] == 1  # one row left undecided
    assert counts["clean"] + counts["quarantined"] + counts["rejected"] == counts["rows_in"]
    assert json.loads((out / "report.json").read_text())["reviews"][0]["quarantined"] == 1
    dec = pd.read_parquet(out / "decisions.parquet").set_index("id")["decision"]
    assert dec[review_ids[0]] == S.QUARANTINE and dec[review_ids[1]] == S.KEEP and dec[review_ids[2]] == S.REVIEW

    entries = audit.read()
    q = [e for e in entries if e["action"] == audit.QUARANTINED and e["subject"].get("ids") == [review_ids[0]]]
    assert len(q) == 1 and "alice: odd phone number" in q[0]["reason"]
    applied = audit.entries(audit.REVIEW_APPLIED)
    assert len(applied) == 1 and applied[0]["details"]["quarantined"] == 1
    assert audit.verify().ok

    # the same file again: nothing moves, nothing is logged
    n = len(audit.read())
    again = review.apply(csv_path, out)
    assert again.quarantined == [] and again.released == [] and len(audit.read()) == n
    assert len(pd.read_parquet(out / "quarantine.parquet")) == len(quar)


def test_release_a_quarantined_row(sanitized, tmp_path):
    out, _, quarantined = sanitized
    rid = quarantined[0]
    dec = tmp_path / "decisions.jsonl"
    dec.write_text(json.dumps({"id": rid, "action": "keep", "reviewer": "bob", "reason": "false positive"}) + "\n")
    res = review.apply(dec, out)
    assert res.released == [rid]
    assert rid in set(pd.read_parquet(out / "clean.parquet")["id"])
    assert rid not in set(pd.read_parquet(out / "quarantine.parquet")["id"])
    rel = audit.entries(audit.RELEASED)
    assert rel[0]["subject"]["ids"] == [rid] and rel[0]["details"]["by"] == {rid: "bob"}


def test_bad_decision_files_name_line_and_field_and_change_nothing(sanitized, tmp_path):
    out, review_ids, _ = sanitized
    bad = tmp_path / "bad.csv"
    bad.write_text("id,action,reviewer,reason\n"
                   f"{review_ids[0]},qarantine,alice,x\n"
                   f"nope-123,keep,alice,x\n"
                   f"{review_ids[1]},keep,,x\n"
                   f"{review_ids[2]},keep,alice,x\n"
                   f"{review_ids[2]},quarantine,alice,x\n")
    before = (out / "clean.parquet").read_bytes()
    with pytest.raises(review.ReviewError) as e:
        review.apply(bad, out)
    msg = str(e.value)
    assert "line 2, field 'action': 'qarantine' is not one of keep, quarantine" in msg
    assert "line 4, field 'reviewer': empty" in msg
    assert "line 6, field 'id'" in msg and "already decided on line 5" in msg
    assert (out / "clean.parquet").read_bytes() == before and audit.entries(audit.REVIEW_APPLIED) == []

    unknown = tmp_path / "unknown.csv"
    unknown.write_text("id,action,reviewer\nnope-123,keep,alice\n")
    with pytest.raises(review.ReviewError, match="line 2, field 'id': 'nope-123' is not a row of"):
        review.apply(unknown, out)
    nohdr = tmp_path / "nohdr.csv"
    nohdr.write_text("row,what\nx,keep\n")
    with pytest.raises(review.ReviewError, match=r"missing column\(s\) \['id', 'action'\]"):
        review.apply(nohdr, out)


def test_cli_review_export_apply(sanitized, tmp_path, capsys, monkeypatch):
    from poisonguard import overrides
    from poisonguard.cli import main

    monkeypatch.chdir(tmp_path)  # the default overrides.jsonl is relative: keep it out of the checkout
    out, review_ids, _ = sanitized
    csv_path = tmp_path / "r.csv"
    assert main(["review", "export", "--sanitized", str(out), "--out", str(csv_path)]) == 0
    _mark(csv_path, {review_ids[0]: ("quarantine", "", "suspicious")})
    assert main(["review", "apply", "--decisions", str(csv_path), "--sanitized", str(out)]) == 1
    assert "field 'reviewer': empty" in capsys.readouterr().err
    assert main(["review", "apply", "--decisions", str(csv_path), "--sanitized", str(out), "--reviewer", "carol",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["quarantined"] == [review_ids[0]]
    assert audit.entries(audit.QUARANTINED)[-1]["details"]["by"] == {review_ids[0]: "carol"}
    # the decision stands for later sanitize runs
    assert res["overrides_added"] == 1
    (o,) = overrides.load(tmp_path / "overrides.jsonl")
    assert (o.id, o.action, o.by) == (review_ids[0], "quarantine", "carol")
