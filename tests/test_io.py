"""Ingest: every layout and format, and every rejection reason with file, line and field."""

from __future__ import annotations

import json

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
