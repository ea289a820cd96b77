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
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
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
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
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


def _iter_parquet(path: Path, batch_rows: int = 10_000) -> Iterator[tuple[int, Any, str]]:
    """Row groups a batch at a time (a whole file as Python dicts costs ~2 KB per row)."""
    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=batch_rows)
        i = 0
        for batch in batches:
            for obj in batch.to_pylist():
                i += 1
                yield i, obj, json.dumps(obj, ensure_ascii=False, default=str)[:RAW_PREVIEW]
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(f"{path}: cannot read Parquet: {e}") from e


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


def iter_rows(path: Path, opts: ReadOptions = ReadOptions(), fmt: str | None = None,
              ) -> Iterator[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """Read one file row by row: ``(record, None)`` or ``(None, rejection)`` per input row, in
    file order (JSON arrays are parsed whole; the other formats stream)."""
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
    fname = str(path)
    try:
        for line, obj, raw in _ITERS[fmt](path):
            source = (_meta(obj, S.SOURCE) if isinstance(obj, Mapping) else None) or default_source
            try:
                if isinstance(obj, RowError):
                    raise obj
                rec = normalise(obj, opts.layout, opts.max_field_chars)
            except RowError as e:
                yield None, {S.FILE: fname, S.LINE: line, S.FIELD: e.field,
                             S.REASON: f"{e.reason}: {e.message}", S.SOURCE: source,
                             S.RAW: raw[:RAW_PREVIEW]}
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
            yield rec, None
    except OSError as e:
        raise InputFileError(f"{path}: cannot read: {e}") from e


class _SeenIds:
    """Ids kept so far with the file and line of their row, for the duplicate-id check: a 128-bit
    digest of each id in sorted runs (24 bytes per id; a dict of 5M id strings costs over 1 GB).
    Runs of similar size merge, so a lookup searches O(log n) runs."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []   # (h1 sorted, h2, where)
        self.files: list[str] = []

    @staticmethod
    def digests(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        raw = np.frombuffer(b"".join(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                                     for i in ids), dtype=np.uint64)
        return raw[0::2].copy(), raw[1::2].copy()

    def find(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """For each digest, where its id was first kept (``file_index << 40 | line``), or -1."""
        out = np.full(len(h1), -1, dtype=np.int64)
        for r1, r2, where in self.runs:   # an id is in one run at most
            pos = np.searchsorted(r1, h1)
            cand = np.flatnonzero(pos < len(r1))
            cand = cand[r1[pos[cand]] == h1[cand]]
            same = r2[pos[cand]] == h2[cand]
            out[cand[same]] = where[pos[cand[same]]]
            for q in cand[~same]:   # another id with the same first half (odds ~2**-64): look further
                k = int(pos[q]) + 1
                while k < len(r1) and r1[k] == h1[q]:
                    if r2[k] == h2[q]:
                        out[q] = where[k]
                        break
                    k += 1
        return out

    def add(self, h1: np.ndarray, h2: np.ndarray, where: np.ndarray) -> None:
        o = np.argsort(h1, kind="stable")
        self.runs.append((h1[o], h2[o], where[o]))
        while len(self.runs) > 1 and 2 * len(self.runs[-1][0]) >= len(self.runs[-2][0]):
            b, a = self.runs.pop(), self.runs.pop()
            cat = [np.concatenate([x, y]) for x, y in zip(a, b)]
            o = np.argsort(cat[0], kind="stable")
            self.runs.append((cat[0][o], cat[1][o], cat[2][o]))

    def file_index(self, name: str) -> int:
        if not self.files or self.files[-1] != name:
            self.files.append(name)
        return len(self.files) - 1

    def describe(self, where: int) -> tuple[str, int]:
        return self.files[where >> 40], where & ((1 << 40) - 1)


@dataclass
class IngestCounts:
    """What :func:`read_batches` has read so far."""

    rows_in: int = 0
    records: int = 0
    rejected: int = 0
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)


def read_batches(paths: Iterable[Path], opts: ReadOptions = ReadOptions(), fmt: str | None = None,
                 sources: Mapping[str, str] | None = None, progress: Callable[[str], None] | None = None,
                 batch_rows: int = 50_000, counts: IngestCounts | None = None,
                 ) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Read several files ``batch_rows`` input rows at a time: (records, rejections) frames, in
    input order. Memory is bounded by the batch (plus 24 bytes per record for the id check), so a
    delivery of any size streams through. ``sources`` maps a file name (or stem) to its default
    source; ``progress(file name)`` is called after each file; ``counts`` is filled as it goes.

    Rows whose id repeats an earlier row's id are rejected (``duplicate_id``), naming the file and
    line of the first.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    counts = counts if counts is not None else IngestCounts()
    seen = _SeenIds()
    buf: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = []

    def flush() -> tuple[pd.DataFrame, pd.DataFrame]:
        recs = [r for r, _ in buf if r is not None]
        h1, h2 = seen.digests([r[S.ID] for r in recs])
        first = seen.find(h1, h2)
        in_batch: dict[str, int] = {}
        kept: list[dict[str, Any]] = []
        keep_at: list[int] = []
        rejected: list[dict[str, Any]] = []
        k = -1
        for rec, rej in buf:
            if rec is None:
                rejected.append(rej)
                counts.per_file[rej[S.FILE]]["rejected"] += 1
                continue
            k += 1
            rid = rec[S.ID]
            if first[k] >= 0 or rid in in_batch:
                f, line = seen.describe(int(first[k])) if first[k] >= 0 else \
                    (kept[in_batch[rid]][S.FILE], kept[in_batch[rid]][S.LINE])
                rejected.append({S.FILE: rec[S.FILE], S.LINE: rec[S.LINE], S.FIELD: S.ID,
                                 S.REASON: f"{DUPLICATE_ID}: id {rid!r} already used at {f}:{line}",
                                 S.SOURCE: rec[S.SOURCE], S.RAW: rec[S.PROMPT][:RAW_PREVIEW]})
                counts.per_file[rec[S.FILE]]["rejected"] += 1
                continue
            in_batch[rid] = len(kept)
            kept.append(rec)
            keep_at.append(k)
            counts.per_file[rec[S.FILE]]["records"] += 1
        if kept:
            where = np.array([(seen.file_index(r[S.FILE]) << 40) | int(r[S.LINE]) for r in kept], dtype=np.int64)
            seen.add(h1[keep_at], h2[keep_at], where)
        counts.records += len(kept)
        counts.rejected += len(rejected)
        buf.clear()
        return records_frame(kept), rejected_frame(rejected)

    for p in paths:
        p = Path(p)
        src = None
        if sources:
            src = sources.get(p.name) or sources.get(p.stem)
        o = opts if src is None else ReadOptions(**{**opts.__dict__, "source": src})
        stats = counts.per_file.setdefault(str(p), {"rows_in": 0, "records": 0, "rejected": 0})
        for row in iter_rows(p, o, fmt):
            buf.append(row)
            stats["rows_in"] += 1
            counts.rows_in += 1
            if len(buf) >= batch_rows:
                yield flush()
        if progress is not None:
            progress(p.name)
    if buf:
        yield flush()


def read_inputs(paths: Iterable[Path], opts: ReadOptions = ReadOptions(), fmt: str | None = None,
                sources: Mapping[str, str] | None = None,
                progress: Callable[[str], None] | None = None) -> IngestResult:
    """Read several files into memory (see :func:`read_batches`, which the ingest stage streams)."""
    counts = IngestCounts()
    recs: list[pd.DataFrame] = []
    rejs: list[pd.DataFrame] = []
    for r, j in read_batches(paths, opts, fmt, sources, progress, batch_rows=1 << 62, counts=counts):
        recs.append(r)
        rejs.append(j)
    records = pd.concat(recs, ignore_index=True) if len(recs) > 1 else (recs[0] if recs else empty_records())
    rejected = pd.concat(rejs, ignore_index=True) if len(rejs) > 1 else (rejs[0] if rejs else rejected_frame([]))
    return IngestResult(records, rejected, counts.rows_in, counts.per_file)


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
    require_columns(path, df.columns, required)
    return df


def require_columns(path: Path, have: Iterable[str], required: Iterable[str]) -> None:
    """Fail, naming the file, when columns of ``required`` are not among ``have``."""
    have = set(have)
    missing = [c for c in required if c not in have]
    if missing:
        raise InputFileError(f"{path}: missing columns {missing}; is this a poisonguard file?")


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


__all__ = ["InputFileError", "ReadOptions", "IngestResult", "IngestCounts", "read_inputs",
           "read_batches", "iter_rows", "normalise",
           "detect_format", "detect_layout", "read_records", "require_columns", "shard_files", "write_records", "read_parquet",
           "write_parquet", "to_native", "REASONS", "empty_records"]
