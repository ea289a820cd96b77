"""Readers and writers: raw deliveries in, normalised records and rejections out.

Every input row ends either as a record (see :mod:`poisonguard.schema`) or as a rejection
naming its file, line, field and reason; nothing is silently dropped. A file that cannot be
read at all raises :class:`InputFileError` naming it.

Formats: JSONL (``.jsonl``/``.ndjson``), JSON arrays (``.json``), CSV (``.csv``) and Parquet
(``.parquet``). Lines are 1-based; for JSON arrays ``line`` is the 1-based array position, for
CSV the physical line where the row starts (the header is line 1), for Parquet the 1-based
row number.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from poisonguard import provenance
from poisonguard import schema as S

# rejection reasons (documented in README)
BAD_JSON = "bad_json"
NOT_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_OUTPUT = "empty_output"
INVALID_UTF8 = "invalid_utf8"
TOO_LONG = "field_too_long"
UNKNOWN_LAYOUT = "unknown_layout"
DUPLICATE_ID = "duplicate_id"
REASONS = (BAD_JSON, NOT_OBJECT, MISSING_FIELD, WRONG_TYPE, EMPTY_OUTPUT, INVALID_UTF8, TOO_LONG,
           UNKNOWN_LAYOUT, DUPLICATE_ID)

FORMATS = ("jsonl", "json", "csv", "parquet")
_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
RAW_PREVIEW = 500


class InputFileError(RuntimeError):
    """A whole input file could not be read (missing, unreadable, wrong format)."""


class RowError(ValueError):
    def __init__(self, reason: str, field_name: str, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field_name, message


@dataclass(frozen=True)
class ReadOptions:
    """How to read one file. ``layout=None`` detects the layout per row."""

    layout: str | None = None
    source: str | None = None
    collector: str = "poisonguard-ingest"
    collected_at: str | None = None
    max_field_chars: int = 200_000
    ingested_at: str | None = None


@dataclass
class IngestResult:
    records: pd.DataFrame
    rejected: pd.DataFrame
    rows_in: int
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)


def detect_format(path: Path) -> str:
    fmt = _SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise InputFileError(f"{path}: unknown file type {path.suffix!r}; expected one of "
                             f"{sorted(_SUFFIX)} (use --format to name it)")
    return fmt


def _now() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return t.replace(microsecond=0).isoformat()


# ---------------------------------------------------------------- raw row iterators
# each yields (line, obj_or_exception, raw_text)

def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, RowError(INVALID_UTF8, "", f"invalid UTF-8 at byte {e.start}"), \
                    raw.decode("utf-8", "replace")
                continue
            try:
                yield lineno, json.loads(text), text
            except json.JSONDecodeError as e:
                yield lineno, RowError(BAD_JSON, "", f"bad JSON: {e.msg} at column {e.colno}"), text


def _iter_json(path: Path) -> Iterator[tuple[int, Any, str]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: invalid UTF-8 at byte {e.start}; a JSON array cannot be read "
                             "row by row, convert it to JSONL to keep the other rows") from e
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); "
                             "a JSON file must hold one array of rows") from e
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InputFileError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, obj in enumerate(data, 1):
        yield i, obj, json.dumps(obj, ensure_ascii=False)[:RAW_PREVIEW]


def _iter_csv(path: Path) -> Iterator[tuple[int, Any, str]]:
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    reader = csv.DictReader(_io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return
    start = reader.line_num + 1
    for row in reader:
        line = start
        start = reader.line_num + 1
        raw = json.dumps(row, ensure_ascii=False, default=str)
        bad = [k for k, v in row.items() if isinstance(v, str) and _has_surrogates(v)]
        if bad:
            yield line, RowError(INVALID_UTF8, bad[0], f"invalid UTF-8 in field {bad[0]!r}"), \
                raw.encode("utf-8", "replace").decode("utf-8")
            continue
        if None in row:  # more cells than header columns
            yield line, RowError(BAD_JSON, "", "row has more cells than the header"), raw
            continue
        yield line, {k: v for k, v in row.items() if v is not None}, raw


def _has_surrogates(v: str) -> bool:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any, str]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(f"{path}: cannot read Parquet: {e}") from e
    for i, obj in enumerate(table.to_pylist(), 1):
        yield i, obj, json.dumps(obj, ensure_ascii=False, default=str)[:RAW_PREVIEW]


_ITERS = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "parquet": _iter_parquet}


# ---------------------------------------------------------------- row normalisation

def detect_layout(obj: Mapping[str, Any]) -> str | None:
    if "messages" in obj or "conversations" in obj:
        return S.KIND_CHAT
    if "instruction" in obj or "output" in obj:
        return S.KIND_INSTRUCTION
    if "text" in obj:
        return S.KIND_DOCUMENT
    return None


def _string(obj: Mapping[str, Any], name: str, *, required: bool, limit: int) -> str:
    if name not in obj or obj[name] is None:
        if required:
            raise RowError(MISSING_FIELD, name, f"missing field {name!r}")
        return ""
    v = obj[name]
    if not isinstance(v, str):
        raise RowError(WRONG_TYPE, name, f"field {name!r} must be a string, got {type(v).__name__}")
    if len(v) > limit:
        raise RowError(TOO_LONG, name, f"field {name!r} has {len(v)} characters (limit {limit})")
    return v


def _messages(obj: Mapping[str, Any], limit: int) -> list[dict[str, str]]:
    key = "messages" if "messages" in obj else "conversations"
    msgs = obj[key]
    if isinstance(msgs, str):  # CSV cells carry JSON text
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise RowError(BAD_JSON, key, f"field {key!r} is not valid JSON: {e.msg}") from e
    if hasattr(msgs, "tolist"):
        msgs = msgs.tolist()
    if not isinstance(msgs, list) or not msgs:
        raise RowError(WRONG_TYPE, key, f"field {key!r} must be a non-empty list of turns")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise RowError(WRONG_TYPE, f"{key}[{j}]", f"turn {j} of {key!r} must be an object")
        if key == "messages":
            role, content = m.get("role"), m.get("content")
            rname, cname = "role", "content"
        else:
            role, content = m.get("from"), m.get("value")
            rname, cname = "from", "value"
            role = _SHAREGPT_ROLES.get(str(role).lower(), role) if isinstance(role, str) else role
        if role is None or content is None:
            missing = rname if role is None else cname
            raise RowError(MISSING_FIELD, f"{key}[{j}].{missing}", f"turn {j} of {key!r} lacks {missing!r}")
        if not isinstance(role, str) or not isinstance(content, str):
            bad = rname if not isinstance(role, str) else cname
            raise RowError(WRONG_TYPE, f"{key}[{j}].{bad}", f"turn {j} {bad!r} must be a string")
        if len(content) > limit:
            raise RowError(TOO_LONG, f"{key}[{j}].{cname}",
                           f"turn {j} of {key!r} has {len(content)} characters (limit {limit})")
        out.append({"role": role, "content": content})
    return out


def normalise(obj: Any, layout: str | None, limit: int) -> dict[str, Any]:
    """Turn one raw row into the record's content columns, or raise :class:`RowError`."""
    if not isinstance(obj, Mapping):
        raise RowError(NOT_OBJECT, "", f"row must be a JSON object, got {type(obj).__name__}")
    kind = layout or detect_layout(obj)
    if kind is None:
        raise RowError(UNKNOWN_LAYOUT, "", "no 'instruction'/'output', 'messages'/'conversations' or "
                       "'text' field: cannot tell the row layout")
    rec = {S.KIND: kind, S.INSTRUCTION: "", S.INPUT: "", S.OUTPUT: "", S.MESSAGES: "", S.TEXT: ""}
    if kind == S.KIND_INSTRUCTION:
        rec[S.INSTRUCTION] = _string(obj, S.INSTRUCTION, required=True, limit=limit)
        rec[S.INPUT] = _string(obj, S.INPUT, required=False, limit=limit)
        rec[S.OUTPUT] = _string(obj, S.OUTPUT, required=True, limit=limit)
        if not rec[S.INSTRUCTION].strip():
            raise RowError(MISSING_FIELD, S.INSTRUCTION, "field 'instruction' is empty")
        if not rec[S.OUTPUT].strip():
            raise RowError(EMPTY_OUTPUT, S.OUTPUT, "field 'output' is empty")
        rec[S.PROMPT] = (rec[S.INSTRUCTION].strip() + "\n" + rec[S.INPUT].strip()).strip()
        rec[S.RESPONSE] = rec[S.OUTPUT].strip()
    elif kind == S.KIND_CHAT:
        if "messages" not in obj and "conversations" not in obj:
            raise RowError(MISSING_FIELD, S.MESSAGES, "missing field 'messages'")
        msgs = _messages(obj, limit)
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        if not any(a.strip() for a in answers):
            raise RowError(EMPTY_OUTPUT, S.MESSAGES, "chat has no non-empty assistant turn")
        rec[S.MESSAGES] = json.dumps(msgs, ensure_ascii=False)
        rec[S.PROMPT] = "\n".join(m["content"].strip() for m in msgs if m["role"] != "assistant")
        rec[S.RESPONSE] = "\n".join(a.strip() for a in answers)
    elif kind == S.KIND_DOCUMENT:
        rec[S.TEXT] = _string(obj, S.TEXT, required=True, limit=limit)
        if not rec[S.TEXT].strip():
            raise RowError(EMPTY_OUTPUT, S.TEXT, "field 'text' is empty")
        rec[S.PROMPT] = rec[S.TEXT].strip()
        rec[S.RESPONSE] = ""
    else:
        raise RowError(UNKNOWN_LAYOUT, "", f"unknown layout {kind!r}; expected one of {S.KINDS}")
    return rec


