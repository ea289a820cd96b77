"""Ingest: every layout and format, and every rejection reason with file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonguard import io
from poisonguard import schema as S

GOOD = {"id": "a1", "instruction": "Summarise", "input": "text", "output": "short", "source": "v1"}


def _reasons(res: io.IngestResult) -> list[str]:
    return [r.split(":")[0] for r in res.rejected[S.REASON]]


def test_instruction_chat_sharegpt_document_detected(jsonl):
    p = jsonl([
        GOOD,
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "id": 7},
        {"text": "a retrieval document"},
    ])
    res = io.read_inputs([p])
    assert res.rows_in == 4 and len(res.rejected) == 0
    assert res.records[S.KIND].tolist() == ["instruction", "chat", "chat", "document"]
    assert res.records[S.ID].tolist()[0] == "a1"
    assert res.records[S.ID].tolist()[2] == "7"                 # given ids are kept (as strings)
    assert res.records[S.ID].tolist()[1].startswith("h-")       # derived from the content hash
    assert res.records[S.SOURCE].tolist() == ["v1", "delivery", "delivery", "delivery"]
    chat = json.loads(res.records[S.MESSAGES].iloc[2])
    assert chat == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert res.records[S.PROMPT].iloc[1] == "be nice\nhi" and res.records[S.RESPONSE].iloc[1] == "hello"
    assert res.records[S.LINE].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("line, reason, field", [
    ('{"instruction": "x", "output": "y"', "bad_json", ""),
    ('[1, 2]', "not_an_object", ""),
    ('{"instruction": "x"}', "missing_field", "output"),
    ('{"instruction": "x", "output": 5}', "wrong_type", "output"),
    ('{"instruction": "x", "output": "   "}', "empty_output", "output"),
    ('{"foo": "bar"}', "unknown_layout", ""),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "empty_output", "messages"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', "missing_field", "messages[0].content"),
    ('{"text": 3}', "wrong_type", "text"),
])
def test_each_rejection_reason(jsonl, line, reason, field):
    p = jsonl([GOOD, line, {**GOOD, "id": "a2"}])
    res = io.read_inputs([p])
    assert res.rows_in == 3 and len(res.records) == 2           # the other rows go on
    rej = res.rejected.iloc[0]
    assert rej[S.REASON].startswith(reason + ":") and rej[S.FIELD] == field
    assert rej[S.LINE] == 2 and rej[S.FILE] == str(p)


def test_invalid_utf8_and_size_limit(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "\xff", "output": "y"}\n'
                  + json.dumps({**GOOD, "id": "big", "output": "x" * 50}).encode() + b"\n")
    res = io.read_inputs([p], io.ReadOptions(max_field_chars=20))
    assert _reasons(res) == ["invalid_utf8", "field_too_long"]
    assert res.rejected[S.LINE].tolist() == [2, 3]
    assert res.rejected[S.FIELD].tolist() == ["", "output"]


def test_duplicate_id_rejected_naming_first(jsonl):
    p = jsonl([GOOD, {**GOOD, "output": "different"}])
    res = io.read_inputs([p])
    assert len(res.records) == 1 and _reasons(res) == ["duplicate_id"]
    assert f"{p}:1" in res.rejected[S.REASON].iloc[0]


def test_json_array_csv_parquet(tmp_path):
    rows = [GOOD, {**GOOD, "id": "a2", "output": ""}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "b.csv", index=False)
    pq.write_table(pa.Table.from_pylist([{**r, "id": r["id"] + "p"} for r in rows]), tmp_path / "c.parquet")
    for name, first_line in (("a.json", 1), ("b.csv", 2), ("c.parquet", 1)):
        res = io.read_inputs([tmp_path / name])
        assert res.rows_in == 2 and len(res.records) == 1, name
        assert res.rejected[S.LINE].iloc[0] == first_line + 1, name
        assert res.rejected[S.REASON].iloc[0].startswith("empty_output"), name


def test_csv_multiline_cell_keeps_physical_line(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text('id,instruction,output\n1,"two\nlines",ok\n2,x,\n', encoding="utf-8")
    res = io.read_inputs([p])
    assert res.records[S.LINE].tolist() == [2] and res.rejected[S.LINE].tolist() == [4]


def test_unreadable_file_names_it(tmp_path):
    with pytest.raises(io.InputFileError, match="missing.jsonl"):
        io.read_inputs([tmp_path / "missing.jsonl"])
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(io.InputFileError, match="broken.json"):
        io.read_inputs([bad])
    pq_bad = tmp_path / "x.parquet"
    pq_bad.write_bytes(b"not parquet")
    with pytest.raises(io.InputFileError, match="x.parquet"):
        io.read_inputs([pq_bad])
    txt = tmp_path / "y.txt"
    txt.write_text("a")
    with pytest.raises(io.InputFileError, match="unknown file type"):
        io.read_inputs([txt])


def test_forced_layout_and_source_mapping(jsonl):
    p = jsonl([{"text": "doc one", "id": "d1"}, {"instruction": "i", "output": "o", "id": "d2"}])
    res = io.read_inputs([p], io.ReadOptions(layout="document"), sources={p.name: "kb"})
    assert res.records[S.ID].tolist() == ["d1"]
    assert _reasons(res) == ["missing_field"] and res.rejected[S.FIELD].iloc[0] == "text"
    assert set(res.records[S.SOURCE]) == {"kb"}


def test_records_roundtrip_parquet(tmp_path, jsonl):
    res = io.read_inputs([jsonl([GOOD])])
    io.write_records(res.records, tmp_path / "r.parquet")
    back = io.read_records(tmp_path / "r.parquet")
    pd.testing.assert_frame_equal(back, res.records)
    io.write_parquet(pd.DataFrame({"x": [1]}), tmp_path / "x.parquet")
    with pytest.raises(io.InputFileError, match="missing columns"):
        io.read_records(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        io.write_records(pd.DataFrame({"x": [1]}), tmp_path / "y.parquet")


def test_read_inputs_reports_progress_per_file(jsonl):
    a = jsonl([{"instruction": "a", "input": "", "output": "b"}], "a.jsonl")
    b = jsonl([{"instruction": "c", "input": "", "output": "d"}], "b.jsonl")
    seen: list[str] = []
    res = io.read_inputs([a, b], progress=seen.append)
    assert seen == ["a.jsonl", "b.jsonl"] and len(res.records) == 2


def _messy_delivery(tmp_path, jsonl) -> list:
    """Three files (JSONL, CSV, Parquet) with rejections and repeated ids within and across files."""
    rows = [{"id": f"r{i}", "instruction": f"Task {i}", "input": "", "output": f"answer {i}", "source": "v1"}
            for i in range(40)]
    rows[5] = "not an object"
    rows[9] = {**rows[9], "output": ""}                      # empty_output
    rows[12] = {**rows[12], "id": "r3"}                      # repeats an id 9 rows back
    rows[13] = {**rows[13], "id": "r13b"}
    rows[14] = {**rows[14], "id": "r13b"}                    # repeats the row just before
    a = jsonl(rows[:25], "a.jsonl")
    b = tmp_path / "b.csv"
    pd.DataFrame([r for r in rows[25:33] if isinstance(r, dict)] + [{**rows[1], "output": "other"}]).to_csv(b, index=False)
    c = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([r for r in rows[33:]] + [{**rows[30], "output": "again"}]), c)
    return [a, b, c]


@pytest.mark.parametrize("batch_rows", [1, 4, 7, 10_000])
def test_read_batches_in_any_batch_size_is_read_inputs(tmp_path, jsonl, batch_rows):
    files = _messy_delivery(tmp_path, jsonl)
    whole = io.read_inputs(files, io.ReadOptions(ingested_at="t"))
    counts = io.IngestCounts()
    got = list(io.read_batches(files, io.ReadOptions(ingested_at="t"), batch_rows=batch_rows, counts=counts))
    assert len(got) >= min(3, 40 // batch_rows)
    recs = pd.concat([r for r, _ in got], ignore_index=True)
    rej = pd.concat([j for _, j in got], ignore_index=True)
    pd.testing.assert_frame_equal(recs, whole.records)
    pd.testing.assert_frame_equal(rej, whole.rejected)
    assert (counts.rows_in, counts.per_file) == (whole.rows_in, whole.per_file)
    assert counts.rows_in == counts.records + counts.rejected == len(recs) + len(rej) == 42
    # every rejection in input order, the repeats naming the row that kept the id
    assert list(zip(rej[S.FILE].map(lambda f: Path(f).name), rej[S.LINE])) == [
        ("a.jsonl", 6), ("a.jsonl", 10), ("a.jsonl", 13), ("a.jsonl", 15), ("b.csv", 10), ("c.parquet", 8)]
    dup = rej[rej[S.REASON].str.startswith("duplicate_id")][S.REASON].tolist()
    assert dup[0].endswith("a.jsonl:4") and dup[1].endswith("a.jsonl:14")
    assert dup[2].endswith("a.jsonl:2") and dup[3].endswith("b.csv:7")


def test_seen_ids_merge_runs_and_find_every_first_row():
    seen = io._SeenIds()
    ids = [f"id-{i}" for i in range(1000)]
    for lo in range(0, 1000, 37):
        h1, h2 = seen.digests(ids[lo:lo + 37])
        assert (seen.find(h1, h2) == -1).all()
        seen.add(h1, h2, (seen.file_index("f") << 40) | np.arange(lo, lo + len(h1), dtype=np.int64))
    assert len(seen.runs) <= 10
    h1, h2 = seen.digests(ids[::-1] + ["id-1000"])
    where = seen.find(h1, h2)
    assert [seen.describe(int(w)) for w in where[:-1]] == [("f", i) for i in range(999, -1, -1)]
    assert where[-1] == -1


def test_ingest_streams_into_shards_and_fails_closed(tmp_path, jsonl):
    from poisonguard import paths, sharded, stages
    from poisonguard.config import IngestConfig

    files = _messy_delivery(tmp_path, jsonl)
    whole = io.read_inputs(files)
    out = tmp_path / "ing"
    summary = stages.ingest(IngestConfig(shards=3, batch_rows=4), out, files)
    assert (summary["rows_in"], summary["records"], summary["rejected"]) == (42, 36, 6)
    parts = io.shard_files(out / paths.RECORDS_FILE)
    assert summary["shards"] == len(parts) == 3
    want = sharded.split(whole.records, 3)
    for k, p in enumerate(parts):   # each shard: its rows, in input order, as the in-memory split
        got = io.read_records(p)
        pd.testing.assert_frame_equal(got.drop(columns=S.INGESTED_AT), want[k].drop(columns=S.INGESTED_AT))
    rej = io.read_parquet(out / paths.REJECTED_FILE, S.REJECTED_COLUMNS)
    pd.testing.assert_frame_equal(rej, whole.rejected)
    # a missing file fails the ingest and leaves the previous output as it was, nothing half-written
    before = {p.name: p.read_bytes() for p in parts}
    with pytest.raises(io.InputFileError, match="no such file"):
        stages.ingest(IngestConfig(shards=3, batch_rows=4), out, [files[0], tmp_path / "missing.jsonl"])
    assert {p.name: p.read_bytes() for p in io.shard_files(out / paths.RECORDS_FILE)} == before
    assert sorted(x.name for x in out.iterdir()) == sorted(["ingest.json", paths.RECORDS_FILE, paths.REJECTED_FILE])
    # an empty delivery still writes both files, readable and empty
    empty = jsonl([], "empty.jsonl")
    stages.ingest(IngestConfig(), out, [empty])
    assert len(io.read_records(out / paths.RECORDS_FILE)) == 0
    assert len(io.read_parquet(out / paths.REJECTED_FILE, S.REJECTED_COLUMNS)) == 0


def test_parquet_streams_in_batches_with_running_row_numbers(tmp_path):
    p = tmp_path / "d.parquet"
    rows = [{"instruction": f"t{i}", "input": "", "output": f"a{i}"} for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=3)
    got = list(io._iter_parquet(p, batch_rows=2))
    assert [line for line, _, _ in got] == list(range(1, 8))
    assert [obj["instruction"] for _, obj, _ in got] == [r["instruction"] for r in rows]
