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
  prompt (copies of one prompt whose responses disagree need both sides);
* a **baseline** of old rows (a fixed hash-ordered sample, ``baseline_factor`` x the new rows,
  at least ``min_baseline``): the global statistics the detectors calibrate against (task
  templates, n-gram rates, duplicate bands) are estimated on it.

Old rows outside the delta set keep their ledger decision; an old row inside it takes the more
severe of the ledger's and tonight's decision only when the finding that flags it tonight
includes new rows (a cluster that grew past its threshold quarantines its earlier rows too); a
partial view neither relaxes an old decision nor adds flags of its own to old rows, which would
ratchet up false positives night after night. Poison that
trickles in below the detection threshold across many nights is only seen whole by a full run:
a full run happens when there is no ledger, the fingerprint changed, the new rows exceed
``max_new_fraction`` of the data, or ``full_every`` incremental runs have passed since the last.
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

from poisonguard import schema as S
from poisonguard.config import IncrementalConfig, SanitizeConfig
from poisonguard.detectors.base import DetectorResult

log = logging.getLogger("poisonguard.incremental")

LEDGER_FILE = "ledger.parquet"
META_FILE = "ledger.json"
LEDGER_COLUMNS = (S.CONTENT_HASH, "prompt_key", S.DECISION, S.SCORE, S.DETECTORS, S.EVIDENCE, S.FINDING)
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


def prompt_keys(records: pd.DataFrame) -> np.ndarray:
    """Stable 64-bit hash of each row's lower-cased, whitespace-trimmed prompt (vectorised)."""
    norm = records[S.PROMPT].fillna("").astype(str).str.strip().str.lower()
    return pd.util.hash_array(norm.to_numpy(dtype=object), categorize=False).astype(np.uint64)


