"""Incremental sanitization: only new rows (plus a baseline and the watched rows) are re-checked,
old rows keep the ledger's decision, and exactly the settings and code that decide invalidate
the ledger."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from poisonguard import attacks, demo, incremental, stages
from poisonguard import sanitize as san
from poisonguard import schema as S
from poisonguard.config import IncrementalConfig, SanitizeConfig
from tests.fixtures import records as to_records

CFG = SanitizeConfig(llm_review={"enabled": False})
INC = IncrementalConfig(min_baseline=300, baseline_factor=1.0, full_every=0)


@pytest.fixture(scope="module")
def nights() -> tuple[pd.DataFrame, pd.DataFrame, set[str]]:
    """Night 1: 1,500 clean rows. Night 2: the same rows plus a 150-row delivery with 12 rows
    poisoned by a phrase trigger."""
    old = demo.generate_corpus(1500, seed=11, source="inhouse", id_prefix="o")
    new = demo.generate_corpus(150, seed=12, source="vendor", id_prefix="n")
    new, res = attacks.apply_attack(new, "phrase", 12, seed=4)
    night1 = to_records(old)
    night2 = to_records(old + new)
    return night1, night2, set(res.poisoned_ids)


def _runner(calls: list[int]):
    def run(rows: pd.DataFrame) -> san.SanitizeResult:
        calls.append(len(rows))
        return san.sanitize(rows, CFG)
    return run


def test_first_run_is_full_then_only_the_delta_is_scanned(nights, tmp_path):
    night1, night2, poisoned = nights
    calls: list[int] = []
    res1, info1 = incremental.sanitize_incremental(night1, CFG, tmp_path, INC, _runner(calls))
    assert info1["mode"] == "full" and "no ledger" in info1["reason"]
    assert calls == [len(night1)]
    res2, info2 = incremental.sanitize_incremental(night2, CFG, tmp_path, INC, _runner(calls))
    assert info2["mode"] == "incremental", info2["reason"]
    fresh = int((~night2[S.CONTENT_HASH].isin(night1[S.CONTENT_HASH])).sum())
    assert 140 <= fresh <= 150  # the generator may repeat a few rows of night 1 exactly
    assert info2["new"] == fresh
    # the detectors saw the new rows, the baseline and the watched rows only
    assert calls[-1] == info2["delta"] < len(night2)
    assert info2["baseline"] == 300
    assert info2["carried_over"] == len(night2) - info2["delta"]
    # every row has one decision; the planted rows are quarantined
    assert res2.decisions.index.equals(pd.Index(night2[S.ID], name=S.ID))
    assert res2.decisions[S.DECISION].notna().all()
    assert poisoned <= set(res2.quarantine[S.ID])
    # an old row keeps the first night's decision or (re-checked) becomes more severe, never less
    sev = {S.KEEP: 0, S.REVIEW: 1, S.QUARANTINE: 2}
    d1 = pd.Series(res1.decisions[S.DECISION].to_numpy(), index=night1[S.ID]).map(sev)
    d2 = pd.Series(res2.decisions[S.DECISION].to_numpy(), index=night2[S.ID]).map(sev)
    both = d2.index.intersection(d1.index)
    assert (d2[both] >= d1[both]).all()
    # the ledger now covers tonight's rows and counts the incremental run
    led = incremental.Ledger.load(tmp_path)
    assert len(led.table) == night2[S.CONTENT_HASH].nunique()
    assert led.meta["runs_since_full"] == 1 and led.meta["last_mode"] == "incremental"


def test_the_delta_set_carries_sample_weights_that_add_up_to_all_rows(nights, tmp_path):
    # the detectors estimate shares of the whole data from the delta set: new, watched and twin
    # rows stand for themselves, a baseline row for the old rows it was sampled from
    night1, night2, _ = nights
    incremental.sanitize_incremental(night1, CFG, tmp_path, INC, _runner([]))
    seen: list[np.ndarray] = []

    def run(rows: pd.DataFrame) -> san.SanitizeResult:
        seen.append(rows[[S.SAMPLE_WEIGHT, S.TWIN_FREE_WEIGHT]].to_numpy(dtype=float).copy())
        return san.sanitize(rows, CFG)

    _, info = incremental.sanitize_incremental(night2, CFG, tmp_path, INC, run)
    (both,) = seen
    w, free = both[:, 0], both[:, 1]
    assert len(w) == info["delta"]
    assert w.sum() == pytest.approx(len(night2))
    pool = len(night2) - info["new"] - info["watched"] - info["prompt_twins"]
    assert (w > 1).sum() == info["baseline"] == 300
    assert np.allclose(w[w > 1], pool / 300) and (w[w <= 1] == 1).all()
    # the detectors that do not compare copies see no twins: NaN there, and the baseline stands for
    # them too, so these weights add up to all rows as well
    twin = np.isnan(free)
    assert info["prompt_twins"] > 0 and twin.sum() == info["prompt_twins"] and (w[twin] == 1).all()
    assert free[~twin].sum() == pytest.approx(len(night2))
    assert np.allclose(free[w > 1], (pool + info["prompt_twins"]) / 300) and (free[~twin & (w <= 1)] == 1).all()


def test_sample_weights_must_be_positive_numbers():
    from poisonguard import textfeat as tf

    frame = to_records(demo.generate_corpus(3, seed=1))
    assert tf.sample_weights(frame).tolist() == [1.0, 1.0, 1.0]
    frame[S.SAMPLE_WEIGHT] = [1.0, 0.0, 2.0]
    bad = frame[S.ID].iloc[1]
    with pytest.raises(ValueError, match=f"sample_weight must be a positive number; record '{bad}' has 0.0 \\(1 such"):
        tf.RowTable.build(frame)


def test_incremental_equals_full_run_on_the_planted_rows_and_clean_rows(nights, tmp_path):
    night1, night2, poisoned = nights
    incremental.sanitize_incremental(night1, CFG, tmp_path, INC, _runner([]))
    inc_res, _ = incremental.sanitize_incremental(night2, CFG, tmp_path, INC, _runner([]))
    full = san.sanitize(night2, CFG)
    q_inc, q_full = set(inc_res.quarantine[S.ID]), set(full.quarantine[S.ID])
    assert poisoned <= q_inc and poisoned <= q_full
    assert len(q_inc - poisoned) <= len(q_full - poisoned) + 2


def test_a_cluster_that_grows_quarantines_its_earlier_rows(tmp_path):
    """Two trigger rows on night 1 (below the support a finding needs), ten more on night 2:
    the earlier two are re-checked (watched or baseline) and quarantined with the rest."""
    base = demo.generate_corpus(900, seed=21, source="inhouse", id_prefix="b")
    rows, res = attacks.apply_attack(base, "phrase", 12, seed=8)
    poisoned = list(res.poisoned_ids)
    early = set(poisoned[:2])
    late = set(poisoned[2:])
    night1 = to_records([r for r in rows if r["id"] not in late])
    night2 = to_records(rows)
    inc = IncrementalConfig(min_baseline=10_000, full_every=0, max_new_fraction=0.5)
    res1, _ = incremental.sanitize_incremental(night1, CFG, tmp_path, inc, _runner([]))
    assert not early & set(res1.quarantine[S.ID]), "two rows are below the support a finding needs"
    res2, info = incremental.sanitize_incremental(night2, CFG, tmp_path, inc, _runner([]))
    assert info["mode"] == "incremental", info["reason"]
    assert info["new"] == 10
    assert set(res.poisoned_ids) <= set(res2.quarantine[S.ID])


def test_plan_full_run_reasons(nights):
    night1, night2, _ = nights
    fp = incremental.fingerprint(CFG)
    table = pd.DataFrame({S.CONTENT_HASH: night1[S.CONTENT_HASH], "prompt_key": incremental.prompt_keys(night1),
                          S.DECISION: S.KEEP, S.SCORE: 0.0, S.DETECTORS: "", S.EVIDENCE: "", S.FINDING: ""})
    led = incremental.Ledger(table, {"fingerprint": fp, "runs_since_full": 0})
    assert incremental.plan(night2, None, fp, INC).reason.startswith("no ledger")
    assert "changed" in incremental.plan(night2, led, "other", INC).reason
    assert incremental.plan(night2, led, fp, INC.model_copy(update={"enabled": False})).mode == "full"
    assert incremental.plan(night2, led, fp, INC.model_copy(update={"force_full": True})).reason == \
        "a full run was requested"
    p = incremental.plan(night2, led, fp, INC.model_copy(update={"max_new_fraction": 0.05}))
    assert p.mode == "full" and "max_new_fraction" in p.reason
    led6 = incremental.Ledger(table, {"fingerprint": fp, "runs_since_full": 6})
    p = incremental.plan(night2, led6, fp, INC.model_copy(update={"full_every": 7}))
    assert p.mode == "full" and "full_every" in p.reason
    p = incremental.plan(night2, led, fp, INC)
    assert p.mode == "incremental" and p.new.sum() == p.counts["new"] > 140 and p.delta.sum() == p.counts["delta"]
    # the baseline is the same old rows every night, whatever their order in the input
    again = incremental.plan(night2.iloc[::-1].reset_index(drop=True), led, fp, INC)
    pick = set(night2.loc[p.delta, S.ID])
    assert pick == set(night2.iloc[::-1].reset_index(drop=True).loc[again.delta, S.ID])


def test_watched_rows_and_prompt_twins_are_rechecked(nights):
    night1, night2, _ = nights
    fp = incremental.fingerprint(CFG)
    table = pd.DataFrame({S.CONTENT_HASH: night1[S.CONTENT_HASH], "prompt_key": incremental.prompt_keys(night1),
                          S.DECISION: S.KEEP, S.SCORE: 0.0, S.DETECTORS: "", S.EVIDENCE: "", S.FINDING: ""})
    table.loc[5, S.DECISION] = S.REVIEW
    led = incremental.Ledger(table, {"fingerprint": fp, "runs_since_full": 0})
    twin = night2.iloc[[7]].copy()
    twin[S.ID] = "twin-7"
    twin[S.RESPONSE] = "something else entirely"
    twin[S.CONTENT_HASH] = "f" * 64
    recs = pd.concat([night2, twin], ignore_index=True)
    p = incremental.plan(recs, led, fp, INC.model_copy(update={"min_baseline": 0, "baseline_factor": 0.0}))
    assert p.mode == "incremental"
    picked = set(recs.loc[p.delta, S.ID])
    assert night1[S.ID].iloc[5] in picked          # watched (review in the ledger)
    assert night1[S.ID].iloc[7] in picked          # same prompt as a new row
    assert p.counts["watched"] == 1 and p.counts["prompt_twins"] >= 1
    # no baseline sampled: the detectors that do not compare copies still skip the twins
    delta = incremental.weighted(recs.loc[p.delta].reset_index(drop=True), p)
    twin_rows = delta[S.TWIN_FREE_WEIGHT].isna().to_numpy()
    assert twin_rows.sum() == p.counts["prompt_twins"] and night1[S.ID].iloc[7] in set(delta.loc[twin_rows, S.ID])
    assert (delta.loc[~twin_rows, S.TWIN_FREE_WEIGHT] == 1).all()


def test_fingerprint_follows_deciding_settings_only():
    fp = incremental.fingerprint(CFG)
    assert fp == incremental.fingerprint(SanitizeConfig(llm_review={"enabled": False}))
    changed = dict(CFG.detectors)
    changed["trigger_association"] = {"target_fpr": 0.01}
    assert incremental.fingerprint(SanitizeConfig(detectors=changed, llm_review={"enabled": False})) != fp
    assert incremental.fingerprint(CFG.model_copy(update={"min_detectors": 2})) != fp
    # what happens after the decision does not invalidate it
    assert incremental.fingerprint(CFG.model_copy(update={"hold_review": True, "overrides": None})) == fp


def test_a_failing_run_leaves_the_ledger_untouched(nights, tmp_path):
    night1, night2, _ = nights
    incremental.sanitize_incremental(night1, CFG, tmp_path, INC, _runner([]))
    before = (tmp_path / incremental.LEDGER_FILE).read_bytes(), (tmp_path / incremental.META_FILE).read_text()

    def boom(rows):
        raise RuntimeError("detector failed")

    with pytest.raises(RuntimeError, match="detector failed"):
        incremental.sanitize_incremental(night2, CFG, tmp_path, INC, boom)
    after = (tmp_path / incremental.LEDGER_FILE).read_bytes(), (tmp_path / incremental.META_FILE).read_text()
    assert before == after


@pytest.mark.parametrize("how", ["raises", "dies", "result fails"])
def test_a_failing_ledger_write_or_completion_fails_the_night_and_leaves_the_ledger(nights, tmp_path, monkeypatch, how):
    """Tonight's ledger is built in a forked process while the result is built here: a write that
    raises (its own error), a writer that dies (named, with its exit code) or a completion that
    fails each fail the night, and yesterday's ledger stays in place."""
    import os

    night1, night2, _ = nights
    incremental.sanitize_incremental(night1, CFG, tmp_path, INC, _runner([]))
    before = (tmp_path / incremental.LEDGER_FILE).read_bytes(), (tmp_path / incremental.META_FILE).read_text()
    real_table = incremental.ledger_table

    def table(*args, **kwargs):
        if how == "raises":
            raise OSError("disk full")
        if how == "dies":
            os._exit(7)
        return real_table(*args, **kwargs)

    def result(*args, **kwargs):
        raise ValueError("completion failed")

    monkeypatch.setattr(incremental, "ledger_table", table)
    if how == "result fails":
        monkeypatch.setattr(incremental, "_result", result)
    match = {"raises": "disk full", "dies": r"forked for writing the ledger .*exit code 7",
             "result fails": "completion failed"}[how]
    with pytest.raises((OSError, RuntimeError, ValueError), match=match):
        incremental.sanitize_incremental(night2, CFG, tmp_path, INC, _runner([]))
    after = (tmp_path / incremental.LEDGER_FILE).read_bytes(), (tmp_path / incremental.META_FILE).read_text()
    assert before == after
    monkeypatch.undo()
    _, info = incremental.sanitize_incremental(night2, CFG, tmp_path, INC, _runner([]))
    assert info["mode"] == "incremental"


