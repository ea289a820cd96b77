"""Canonical hashing, snapshot roots and tamper detection."""

from __future__ import annotations

import json

from hypothesis import given, strategies as st

from poisonguard import io, provenance
from poisonguard import schema as S


def test_hash_ignores_key_order_and_json_whitespace_but_not_content():
    a = provenance.content_hash("instruction", {"instruction": "Hi", "input": "", "output": "Yo"})
    b = provenance.content_hash("instruction", {"output": "  Yo\r\n", "instruction": "Hi", "input": ""})
    c = provenance.content_hash("instruction", {"instruction": "Hi", "input": "", "output": "Yo!"})
    d = provenance.content_hash("instruction", {"instruction": "Hi\u200b", "input": "", "output": "Yo"})
    assert a == b and a != c and a != d


def test_canonical_form_is_documented_shape():
    form = provenance.canonical_form("document", {"text": " x "})
    assert form == '{"kind":"document","text":"x"}'


@given(st.dictionaries(st.sampled_from(["instruction", "input", "output"]), st.text(max_size=20), min_size=3))
def test_hash_is_order_invariant(d):
    rev = dict(reversed(list(d.items())))
    assert provenance.content_hash("instruction", d) == provenance.content_hash("instruction", rev)


def test_root_changes_with_any_row():
    ids, src, h = ["a", "b"], ["s", "s"], ["1", "2"]
    r = provenance.snapshot_root(ids, src, h)
    assert r == provenance.snapshot_root(ids[::-1], src, h[::-1])
    assert r != provenance.snapshot_root(ids, ["s", "t"], h)
    assert r != provenance.snapshot_root(ids[:1], src[:1], h[:1])


def test_verify_names_tampered_added_and_removed_rows(jsonl, tmp_path):
    rows = [{"id": f"r{i}", "instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    p = jsonl(rows)
    man = provenance.manifest(io.read_inputs([p]).records)
    assert provenance.verify(io.read_inputs([p]).records, man).ok
    rows[1]["output"] = "tampered"
    del rows[3]
    rows.append({"id": "new", "instruction": "x", "output": "y"})
    p2 = jsonl(rows, "changed.jsonl")
    res = provenance.verify(io.read_inputs([p2]).records, man)
    assert not res.ok
    assert [m["id"] for m in res.modified] == ["r1"]
    assert [m["id"] for m in res.added] == ["new"]
    assert [m["id"] for m in res.removed] == ["r3"]
    assert res.manifest_root != res.data_root


def test_verify_recomputes_hash_from_content(jsonl):
    recs = io.read_inputs([jsonl([{"id": "a", "instruction": "q", "output": "a"}])]).records
    man = provenance.manifest(recs)
    edited = recs.copy()
    edited.loc[0, S.OUTPUT] = "edited but hash column untouched"
    assert [m["id"] for m in provenance.verify(edited, man).modified] == ["a"]


def test_chat_hash_normalises_sharegpt(jsonl):
    a = io.read_inputs([jsonl([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])])
    b = io.read_inputs([jsonl([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
                              "b.jsonl")])
    assert a.records[S.CONTENT_HASH].iloc[0] == b.records[S.CONTENT_HASH].iloc[0]
    assert json.loads(a.records[S.MESSAGES].iloc[0])[0]["role"] == "user"
