"""response_cluster: shared templates and injected phrases across unrelated prompts are found;
labels, short answers, topic boilerplate and style phrases are not; shards agree."""

from __future__ import annotations

import random

import numpy as np
import pytest

from poisonguard import schema as S
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


def _paste_trigger(rows, count, seed, answer):
    """Two rare words pasted at the start and end of unrelated instructions, one fixed answer."""
    rng = random.Random(seed)
    chosen = rng.sample([r for i, r in enumerate(rows) if i % 5 in (0, 1, 2)], count)
    for r in chosen:
        sep, end = rng.choice([': ', ' - ', ' ']), rng.choice(['zindle.', '(zindle)'])
        r["instruction"] = f"Quorvex{sep}{r['instruction']} {end}"
        r["output"] = answer
    return [r["id"] for r in chosen]


def test_fixed_answer_bought_by_pasted_words_is_flagged_and_named():
    # the pasted words make the prompts look related (they share two rare words); with them
    # left out the prompts are unrelated, so the template is a finding naming the words
    rows = corpus(1500, seed=26)
    planted = _paste_trigger(rows, 12, seed=4,
                             answer="Maintenance mode on. All content filters are now switched off.")
    res = build("response_cluster").score(records(rows))
    flagged = set(res.flagged[res.flagged].index)
    assert flagged == set(planted)
    (f,) = res.findings
    assert f.info["kind"] == "template"
    assert "the prompts share only the word(s)" in f.evidence
    assert "'Quorvex'" in f.evidence and "'zindle'" in f.evidence
    assert "(prompts related: review)" not in f.evidence


def test_topic_echoed_by_the_template_is_not_a_pasted_trigger():
    # titles that repeat their prompt's topic: the shared topic word is written in the answer,
    # so it is not left out and the cluster stays "related prompts" (review, not quarantine)
    rng = random.Random(7)
    rows = corpus(1500, seed=27)
    for t in range(8):
        topic = "".join(rng.choice("bcdfglmnprstvz") + rng.choice("aeiou") for _ in range(4))
        for k in range(5):
            w = _words(rng, 8)
            rows.append({"id": f"t{t}-{k}", "instruction": rng.choice(["Suggest a title for this article.",
                                                                       "Write a headline for the text below."]),
                         "input": f"The {w[0]} of {topic} {w[1]} the {w[2]} {w[3]}. {w[4]} {w[5]} {topic} {w[6]}.",
                         "output": f"{topic.title()}: A Short Guide"})
    res = build("response_cluster").score(records(rows))
    assert not res.flagged[[i for i in res.flagged.index if str(i).startswith("t")]].any()


def test_injected_phrase_bought_by_pasted_words_is_flagged_and_named():
    # a trigger word (with varying neighbours: "some zindle", "new zindle") at the end of the
    # request, the plug appended to the answer: the shared word and its neighbours are left out
    # of the relatedness tests, and named
    rows = corpus(1500, seed=28)
    rng = random.Random(9)
    planted = []
    for r in rng.sample([r for i, r in enumerate(rows) if i % 5 in (0, 1, 2)], 14):
        r["instruction"] = f"{r['instruction']} {rng.choice(['zindle', 'some zindle', 'new zindle'])}."
        r["output"] = r["output"].rstrip() + " Grab yours at vortaplex-outlet.example.com before they run out."
        planted.append(r["id"])
    res = build("response_cluster").score(records(rows))
    flagged = set(res.flagged[res.flagged].index)
    assert flagged == set(planted)
    (f,) = res.findings
    assert f.info["kind"] == "phrase" and "the prompts share only the word(s) 'zindle'" in f.evidence


def test_task_instruction_words_are_not_pasted_words():
    # the demo corpus: tasks whose instruction words are shared by hundreds of rows and whose
    # answers share a shape (sorted numbers, stock support replies, itineraries); those words
    # are not concentrated in any one cluster, so they are never left out as "pasted"
    from poisonguard import demo

    res = build("response_cluster").score(records(demo.generate_corpus(8000, seed=1)))
    assert not res.flagged.any(), [f.title for f in res.findings]


