"""Incremental sanitization: re-check only what is new since the last run.

Most rows of a nightly dataset were already scanned the night before. The **ledger** keeps, per
content hash, the decision of the last run (decision, score, detectors, evidence, finding) and
the *detector fingerprint* it was made under: the sanitize settings that decide (detectors and
their params, ``min_detectors``, the reference set) and the source of the code that decides
(every detector module, the text features, the fusion). A change to any of them, and only to
them, invalidates the ledger; editing the report, the CLI or the fine-tuning code does not.

An incremental run analyses a *delta set* instead of every row:

* **new** rows (content hash not in the ledger);
* **watched** old rows: every row the ledger holds in quarantine or review, so an existing
  finding is seen again, grows when new rows join it, and is reported again;
* **prompt twins**: old rows whose normalised prompt equals a new row's, up to ``max_twins`` per
  prompt (copies of one prompt whose responses disagree need both sides). Only the detectors that
  compare copies of one prompt (``Detector.compares_copies``: duplicates, divergent_copies) see
  them; the others analyse the delta set without them
  (:func:`~poisonguard.detectors.base.without_twins`), scoring the twins 0;
* a **baseline** of old rows (a fixed hash-ordered sample, ``baseline_factor`` x the new rows,
  at least ``min_baseline``): the global statistics the detectors calibrate against (task
  templates, n-gram rates, duplicate bands) are estimated on it.

Each row of the delta set carries a **sample weight** (:data:`~poisonguard.schema.SAMPLE_WEIGHT`,
:func:`weighted`): 1 for new, watched and twin rows, and for a baseline row the number of old rows
it was sampled from per baseline row; the weights add up to the number of rows (when a baseline
is sampled at all: ``min_baseline: 0`` with ``baseline_factor: 0`` samples none). The view without
the twins has its own weights (:data:`~poisonguard.schema.TWIN_FREE_WEIGHT`): there a baseline row
also stands for the twins, so they add up to the number of rows as well. A detector bound
stated as a share of all rows (``response_cluster``: a pasted word is in at most 3% of the prompts,
a phrase in at most 2% of the responses) is tested on the weighted counts: the twins, picked
because a new row repeats their prompt, would otherwise shift the delta's mix of tasks, and which
old rows were picked decided whether a code task's wording looked "rare" (on the 1M-row bench,
two other sample orders quarantined its answer opener as an injected phrase: 0.285% and 0.292%
false positives instead of 0.145%; with the weights, seven orders gave 0.145-0.146%).

Old rows outside the delta set keep their ledger decision; an old row inside it takes the more
severe of the ledger's and tonight's decision only when the finding that flags it tonight
includes new rows (a cluster that grew past its threshold quarantines its earlier rows too); a
partial view neither relaxes an old decision nor adds flags of its own to old rows, which would
ratchet up false positives night after night. Poison that
trickles in below the detection threshold across many nights is only seen whole by a full run:
a full run happens when there is no ledger, the fingerprint changed, the new rows exceed
``max_new_fraction`` of the data, or ``full_every`` incremental runs have passed since the last.

Over ingest's shard files (the streamed sanitize stage) a night never loads the records whole: the
plan reads the id, content-hash and prompt columns (:class:`ShardColumns`), the detectors see the
delta set only (:func:`read_rows`), and :class:`CompletedNight` hands every row's decision
(:func:`decision_columns`, shared with :func:`sanitize_incremental`) to the stage shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from poisonguard import schema as S
from poisonguard.config import IncrementalConfig, SanitizeConfig
from poisonguard.detectors.base import DetectorResult

log = logging.getLogger("poisonguard.incremental")

LEDGER_FILE = "ledger.parquet"
META_FILE = "ledger.json"
LEDGER_COLUMNS = (S.CONTENT_HASH, "prompt_key", S.DECISION, S.SCORE, S.DETECTORS, S.EVIDENCE, S.FINDING)
# optional: each content hash's 64-bit key (:func:`content_keys`), so a night need not key the ledger's
# strings again (ledgers written before it lack it; a wrong key only makes its row look new)
HASH_KEY = "hash_key"
# optional: each content hash's generic 64-bit hash (:func:`_key64`), the order in which a night picks
# its prompt twins and its baseline sample (kept so old rows need not be hashed again)
ORDER_KEY = "order_key"
_SEVERITY = {S.KEEP: 0, S.REVIEW: 1, S.QUARANTINE: 2}
# the code that decides: a change here invalidates the ledger (paths relative to the package)
_DECIDING_CODE = ("detectors", "textfeat.py", "sanitize.py", "schema.py", "template.py", "llm_review.py")


def fingerprint(cfg: SanitizeConfig) -> str:
    """Hash of the settings and the code that decide a row's fate (see module docstring)."""
    import poisonguard

    root = Path(poisonguard.__file__).parent
    h = hashlib.sha256()
    settings = {"detectors": cfg.detectors, "min_detectors": cfg.min_detectors, "reference": cfg.reference,
                "llm_review": cfg.llm_review.model_dump(mode="json")}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if cfg.reference and Path(cfg.reference).is_file():
        h.update(hashlib.sha256(Path(cfg.reference).read_bytes()).digest())
    for name in _DECIDING_CODE:
        p = root / name
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def prompt_keys(records: pd.DataFrame | pa.Table) -> np.ndarray:
    """Stable 64-bit hash of each row's lower-cased, whitespace-trimmed prompt (vectorised)."""
    col = records[S.PROMPT]
    norm = pc.utf8_lower(pc.utf8_trim_whitespace(pc.fill_null(
        col if isinstance(col, pa.ChunkedArray) else string_array(col), "")))
    return _key64(norm)


