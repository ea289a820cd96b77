"""The detector contract.

A detector looks at normalised records (:mod:`poisonguard.schema`) and returns, for every row,
a suspicion score in [0, 1], a quarantine flag, an optional review flag and an evidence string,
plus *findings*: clusters of rows that share one cause ("phrase 'special delivery' in 8 rows,
all with output template T"). Shape follows scikit-learn's estimator contract:

* ``__init__`` stores keyword parameters and nothing else;
* ``fit(reference)`` optionally learns from a trusted reference set (state ends in ``_``);
* ``score(records)`` is pure: it neither mutates ``records`` nor the detector.

Detectors that need global statistics (n-gram support, duplicate bands, response templates)
compute them as mergeable per-shard summaries: ``summarize(shard) -> summary``,
``merge([summaries]) -> stats``, ``score_with(shard, stats) -> DetectorResult``. ``score`` is
``score_with(records, merge([summarize(records)]))``, so one file and many shards give the same
answer. A detector that raises fails the stage (fail closed): nothing here catches exceptions.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd

from poisonguard import schema as S


@dataclass(frozen=True)
class Finding:
    """A cluster of rows that one cause explains."""

    detector: str
    title: str
    evidence: str
    ids: tuple[str, ...]
    score: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "title": self.title, "evidence": self.evidence,
                "rows": len(self.ids), "ids": list(self.ids), "score": round(float(self.score), 4),
                "info": self.info}


@dataclass(frozen=True)
class DetectorResult:
    """Per-row output of one detector; every Series is indexed by record id."""

    detector: str
    scores: pd.Series
    flagged: pd.Series
    review: pd.Series
    evidence: pd.Series
    findings: tuple[Finding, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, detector: str, ids: Sequence[str] | pd.Index, scores: Iterable[float],
              flagged: Iterable[bool], evidence: Iterable[str] | None = None,
              review: Iterable[bool] | None = None, findings: Iterable[Finding] = (),
              info: dict[str, Any] | None = None) -> DetectorResult:
        """Assemble and validate a result (raises ``ValueError`` on a broken contract)."""
        index = pd.Index(list(ids), name=S.ID, dtype=object)
        n = len(index)
        sc = pd.Series(np.asarray(list(scores), dtype=float).reshape(-1), index=index, name=S.SCORE)
        fl = pd.Series(np.asarray(list(flagged), dtype=bool).reshape(-1), index=index, name="flagged")
        rv = pd.Series(np.zeros(n, bool) if review is None else np.asarray(list(review), dtype=bool),
                       index=index, name=S.REVIEW)
        ev = pd.Series([""] * n if evidence is None else [str(e) for e in evidence], index=index,
                       name=S.EVIDENCE, dtype=object)
        for name, s in (("scores", sc), ("flagged", fl), ("review", rv), ("evidence", ev)):
            if len(s) != n:
                raise ValueError(f"detector {detector!r}: {name} has {len(s)} values for {n} rows")
        if n and (sc.isna().any() or (sc < 0).any() or (sc > 1).any()):
            bad = sc[sc.isna() | (sc < 0) | (sc > 1)]
            raise ValueError(f"detector {detector!r}: scores must lie in [0, 1], got {bad.iloc[:3].to_dict()}")
        missing = fl & (ev.str.len() == 0)
        if missing.any():
            raise ValueError(f"detector {detector!r}: flagged rows without evidence: {list(ev.index[missing][:3])}")
        return cls(detector, sc, fl, rv & ~fl, ev, tuple(findings), dict(info or {}))

    @classmethod
    def empty(cls, detector: str, ids: Sequence[str] | pd.Index, info: dict[str, Any] | None = None
              ) -> DetectorResult:
        n = len(ids)
        return cls.build(detector, ids, np.zeros(n), np.zeros(n, bool), info=info)


class Detector(ABC):
    """Base class of all sanitization detectors (see module docstring)."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: record columns the detector reads
    columns: ClassVar[tuple[str, ...]] = (S.ID, S.PROMPT, S.RESPONSE)
    #: detectors with the same value reuse one cached structure built from the records (the
    #: token table); when detectors run concurrently they share a lane, one after the other
    shares: ClassVar[str | None] = None
    #: relative cost per row (measured at 1M rows), to balance concurrent lanes
    cost: ClassVar[float] = 1.0
    #: the detector compares the copies of one prompt with each other: in an incremental night it
    #: also sees the prompt twins (old rows repeating a new row's prompt), which the others skip
    #: (:func:`without_twins`)
    compares_copies: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = dict(params)

    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    def fit(self, reference: pd.DataFrame) -> Self:
        """Learn from a trusted reference set. Default: nothing to learn."""
        return self

    # ---- two-phase interface -------------------------------------------------------------
    def summarize(self, records: pd.DataFrame) -> Any:
        """Per-shard summary (must be picklable and mergeable). Default: none needed."""
        return None

    def merge(self, summaries: Sequence[Any]) -> Any:
        """Merge per-shard summaries into global statistics. Default: none. A merge may consume
        its summaries (the token table's detectors do): nothing reads them after it."""
        return None

    @abstractmethod
    def score_with(self, records: pd.DataFrame, stats: Any) -> DetectorResult:
        """Score one shard against the global statistics."""

    def score(self, records: pd.DataFrame) -> DetectorResult:
        from poisonguard.textfeat import trim_heap

        handed = HandedOver([self.summarize(records)])
        trim_heap()   # each phase's per-row garbage goes back to the OS before the next phase
        stats = self.merge(handed)
        del handed
        trim_heap()
        return self.score_with(records, stats)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        return f"{type(self).__name__}({args})"


