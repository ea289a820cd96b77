"""Fusion of detector results into decisions, with fake detectors of known output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from poisonguard import schema as S
from poisonguard.config import SanitizeConfig
from poisonguard.detectors import registry
from poisonguard.detectors.base import Detector, DetectorResult, Finding
from poisonguard.sanitize import fuse, sanitize
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