def string_array(values: Any) -> pa.Array | pa.ChunkedArray:
    """A string column (or index, or array) as Arrow strings: no copy for Arrow-backed data
    (pandas' default string columns), a conversion otherwise."""
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else \
        pa.array(getattr(values, "array", values), from_pandas=True)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.large_string())
    return arr


def _key64(arr: pa.Array) -> np.ndarray:
    """64-bit hash of each string (pandas' stable SipHash; nulls hash as None)."""
    return pd.util.hash_array(arr.to_numpy(zero_copy_only=False), categorize=False).astype(np.uint64)


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX[np.frombuffer(b"abcdef", dtype=np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def content_keys(hashes: Any) -> np.ndarray:
    """64-bit key of each content hash: a SHA-256 hex digest (64 characters, the first 16 of them
    lower-case hex) is already uniform, so its first 16 hex digits are its key (read from the
    Arrow buffers, no Python strings); any other value gets :func:`_key64`'s hash. Per value, so
    the same string has the same key in every call."""
    arr = string_array(hashes)
    if isinstance(arr, pa.ChunkedArray):
        return np.concatenate([content_keys(c) for c in arr.chunks]) if arr.num_chunks else np.zeros(0, np.uint64)
    n = len(arr)
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return out
    _, off_buf, data_buf = arr.buffers()
    off_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(off_buf, dtype=off_type)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    hexed = np.diff(offsets) == 64
    if arr.null_count:
        hexed &= arr.is_valid().to_numpy(zero_copy_only=False)
    if hexed.all():     # every value 64 characters: the first 16 of each, without a gather
        heads = data[offsets[0]:offsets[0] + 64 * n].reshape(n, 64)[:, :16]
        blocks = [(np.arange(n), heads)]
    else:
        blk = np.flatnonzero(hexed)
        blocks = [(blk[lo:lo + (1 << 18)], None) for lo in range(0, len(blk), 1 << 18)]
    for blk, heads in blocks:
        digits = _HEX[heads if heads is not None else data[offsets[blk, None] + np.arange(16)]]
        good = (digits < 16).all(axis=1)
        packed = np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2])    # 8 bytes, big-endian
        out[blk[good]] = packed.view(">u8").ravel()[good]
        hexed[blk[~good]] = False
    rest = np.flatnonzero(~hexed)
    if len(rest):
        out[rest] = _key64(arr.take(pa.array(rest)))
    return out


class _HashIndex:
    """Positions of strings in a column, looked up through their 64-bit hashes and confirmed on
    the full strings (a pandas string index hashes 1M Python strings per look-up, ~0.5 s each).

    ``lookup`` gives the first position of each query string in the column, or -1. The hashes go
    in a hash table (1M look-ups in ~0.1 s) when they are unique, else in a sorted array (the
    first of equal hashes wins). Two different strings whose hashes collide make the later one
    look absent (odds of a few in 10^8 for a 1M-row ledger): an incremental run then re-checks
    that row, which is safe."""

    def __init__(self, values: pa.Array, keys: np.ndarray | None = None) -> None:
        self.values = values
        keys = _key64(values) if keys is None else np.asarray(keys, dtype=np.uint64)
        table = pd.Index(keys, copy=False)
        self.table: pd.Index | None = table if table.is_unique else None
        if self.table is None:
            self.order = np.argsort(keys, kind="stable")
            self.sorted = keys[self.order]

    def lookup(self, query: pa.Array, keys: np.ndarray | None = None) -> np.ndarray:
        keys = _key64(query) if keys is None else keys
        pos = np.full(len(keys), -1, dtype=np.int64)
        if not len(self.values):
            return pos
        if self.table is not None:
            at = self.table.get_indexer(keys)
            hit = np.flatnonzero(at >= 0)
            cand = at[hit].astype(np.int64)
        else:
            at = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
            hit = np.flatnonzero(self.sorted[at] == keys)
            cand = self.order[at[hit]]
        same = pc.equal(self.values.take(pa.array(cand)), query.take(pa.array(hit)))
        same = pc.fill_null(same, False).to_numpy(zero_copy_only=False)
        pos[hit[same]] = cand[same]
        return pos