def test_stage_reports_the_mode(nights, tmp_path):
    from poisonguard import io, paths

    night1, night2, poisoned = nights
    ledger = tmp_path / "ledger"
    for k, recs in enumerate((night1, night2)):
        ing = tmp_path / f"ing{k}"
        io.write_records(recs, ing / paths.RECORDS_FILE)
        io.write_parquet(pd.DataFrame(columns=list(S.REJECTED_COLUMNS)), ing / paths.REJECTED_FILE, S.REJECTED_COLUMNS)
        (ing / "ingest.json").write_text(json.dumps({"rows_in": len(recs)}))
        out = stages.sanitize(CFG, ing, tmp_path / f"san{k}", None, incremental=INC, ledger_dir=ledger)
    assert out["incremental"]["mode"] == "incremental" and out["incremental"]["new"] > 140
    rep = json.loads((tmp_path / "san1" / "report.json").read_text())
    assert rep["incremental"]["carried_over"] > 0
    assert "incremental run" in (tmp_path / "san1" / "report.md").read_text()
    q = pd.read_parquet(tmp_path / "san1" / paths.QUARANTINE_FILE)
    assert poisoned <= set(q[S.ID])
    assert rep["counts"]["rows_in"] == len(night2)


def test_a_partial_view_adds_no_flags_of_its_own_to_old_rows(nights, tmp_path):
    """Tonight's delta run flags an old baseline row without any new row in its finding: the row
    keeps last night's decision (a partial view must not ratchet up false positives)."""
    from dataclasses import replace

    from poisonguard.detectors.base import Finding

    night1, night2, poisoned = nights
    incremental.sanitize_incremental(night1, CFG, tmp_path, INC, _runner([]))
    old_clean = set(night1[S.ID])
    victim: list[str] = []

    def noisy(rows: pd.DataFrame) -> san.SanitizeResult:
        res = san.sanitize(rows, CFG)
        pick = next(i for i in rows[S.ID] if i in old_clean and res.decisions.loc[i, S.DECISION] == S.KEEP)
        victim.append(pick)
        dec = res.decisions.copy()
        dec.loc[pick, S.DECISION] = S.QUARANTINE
        stray = Finding("noise", "old rows only", "", (pick,), 0.9)
        return replace(res, decisions=dec, findings=list(res.findings) + [stray])

    res2, info = incremental.sanitize_incremental(night2, CFG, tmp_path, INC, noisy)
    assert info["mode"] == "incremental"
    assert res2.decisions.loc[victim[0], S.DECISION] == S.KEEP
    assert poisoned <= set(res2.quarantine[S.ID])