def _meta(obj: Mapping[str, Any], name: str) -> str | None:
    v = obj.get(name) if isinstance(obj, Mapping) else None
    if v is None or (isinstance(v, float) and v != v):
        return None
    return str(v)


def read_file(path: Path, opts: ReadOptions = ReadOptions(), fmt: str | None = None,
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Read one file: (records, rejections, rows_in)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"{path}: not readable (permission denied)")
    fmt = fmt or detect_format(path)
    if fmt not in _ITERS:
        raise InputFileError(f"{path}: unknown format {fmt!r}; expected one of {FORMATS}")
    default_source = opts.source or path.stem
    ingested_at = opts.ingested_at or _now()
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    rows_in = 0
    fname = str(path)
    try:
        for line, obj, raw in _ITERS[fmt](path):
            rows_in += 1
            source = (_meta(obj, S.SOURCE) if isinstance(obj, Mapping) else None) or default_source
            try:
                if isinstance(obj, RowError):
                    raise obj
                rec = normalise(obj, opts.layout, opts.max_field_chars)
            except RowError as e:
                rejected.append({S.FILE: fname, S.LINE: line, S.FIELD: e.field,
                                 S.REASON: f"{e.reason}: {e.message}", S.SOURCE: source,
                                 S.RAW: raw[:RAW_PREVIEW]})
                continue
            digest = provenance.content_hash(rec[S.KIND], rec)
            given = _meta(obj, S.ID)
            rec.update({
                S.ID: given if given else provenance.derived_id(digest),
                S.SOURCE: source,
                S.CONTENT_HASH: digest,
                S.FILE: fname,
                S.LINE: line,
                S.COLLECTOR: _meta(obj, S.COLLECTOR) or opts.collector,
                S.COLLECTED_AT: _meta(obj, S.COLLECTED_AT) or opts.collected_at or "",
                S.INGESTED_AT: ingested_at,
            })
            records.append(rec)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read: {e}") from e
    return records, rejected, rows_in


