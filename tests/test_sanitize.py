"""Fusion of detector results into decisions, with fake detectors of known output."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pandas as pd
import pytest

from poisonguard import schema as S
from poisonguard.config import SanitizeConfig
from poisonguard.detectors import registry
from poisonguard.detectors.base import Detector, DetectorResult, Finding
from poisonguard.sanitize import fuse, plan_lanes, sanitize
from tests.fixtures import records


class FlagIds(Detector):
    name = "flag_ids"
    description = "test: flags the ids it is given"

    def score_with(self, recs, stats):
        flag = recs[S.ID].isin(self.params.get("flag", [])).to_numpy()
        rev = recs[S.ID].isin(self.params.get("review", [])).to_numpy()
        ids = recs[S.ID].tolist()
        ev = ["planted" if f or r else "" for f, r in zip(flag, rev)]
        fl = [i for i, f in zip(ids, flag) if f]
        finds = [Finding(self.name, "phrase 'x'", "planted rows", tuple(fl), 0.9)] if fl else []
        return DetectorResult.build(self.name, ids, np.where(flag, 0.9, np.where(rev, 0.4, 0.0)), flag, ev, rev, finds)


class Boom(Detector):
    name = "boom"
    description = "test: always fails"

    def score_with(self, recs, stats):
        raise RuntimeError("detector exploded")


@pytest.fixture
def fake_registry(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, FlagIds.name, FlagIds)
    monkeypatch.setitem(registry._REGISTRY, Boom.name, Boom)


@pytest.fixture
def recs():
    return records([{"id": f"r{i}", "instruction": f"q{i}", "output": f"a{i}"} for i in range(6)])


def test_fuse_decisions_and_evidence(fake_registry, recs):
    cfg = SanitizeConfig(detectors={"flag_ids": {"flag": ["r1", "r2"], "review": ["r3"]}}, llm_review={"enabled": False})
    res = sanitize(recs, cfg)
    d = res.decisions[S.DECISION]
    assert d.to_dict() == {"r0": "keep", "r1": "quarantine", "r2": "quarantine", "r3": "review", "r4": "keep",
                           "r5": "keep"}
    assert res.decisions.at["r1", S.EVIDENCE] == "[flag_ids] planted"
    assert res.decisions.at["r1", S.FINDING] == "flag_ids: phrase 'x'"
    assert res.clean[S.ID].tolist() == ["r0", "r3", "r4", "r5"]        # review rows stay in clean by default
    assert res.quarantine[S.ID].tolist() == ["r1", "r2"]
    assert len(res.clean) + len(res.quarantine) == len(recs)


def test_hold_review_moves_review_rows_out(fake_registry, recs):
    cfg = SanitizeConfig(detectors={"flag_ids": {"flag": ["r1"], "review": ["r3"]}}, hold_review=True,
                         llm_review={"enabled": False})
    res = sanitize(recs, cfg)
    assert res.quarantine[S.ID].tolist() == ["r1", "r3"]
    assert res.quarantine[S.DECISION].tolist() == ["quarantine", "review"]


def test_min_detectors_two_turns_single_flag_into_review():
    ids = pd.Index(["a", "b"])
    a = DetectorResult.build("x", ids, [0.9, 0.9], [True, True], ["e", "e"])
    b = DetectorResult.build("y", ids, [0.9, 0.0], [True, False], ["e", ""])
    d = fuse(ids, {"x": a, "y": b}, min_detectors=2)
    assert d[S.DECISION].tolist() == ["quarantine", "review"]
    assert d[S.DETECTORS].tolist() == ["x,y", "x"]


def test_failing_detector_fails_the_stage(fake_registry, recs):
    cfg = SanitizeConfig(detectors={"flag_ids": {}, "boom": {}}, llm_review={"enabled": False})
    with pytest.raises(RuntimeError, match="detector exploded"):
        sanitize(recs, cfg)


def test_result_contract_is_enforced():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DetectorResult.build("x", ["a"], [1.5], [False])
    with pytest.raises(ValueError, match="without evidence"):
        DetectorResult.build("x", ["a"], [0.9], [True], [""])


def test_unknown_detector_in_config_is_named():
    with pytest.raises(ValueError, match="no_such"):
        SanitizeConfig(detectors={"no_such": {}})


# ---------------------------------------------------------------- concurrent detector lanes

class Slow(Detector):
    name = "slow"
    description = "test: takes a while, then keeps every row"
    shares = "lane-x"
    cost = 5.0

    def score_with(self, recs, stats):
        time.sleep(0.3)
        return DetectorResult.empty(self.name, recs[S.ID].tolist())


class Marker(Detector):
    name = "marker"
    description = "test: records that it ran (a line with its process id in the file ``log``)"
    shares = "lane-x"
    cost = 1.0

    def score_with(self, recs, stats):
        with open(self.params["log"], "a") as fh:   # a lane process's memory is its own: a file is shared
            fh.write(f"{os.getpid()}\n")
        return DetectorResult.empty(self.name, recs[S.ID].tolist())


class Dies(Detector):
    name = "dies"
    description = "test: its process dies without a word when it is not the test's process"

    def score_with(self, recs, stats):
        if os.getpid() != self.params["parent"]:
            os._exit(3)
        return DetectorResult.empty(self.name, recs[S.ID].tolist())


class Odd(Exception):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self) -> None:
        super().__init__("odd failure")
        self.lock = threading.Lock()


class RaisesOdd(Detector):
    name = "raises_odd"
    description = "test: fails with an exception that does not pickle"

    def score_with(self, recs, stats):
        raise Odd()


def _ran(log) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_plan_lanes_keeps_shared_detectors_together_and_balances_cost():
    names = ["duplicates", "unicode", "injection", "trigger_association", "response_cluster", "label_flip",
             "divergent_copies", "harmful_compliance", "semantic"]
    assert plan_lanes(names, 1) == [names]
    lanes = plan_lanes(names, 2)
    assert len(lanes) == 2 and sorted(sum(lanes, [])) == sorted(names)
    together = [lane for lane in lanes if "trigger_association" in lane][0]
    assert "response_cluster" in together and "label_flip" in together   # they share the token table
    assert "duplicates" not in together                        # the next costliest goes to the other lane
    for lane in lanes:                                         # configuration order inside a lane
        assert lane == sorted(lane, key=names.index)
    assert len(plan_lanes(names, 64)) == 7                     # one lane per group at most
    assert plan_lanes([], 2) == []


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_failing_lane_stops_the_others_and_fails_the_stage(monkeypatch, recs, tmp_path, mode):
    for cls in (Boom, Slow, Marker, FlagIds):
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
    monkeypatch.setattr(Boom, "cost", 10.0, raising=False)
    log = tmp_path / "ran"
    cfg = SanitizeConfig(detectors={"slow": {}, "marker": {"log": str(log)}, "boom": {}}, workers=2, lanes=mode,
                         llm_review={"enabled": False})
    assert plan_lanes(list(cfg.detectors), 2) == [["boom"], ["slow", "marker"]]
    with pytest.raises(RuntimeError, match="detector exploded"):
        sanitize(recs, cfg)
    assert _ran(log) == []                                     # the other lane did not start its next detector
    # the same lanes, the first one fine: the second lane runs (in its own process for "processes")
    monkeypatch.setattr(FlagIds, "cost", 10.0, raising=False)
    ok = SanitizeConfig(detectors={"flag_ids": {"flag": ["r1"]}, "slow": {}, "marker": {"log": str(log)}},
                        workers=2, lanes=mode, llm_review={"enabled": False})
    res = sanitize(recs, ok)
    assert list(res.results) == ["flag_ids", "slow", "marker"] and res.counts()["quarantine"] == 1
    assert len(_ran(log)) == 1 and (_ran(log)[0] != os.getpid()) == (mode == "processes")


def test_lane_process_failures_fail_the_stage(monkeypatch, recs):
    for cls in (Boom, FlagIds, Dies, RaisesOdd):
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
    monkeypatch.setattr(FlagIds, "cost", 10.0, raising=False)

    def run(name: str, **params) -> None:
        cfg = SanitizeConfig(detectors={"flag_ids": {}, name: params}, workers=2, lanes="processes",
                             llm_review={"enabled": False})
        assert plan_lanes(list(cfg.detectors), 2) == [["flag_ids"], [name]]
        sanitize(recs, cfg)

    # the child's exception, raised again in the parent with its type and message, traceback attached
    with pytest.raises(RuntimeError, match="detector exploded") as err:
        run("boom")
    assert any("lane process" in n and "'boom'" in n and "score_with" in n for n in err.value.__notes__)
    # one that cannot travel: its type and text do
    with pytest.raises(RuntimeError, match=r"detector 'raises_odd' failed in the detector lane process .*Odd: odd failure"):
        run("raises_odd")
    # a child that dies without a word (killed, out of memory)
    with pytest.raises(RuntimeError, match=r"running 'dies' .* ended without a result \(exit code 3"):
        run("dies", parent=os.getpid())


def test_lane_mode_falls_back_to_threads_only_when_allowed(monkeypatch):
    from poisonguard import lanes

    assert lanes.use_processes("auto", 2) == (lanes.unavailable_reason() is None)
    assert not lanes.use_processes("processes", 1)              # one lane: nothing to fork
    assert not lanes.use_processes("threads", 2)
    monkeypatch.setattr(lanes.sys, "platform", "darwin")
    assert "Linux" in lanes.unavailable_reason()
    assert not lanes.use_processes("auto", 2)
    with pytest.raises(RuntimeError, match="sanitize.lanes = processes, but .*darwin"):
        lanes.use_processes("processes", 2)
    with pytest.raises(ValueError, match="lanes"):
        SanitizeConfig(lanes="fibers")


def test_concurrent_lanes_give_the_sequential_result():
    from poisonguard import attacks, demo, io

    rows = demo.generate_corpus(3000, seed=11, source="vendor-a", id_prefix="c")
    rows, res = attacks.apply_attack(rows, "phrase", 12, seed=2)
    recs = io.records_from_rows(rows, source="vendor-a", collector="test")
    one = sanitize(recs, SanitizeConfig(workers=1, llm_review={"enabled": False}))
    two = sanitize(recs, SanitizeConfig(workers=2, lanes="processes", llm_review={"enabled": False}))
    threads = sanitize(recs, SanitizeConfig(workers=2, lanes="threads", llm_review={"enabled": False}))
    assert set(res.poisoned_ids) <= set(two.quarantine[S.ID])
    for other in (two, threads):
        assert list(other.results) == list(one.results)       # configuration order
        pd.testing.assert_frame_equal(one.decisions, other.decisions)
        assert [f.to_dict() for f in one.findings] == [f.to_dict() for f in other.findings]
        for name, r in one.results.items():                    # every field of every detector's result
            o = other.results[name]
            for k in ("scores", "flagged", "review", "evidence"):
                pd.testing.assert_series_equal(getattr(r, k), getattr(o, k))
            assert r.info == o.info
    # every detector's result reads one shared id index (each built its own: 1M strings apiece)
    for r in (one, two, threads):
        assert len({id(getattr(x, k).index) for x in r.results.values()
                    for k in ("scores", "flagged", "review", "evidence")}) == 1
    # the token table and features the detectors shared are released when they are done
    from poisonguard import textfeat
    from poisonguard.detectors import trigger_association

    assert not textfeat._TABLE_CACHE and not trigger_association._FEATURE_CACHE