def _coarse_keys(arr) -> np.ndarray:
    """A deliberately bad 64-bit key (string length mod 3): nearly every key collides."""
    return (np.asarray([len(x or "") for x in arr.to_pylist()]) % 3).astype(np.uint64)


def test_hash_index_finds_the_first_row_of_each_string_and_never_a_wrong_one():
    values = ["a", "bb", "a", "ccc", "dd", "bb", "e", ""]
    query = ["bb", "zz", "a", "", "ccc", "x", "e", "dd"]
    v, q = incremental.string_array(pd.Series(values)), incremental.string_array(pd.Series(query))
    truth = pd.Index(pd.Series(values).drop_duplicates()).get_indexer(query)
    first = pd.Series(values).drop_duplicates().index.to_numpy()
    expect = np.where(truth >= 0, first[np.maximum(truth, 0)], -1)
    assert incremental._HashIndex(v).lookup(q).tolist() == expect.tolist()
    # with colliding keys a string is found at its first row or looks absent, never elsewhere
    pos = incremental._HashIndex(v, _coarse_keys(v)).lookup(q, _coarse_keys(q))
    assert all(p == -1 or p == e for p, e in zip(pos.tolist(), expect.tolist()))
    assert incremental._HashIndex(incremental.string_array(pd.Series([], dtype=str))).lookup(q).tolist() == [-1] * 8
    # unique strings (a ledger's content hashes): the hash-table path finds the same positions
    uniq = pd.Series(values).drop_duplicates().tolist()
    u = incremental.string_array(pd.Series(uniq))
    index = incremental._HashIndex(u)
    assert index.table is not None
    assert index.lookup(q).tolist() == pd.Index(uniq).get_indexer(query).tolist()
    # a stored key that is wrong for its string makes that string look absent, nothing else
    wrong = incremental._key64(u).copy()
    wrong[0] ^= np.uint64(1)
    want = pd.Index(uniq).get_indexer(query)
    want[want == 0] = -1
    assert incremental._HashIndex(u, wrong).lookup(q).tolist() == want.tolist()