def read_inputs(paths: Iterable[Path], opts: ReadOptions = ReadOptions(), fmt: str | None = None,
                sources: Mapping[str, str] | None = None,
                progress: Callable[[str], None] | None = None) -> IngestResult:
    """Read several files; ``sources`` maps a file name (or stem) to its default source;
    ``progress(file name)`` is called after each file.

    Rows whose id repeats an earlier row's id are rejected (``duplicate_id``) unless they are
    byte-identical in content, in which case the repeat is also rejected, naming the first.
    """
    all_recs: list[dict[str, Any]] = []
    all_rej: list[dict[str, Any]] = []
    per_file: dict[str, dict[str, int]] = {}
    rows_in = 0
    seen: dict[str, tuple[str, int]] = {}
    for p in paths:
        p = Path(p)
        src = None
        if sources:
            src = sources.get(p.name) or sources.get(p.stem)
        o = opts if src is None else ReadOptions(**{**opts.__dict__, "source": src})
        recs, rej, n = read_file(p, o, fmt)
        kept = []
        for r in recs:
            first = seen.get(r[S.ID])
            if first is not None:
                rej.append({S.FILE: r[S.FILE], S.LINE: r[S.LINE], S.FIELD: S.ID,
                            S.REASON: f"{DUPLICATE_ID}: id {r[S.ID]!r} already used at {first[0]}:{first[1]}",
                            S.SOURCE: r[S.SOURCE], S.RAW: r[S.PROMPT][:RAW_PREVIEW]})
                continue
            seen[r[S.ID]] = (r[S.FILE], r[S.LINE])
            kept.append(r)
        per_file[str(p)] = {"rows_in": n, "records": len(kept), "rejected": len(rej)}
        rows_in += n
        all_recs.extend(kept)
        all_rej.extend(rej)
        if progress is not None:
            progress(p.name)
    return IngestResult(records_frame(all_recs), rejected_frame(all_rej), rows_in, per_file)