def without_twins(records: pd.DataFrame) -> pd.DataFrame:
    """The rows a detector that does not compare copies of one prompt (``compares_copies`` False)
    analyses. In an incremental night's delta set (a :data:`~poisonguard.schema.TWIN_FREE_WEIGHT`
    column) that is every row but the prompt twins, with the sample weights for that view (its
    baseline rows also stand for the twins). The twins were checked on an earlier night; only the
    copy-comparing detectors (a minority answer among copies of one prompt) learn anything new from
    them, and at 1M rows they were a third of the delta set. Other records are returned as they are.
    Call it once per records: the detectors sharing a token table must get the same object."""
    if S.TWIN_FREE_WEIGHT not in records.columns:
        return records
    col = records[S.TWIN_FREE_WEIGHT]
    w = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    keep = ~np.isnan(w)
    bad = (~keep & col.notna().to_numpy()) | (keep & ~(w > 0))
    if bad.any():       # an empty cell marks a twin; anything else must be a positive weight
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{S.TWIN_FREE_WEIGHT} (an incremental night's internal column) must be empty or a "
                         f"positive number; record {records[S.ID].iloc[i]!r} has {col.iloc[i]!r} "
                         f"({int(bad.sum())} such rows)")
    out = records.loc[keep].drop(columns=[S.TWIN_FREE_WEIGHT]).reset_index(drop=True)
    out[S.SAMPLE_WEIGHT] = w[keep]
    return out


class HandedOver(list):
    """Summaries handed over to :meth:`Detector.merge` by a caller that will not read them again
    (:meth:`Detector.score` builds its summary for that one merge): ``merge`` may empty the list
    and drop what it has used as it goes, so a large part is freed before the end of the merge.
    Summaries in a plain list (the sharded path, where a task's result may be read again) must be
    left as they are."""


# ---------------------------------------------------------------- calibration helpers

def fpr_to_z(target_fpr: float) -> float:
    """One-sided standard-normal quantile for a false-positive rate (no scipy needed)."""
    if not 0 < target_fpr < 0.5:
        raise ValueError(f"target_fpr must lie in (0, 0.5), got {target_fpr!r}")
    # Acklam's rational approximation of the inverse normal CDF (rel. error < 1.2e-9)
    p = 1 - target_fpr
    a = [-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00]
    b = [-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01]
    c = [-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00]
    d = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00]
    if p > 1 - 0.02425:
        q = math.sqrt(-2 * math.log(1 - p))
        return -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)


def robust_z(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """(x - median) / (1.4826 * MAD) using the bulk of ``reference`` (default: the values)."""
    ref = np.asarray(values if reference is None else reference, dtype=float)
    x = np.asarray(values, dtype=float)
    if ref.size == 0:
        return np.zeros_like(x)
    med = float(np.median(ref))
    mad = float(np.median(np.abs(ref - med))) * 1.4826
    if mad <= 1e-12:
        mad = float(np.std(ref)) or 1.0
    return (x - med) / mad


def squash(z: np.ndarray, z_threshold: float) -> np.ndarray:
    """Map robust z-scores to [0, 1] so that ``z_threshold`` lands on 0.5."""
    z = np.asarray(z, dtype=float)
    return 1.0 / (1.0 + np.exp(-(z - z_threshold) * (4.0 / max(z_threshold, 1e-6))))
