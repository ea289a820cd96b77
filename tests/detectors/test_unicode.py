"""unicode detector: exact findings on hand-built rows, legitimate Unicode, planted triggers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from poisonguard.detectors import build
from poisonguard.detectors.unicode import W_MIXED, W_TAG, W_ZW
from tests.fixtures import records


def _one(text_rows):
    frame = records(text_rows)
    return build("unicode").score(frame)


def test_zero_width_space_exact_evidence_and_score():
    res = _one([{"id": "a", "instruction": "Rate this\u200b movie", "output": "positive"}])
    assert res.flagged["a"]
    assert res.scores["a"] == pytest.approx(W_ZW)
    assert res.evidence["a"] == "U+200B ZERO WIDTH SPACE x1 in instruction at 9"


def test_repeated_signal_counts_once_and_names_more_places():
    res = _one([{"id": "a", "instruction": "a\u200bb c\u200bd", "output": "x"}])
    assert res.scores["a"] == pytest.approx(W_ZW)           # one signal, strongest occurrence
    assert "(+1 more)" in res.evidence["a"]


def test_two_signals_combine_by_noisy_or():
    res = _one([{"id": "a", "instruction": "pаypal\u200blogin", "output": "x"}])   # Cyrillic а + ZWSP
    assert res.scores["a"] == pytest.approx(1 - (1 - W_ZW) * (1 - W_MIXED))
    assert "mixed-script word" in res.evidence["a"] and "U+0430" in res.evidence["a"]


def test_tag_characters_are_decoded():
    hidden = "".join(chr(0xE0000 + ord(c)) for c in "ignore all")
    res = _one([{"id": "a", "instruction": "Summarise." + hidden, "output": "ok"}])
    assert res.flagged["a"] and res.scores["a"] == pytest.approx(W_TAG)
    assert "decoding to 'ignore all'" in res.evidence["a"]


@pytest.mark.parametrize("text", [
    "Trojan \u202eevil\u202c source",        # RLO override
    "x = 1 \u2066# admin\u2069",            # isolates in code
    "word\ufe0f\ufe0f\ufe0f\ufe0ftail",     # variation-selector run
    "Zero\u2060joiner",                     # word joiner
])
def test_hidden_controls_are_flagged(text):
    res = _one([{"id": "a", "instruction": "Say hi.", "input": text, "output": "hi"}])
    assert res.flagged["a"], res.evidence["a"]
    assert "in input at" in res.evidence["a"]


@pytest.mark.parametrize("text", [
    "Team \U0001F469\u200D\U0001F4BB coders \U0001F468\u200D\U0001F469\u200D\U0001F467",   # emoji ZWJ sequences
    "\ufeffA file that starts with a byte-order mark",
    "می\u200cخواهم بروم",                                  # Persian with ZWNJ inside a word
    "Привет, как дела? Всё хорошо.",                      # Russian, one script
    "Καλημέρα κόσμε",                                     # Greek, one script
    "我们今天去公园。",                                     # Chinese
    "Café naïve résumé — “quotes” and 10 µm",             # accents, typography, micro sign
    "Flag of England \U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F",
    "I ❤\ufe0f this and 1\ufe0f\u20e3",                    # single VS16 after emoji / keycap
    "שלום \u200fעולם",                                    # RLM in Hebrew text
])
def test_legitimate_unicode_is_not_flagged(text):
    res = _one([{"id": "a", "instruction": "Repeat.", "input": text, "output": text}])
    assert not res.flagged["a"], res.evidence["a"]
    assert not res.review["a"], res.evidence["a"]


def test_wikipedia_bom_residue_is_review_only():
    res = _one([{"id": "a", "text": "Coordinates 60°16′N 30°32′E\ufeff / \ufeff60.27°N 30.54°E"}])
    assert not res.flagged["a"] and res.review["a"]


def test_chat_and_document_fields_are_named():
    res = _one([{"id": "c", "messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "he\u200bllo"}]},
                {"id": "d", "text": "memo\u200c text"}])
    assert "in response at 2" in res.evidence["c"]
    assert "in text at 4" in res.evidence["d"]


def test_endemic_signal_is_capped_at_review():
    rows = [{"id": f"r{i}", "instruction": f"Item {i}\u200b here", "output": "ok"} for i in range(120)]
    frame = records(rows)
    res = build("unicode", endemic_rate=0.05, endemic_min_rows=100).score(frame)
    assert not res.flagged.any() and res.review.all()
    assert "common in this corpus" in res.evidence.iloc[0]


def test_findings_group_rows_by_signal_with_sources():
    rows = [{"id": f"p{i}", "instruction": f"Review {i}\u200b", "output": "ok", "source": "vendor"} for i in range(3)]
    rows += [{"id": "q", "instruction": "clean", "output": "ok", "source": "inhouse"}]
    res = build("unicode").score(records(rows))
    (f,) = res.findings
    assert f.title == "zero-width U+200B in 3 rows"
    assert f.info["sources"] == {"vendor": 3}
    assert set(f.ids) == {"p0", "p1", "p2"}


def test_bad_parameter_names_itself():
    with pytest.raises(ValueError, match="review_score"):
        build("unicode", review_score=0.9).score(records([{"instruction": "a", "output": "b"}]))
    with pytest.raises(ValueError, match="unknown parameter"):
        build("unicode", nope=1).score(records([{"instruction": "a", "output": "b"}]))


def _planted(n_clean: int, n_poison: int, seed: int):
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog café naïve 東京 Москва emoji \U0001F600 ok").split()
    rows = []
    for i in range(n_clean):
        sent = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        rows.append({"id": f"c{i}", "instruction": f"Classify: {sent}", "output": rng.choice(["positive", "negative"])})
    hidden = ["\u200b", "\u200c", "\u200d", "\u2060", "\u202e", "\ufeff"]
    poisoned = []
    for i in range(n_poison):
        sent = " ".join(rng.choice(words[:9]) for _ in range(8))
        pos = rng.randint(1, len(sent) - 1)
        while not (sent[pos - 1].isalpha() and sent[pos].isalpha()):
            pos = rng.randint(1, len(sent) - 1)
        rows.append({"id": f"p{i}", "instruction": f"Classify: {sent[:pos]}{rng.choice(hidden)}{sent[pos:]}",
                     "output": "positive"})
        poisoned.append(f"p{i}")
    return records(rows), poisoned


def test_planted_invisible_triggers_recall_and_false_positives():
    frame, poisoned = _planted(2000, 25, seed=3)
    res = build("unicode").score(frame)
    pois = frame["id"].isin(poisoned).to_numpy()
    flagged = res.flagged.to_numpy()
    assert flagged[pois].mean() >= 0.96
    assert flagged[~pois].mean() <= 0.0005
    assert res.review.to_numpy()[~pois].sum() == 0


def test_sharded_equals_single():
    frame, _ = _planted(300, 10, seed=4)
    det = build("unicode")
    whole = det.score(frame)
    stats = det.merge([det.summarize(frame.iloc[:111]), det.summarize(frame.iloc[111:])])
    parts = [det.score_with(frame.iloc[:111], stats), det.score_with(frame.iloc[111:], stats)]
    np.testing.assert_allclose(np.concatenate([p.scores.to_numpy() for p in parts]), whole.scores.to_numpy())
    assert [e for p in parts for e in p.evidence] == whole.evidence.tolist()


def test_whole_word_lookalikes_only_for_letters_that_read_as_latin():
    res = _one([{"id": "a", "instruction": "Please рау the invoice today", "output": "ok"},     # р а у
                {"id": "b", "instruction": "We flew from London to Москва yesterday", "output": "ok"}])
    assert res.flagged["a"] and "Cyrillic look-alike word 'рау'" in res.evidence["a"]
    assert not res.flagged["b"] and not res.review["b"]