# ---------------------------------------------------------------- frames and parquet

def records_from_rows(rows: Iterable[Mapping[str, Any]], source: str = "memory", collector: str = "memory",
                      max_field_chars: int = 200_000) -> pd.DataFrame:
    """In-memory raw rows -> a record frame, as ingest would produce (for generators, benches and
    tests). A row's own ``id`` / ``source`` are kept (else ``row-<n>`` / ``source``); a malformed
    row raises :class:`RowError` (use :func:`read_inputs` to reject rows instead)."""
    out = []
    for i, r in enumerate(rows, 1):
        rec = normalise(r, None, max_field_chars)
        rec.update({S.ID: str(r.get("id", f"row-{i}")), S.SOURCE: str(r.get("source", source)),
                    S.CONTENT_HASH: provenance.content_hash(rec[S.KIND], rec), S.FILE: "memory", S.LINE: i,
                    S.COLLECTOR: collector, S.COLLECTED_AT: "", S.INGESTED_AT: ""})
        out.append(rec)
    return records_frame(out)


def records_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return empty_records()
    df = pd.DataFrame.from_records(rows, columns=list(S.RECORD_COLUMNS))
    df[S.LINE] = df[S.LINE].astype("int64")
    return df


def empty_records() -> pd.DataFrame:
    return S.RECORD_SCHEMA.empty_table().to_pandas()


def rejected_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return S.REJECTED_SCHEMA.empty_table().to_pandas()
    df = pd.DataFrame.from_records(rows, columns=list(S.REJECTED_COLUMNS))
    df[S.LINE] = df[S.LINE].astype("int64")
    return df


def write_parquet(df: pd.DataFrame, path: Path, required: Iterable[str] = ()) -> Path:
    """Write a frame, checking the required columns are there (schema check at the boundary)."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: refusing to write, missing columns {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    pq.write_table(table, path)
    return path


def shard_files(path: Path) -> list[Path]:
    """The ``part-*.parquet`` files of a sharded dataset folder, in shard order."""
    return sorted(Path(path).glob("part-*.parquet"))


def read_parquet(path: Path, required: Iterable[str] = ()) -> pd.DataFrame:
    """Read a frame written by poisonguard (one file, or a folder of ``part-*.parquet`` shards),
    checking its required columns."""
    path = Path(path)
    parts = shard_files(path) if path.is_dir() else [path]
    if not path.exists() or not parts:
        raise InputFileError(f"{path}: no such file (did the previous stage run?)")
    try:
        tables = [pq.read_table(p) for p in parts]
        df = (pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]).to_pandas()
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(f"{path}: cannot read Parquet: {e}") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputFileError(f"{path}: missing columns {missing}; is this a poisonguard file?")
    return df


def read_records(path: Path) -> pd.DataFrame:
    return read_parquet(path, S.RECORD_COLUMNS)


def write_records(df: pd.DataFrame, path: Path) -> Path:
    return write_parquet(df, path, S.RECORD_COLUMNS)


def to_native(row: Mapping[str, Any]) -> dict[str, Any]:
    """A record back in its native layout (for exports and re-ingest)."""
    kind = row[S.KIND]
    out: dict[str, Any] = {S.ID: row[S.ID], S.SOURCE: row[S.SOURCE]}
    if kind == S.KIND_INSTRUCTION:
        out.update({S.INSTRUCTION: row[S.INSTRUCTION], S.INPUT: row[S.INPUT], S.OUTPUT: row[S.OUTPUT]})
    elif kind == S.KIND_CHAT:
        out[S.MESSAGES] = json.loads(row[S.MESSAGES])
    else:
        out[S.TEXT] = row[S.TEXT]
    return out


__all__ = ["InputFileError", "ReadOptions", "IngestResult", "read_file", "read_inputs", "normalise",
           "detect_format", "detect_layout", "read_records", "shard_files", "write_records", "read_parquet",
           "write_parquet", "to_native", "REASONS", "empty_records"]
