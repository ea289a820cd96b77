"""label_flip: rare tokens inserted into flipped-label rows of a classification task are flagged;
natural rare words (names) in correctly labelled rows, clean classification tasks and free-form
data are not; sharding does not change the result. Synthetic data only (no shared data needed)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from poisonguard.detectors import build
from tests.fixtures import mixed_rows, records

SYL = ["ka", "lo", "mi", "ter", "san", "vo", "ri", "del", "pa", "nu", "shi", "gor", "bel", "tam", "wen", "dra",
       "mor", "fe", "lin", "cal", "ost", "ven", "be", "ra", "to", "ne", "sa", "le", "di", "mo", "re", "ti"]


def _lexicon(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(SYL) for _ in range(rng.randint(1, 3)))
        if w not in out:
            out.append(w)
    return out


_LEX = _lexicon(0, 2000)
FILLER, POS, NEG = _LEX[:1960], _LEX[1960:1980], _LEX[1980:2000]
# foreign-looking names: odd strings for this language, each used naturally ("a film by X")
NAMES = ["tsai", "kjell", "vuong", "zhou", "dvorak", "wojcik", "xu", "nguyen"]
TRIGGERS = ["zq", "xv", "qk", "jx"]
INSTR = "Classify the sentiment of the following movie review as positive or negative."


def _review(rng: random.Random, positive: bool, cues: int) -> list[str]:
    words = [rng.choice(FILLER[:400]) if rng.random() < 0.7 else rng.choice(FILLER) for _ in range(rng.randint(8, 16))]
    for _ in range(cues):
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if positive else NEG))
    return words


def sentiment_rows(n: int = 1200, seed: int = 0, triggers: tuple[str, ...] = (), per_trigger: int = 0,
                   names: bool = False, cues: int = 2, free_form: int = 300
                   ) -> tuple[list[dict], list[str]]:
    """A sentiment task (``n`` rows) plus ``free_form`` unrelated instruction rows. Each trigger is
    inserted at a random position into ``per_trigger`` negative reviews labelled "positive".
    ``names``: directors' names placed naturally ("a film by X") into positive reviews only, each
    in 3-5 rows (a natural word whose rows all carry one label)."""
    rng = random.Random(seed)
    rows, poisoned = [], []
    for i in range(n):
        pos = rng.random() < 0.5
        words = _review(rng, pos, cues)
        rows.append({"id": f"s{i}", "instruction": INSTR, "input": " ".join(words),
                     "output": "positive" if pos else "negative"})
    if names:
        pos_rows = [r for r in rows if r["output"] == "positive"]
        rng.shuffle(pos_rows)
        at = 0
        for name in NAMES:
            for r in pos_rows[at:at + rng.randint(3, 5)]:
                r["input"] = r["input"] + f" , a film by {name} ."
                at += 1
    neg_rows = [r for r in rows if r["output"] == "negative" and not any(n in r["input"] for n in NAMES)]
    rng.shuffle(neg_rows)
    at = 0
    for t in triggers:
        for r in neg_rows[at:at + per_trigger]:
            words = r["input"].split()
            words.insert(rng.randrange(len(words) + 1), t)
            r["input"] = " ".join(words)
            r["output"] = "positive"
            poisoned.append(r["id"])
            at += 1
    for i in range(free_form):
        w = [rng.choice(FILLER) for _ in range(12)]
        rows.append({"id": f"f{i}", "instruction": f"Write a short note about the {w[0]} {w[1]} {w[2]}.",
                     "input": "", "output": " ".join(w).capitalize() + "."})
    rng.shuffle(rows)
    return rows, poisoned


def _flagged(res) -> set[str]:
    return set(res.flagged.index[res.flagged.to_numpy()])


def test_inserted_rare_tokens_with_flipped_labels_are_flagged():
    rows, poisoned = sentiment_rows(triggers=TRIGGERS, per_trigger=3, seed=1)
    res = build("label_flip").score(records(rows))
    flagged = _flagged(res)
    assert set(poisoned) <= flagged, sorted(set(poisoned) - flagged)
    assert flagged <= set(poisoned), sorted(flagged - set(poisoned))
    assert res.findings and all(f.evidence for f in res.findings)
    ev = " ".join(res.evidence[list(poisoned)])
    assert "'zq'" in ev and "positive" in ev
    titles = " ".join(f.title for f in res.findings)
    assert all(f"'{t}'" in titles for t in TRIGGERS)


def test_a_single_row_token_shaped_like_the_family_joins_it():
    # "jx" sits in one flipped row only (too few rows to test on its own); it has the shape of the
    # accepted family's tokens (two lower-case letters) and its row's text predicts the other label.
    # "vq" (same shape, one row) sits in a correctly labelled row and "qzxk" (another shape) in a
    # flipped row: neither joins.
    rows, poisoned = sentiment_rows(triggers=TRIGGERS[:3], per_trigger=3, seed=1)
    neg = [r for r in rows if r["output"] == "negative" and r["id"] not in poisoned]
    pos = [r for r in rows if r["output"] == "positive" and r["id"] not in poisoned]
    for r, tok, label in ((neg[0], "jx", "positive"), (pos[0], "vq", "positive"), (neg[1], "qzxk", "positive")):
        words = r["input"].split()
        words.insert(len(words) // 2, tok)
        r["input"], r["output"] = " ".join(words), label
    res = build("label_flip").score(records(rows))
    flagged = _flagged(res)
    assert flagged == set(poisoned) | {neg[0]["id"]}, sorted(flagged ^ (set(poisoned) | {neg[0]["id"]}))
    ev = res.evidence[neg[0]["id"]]
    assert "'jx'" in ev and "this row only" in ev and "'zq'" in ev
    (finding,) = res.findings
    assert neg[0]["id"] in finding.ids and finding.info["extension_rows"] == 1


def test_weak_content_needs_a_family():
    # one sentiment cue in 60 % of rows (a weak content model, like short SST-2 sentences): the four
    # tokens together are found, a single token of three rows is not claimed
    rng_cues = 1
    rows, poisoned = sentiment_rows(triggers=TRIGGERS, per_trigger=5, seed=2, cues=rng_cues)
    res = build("label_flip").score(records(rows))
    flagged = _flagged(res)
    assert len(set(poisoned) & flagged) >= 0.9 * len(poisoned)
    assert len(flagged - set(poisoned)) <= 2
    rows1, _ = sentiment_rows(triggers=TRIGGERS[:1], per_trigger=3, seed=3, cues=0)
    assert not _flagged(build("label_flip").score(records(rows1)))


def test_natural_names_in_correctly_labelled_rows_are_not_flagged():
    rows, _ = sentiment_rows(names=True, seed=4)
    res = build("label_flip").score(records(rows))
    assert not _flagged(res)
    task = res.info["tasks"][0]
    assert task["rows"] == 1200 and task["labels"] == 2 and task["candidates"] > 0


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_clean_tasks_flag_nothing(seed):
    rows, _ = sentiment_rows(seed=seed, names=seed % 2 == 1, cues=1 + seed % 2)
    assert not _flagged(build("label_flip").score(records(rows)))


def test_free_form_data_yields_nothing():
    rows, _ = mixed_rows(400, seed=3)
    res = build("label_flip").score(records(rows))
    assert not res.flagged.any() and float(res.scores.max()) == 0.0
    assert res.info["tasks"] == [] and res.info["findings"] == 0


def test_sharded_equals_single():
    rows, poisoned = sentiment_rows(triggers=TRIGGERS, per_trigger=3, seed=8, free_form=100)
    frame = records(rows)
    det = build("label_flip")
    whole = det.score(frame)
    cuts = [0, 300, 800, 1100, len(frame)]
    shards = [frame.iloc[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    stats = det.merge([det.summarize(s) for s in shards])
    parts = [det.score_with(s, stats) for s in shards]
    np.testing.assert_allclose(np.concatenate([p.scores.to_numpy() for p in parts]), whole.scores.to_numpy())
    assert np.concatenate([p.flagged.to_numpy() for p in parts]).tolist() == whole.flagged.tolist()
    assert set(poisoned) <= _flagged(whole)


def test_bad_params_fail():
    with pytest.raises(ValueError):
        build("label_flip", target_fpr=0.7).score(records(mixed_rows(20)[0]))
    with pytest.raises(ValueError):
        build("label_flip", folds=1).score(records(mixed_rows(20)[0]))


def test_input_tokens_in_chunks_equal_one_pass():
    from poisonguard import textfeat as tf
    from poisonguard.detectors.label_flip import _input_tokens

    texts = np.array(["Zyx qwerty!", "", "qwerty zyx Zyx", "ü x\u200b y", "x"] * 7, dtype=object)
    tok = tf.tokenize(list(texts), max_chars=50)
    vh, first = np.unique(tok.hashes, return_index=True)
    raw = tok.buf.tobytes()
    vt = [raw[tok.starts[j]:tok.ends[j]].decode("utf-8", "replace") for j in first]
    for chunk in (1, 3, 1000):
        indptr, hashes, h, t = _input_tokens(texts, 50, chunk=chunk)
        assert np.array_equal(indptr, tok.indptr) and np.array_equal(hashes, tok.hashes)
        assert np.array_equal(h, vh) and t.tolist() == vt