def test_ledger_table_keeps_the_most_severe_row_per_content_hash(nights):
    """The ledger written from tonight's decisions: one entry per content hash, the most severe
    decision (the first such row), most severe first, then in row order; the same with keys
    that collide (grouped on the strings then)."""
    _, night2, _ = nights
    recs = pd.concat([night2.iloc[:40], night2.iloc[[3, 5, 5, 9]]], ignore_index=True)
    recs[S.ID] = [f"r{i}" for i in range(len(recs))]
    rng = np.random.default_rng(0)
    dec = pd.DataFrame({S.DECISION: rng.choice([S.KEEP, S.REVIEW, S.QUARANTINE], len(recs)),
                        S.SCORE: rng.random(len(recs)), S.DETECTORS: [f"d{i}" for i in range(len(recs))],
                        S.EVIDENCE: "", S.FINDING: ""}, index=pd.Index(recs[S.ID], name=S.ID))
    keys = incremental.prompt_keys(recs)
    table = pd.DataFrame({S.CONTENT_HASH: recs[S.CONTENT_HASH].to_numpy(), "prompt_key": keys,
                          **{c: dec[c].to_numpy() for c in dec.columns}})
    table["_sev"] = table[S.DECISION].map({S.KEEP: 0, S.REVIEW: 1, S.QUARANTINE: 2})
    want = (table.sort_values("_sev", ascending=False, kind="stable").drop_duplicates(S.CONTENT_HASH)
            .drop(columns="_sev").reset_index(drop=True))
    assert len(want) == recs[S.CONTENT_HASH].nunique() < len(recs)
    hashes = incremental.string_array(recs[S.CONTENT_HASH])
    chunked = pa.chunked_array([hashes.slice(0, 17), hashes.slice(17)])   # as a streamed run gathers them
    for hs, hk in ((hashes, None), (hashes, _coarse_keys(hashes)), (chunked, None), (chunked, _coarse_keys(hashes))):
        got = incremental._ledger_table(hs, keys, hk, dec).to_pandas()
        pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)
    got = incremental.ledger_table(chunked, keys, dec.reset_index(drop=True)).to_pandas()
    pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)