@dataclass
class Ledger:
    """What the last run decided, per content hash, and under which fingerprint."""

    table: pd.DataFrame                  # LEDGER_COLUMNS, unique content hashes
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, ledger_dir: Path) -> Ledger | None:
        ledger_dir = Path(ledger_dir)
        meta_p, tab_p = ledger_dir / META_FILE, ledger_dir / LEDGER_FILE
        if not (meta_p.is_file() and tab_p.is_file()):
            return None
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
        table = pd.read_parquet(tab_p)
        missing = [c for c in LEDGER_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{tab_p}: ledger is missing columns {missing}; delete the folder to start afresh")
        return cls(table, meta)

    def save(self, ledger_dir: Path) -> None:
        ledger_dir = Path(ledger_dir)
        ledger_dir.mkdir(parents=True, exist_ok=True)
        tmp = ledger_dir / (LEDGER_FILE + ".tmp")
        self.table.loc[:, list(LEDGER_COLUMNS)].to_parquet(tmp, index=False)
        tmp.replace(ledger_dir / LEDGER_FILE)  # atomic: a crash leaves the old ledger whole
        (ledger_dir / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n", encoding="utf-8")


@dataclass
class Plan:
    """Which rows tonight's run analyses, and why."""

    mode: str                            # "full" | "incremental"
    reason: str
    new: np.ndarray                      # bool per record
    delta: np.ndarray                    # bool per record: rows the detectors see
    counts: dict[str, int] = field(default_factory=dict)


def plan(records: pd.DataFrame, ledger: Ledger | None, fp: str, inc: IncrementalConfig,
         keys: np.ndarray | None = None) -> Plan:
    """Decide full vs incremental and pick the delta set (pure; see module docstring)."""
    n = len(records)
    hashes = records[S.CONTENT_HASH].to_numpy()
    everything = np.ones(n, dtype=bool)

    def full(reason: str) -> Plan:
        return Plan("full", reason, everything.copy(), everything.copy(), {"rows": n, "new": n, "delta": n})

    if not inc.enabled:
        return full("incremental runs are disabled")
    if inc.force_full:
        return full("a full run was requested")
    if ledger is None:
        return full("no ledger yet (first run)")
    if ledger.meta.get("fingerprint") != fp:
        return full("detector settings or code changed since the ledger was written")
    since = int(ledger.meta.get("runs_since_full", 0))
    if inc.full_every and since + 1 >= inc.full_every:
        return full(f"{since} incremental runs since the last full run (full_every: {inc.full_every})")
    tab = ledger.table.drop_duplicates(S.CONTENT_HASH)
    known = pd.Index(tab[S.CONTENT_HASH])
    is_old = known.get_indexer(hashes) >= 0
    new = ~is_old
    n_new = int(new.sum())
    if n and n_new / n > inc.max_new_fraction:
        return full(f"{n_new} of {n} rows are new (more than max_new_fraction {inc.max_new_fraction})")
    old_dec = pd.Series(tab[S.DECISION].to_numpy(), index=known)
    dec = old_dec.reindex(hashes).fillna(S.KEEP).to_numpy()
    watched = is_old & (dec != S.KEEP)
    if keys is None:
        keys = prompt_keys(records)
    twins = np.zeros(n, dtype=bool)
    if n_new:
        cand = np.flatnonzero(is_old & ~watched & np.isin(keys, keys[new]))
        # a few copies per prompt are enough to show disagreeing answers; the first by content hash
        frame = pd.DataFrame({"k": keys[cand], "h": pd.util.hash_array(hashes[cand].astype(object), categorize=False),
                              "i": cand}).sort_values(["k", "h"], kind="stable")
        twins[frame["i"].to_numpy()[frame.groupby("k", sort=False).cumcount().to_numpy() < inc.max_twins]] = True
    old_idx = np.flatnonzero(is_old & ~watched & ~twins)
    want = min(len(old_idx), max(int(np.ceil(inc.baseline_factor * n_new)), inc.min_baseline))
    # a fixed hash-ordered sample: the same old rows serve as the baseline night after night
    order = np.argsort(pd.util.hash_array(hashes[old_idx].astype(object), categorize=False), kind="stable")
    base = np.zeros(n, dtype=bool)
    base[old_idx[order[:want]]] = True
    delta = new | watched | twins | base
    counts = {"rows": n, "new": n_new, "watched": int(watched.sum()), "prompt_twins": int(twins.sum()),
              "baseline": int(base.sum()), "delta": int(delta.sum()), "carried_over": int(n - delta.sum())}
    return Plan("incremental", f"{n_new} new rows of {n}", new, delta, counts)


RunFn = Callable[[pd.DataFrame], Any]  # records -> SanitizeResult


def sanitize_incremental(records: pd.DataFrame, cfg: SanitizeConfig, ledger_dir: Path, inc: IncrementalConfig,
                         run: RunFn):  # noqa: ANN201 - (SanitizeResult, info)
    """Run ``run`` (a full sanitizer) on the delta set and complete the decisions from the ledger.

    Returns the :class:`~poisonguard.sanitize.SanitizeResult` over *all* records (decisions for
    every row; detector results and findings from the delta run) and a JSON-able ``info``.
    The ledger is rewritten for tonight's rows only after the run succeeded (fail closed: a run
    that raises leaves yesterday's ledger untouched).
    """
    from poisonguard.sanitize import SanitizeResult, _align

    t0 = time.perf_counter()
    fp = fingerprint(cfg)
    ledger = Ledger.load(ledger_dir)
    keys = prompt_keys(records)
    p = plan(records, ledger, fp, inc, keys)
    log.info("sanitize mode: %s (%s) %s", p.mode, p.reason, p.counts)
    if p.mode == "full":
        res = run(records)
        runs_since = 0
    else:
        sub = records.loc[p.delta].reset_index(drop=True)
        part = run(sub)
        res = _complete(records, part, ledger, p, SanitizeResult, _align)
        runs_since = int(ledger.meta.get("runs_since_full", 0)) + 1
    dec = res.decisions.reindex(records[S.ID])
    table = pd.DataFrame({S.CONTENT_HASH: records[S.CONTENT_HASH].to_numpy(), "prompt_key": keys,
                          **{c: dec[c].to_numpy() for c in (S.DECISION, S.SCORE, S.DETECTORS, S.EVIDENCE, S.FINDING)}})
    # one entry per content hash: the most severe decision among identical rows
    table["_sev"] = table[S.DECISION].map(_SEVERITY)
    table = (table.sort_values("_sev", ascending=False, kind="stable")
             .drop_duplicates(S.CONTENT_HASH).drop(columns="_sev").reset_index(drop=True))
    meta = {"fingerprint": fp, "runs_since_full": runs_since, "last_mode": p.mode, "last_reason": p.reason,
            "rows": int(len(table)), "written_at": pd.Timestamp.now(tz="UTC").isoformat()}
    Ledger(table, meta).save(ledger_dir)
    info = {"mode": p.mode, "reason": p.reason, **p.counts, "seconds": round(time.perf_counter() - t0, 3),
            "fingerprint": fp}
    return res, info


def _complete(records: pd.DataFrame, part: Any, ledger: Ledger, p: Plan, result_cls: Any, align: Any) -> Any:
    """All rows' decisions: the delta run's for new rows; for old rows the ledger's, replaced by the
    delta run's only when that is more severe and comes from a finding that new rows joined."""
    ids = pd.Index(records[S.ID], name=S.ID)
    tab = ledger.table.drop_duplicates(S.CONTENT_HASH).set_index(S.CONTENT_HASH)
    cols = [S.DECISION, S.SCORE, S.DETECTORS, S.EVIDENCE, S.FINDING]
    old = tab.reindex(records[S.CONTENT_HASH].to_numpy())[cols]
    old.index = ids
    old[S.DECISION] = old[S.DECISION].fillna(S.KEEP)
    old[S.SCORE] = old[S.SCORE].fillna(0.0).astype(float)
    for c in (S.DETECTORS, S.EVIDENCE, S.FINDING):
        old[c] = old[c].fillna("").astype(object)
    tonight = part.decisions[cols].reindex(ids)
    seen = tonight[S.DECISION].notna().to_numpy()
    sev_new = tonight[S.DECISION].map(_SEVERITY).fillna(-1).to_numpy()
    sev_old = old[S.DECISION].map(_SEVERITY).to_numpy()
    # an old row is upgraded only by a finding that new rows joined (a cluster that grew); a
    # partial view flagging old rows on its own would ratchet up false positives night by night
    new_ids = set(records.loc[p.new, S.ID])
    grown: set[str] = set()
    for f in part.findings:
        if not new_ids.isdisjoint(f.ids):
            grown.update(f.ids)
    in_grown = ids.isin(list(grown)) if grown else np.zeros(len(ids), dtype=bool)
    take_new = seen & (p.new | ((sev_new > sev_old) & in_grown))
    decisions = old.copy()
    decisions.loc[take_new, cols] = tonight.loc[take_new, cols].to_numpy()
    decisions[S.SCORE] = decisions[S.SCORE].astype(float)
    # every detector result of the delta run is indexed by the delta's ids (the run checks it):
    # look the positions up once
    obj_ids = pd.Index(ids.to_numpy(dtype=object), name=S.ID)
    pos = part.decisions.index.get_indexer(obj_ids)
    for k, r in part.results.items():
        if not r.scores.index.equals(part.decisions.index):
            raise ValueError(f"detector {k!r}: its rows differ from the delta run's decisions")
    results: dict[str, DetectorResult] = {k: align(r, obj_ids, pos) for k, r in part.results.items()}
    return result_cls(records.reset_index(drop=True), decisions, results, list(part.findings),
                      dict(part.seconds), dict(part.llm_summary), part.hold_review)
