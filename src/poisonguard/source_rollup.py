"""Per-source roll-up of sanitize decisions: which delivery (vendor, crawl, team) stands out.

Poison is a near-constant *count* (250 documents backdoor models of any size, Anthropic/UK AISI
2025), so per-row thresholds alone drown in false positives at realistic prevalence; suspicion
aggregated by provenance makes a bad source visible even when each row's evidence is weak
(FIELD.md §1, base-rate consequence). Not a detector: it reads the fused decisions.

For each source
---------------
``rows``, ``quarantined``, ``review``, ``suspicious`` (= quarantined + review), ``rate``
(= suspicious / rows), a Wilson score interval ``ci_low``..``ci_high`` for the rate (Wilson
1927; Brown, Cai & DasGupta 2001 recommend it over the Wald interval for small counts),
``baseline`` = the pooled rate of all *other* sources, ``p_value`` = one-sided binomial
probability of at least ``suspicious`` hits at the baseline rate, ``z`` = robust z of the
source's rate against the other sources' rates (median/MAD; with fewer than three other
sources the MAD is floored by the binomial standard error, so two sources still compare), and
``flag``: ``ci_low > baseline`` and ``p_value < alpha / n_sources`` (Bonferroni) and at least
``min_suspicious`` suspicious rows.

Known limitations
-----------------
* A source that *is* the whole corpus has no baseline: it is never flagged.
* Review rows count as suspicious with the same weight as quarantined ones (``review_weight``
  lowers that).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as st

from poisonguard import schema as S

COLUMNS = ("source", "rows", "quarantined", "review", "suspicious", "rate", "ci_low", "ci_high", "baseline",
           "p_value", "z", "flag")


def wilson_interval(k: np.ndarray | float, n: np.ndarray | float, confidence: float = 0.95
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for k successes in n trials (vectorised; n = 0 gives (0, 1))."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    z = st.norm.ppf(0.5 + confidence / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n > 0, k / n, 0.0)
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        lo = np.where((n > 0) & (k > 0), np.clip(centre - half, 0, 1), 0.0)
        hi = np.where((n > 0) & (k < n), np.clip(centre + half, 0, 1), 1.0)   # exact at k = 0 and k = n
    return lo, hi


def rollup(decisions: pd.DataFrame, records: pd.DataFrame, *, alpha: float = 0.01, min_suspicious: int = 3,
           review_weight: float = 1.0, confidence: float = 0.95) -> pd.DataFrame:
    """One row per source, most anomalous first (see module docstring).

    Parameters
    ----------
    decisions : DataFrame
        Output of :func:`poisonguard.sanitize.fuse`: indexed by record id (or with an ``id``
        column), with a ``decision`` column of keep / review / quarantine.
    records : DataFrame
        The records (``id``, ``source``).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    if not 0 <= review_weight <= 1:
        raise ValueError(f"review_weight must lie in [0, 1], got {review_weight!r}")
    if min_suspicious < 0:
        raise ValueError(f"min_suspicious must be >= 0, got {min_suspicious!r}")
    dec = decisions.reset_index() if S.ID not in decisions.columns else decisions
    missing = [c for c in (S.ID, S.DECISION) if c not in dec.columns]
    if missing:
        raise ValueError(f"decisions lack column(s) {missing}")
    if S.ID not in records.columns or S.SOURCE not in records.columns:
        raise ValueError("records need 'id' and 'source' columns")
    src = records.set_index(S.ID)[S.SOURCE].astype(str)
    d = dec[[S.ID, S.DECISION]].copy()
    unknown = ~d[S.ID].isin(src.index)
    if unknown.any():
        raise ValueError(f"decisions name ids missing from records: {d.loc[unknown, S.ID].iloc[:3].tolist()}")
    d[S.SOURCE] = src.loc[d[S.ID]].to_numpy()
    g = d.groupby(S.SOURCE, sort=True)[S.DECISION]
    out = pd.DataFrame({
        "rows": g.size(),
        "quarantined": g.apply(lambda s: int((s == S.QUARANTINE).sum())),
        "review": g.apply(lambda s: int((s == S.REVIEW).sum())),
    })
    return rollup_counts(out, alpha=alpha, min_suspicious=min_suspicious, review_weight=review_weight,
                         confidence=confidence)


def rollup_counts(counts: pd.DataFrame, *, alpha: float = 0.01, min_suspicious: int = 3,
                  review_weight: float = 1.0, confidence: float = 0.95) -> pd.DataFrame:
    """:func:`rollup` from the decision counts per source (index: source; columns ``rows``,
    ``quarantined``, ``review``): the counts add up over shards, so a streamed run rolls up
    without holding a row per record."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    if not 0 <= review_weight <= 1:
        raise ValueError(f"review_weight must lie in [0, 1], got {review_weight!r}")
    out = counts[["rows", "quarantined", "review"]].copy()
    out.index = out.index.astype(str).rename(S.SOURCE)
    out = out.sort_index()
    if out.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    out["suspicious"] = out["quarantined"] + out["review"]
    weighted = out["quarantined"] + review_weight * out["review"]
    n = out["rows"].to_numpy(float)
    k = weighted.to_numpy(float)
    out["rate"] = k / n
    lo, hi = wilson_interval(k, n, confidence)
    out["ci_low"], out["ci_high"] = lo, hi
    tot_k, tot_n = k.sum(), n.sum()
    other_n = tot_n - n
    with np.errstate(divide="ignore", invalid="ignore"):
        baseline = np.where(other_n > 0, (tot_k - k) / np.maximum(other_n, 1), np.nan)
    out["baseline"] = baseline
    # one-sided binomial tail P(X >= k | n, baseline); baseline 0 makes any hit significant
    pv = np.ones(len(out))
    for i in range(len(out)):
        if np.isnan(baseline[i]):
            continue
        b = max(baseline[i], 0.5 / max(other_n[i], 1))     # a zero baseline is only known to +-1/(2n)
        pv[i] = float(st.binom.sf(math.ceil(k[i]) - 1, int(n[i]), b)) if k[i] > 0 else 1.0
    out["p_value"] = pv
    rates = out["rate"].to_numpy()
    z = np.zeros(len(out))
    for i in range(len(out)):
        others = np.delete(rates, i)
        if others.size == 0:
            continue
        med = float(np.median(others))
        mad = float(np.median(np.abs(others - med))) * 1.4826
        se = math.sqrt(max(med, 0.5 / n[i]) * (1 - min(med, 0.5)) / n[i])
        z[i] = (rates[i] - med) / max(mad, se, 1e-12)
    out["z"] = z
    m = len(out)
    out["flag"] = (out["ci_low"] > np.nan_to_num(baseline, nan=1.0)) & (out["p_value"] < alpha / m) & \
        (out["suspicious"] >= min_suspicious)
    out = out.reset_index().rename(columns={S.SOURCE: "source"})
    out = out.sort_values(["flag", "z", "source"], ascending=[False, False, True], kind="stable")
    return out[list(COLUMNS)].reset_index(drop=True)