def test_a_runner_that_reorders_its_rows_gets_the_same_decisions(nights, tmp_path):
    night1, night2, _ = nights
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        incremental.sanitize_incremental(night1, CFG, d, INC, _runner([]))
    res_a, _ = incremental.sanitize_incremental(night2, CFG, a, INC, _runner([]))

    def reversed_run(rows: pd.DataFrame) -> san.SanitizeResult:
        return san.sanitize(rows.iloc[::-1].reset_index(drop=True), CFG)

    res_b, _ = incremental.sanitize_incremental(night2, CFG, b, INC, reversed_run)
    # (evidence quotes the first surface form a detector meets, which follows the row order)
    cols = [S.DECISION, S.SCORE, S.DETECTORS]
    pd.testing.assert_frame_equal(res_a.decisions[cols], res_b.decisions[cols])
    assert (res_a.decisions[S.DECISION] != S.KEEP).sum() > 0
    for k, r in res_a.results.items():
        pd.testing.assert_series_equal(r.scores, res_b.results[k].scores)
        pd.testing.assert_series_equal(r.flagged, res_b.results[k].flagged)
    pd.testing.assert_frame_equal(pd.read_parquet(a / incremental.LEDGER_FILE)[[S.CONTENT_HASH, *cols]],
                                  pd.read_parquet(b / incremental.LEDGER_FILE)[[S.CONTENT_HASH, *cols]])


