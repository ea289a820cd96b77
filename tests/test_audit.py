"""The hash-chained audit log: appends chain, and every kind of tampering is named by seq."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from poisonguard import audit


@pytest.fixture
def state(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv(audit.STATE_ENV, str(d))
    return d


def _fill(n: int = 5) -> list[dict]:
    return [audit.record(audit.QUARANTINED, subject={"ids": [f"r{i}"]}, reason=f"entry {i}",
                         details={"n": i}) for i in range(1, n + 1)]


def _lines(state):
    return (state / audit.LOG_FILE).read_text(encoding="utf-8").splitlines()


def _write(state, lines):
    (state / audit.LOG_FILE).write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")


def test_entries_chain_and_verify_ok(state):
    es = _fill(3)
    assert [e["seq"] for e in es] == [1, 2, 3]
    assert es[0]["prev_hash"] == audit.GENESIS
    assert es[1]["prev_hash"] == es[0]["hash"] and es[2]["prev_hash"] == es[1]["hash"]
    assert es[2]["hash"] == audit.entry_hash(es[2])
    assert set(es[0]["actor"]) == {"user", "host", "flow"}
    assert audit.read() == es  # the env var moved the log into the tmp dir
    res = audit.verify()
    assert res.ok and res.checked == 3 and res.first_bad_seq is None
    assert json.loads((state / audit.HEAD_FILE).read_text()) == {"seq": 3, "hash": es[2]["hash"]}


def test_actor_override_by_env(state, monkeypatch):
    monkeypatch.setenv(audit.ACTOR_ENV, "flow:poisonguard-remediate")
    assert audit.record("released")["actor"]["flow"] == "flow:poisonguard-remediate"


def test_edited_entry_is_named(state):
    _fill(5)
    lines = _lines(state)
    e = json.loads(lines[2])
    e["reason"] = "nothing to see here"
    lines[2] = json.dumps(e, sort_keys=True)
    _write(state, lines)
    res = audit.verify()
    assert not res.ok and res.first_bad_seq == 3
    assert res.problems[0]["kind"] == "edited"


def test_edited_entry_with_recomputed_hash_breaks_the_next_link(state):
    _fill(5)
    lines = _lines(state)
    e = json.loads(lines[1])
    e["details"] = {"n": 999}
    e["hash"] = audit.entry_hash(e)  # a forger who knows the hash scheme
    lines[1] = json.dumps(e, sort_keys=True)
    _write(state, lines)
    res = audit.verify()
    assert res.first_bad_seq == 3 and res.problems[0]["kind"] == "broken_link"


def test_deleted_entry_is_named(state):
    _fill(5)
    lines = _lines(state)
    del lines[1]
    _write(state, lines)
    res = audit.verify()
    assert not res.ok and res.first_bad_seq == 2
    assert {p["kind"] for p in res.problems} >= {"missing", "broken_link"}


def test_reordered_entries_are_named(state):
    _fill(5)
    lines = _lines(state)
    lines[1], lines[2] = lines[2], lines[1]
    _write(state, lines)
    res = audit.verify()
    assert not res.ok and res.first_bad_seq == 2


def test_truncated_tail_is_caught_by_the_head(state):
    _fill(5)
    _write(state, _lines(state)[:3])
    res = audit.verify()
    assert not res.ok and res.first_bad_seq == 4 and res.problems[0]["kind"] == "truncated"
    _write(state, [])
    assert audit.verify().first_bad_seq == 1


def test_torn_line_is_reported_and_not_extended(state):
    _fill(2)
    with (state / audit.LOG_FILE).open("a") as fh:
        fh.write('{"seq": 3, "act')
    res = audit.verify()
    assert not res.ok and res.problems[0]["kind"] == "unreadable" and res.first_bad_seq == 3
    with pytest.raises(audit.AuditError, match="audit verify"):
        audit.record("trained")


def _append_many(path: str, n: int) -> None:
    import os

    os.environ[audit.STATE_ENV] = path
    for i in range(n):
        audit.record("scanned", details={"pid": os.getpid(), "i": i})


def test_concurrent_appends_keep_one_chain(state):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(state), 25)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    res = audit.verify()
    assert res.ok, res.problems[:3]
    assert res.checked == 75 and [e["seq"] for e in audit.read()] == list(range(1, 76))


def test_cli_audit_verify_exit_4_names_seq(state, capsys):
    from poisonguard.cli import main

    _fill(3)
    assert main(["audit", "verify"]) == 0
    lines = _lines(state)
    lines[0] = lines[0].replace("entry 1", "entry one")
    _write(state, lines)
    capsys.readouterr()
    assert main(["audit", "verify"]) == 4
    out = capsys.readouterr().out
    assert "TAMPERED" in out and "first bad entry: seq 1" in out
    assert main(["audit", "show", "--json", "--last", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["seq"] for e in shown] == [2, 3]
