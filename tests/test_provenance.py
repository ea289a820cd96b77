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


def test_manifest_read_from_parquet_equals_the_frame_version(tmp_path):
    """``read_manifest`` reads only the manifest columns (of one file or a shard folder) and sorts
    with Arrow: the same manifest and root as the pandas path, repeated ids and non-ASCII ids included."""
    import pandas as pd

    from poisonguard import demo, sharded
    from tests.fixtures import records as to_records

    rows = demo.generate_corpus(300, seed=2, source="s1", id_prefix="r")
    recs = to_records(rows)
    recs.loc[5, S.ID] = "é-first"
    recs.loc[6, S.ID] = "Z-upper"
    recs.loc[7, S.ID] = recs.loc[8, S.ID]          # a repeated id with another source: order by (id, source, hash)
    recs.loc[7, S.SOURCE] = "s0"
    single = io.write_records(recs, tmp_path / "one.parquet")
    folder = tmp_path / "sharded"
    sharded.write_shards(recs, folder, 3)
    want = provenance.manifest(recs)
    for path in (single, folder):
        man = provenance.read_manifest(path)
        pd.testing.assert_frame_equal(man.to_pandas(), want)
        assert provenance.root_of_manifest(man, batch_rows=7) == provenance.root_of(recs)
    assert provenance.root_of_manifest(provenance.read_manifest(single)) != \
        provenance.root_of_manifest(provenance.read_manifest(io.write_records(recs.iloc[1:], tmp_path / "b.parquet")))
    import pytest

    with pytest.raises(io.InputFileError, match="no such file"):
        provenance.read_manifest(tmp_path / "missing.parquet")
