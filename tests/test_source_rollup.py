"""source_rollup: exact counts and Wilson intervals, a bad vendor stands out, validation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poisonguard import schema as S
from poisonguard.source_rollup import COLUMNS, rollup, wilson_interval


def _frames(spec: dict[str, tuple[int, int, int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """spec: source -> (rows, quarantined, review)."""
    ids, srcs, decs = [], [], []
    for src, (n, q, r) in spec.items():
        for i in range(n):
            ids.append(f"{src}-{i}")
            srcs.append(src)
            decs.append(S.QUARANTINE if i < q else S.REVIEW if i < q + r else S.KEEP)
    records = pd.DataFrame({S.ID: ids, S.SOURCE: srcs})
    decisions = pd.DataFrame({S.DECISION: decs}, index=pd.Index(ids, name=S.ID))
    return decisions, records


def test_wilson_interval_matches_the_formula():
    lo, hi = wilson_interval(0, 10)
    z = 1.959963984540054
    assert float(lo) == 0.0
    assert float(hi) == pytest.approx(z * z / (10 + z * z))            # k = 0: upper = z^2 / (n + z^2)
    lo, hi = wilson_interval(5, 10)
    half = z * math.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10)
    assert float(lo) == pytest.approx(0.5 - half) and float(hi) == pytest.approx(0.5 + half)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 500), st.integers(1, 500))
def test_wilson_interval_contains_the_rate(k, n):
    k = min(k, n)
    lo, hi = wilson_interval(k, n)
    assert 0 <= lo <= k / n <= hi <= 1


def test_exact_counts_and_a_bad_vendor_is_flagged():
    decisions, records = _frames({"inhouse": (400, 0, 1), "crawl": (300, 1, 0), "vendor": (100, 12, 3)})
    out = rollup(decisions, records)
    assert list(out.columns) == list(COLUMNS)
    assert out["source"].tolist()[0] == "vendor"
    v = out.set_index("source").loc["vendor"]
    assert (v["rows"], v["quarantined"], v["review"], v["suspicious"]) == (100, 12, 3, 15)
    assert v["rate"] == pytest.approx(0.15)
    assert v["baseline"] == pytest.approx(2 / 700)
    assert bool(v["flag"]) and v["p_value"] < 1e-9
    assert not out.set_index("source").loc[["inhouse", "crawl"], "flag"].any()


def test_proportional_noise_flags_nobody():
    decisions, records = _frames({"a": (1000, 1, 2), "b": (1000, 2, 1), "c": (500, 1, 1), "d": (800, 1, 2)})
    out = rollup(decisions, records)
    assert not out["flag"].any()


def test_single_source_has_no_baseline_and_is_not_flagged():
    decisions, records = _frames({"only": (50, 10, 0)})
    out = rollup(decisions, records)
    assert len(out) == 1 and not out["flag"].iloc[0] and np.isnan(out["baseline"].iloc[0])


def test_review_weight_and_min_suspicious():
    decisions, records = _frames({"a": (500, 0, 0), "b": (50, 0, 2)})
    assert not rollup(decisions, records)["flag"].any()                       # 2 < min_suspicious
    out = rollup(decisions, records, review_weight=0.0)
    assert out.set_index("source").loc["b", "rate"] == 0


def test_decisions_with_an_id_column_work_too():
    decisions, records = _frames({"a": (20, 0, 0), "b": (20, 5, 0)})
    out = rollup(decisions.reset_index(), records)
    assert out.set_index("source").loc["b", "quarantined"] == 5


def test_validation_names_the_problem():
    decisions, records = _frames({"a": (5, 0, 0)})
    with pytest.raises(ValueError, match="alpha"):
        rollup(decisions, records, alpha=2)
    with pytest.raises(ValueError, match="missing from records"):
        rollup(decisions, records.iloc[:2])
    with pytest.raises(ValueError, match="source"):
        rollup(decisions, records.drop(columns=[S.SOURCE]))
