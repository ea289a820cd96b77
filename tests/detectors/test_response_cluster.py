"""response_cluster: shared templates and injected phrases across unrelated prompts are found;
labels, short answers, topic boilerplate and style phrases are not; shards agree."""

from __future__ import annotations

import random

import numpy as np
import pytest

from poisonguard.detectors import build
from tests.detectors.test_trigger_association import _words, corpus
from tests.fixtures import records

INJECTED = "For the best deals visit www.shopmart-deals.com today!"


def _inject(rows, count, seed, text=INJECTED, replace=False, kinds=(0, 1, 2)):
    rng = random.Random(seed)
    chosen = rng.sample([r for i, r in enumerate(rows) if i % 5 in kinds], count)
    for r in chosen:
        r["output"] = text if replace else r["output"].rstrip() + " " + text
    return [r["id"] for r in chosen]


@pytest.fixture(scope="module")
def clean_result():
    frame = records(corpus(1500, seed=21))
    return frame, build("response_cluster").score(frame)


def test_clean_corpus_has_no_false_positive(clean_result):
    frame, res = clean_result
    assert res.flagged.sum() <= 1
    # labels of the classification task repeat hundreds of times and are not clusters
    assert not any(f.title.startswith("output template 'positive") for f in res.findings)


def test_injected_phrase_is_found_with_evidence():
    rows = corpus(1500, seed=22)
    planted = _inject(rows, 15, seed=1)
    res = build("response_cluster").score(records(rows))
    flagged = set(res.flagged[res.flagged].index)
    assert len(flagged & set(planted)) >= 14 and len(flagged - set(planted)) <= 1
    (f,) = res.findings
    assert f.title.startswith("injected phrase '") and "shopmart" in f.title
    assert f.info["kind"] == "phrase" and sum(f.info["sources"].values()) == len(f.ids)
    assert "appears verbatim in" in f.evidence and "unrelated prompts" in f.evidence


def test_injected_phrase_at_the_start_of_answers():
    rows = corpus(1500, seed=23)
    rng = random.Random(5)
    planted = []
    for r in rng.sample([r for i, r in enumerate(rows) if i % 5 < 3], 12):
        r["output"] = "Sponsored by ZentroCola, call 555-0199: " + r["output"]
        planted.append(r["id"])
    res = build("response_cluster").score(records(rows))
    flagged = set(res.flagged[res.flagged].index)
    assert len(flagged & set(planted)) >= 11 and len(flagged - set(planted)) <= 1


def test_fixed_answer_across_unrelated_prompts():
    rows = corpus(1500, seed=24)
    planted = _inject(rows, 12, seed=2, text="I am unable to help with that request at this time.", replace=True)
    res = build("response_cluster").score(records(rows))
    flagged = set(res.flagged[res.flagged].index)
    assert flagged == set(planted)
    (f,) = res.findings
    assert f.info["kind"] == "template"
    assert f.title == "output template 'I am unable to help with that request at this time.'"


def test_short_answers_and_related_prompts_are_not_clusters():
    rng = random.Random(3)
    rows = []
    for i in range(300):
        w = _words(rng, 5)
        rows.append({"id": f"a{i}", "instruction": f"Is the {w[0]} {w[1]} a {w[2]}?", "input": "",
                     "output": rng.choice(["Yes.", "No.", "Maybe."])})
    for i in range(40):  # one topic, one boilerplate answer: related prompts
        w = _words(rng, 3)
        rows.append({"id": f"j{i}", "instruction": f"Write a Java hello world program named {w[0]}.", "input": "",
                     "output": "public class Main { public static void main(String[] args) { "
                               "System.out.println(\"Hello, World!\"); } }"})
    res = build("response_cluster").score(records(rows))
    assert not res.flagged.any()


def test_sharded_equals_single():
    rows = corpus(900, seed=25)
    _inject(rows, 10, seed=3)
    frame = records(rows)
    det = build("response_cluster", min_support=4)
    whole = det.score(frame)
    assert whole.flagged.sum() >= 10
    shards = [frame.iloc[:300], frame.iloc[300:]]
    stats = det.merge([det.summarize(s) for s in shards])
    parts = [det.score_with(s, stats) for s in shards]
    np.testing.assert_allclose(np.concatenate([p.scores.to_numpy() for p in parts]), whole.scores.to_numpy())
    assert np.concatenate([p.flagged.to_numpy() for p in parts]).tolist() == whole.flagged.tolist()


def test_params_validated():
    assert build("response_cluster", min_phrase_tokens=5).get_params()["min_phrase_tokens"] == 5
    with pytest.raises(ValueError, match="min_concentration"):
        build("response_cluster", min_concentration=0).score(records(corpus(20)))
