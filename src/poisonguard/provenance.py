"""Canonical content hashing, manifests, snapshot roots and tamper verification.

Canonical form of a row (the input to its SHA-256)
-------------------------------------------------
A JSON object ``{"kind": ..., <content fields>}`` where the content fields are those of the
row's layout (:data:`poisonguard.schema.CONTENT_FIELDS`):

* instruction: ``instruction``, ``input``, ``output`` (strings)
* chat: ``messages``, a list of ``{"role", "content"}`` objects (ShareGPT ``from``/``value`` is
  mapped to ``role``/``content`` first: human->user, gpt->assistant)
* document: ``text``

Every string has ``\\r\\n``/``\\r`` turned into ``\\n`` and leading/trailing whitespace stripped;
the object is serialised with sorted keys, no insignificant whitespace (``separators=(",", ":")``)
and ``ensure_ascii=False``, then encoded as UTF-8. So key order, JSON formatting and surrounding
whitespace do not change the hash; any change of content does, including invisible characters
(no Unicode normalisation is applied: a zero-width character is content). The ``id``, ``source``
and other metadata are not part of the content hash.

Snapshot root
-------------
SHA-256 over the lines ``"{id}\\t{source}\\t{content_hash}\\n"`` sorted by id: one hash naming the
exact dataset version (adding, removing, editing or moving a row between sources changes it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from poisonguard import schema as S

HASH_PREFIX_LEN = 16


def _norm(value: str) -> str:
    return value.replace("\r\n", "\n").replace("\r", "\n").strip()


def canonical_form(kind: str, content: Mapping[str, Any]) -> str:
    """The documented canonical JSON text of a row's content (see module docstring)."""
    if kind == S.KIND_CHAT:
        msgs = content[S.MESSAGES]
        if isinstance(msgs, str):
            msgs = json.loads(msgs)
        body: dict[str, Any] = {
            S.MESSAGES: [{"role": _norm(str(m["role"])), "content": _norm(str(m["content"]))} for m in msgs]
        }
    else:
        body = {f: _norm(str(content.get(f, "") or "")) for f in S.CONTENT_FIELDS[kind]}
    body[S.KIND] = kind
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(kind: str, content: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of :func:`canonical_form`."""
    return hashlib.sha256(canonical_form(kind, content).encode("utf-8")).hexdigest()


def derived_id(digest: str) -> str:
    """Stable id for a row that came without one."""
    return f"h-{digest[:HASH_PREFIX_LEN]}"


def snapshot_root(ids: Sequence[str], sources: Sequence[str], hashes: Sequence[str]) -> str:
    """Root hash of a dataset version (see module docstring)."""
    h = hashlib.sha256()
    for i, s, c in sorted(zip(ids, sources, hashes, strict=True)):
        h.update(f"{i}\t{s}\t{c}\n".encode())
    return h.hexdigest()


MANIFEST_COLUMNS = (S.ID, S.CONTENT_HASH, S.SOURCE, S.FILE, S.LINE, S.COLLECTOR, S.COLLECTED_AT, S.INGESTED_AT)


def manifest(records: pd.DataFrame) -> pd.DataFrame:
    """One row per record: id, hash, source, file, line, collector, collected_at, ingested_at."""
    return records.loc[:, list(MANIFEST_COLUMNS)].sort_values(S.ID, kind="stable").reset_index(drop=True)


def root_of(records: pd.DataFrame) -> str:
    return snapshot_root(records[S.ID].tolist(), records[S.SOURCE].tolist(), records[S.CONTENT_HASH].tolist())


def read_manifest(path: Any) -> Any:
    """:func:`manifest` of the records at ``path`` (one Parquet file or a folder of shards) as a
    pyarrow table: only the manifest columns are read (never the texts) and the sort is Arrow's
    (stable, like pandas'), so the records frame is never built."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from poisonguard import io

    path = Path(path)
    parts = io.shard_files(path) if path.is_dir() else [path]
    if not path.exists() or not parts:
        raise io.InputFileError(f"{path}: no such file (did the previous stage run?)")
    try:
        tables = [pq.read_table(p, columns=list(MANIFEST_COLUMNS)) for p in parts]
    except (pa.ArrowException, OSError) as e:
        raise io.InputFileError(f"{path}: cannot read the manifest columns {list(MANIFEST_COLUMNS)}: {e}") from e
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    del tables
    table = table.replace_schema_metadata(None).combine_chunks()
    return table.take(pc.sort_indices(table, sort_keys=[(S.ID, "ascending")]))


def root_of_manifest(table: Any, batch_rows: int = 200_000) -> str:
    """:func:`snapshot_root` of a manifest table (:func:`read_manifest`), a batch at a time."""
    import pyarrow.compute as pc

    cols = [S.ID, S.SOURCE, S.CONTENT_HASH]
    t = table.select(cols)
    if pc.count_distinct(t.column(S.ID)).as_py() != t.num_rows:
        # repeated ids: the root sorts whole (id, source, hash) lines
        t = t.take(pc.sort_indices(t, sort_keys=[(c, "ascending") for c in cols]))
    h = hashlib.sha256()
    for batch in t.to_batches(max_chunksize=batch_rows):
        ids, src, hs = (batch.column(c).to_pylist() for c in cols)
        h.update("".join(f"{i}\t{s}\t{c}\n" for i, s, c in zip(ids, src, hs, strict=True)).encode())
    return h.hexdigest()


def rehash(records: pd.DataFrame) -> pd.Series:
    """Recompute each record's content hash from its content columns (never trusts the stored hash)."""
    out = []
    for row in records.itertuples(index=False):
        d = row._asdict()
        out.append(content_hash(d[S.KIND], d))
    return pd.Series(out, index=records.index, name=S.CONTENT_HASH)


@dataclass
class VerifyResult:
    """Differences between a dataset and the manifest it claims to match."""

    modified: list[dict[str, Any]] = field(default_factory=list)
    added: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    checked: int = 0
    manifest_root: str = ""
    data_root: str = ""

    @property
    def ok(self) -> bool:
        return not (self.modified or self.added or self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "manifest_root": self.manifest_root,
            "data_root": self.data_root,
            "modified": self.modified,
            "added": self.added,
            "removed": self.removed,
        }


def verify(records: pd.DataFrame, manifest_df: pd.DataFrame) -> VerifyResult:
    """Name every row modified, added or removed relative to ``manifest_df``.

    Hashes are recomputed from the records' content, so an edit that left the stored
    ``content_hash`` column untouched is still caught.
    """
    data = records.loc[:, [S.ID, S.SOURCE, S.FILE, S.LINE]].copy()
    data[S.CONTENT_HASH] = rehash(records).to_numpy()
    man = manifest_df.set_index(S.ID)
    dat = data.set_index(S.ID)
    res = VerifyResult(checked=len(data))
    common = dat.index.intersection(man.index)
    changed = common[(dat.loc[common, S.CONTENT_HASH] != man.loc[common, S.CONTENT_HASH]).to_numpy()]
    for rid in changed:
        res.modified.append({
            S.ID: rid, "expected": man.at[rid, S.CONTENT_HASH], "actual": dat.at[rid, S.CONTENT_HASH],
            S.FILE: dat.at[rid, S.FILE], S.LINE: int(dat.at[rid, S.LINE]),
        })
    for rid in dat.index.difference(man.index):
        res.added.append({S.ID: rid, S.FILE: dat.at[rid, S.FILE], S.LINE: int(dat.at[rid, S.LINE])})
    for rid in man.index.difference(dat.index):
        res.removed.append({S.ID: rid, S.FILE: man.at[rid, S.FILE], S.LINE: int(man.at[rid, S.LINE])})
    res.manifest_root = snapshot_root(man.index.tolist(), man[S.SOURCE].tolist(), man[S.CONTENT_HASH].tolist())
    res.data_root = snapshot_root(data[S.ID].tolist(), data[S.SOURCE].tolist(), data[S.CONTENT_HASH].tolist())
    return res