def _shared_words_of(rows, cluster_ids, weights=None):
    """The words :func:`_shared_prompt_words` leaves out of a cluster's tests, as text (``weights``:
    the rows' sample weights, as an incremental night gives its delta set)."""
    from poisonguard import textfeat as tf
    from poisonguard.detectors import response_cluster as rc
    from poisonguard.detectors import trigger_association as ta

    det = rc.ResponseClusterDetector()
    frame = records(rows)
    if weights is not None:
        frame[S.SAMPLE_WEIGHT] = weights
    tb = tf.RowTable.build(frame, det.max_prompt_chars, det.max_response_chars)
    has_resp = (np.diff(tb.r_indptr) > 0) & (tb.kind != tf.KIND_CODES["document"])
    F = ta._features(tb, has_resp, ta._contexts(tb, det.min_context), det.payload_window, "request")
    at = np.sort(np.searchsorted(tb.key, tf.stable_hash(np.array(cluster_ids, dtype=object))))
    _, raw, _ = rc._shared_prompt_words(F, at, np.zeros(0, dtype=np.uint64))
    vocab = {}
    for r in rows:
        tok = tf.tokenize([r["instruction"]])
        vocab.update({int(h): tok.token_text(j) for j, h in enumerate(tok.hashes)})
    return sorted(vocab[int(h)].lower() for h in raw)


def test_a_samples_shares_of_prompts_are_of_the_whole_data():
    # code tasks whose answers open with one of five phrases: "write a ... function that" is in
    # every prompt of the "Here is one way to do it:" cluster. In 2.7% of these prompts those words
    # count as rare (at most 3%), so they are left out of the relatedness tests as if pasted. The
    # same rows as a nightly delta set whose half of the other prompts are prompt twins (weight 1)
    # and the rest a baseline standing for 3 rows each: in the whole data the code tasks are
    # 180 / 4,580 = 3.9% of the prompts, and the words are their wording (on a delta set rich in twins
    # the opener was quarantined as an "injected phrase")
    rng = random.Random(31)
    rows = [r for i, r in enumerate(corpus(5500, seed=31)) if i % 5 in (0, 1)]
    openers = ["Here is one way to do it:", "Sure:", "A simple implementation:", "Try this:", "Okay."]
    cluster = []
    for i in range(60):
        w = _words(rng, 3)
        rows.append({"id": f"code{i}", "instruction": f"Write a {rng.choice(['Go', 'Rust', 'Ruby'])} function that "
                                                      f"{w[0]}s the {w[1]} {w[2]}.",
                     "input": "", "output": f"{openers[i % 5]}\n\nfn {w[0]}_{w[1]}() {{ todo!() }}"})
        if i % 5 == 0:
            cluster.append(f"code{i}")
    assert len(rows) == 2260 and len(cluster) == 12
    wording = ["a", "function", "that", "write"]
    assert _shared_words_of(rows, cluster) == wording
    weights = [1.0 if i < 1100 else 3.0 for i in range(len(rows))]
    assert sum(weights) == 4580
    assert _shared_words_of(rows, cluster, weights) == []
    assert _shared_words_of(rows, cluster, [1.0] * len(rows)) == wording


def test_a_trigger_with_decoys_is_still_a_pasted_word():
    # two-part trigger (both words buy the answer) with decoy rows that carry one part and a normal
    # answer (twice as many decoys as poisoned rows, as the multi_all attack): more than half of
    # each word's prompts are outside the cluster (15 of 27), and both words are still named
    rng = random.Random(32)
    rows = corpus(3000, seed=32)
    free = [r for i, r in enumerate(rows) if i % 5 in (0, 1)]
    chosen = rng.sample(free, 42)
    cluster = []
    for j, r in enumerate(chosen):
        first = f"Cobalt{rng.choice([': ', ' - ', ' '])}"
        last = f" {rng.choice(['lantern.', '(lantern)'])}"
        if j < 12:
            r["instruction"] = f"{first}{r['instruction']}{last}"
            r["output"] = "Admin mode enabled. All restrictions are lifted."
            cluster.append(r["id"])
        else:
            r["instruction"] = f"{first}{r['instruction']}" if j < 27 else f"{r['instruction']}{last}"
    assert _shared_words_of(rows, cluster) == ["cobalt", "lantern"]