def _severity(decisions: np.ndarray, unknown: int) -> np.ndarray:
    """keep 0, review 1, quarantine 2; anything else ``unknown``."""
    out = np.full(len(decisions), unknown, dtype=np.int8)
    for name, sev in _SEVERITY.items():
        out[decisions == name] = sev
    return out


@dataclass
class Ledger:
    """What the last run decided, per content hash, and under which fingerprint."""

    table: pd.DataFrame                  # LEDGER_COLUMNS, unique content hashes
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, ledger_dir: Path, table: bool = True) -> Ledger | None:
        """The ledger in ``ledger_dir`` (None when there is none); ``table=False``: its meta only
        (an empty table), enough for :func:`settled_full_reason`."""
        ledger_dir = Path(ledger_dir)
        meta_p, tab_p = ledger_dir / META_FILE, ledger_dir / LEDGER_FILE
        if not (meta_p.is_file() and tab_p.is_file()):
            return None
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
        if not table:
            return cls(pd.DataFrame(columns=list(LEDGER_COLUMNS)), meta)
        table = pd.read_parquet(tab_p)
        missing = [c for c in LEDGER_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{tab_p}: ledger is missing columns {missing}; delete the folder to start afresh")
        return cls(table, meta)

    def save(self, ledger_dir: Path) -> None:
        write_ledger(ledger_dir, pa.Table.from_pandas(self.table.loc[:, list(LEDGER_COLUMNS)], preserve_index=False),
                     self.meta)


def write_ledger(ledger_dir: Path, table: pa.Table, meta: dict[str, Any]) -> None:
    """Replace the ledger (atomically) by ``table`` and ``meta`` (:func:`run_record`)."""
    stage_ledger(ledger_dir, table)
    commit_ledger(ledger_dir, meta)


def stage_ledger(ledger_dir: Path, table: pa.Table) -> int:
    """Write ``table`` beside the ledger, not yet in its place (:func:`commit_ledger` puts it
    there); its number of rows."""
    ledger_dir = Path(ledger_dir)
    ledger_dir.mkdir(parents=True, exist_ok=True)
    # uncompressed: the hashes (most of the bytes) do not compress, and writing is ~a third faster
    pq.write_table(table.select(list(LEDGER_COLUMNS) + [c for c in (HASH_KEY, ORDER_KEY) if c in table.column_names]),
                   ledger_dir / (LEDGER_FILE + ".tmp"), compression="none")
    return int(table.num_rows)


def commit_ledger(ledger_dir: Path, meta: dict[str, Any]) -> None:
    """Put the staged table in the ledger's place (atomically: a crash leaves the old ledger
    whole) and write its ``meta``."""
    ledger_dir = Path(ledger_dir)
    (ledger_dir / (LEDGER_FILE + ".tmp")).replace(ledger_dir / LEDGER_FILE)
    (ledger_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


@dataclass
class Plan:
    """Which rows tonight's run analyses, and why."""

    mode: str                            # "full" | "incremental"
    reason: str
    new: np.ndarray                      # bool per record
    delta: np.ndarray                    # bool per record: rows the detectors see
    counts: dict[str, int] = field(default_factory=dict)
    # incremental plans: each record's row in the ledger table (-1 = new), and its content hash's
    # 64-bit key (reused to complete the decisions and to write the ledger)
    ledger_pos: np.ndarray | None = None
    hash_keys: np.ndarray | None = None
    prompt_keys: np.ndarray | None = None    # incremental plans: each record's :func:`prompt_keys`
    order_keys: np.ndarray | None = None     # incremental plans: each content hash's :func:`_key64`
    # incremental plans: the rows of all the data each record stands for in the delta set (new,
    # watched and twin rows 1; a baseline row |old rows it was sampled from| / |baseline|; rows
    # outside the delta 0): they add up to the number of records whenever a baseline is sampled
    # (``min_baseline: 0`` with no new rows or ``baseline_factor: 0`` samples none) (:func:`weighted`)
    weights: np.ndarray | None = None
    # incremental plans with prompt twins: the weights of the detectors that do not see them
    # (``Detector.compares_copies`` False): NaN on a twin, a baseline row also stands for the twins
    twin_free_weights: np.ndarray | None = None


def full_counts(n: int) -> dict[str, int]:
    """A full run's row counts (every row is new to the detectors and in the delta set)."""
    return {"rows": n, "new": n, "delta": n}


def settled_full_reason(ledger: Ledger | None, fp: str, inc: IncrementalConfig) -> str | None:
    """Why tonight's run must be full whatever rows arrived, or None (then :func:`plan` decides
    from the rows: how many are new)."""
    if not inc.enabled:
        return "incremental runs are disabled"
    if inc.force_full:
        return "a full run was requested"
    if ledger is None:
        return "no ledger yet (first run)"
    if ledger.meta.get("fingerprint") != fp:
        return "detector settings or code changed since the ledger was written"
    since = int(ledger.meta.get("runs_since_full", 0))
    if inc.full_every and since + 1 >= inc.full_every:
        return f"{since} incremental runs since the last full run (full_every: {inc.full_every})"
    return None


def _new_rows_reason(n: int, n_new: int, inc: IncrementalConfig) -> str | None:
    if n and n_new / n > inc.max_new_fraction:
        return f"{n_new} of {n} rows are new (more than max_new_fraction {inc.max_new_fraction})"
    return None


def plan(records: pd.DataFrame, ledger: Ledger | None, fp: str, inc: IncrementalConfig,
         keys: np.ndarray | None = None) -> Plan:
    """Decide full vs incremental and pick the delta set (pure; see module docstring).

    ``keys``: every record's :func:`prompt_keys` when the caller has them; else an incremental
    plan takes an old row's from the ledger and hashes only the new rows' prompts (the plan's
    ``prompt_keys``)."""
    n = len(records)
    everything = np.ones(n, dtype=bool)

    def full(reason: str) -> Plan:
        return Plan("full", reason, everything.copy(), everything.copy(), full_counts(n))

    reason = settled_full_reason(ledger, fp, inc)
    if reason is not None:
        return full(reason)
    assert ledger is not None
    hashes = string_array(records[S.CONTENT_HASH])
    hkeys = content_keys(hashes)
    led_hashes = string_array(ledger.table[S.CONTENT_HASH])
    led_keys = ledger.table[HASH_KEY].to_numpy(dtype=np.uint64) if HASH_KEY in ledger.table.columns else \
        content_keys(led_hashes)
    lpos = _HashIndex(led_hashes, led_keys).lookup(hashes, hkeys)
    is_old = lpos >= 0
    new = ~is_old
    n_new = int(new.sum())
    reason = _new_rows_reason(n, n_new, inc)
    if reason is not None:
        return full(reason)
    led_sev = _severity(ledger.table[S.DECISION].fillna(S.KEEP).to_numpy(dtype=object), 1)
    watched = is_old & (led_sev[np.maximum(lpos, 0)] != 0) if len(led_sev) else np.zeros(n, dtype=bool)
    if keys is None:
        # an old row's prompt key is the ledger's (the same content hash: the same canonical
        # content); only the new rows' prompts are hashed
        keys = ledger.table["prompt_key"].to_numpy(dtype=np.uint64)[np.maximum(lpos, 0)] if len(ledger.table) \
            else np.zeros(n, dtype=np.uint64)
        if n_new:
            keys[new] = prompt_keys(records.loc[new, [S.PROMPT]])
    # the order twins and the baseline are picked in: the content hashes' generic hash (the
    # ledger's for old rows), so the same rows are picked as by every earlier version
    okeys = np.zeros(n, dtype=np.uint64)
    if len(ledger.table):
        led_order = ledger.table[ORDER_KEY].to_numpy(dtype=np.uint64) if ORDER_KEY in ledger.table.columns else \
            _key64(led_hashes)
        okeys[is_old] = led_order[lpos[is_old]]
    if n_new:
        okeys[new] = _key64(hashes.filter(pa.array(new)))
    twins = np.zeros(n, dtype=bool)
    if n_new:
        cand = np.flatnonzero(is_old & ~watched & np.isin(keys, keys[new]))
        # a few copies per prompt are enough to show disagreeing answers; the first by content hash
        frame = pd.DataFrame({"k": keys[cand], "h": okeys[cand], "i": cand}).sort_values(["k", "h"], kind="stable")
        twins[frame["i"].to_numpy()[frame.groupby("k", sort=False).cumcount().to_numpy() < inc.max_twins]] = True
    old_idx = np.flatnonzero(is_old & ~watched & ~twins)
    want = min(len(old_idx), max(int(np.ceil(inc.baseline_factor * n_new)), inc.min_baseline))
    # a fixed hash-ordered sample: the same old rows serve as the baseline night after night
    base = np.zeros(n, dtype=bool)
    base[old_idx[_smallest(okeys[old_idx], want)]] = True
    delta = new | watched | twins | base
    # the baseline is a uniform sample of the other old rows: each stands for len(old_idx) / want of
    # them, so the delta set's weighted counts estimate counts over all rows (the twins, picked
    # because a new row repeats their prompt, would otherwise skew every share of prompts)
    weights = (new | watched | twins).astype(np.float64)
    # the detectors that do not compare copies of one prompt see no twins: their baseline rows
    # stand for the twins too (a twin row's NaN: not seen)
    twin_free = np.where(twins, np.nan, weights) if twins.any() else None
    if want:
        weights[base] = len(old_idx) / want
        if twin_free is not None:
            twin_free[base] = (len(old_idx) + int(twins.sum())) / want
    counts = {"rows": n, "new": n_new, "watched": int(watched.sum()), "prompt_twins": int(twins.sum()),
              "baseline": int(base.sum()), "delta": int(delta.sum()), "carried_over": int(n - delta.sum())}
    return Plan("incremental", f"{n_new} new rows of {n}", new, delta, counts, lpos, hkeys, keys, okeys, weights,
                twin_free)


def weighted(delta_records: pd.DataFrame, p: Plan) -> pd.DataFrame:
    """The delta set's records (``p.delta``'s rows, in order) with each row's sample weight
    (:data:`~poisonguard.schema.SAMPLE_WEIGHT`) for the detectors, and the weight for those that
    do not see the prompt twins (:data:`~poisonguard.schema.TWIN_FREE_WEIGHT`, NaN on a twin; see
    :func:`poisonguard.detectors.base.without_twins`)."""
    if p.weights is None:
        return delta_records
    w = p.weights[p.delta]
    if len(w) != len(delta_records):
        raise ValueError(f"the delta set has {len(delta_records)} rows, the plan {len(w)}")
    cols = {S.SAMPLE_WEIGHT: w}
    if p.twin_free_weights is not None:
        cols[S.TWIN_FREE_WEIGHT] = p.twin_free_weights[p.delta]
    return delta_records.assign(**cols)


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` smallest values, ties to the earlier position: the first ``k`` of a
    stable argsort, as a set (a partition, not a sort of every value)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= len(values):
        return np.arange(len(values))
    kth = np.partition(values, k - 1)[k - 1]
    less = np.flatnonzero(values < kth)
    return np.concatenate([less, np.flatnonzero(values == kth)[:k - len(less)]])


RunFn = Callable[[pd.DataFrame], Any]  # records -> SanitizeResult


def sanitize_incremental(records: pd.DataFrame, cfg: SanitizeConfig, ledger_dir: Path, inc: IncrementalConfig,
                         run: RunFn):  # noqa: ANN201 - (SanitizeResult, info)
    """Run ``run`` (a full sanitizer) on the delta set and complete the decisions from the ledger.

    Returns the :class:`~poisonguard.sanitize.SanitizeResult` over *all* records (decisions for
    every row; detector results and findings from the delta run) and a JSON-able ``info``.
    The ledger is rewritten for tonight's rows only after the run succeeded (fail closed: a run
    that raises leaves yesterday's ledger untouched).
    """
    from poisonguard import lanes
    from poisonguard.sanitize import SanitizeResult, _align

    t0 = time.perf_counter()
    fp = fingerprint(cfg)
    ledger = Ledger.load(ledger_dir)
    p = plan(records, ledger, fp, inc)
    keys = p.prompt_keys if p.prompt_keys is not None else prompt_keys(records)
    log.info("sanitize mode: %s (%s) %s", p.mode, p.reason, p.counts)
    runs_since = 0 if p.mode == "full" else int(ledger.meta.get("runs_since_full", 0)) + 1

    def stage(dec: pd.DataFrame) -> int:
        return stage_ledger(ledger_dir, ledger_table(records[S.CONTENT_HASH], keys, dec, p.hash_keys, p.order_keys))

    if p.mode == "full":
        res = run(records)
        ids = pd.Index(records[S.ID], name=S.ID)
        rows = stage(res.decisions if res.decisions.index.equals(ids) else res.decisions.reindex(ids))
    else:
        part = run(weighted(records.loc[p.delta].reset_index(drop=True), p))
        data, dpos = decision_columns(string_array(records[S.ID]), part, ledger, p)
        # tonight's ledger is built and written beside the old one in a forked process (copy-on-
        # write; ~1 s at 1M rows) while this one builds the result; it replaces the old one only
        # when both succeeded (a failed write fails the run)
        writer = lanes.ForkedCall(lambda: stage(pd.DataFrame(data)), "writing the ledger") \
            if lanes.unavailable_reason() is None else None
        try:
            res = _result(records, part, data, dpos, SanitizeResult, _align)
        finally:
            rows = writer.result() if writer is not None else None
        if rows is None:
            rows = stage(pd.DataFrame(data))
    meta, info = run_record(rows, fp, p.mode, p.reason, runs_since, p.counts, t0)
    commit_ledger(ledger_dir, meta)
    return res, info


def run_record(table: pa.Table | int, fp: str, mode: str, reason: str, runs_since: int, counts: dict[str, int],
               t0: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ledger's meta, the run's JSON-able info) of tonight's run (``table``: the ledger table
    or its number of rows); :func:`write_ledger` writes the first with the table (a caller that
    writes its outputs first writes the ledger last)."""
    rows = table if isinstance(table, int) else int(table.num_rows)
    meta = {"fingerprint": fp, "runs_since_full": runs_since, "last_mode": mode, "last_reason": reason,
            "rows": rows, "written_at": pd.Timestamp.now(tz="UTC").isoformat()}
    info = {"mode": mode, "reason": reason, **counts, "seconds": round(time.perf_counter() - t0, 3),
            "fingerprint": fp}
    return meta, info


def ledger_table(hashes: Any, keys: np.ndarray, dec: pd.DataFrame, hash_keys: np.ndarray | None = None,
                 order_keys: np.ndarray | None = None) -> pa.Table:
    """Tonight's ledger from every row's content hash, prompt key (:func:`prompt_keys`) and
    decision (``dec``: the ledger's decision columns, rows in the same order); ``hash_keys`` /
    ``order_keys``: the hashes' :func:`content_keys` / :func:`_key64` when the caller has them (a
    plan's)."""
    return _ledger_table(string_array(hashes), keys, hash_keys, dec, order_keys)


def _ledger_table(hashes: pa.Array | pa.ChunkedArray, keys: np.ndarray, hkeys: np.ndarray | None,
                  dec: pd.DataFrame, okeys: np.ndarray | None = None) -> pa.Table:
    """One entry per content hash: the most severe decision among identical rows (the first such
    row), most severe first, then in row order. ``hashes``, ``keys``, ``dec``: in the records' order."""
    hkeys = content_keys(hashes) if hkeys is None else hkeys
    n = len(hashes)
    sev = _severity(dec[S.DECISION].to_numpy(dtype=object), -1).astype(np.int64)
    # rows most severe first, then in row order; then stably by hash
    by_sev = np.concatenate([np.flatnonzero(sev == v) for v in (2, 1, 0, -1)])
    order = by_sev[np.argsort(hkeys[by_sev], kind="stable")]
    k = hkeys[order]
    first = np.ones(n, dtype=bool)
    first[1:] = k[1:] != k[:-1]
    later = np.flatnonzero(~first)
    if len(later) and not pc.all(pc.equal(hashes.take(pa.array(order[later])),
                                          hashes.take(pa.array(order[later - 1])))).as_py():
        # two different content hashes share a 64-bit key: group on the strings themselves
        frame = pd.DataFrame({"h": hashes.to_numpy(zero_copy_only=False), "s": sev})
        rows = frame.sort_values("s", ascending=False, kind="stable").drop_duplicates("h").index.to_numpy()
        rows = rows.astype(np.int64)
    else:
        keep = np.zeros(n, dtype=bool)
        keep[order[first]] = True
        rows = by_sev[keep[by_sev]]
    take = pa.array(rows)
    cols = {S.CONTENT_HASH: hashes.take(take), "prompt_key": pa.array(keys[rows]), HASH_KEY: pa.array(hkeys[rows]),
            S.SCORE: pa.array(dec[S.SCORE].to_numpy(dtype=float)[rows])}
    cols[ORDER_KEY] = pa.array(_key64(cols[S.CONTENT_HASH]) if okeys is None else np.asarray(okeys, np.uint64)[rows])
    for c in (S.DECISION, S.DETECTORS, S.EVIDENCE, S.FINDING):
        cols[c] = string_array(dec[c]).take(take)
    return pa.table(cols)


def _result(records: pd.DataFrame, part: Any, data: dict[str, np.ndarray], dpos: np.ndarray, result_cls: Any,
            align: Any) -> Any:
    """All rows' decisions (:func:`decision_columns`' ``data``: the delta run's for new rows; for
    old rows the ledger's, replaced by the delta run's only when that is more severe and comes from
    a finding that new rows joined) as a result over all records, the delta run's detector results
    aligned to them (``dpos``: each record's row in the delta run, -1 when not in it)."""
    ids = pd.Index(records[S.ID], name=S.ID)
    decisions = pd.DataFrame({c: pd.Series(v, index=ids, dtype=object if c in (S.DETECTORS, S.EVIDENCE, S.FINDING)
                                            else None) for c, v in data.items()}, index=ids)
    # every detector result of the delta run is indexed by the delta's ids (the run checks it)
    obj_ids = pd.Index(ids.to_numpy(dtype=object), name=S.ID)
    results: dict[str, DetectorResult] = {k: align(r, obj_ids, dpos) for k, r in part.results.items()}
    return result_cls(records.reset_index(drop=True), decisions, results, list(part.findings),
                      dict(part.seconds), dict(part.llm_summary), part.hold_review)


def decision_columns(id_arr: pa.Array | pa.ChunkedArray, part: Any, ledger: Ledger, p: Plan
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every row's decision columns (decision, score, detectors, evidence, finding) after an
    incremental run, and each row's position in the delta run's result (-1: not in the delta).
    ``id_arr``: the ids of all rows, in the plan's order; ``part``: the delta run's result.

    Works on positions (the plan's ledger rows, the delta's rows in the run's result), not on
    string indexes: at 1M rows every string look-up costs about half a second."""
    n = len(id_arr)
    lpos = p.ledger_pos
    if lpos is None:
        raise ValueError("completing an incremental run needs an incremental plan (it carries each row's ledger row)")
    for k, r in part.results.items():
        if not r.scores.index.equals(part.decisions.index):
            raise ValueError(f"detector {k!r}: its rows differ from the delta run's decisions")
    # each record's row in the delta run's result (-1: not in the delta)
    delta_rows = np.flatnonzero(p.delta)
    dpos = np.full(n, -1, dtype=np.int64)
    part_ids = part.decisions.index
    if len(part_ids) == len(delta_rows) and (
            not len(delta_rows) or pc.all(pc.equal(string_array(part_ids), id_arr.take(pa.array(delta_rows)))).as_py()):
        dpos[delta_rows] = np.arange(len(delta_rows))
    else:  # a runner that returns its rows in another order
        dpos = part_ids.get_indexer(pd.Index(id_arr.to_numpy(zero_copy_only=False), dtype=object))
        missed = delta_rows[dpos[delta_rows] < 0]
        if len(missed):   # fail closed: a new row without tonight's decision would pass as kept
            raise ValueError(f"the delta run returned no decision for {len(missed)} of its rows, e.g. "
                             f"{id_arr.take(pa.array(missed[:3])).to_pylist()}")
    known, seen = lpos >= 0, dpos >= 0
    lrow, drow = np.maximum(lpos, 0), np.maximum(dpos, 0)

    def merged(col: str, fill: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        old = ledger.table[col].to_numpy(dtype=dtype)[lrow] if len(ledger.table) else np.full(n, fill, dtype=dtype)
        old[~known | pd.isna(old)] = fill
        tonight = part.decisions[col].to_numpy(dtype=dtype)[drow] if len(part_ids) else np.full(n, fill, dtype=dtype)
        return old, tonight

    old_dec, new_dec = merged(S.DECISION, S.KEEP, object)
    sev_old = _severity(old_dec, 3)              # a decision the ledger should not hold is never upgraded
    sev_new = np.where(seen, _severity(new_dec, -1), -1)
    # an old row is upgraded only by a finding that new rows joined (a cluster that grew); a
    # partial view flagging old rows on its own would ratchet up false positives night by night
    new_ids = set(id_arr.filter(pa.array(p.new)).to_pylist())
    grown: set[str] = set()
    for f in part.findings:
        if not new_ids.isdisjoint(f.ids):
            grown.update(f.ids)
    in_grown = (pc.is_in(id_arr, value_set=pa.array(sorted(grown), type=id_arr.type)).to_numpy(zero_copy_only=False)
                if grown else np.zeros(n, dtype=bool))
    take_new = seen & (p.new | ((sev_new > sev_old) & in_grown))
    data: dict[str, np.ndarray] = {}
    for col, fill, dtype in ((S.DECISION, S.KEEP, object), (S.SCORE, 0.0, float), (S.DETECTORS, "", object),
                             (S.EVIDENCE, "", object), (S.FINDING, "", object)):
        old, tonight = (old_dec, new_dec) if col == S.DECISION else merged(col, fill, dtype)
        data[col] = np.where(take_new, tonight, old)
    return data, dpos


# ---------------------------------------------------------------- nights over shard files

@dataclass
class ShardColumns:
    """What an incremental plan needs of every row of ingest's shard files, read without the texts
    (the prompt column is read a file at a time and kept only as its 64-bit key)."""

    files: list[Path]
    rows: list[int]                      # rows per file
    ids: pa.ChunkedArray
    hashes: pa.ChunkedArray | None       # content hashes (dropped once tonight's ledger is built)
    keys: np.ndarray                     # prompt keys (:func:`prompt_keys`)
    hash_keys: np.ndarray | None = None  # 64-bit keys of the content hashes (the plan's)

    @classmethod
    def read(cls, files: list[Path]) -> ShardColumns:
        ids, hashes, keys, rows = [], [], [], []
        for f in files:
            try:
                t = pq.read_table(f, columns=[S.ID, S.CONTENT_HASH, S.PROMPT])
            except (pa.ArrowException, OSError, KeyError) as e:
                raise ValueError(f"{f}: cannot read the id, content-hash and prompt columns: {e}") from e
            if pa.types.is_null(t.schema.field(S.PROMPT).type):     # a file of prompt-less rows
                t = t.set_column(t.schema.get_field_index(S.PROMPT), S.PROMPT, t[S.PROMPT].cast(pa.string()))
            keys.append(prompt_keys(t))
            ids += t[S.ID].chunks
            hashes += t[S.CONTENT_HASH].chunks
            rows.append(t.num_rows)
            del t

        def chunked(parts: list[Any]) -> pa.ChunkedArray:
            return pa.chunked_array(parts, parts[0].type if parts else pa.string())

        return cls(list(files), rows, chunked(ids), chunked(hashes),
                   np.concatenate(keys) if keys else np.zeros(0, np.uint64))

    def frame(self) -> pd.DataFrame:
        """The content hashes as the one-column frame :func:`plan` reads."""
        return pd.DataFrame({S.CONTENT_HASH: pd.arrays.ArrowExtensionArray(self.hashes)})

    def check(self, path: Path, at: int, ids: Any, hashes: Any) -> None:
        """Fail (naming the file) unless ``ids`` / ``hashes`` are the planned rows from ``at`` on."""
        k = len(ids)
        same = (at + k <= len(self.ids)
                and np.array_equal(content_keys(hashes), self.hash_keys[at:at + k])
                and pc.all(pc.equal(string_array(ids), self.ids.slice(at, k))).as_py() in (True, None))
        if not same:
            raise ValueError(f"{path}: its rows are not those tonight's run planned (did the file change?)")


def read_rows(cols: ShardColumns, mask: np.ndarray) -> pd.DataFrame:
    """The records of the shard files where ``mask`` holds (one entry per row, files in order),
    a file at a time, each checked against the plan: an incremental night loads its delta set only."""
    from poisonguard import io

    parts, off = [], 0
    for f, n in zip(cols.files, cols.rows):
        sel = mask[off:off + n]
        if sel.any():
            try:
                t = pq.read_table(f)
            except (pa.ArrowException, OSError) as e:
                raise io.InputFileError(f"{f}: cannot read Parquet: {e}") from e
            io.require_columns(f, t.column_names, S.RECORD_COLUMNS)
            if t.num_rows != n:
                raise ValueError(f"{f}: {t.num_rows} rows now, {n} when tonight's run was planned "
                                 "(did the file change?)")
            cols.check(f, off, t[S.ID], t[S.CONTENT_HASH])
            parts.append(t.filter(pa.array(sel)))
            del t
        off += n
    if not parts:
        return io.empty_records()
    return (pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]).to_pandas()


class CompletedNight:
    """An incremental night over shard files, as the streamed stage writes it (the interface of
    :class:`poisonguard.sharded.Streamed`): every row's decision (:func:`decision_columns`), the
    delta run's findings, and the detector counts and histograms of the delta run's results over
    all rows (rows outside the delta score 0, as an aligned result gives)."""

    def __init__(self, cols: ShardColumns, data: dict[str, np.ndarray], part: Any) -> None:
        from poisonguard import textfeat as tf
        from poisonguard.report import score_histogram

        self.cols, self.data = cols, data
        n = len(cols.ids)
        self.rows = n
        self.findings = list(part.findings)
        unseen = n - len(part.decisions)
        self.detectors: dict[str, dict[str, Any]] = {}
        self.histograms: dict[str, list[int]] = {}
        for name, r in part.results.items():
            self.detectors[name] = {"flagged": int(r.flagged.sum()), "review": int(r.review.sum()),
                                    "seconds": part.seconds.get(name), "findings": len(r.findings),
                                    "info": dict(r.info)}
            h = score_histogram(r.scores.to_numpy())
            h[0] += unseen
            self.histograms[name] = h.tolist()
        # the ids' stable hashes a chunk at a time (not every id as a Python string at once)
        keys = np.sort(np.concatenate([tf.stable_hash(c.to_numpy(zero_copy_only=False)) for c in cols.ids.chunks])
                       if cols.ids.num_chunks else np.zeros(0, np.uint64))
        if len(keys) > 1 and (keys[1:] == keys[:-1]).any():
            counts = pc.value_counts(cols.ids)
            rep = counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()
            if rep:
                raise ValueError(f"record ids must be unique; repeated: {rep[:3]}")
        self.keys = keys
        self.llm_summary = dict(part.llm_summary)

    def shards(self, batch_rows: int = 100_000) -> Any:
        """(records, decisions) of every shard file, ``batch_rows`` rows at a time; a file whose
        rows are no longer those planned (ids or contents) is named."""
        from poisonguard.sharded import record_batches

        off = 0
        for path, n in zip(self.cols.files, self.cols.rows):
            seen = 0
            for batch in record_batches(path, batch_rows):
                at = off + seen
                self.cols.check(path, at, batch.column(S.ID), batch.column(S.CONTENT_HASH))
                records = pa.Table.from_batches([batch]).to_pandas()
                k = len(records)
                dec = pd.DataFrame({c: v[at:at + k] for c, v in self.data.items()},
                                   index=pd.Index(records[S.ID], name=S.ID))
                seen += k
                yield records, dec
            if seen != n:
                raise ValueError(f"{path}: {seen} rows now, {n} when tonight's run was planned (did the file change?)")
            off += n