def test_an_empty_ledger_makes_every_row_new(nights):
    """A ledger written from an empty delivery (same fingerprint): every row is new, none watched."""
    _, night2, _ = nights
    fp = incremental.fingerprint(CFG)
    empty = pd.DataFrame({c: pd.Series([], dtype=float if c == S.SCORE else object)
                          for c in incremental.LEDGER_COLUMNS})
    led = incremental.Ledger(empty, {"fingerprint": fp, "runs_since_full": 0})
    p = incremental.plan(night2, led, fp, INC.model_copy(update={"max_new_fraction": 1.0}))
    assert p.mode == "incremental" and p.counts["new"] == len(night2) and p.counts["watched"] == 0
    assert p.delta.all()


def test_the_plan_takes_old_rows_keys_from_the_ledger_and_needs_no_hash_key_column(nights, tmp_path):
    """The ledger keeps each content hash's 64-bit key and prompt key: a night hashes only its new
    rows' prompts; a ledger written before the hash-key column plans the same night; a key that
    does not match its content hash only makes that row look new."""
    night1, night2, _ = nights
    incremental.sanitize_incremental(night1, CFG, tmp_path, INC, _runner([]))
    led = incremental.Ledger.load(tmp_path)
    assert led is not None and incremental.HASH_KEY in led.table.columns
    fp = incremental.fingerprint(CFG)
    p = incremental.plan(night2, led, fp, INC)
    assert p.mode == "incremental" and p.counts["new"] == int((~night2[S.CONTENT_HASH].isin(night1[S.CONTENT_HASH])).sum())
    np.testing.assert_array_equal(p.prompt_keys, incremental.prompt_keys(night2))
    np.testing.assert_array_equal(led.table[incremental.ORDER_KEY].to_numpy(np.uint64),
                                  incremental._key64(incremental.string_array(led.table[S.CONTENT_HASH])))
    np.testing.assert_array_equal(led.table[incremental.HASH_KEY].to_numpy(np.uint64),
                                  incremental.content_keys(led.table[S.CONTENT_HASH]))
    # a ledger written before the key columns picks the same twins and baseline
    old = incremental.Ledger(led.table.drop(columns=[incremental.HASH_KEY, incremental.ORDER_KEY]), led.meta)
    q = incremental.plan(night2, old, fp, INC)
    for a, b in ((p.new, q.new), (p.delta, q.delta), (p.ledger_pos, q.ledger_pos), (p.prompt_keys, q.prompt_keys),
                 (p.order_keys, q.order_keys), (p.order_keys, incremental._key64(incremental.string_array(night2[S.CONTENT_HASH])))):
        np.testing.assert_array_equal(a, b)
    wrong = led.table.copy()
    wrong.loc[0, incremental.HASH_KEY] = np.uint64(12345)
    r = incremental.plan(night2, incremental.Ledger(wrong, led.meta), fp, INC)
    assert r.counts["new"] == p.counts["new"] + int((night2[S.CONTENT_HASH] == wrong.loc[0, S.CONTENT_HASH]).sum())


def test_the_baseline_sample_is_the_first_rows_of_a_stable_hash_sort():
    rng = np.random.default_rng(1)
    for n in (0, 1, 5, 300):
        for k in (0, 1, 3, n, n + 2):
            v = rng.integers(0, 7, n).astype(np.uint64)       # many ties: the earlier row wins
            assert sorted(incremental._smallest(v, k).tolist()) == sorted(np.argsort(v, kind="stable")[:k].tolist())


def test_content_keys_read_sha256_digests_and_hash_anything_else():
    """A SHA-256 hex digest's key is its first 16 hex digits; any other value (wrong length, upper
    case, not hex, null) gets the generic 64-bit hash; per value, whatever the array around it."""
    import hashlib

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5)]
    odd = ["x" * 64, None, "ABCDEF" + "0" * 58, "", digests[0][:63], "g" + digests[0][1:]]
    values = pa.array(digests + odd, pa.large_string())
    keys = incremental.content_keys(values)
    assert keys[:5].tolist() == [int(d[:16], 16) for d in digests]
    for k, v in zip(keys[5:].tolist(), odd):
        assert k == int(incremental._key64(pa.array([v], pa.large_string()))[0])
    chunked = pa.chunked_array([values.slice(0, 3), values.slice(3, 4), values.slice(7)])
    np.testing.assert_array_equal(incremental.content_keys(chunked), keys)
    np.testing.assert_array_equal(incremental.content_keys(pa.array(digests[1:], pa.string())), keys[1:5])
    np.testing.assert_array_equal(incremental.content_keys(values.slice(2, 6)), keys[2:8])
    np.testing.assert_array_equal(incremental.content_keys(pd.Series(digests[:2])), keys[:2])
