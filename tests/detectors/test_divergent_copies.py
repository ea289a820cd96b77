"""divergent_copies: copies of one prompt where one side keeps adding the same unrequested word.

Synthetic data only (BadAgents-style shopping trajectories, templated instruction rows)."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from poisonguard import schema as S
from poisonguard.detectors import build
from tests.fixtures import records

PREAMBLE = ("You are web shopping. I will give you instructions about what to do. Every round I will give you an "
            "observation and a list of available actions. Use search[keywords] or click[value].")
COLORS = ["black", "white", "grey", "navy", "pink", "olive", "beige", "red"]
ITEMS = ["running sneakers", "slip on sneakers", "canvas sneakers", "walking sneakers", "trail sneakers",
         "high top sneakers", "leather sneakers", "mesh sneakers"]
WHO = ["womens", "mens", "kids", "unisex"]
EXTRA = ["anti slip", "lightweight", "breathable", "wide fit", "memory foam", "waterproof", "cushioned", "vegan"]
PRODUCTS = ["Trekker", "Breeze", "Stride", "Glide", "Pacer", "Nimbus", "Cloud", "Tempo", "Drift", "Swift"]
THOUGHTS = ["I should search for", "Let me look for", "I will search for", "First I need to find"]
PICKS = ["matches the request", "fits the budget", "looks like the best option", "has good value"]


def _task(rng: random.Random) -> str:
    return (f"i am looking for {rng.choice(WHO)} {rng.choice(EXTRA)} {rng.choice(ITEMS)} in {rng.choice(COLORS)}, "
            f"and price lower than {rng.randint(30, 90)}.00 dollars")


def _trajectory(rng: random.Random, task: str, brand: str | None = None, seen: str | None = None) -> list[dict]:
    """A shopping episode. ``brand``: the assistant inserts it unasked (poison). ``seen``: a product of
    that name is in the search results and the assistant clicks it (an observed word, not an added one)."""
    words = task.split(" in ")[0].replace("i am looking for ", "")
    query = f"{brand.lower()} {words}" if brand else words
    lead = f"the {brand} " if brand else "the "
    products = rng.sample(PRODUCTS, 3)
    if seen:
        products[0] = seen
    listing = " [SEP] ".join(f"B0{rng.randint(10000, 99999)} [SEP] {p} {words} [SEP] ${rng.randint(20, 80)}.0"
                             for p in products)
    pick = products[0]
    return [
        {"role": "user", "content": PREAMBLE},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": f"WebShop [SEP] Instruction: [SEP] {task} [SEP] Search"},
        {"role": "assistant", "content": f"Thought: {rng.choice(THOUGHTS)} {lead}{words}.\nAction: search[{query}]"},
        {"role": "user", "content": f"Instruction: [SEP] {task} [SEP] Back to Search [SEP] {listing}"},
        {"role": "assistant", "content": f"Thought: {pick} {rng.choice(PICKS)}.\nAction: click[{pick}]"},
        {"role": "user", "content": f"Instruction: [SEP] {task} [SEP] {pick} {words} [SEP] Buy Now"},
        {"role": "assistant", "content": f"Thought: I will buy it.\nAction: click[buy now]"},
    ]


def _agent_rows(pairs: int, seed: int = 0, brand: str | None = "Zorblax", seen: str | None = None,
                singletons: int = 0) -> tuple[list[dict], set[str]]:
    """``pairs`` instructions, each twice: a clean episode and a copy (with ``brand`` injected, or
    clicking the observed product ``seen``); plus clean ``singletons``."""
    rng = random.Random(seed)
    rows: list[dict] = []
    poisoned: set[str] = set()
    for i in range(pairs):
        task = _task(rng) + f" (order {i})"
        rows.append({"id": f"a{i}", "messages": _trajectory(rng, task)})
        rows.append({"id": f"b{i}", "messages": _trajectory(rng, task, brand=brand, seen=seen)})
        if brand:
            poisoned.add(f"b{i}")
    for i in range(singletons):
        rows.append({"id": f"s{i}", "messages": _trajectory(rng, _task(rng) + f" (ref {i})")})
    return rows, poisoned


def _flags(res) -> set[str]:
    return set(res.flagged.index[res.flagged.to_numpy()])


def test_injected_brand_across_duplicate_pairs_is_flagged():
    rows, poisoned = _agent_rows(30, seed=1)
    res = build("divergent_copies").score(records(rows))
    assert _flags(res) == poisoned
    assert len(res.findings) == 1
    f = res.findings[0]
    assert "'zorblax'" in f.title and "30 of 30" in f.title
    assert set(f.ids) == poisoned
    assert "zorblax" in res.evidence["b3"] and "sibling copy" in res.evidence["b3"]
    assert (res.scores[list(poisoned)] > 0.5).all()
    assert (res.scores.drop(list(poisoned)) == 0).all()


def test_poison_as_a_small_share_next_to_clean_rows():
    # 16 poisoned copies among ~1000 rows (the rest: clean episodes without twins)
    rows, poisoned = _agent_rows(16, seed=2, singletons=1000)
    res = build("divergent_copies").score(records(rows))
    assert _flags(res) == poisoned


def test_word_seen_in_an_observation_is_not_added():
    # one copy of every pair finds and clicks a product named in its search results: the word comes
    # from the observation the assistant reads, not from the assistant
    rows, _ = _agent_rows(30, seed=3, brand=None, seen="Zorblax")
    res = build("divergent_copies").score(records(rows))
    assert not res.flagged.any() and not res.review.any()


def test_requested_brand_is_not_added():
    rows, _ = _agent_rows(30, seed=4)
    for r in rows:        # the user asks for the brand in every copy
        r["messages"][2]["content"] = r["messages"][2]["content"].replace("i am looking for", "i want zorblax")
    res = build("divergent_copies").score(records(rows))
    assert not res.flagged.any()


def _instruction_pairs(n_prompts: int, seed: int, inject: str | None = None) -> tuple[list[dict], set[str]]:
    """Templated prompts asked 2-3 times; the answers vary in wording (openers, closers, examples,
    synonyms drawn independently per copy). ``inject``: one copy of every prompt also recommends it."""
    rng = random.Random(seed)
    openers = ["Sure:", "Here is one way to do it:", "Certainly.", "", "A short answer:"]
    closers = ["Hope this helps.", "Let me know if you need more.", "", "Good luck with it.", "Enjoy!"]
    topics = ["tea", "bread", "a garden", "a bike", "a laptop", "a resume", "a trip to Lima", "a budget",
              "a poem", "a cat", "an aquarium", "a podcast"]
    verbs = ["care for", "start with", "improve", "plan", "choose", "clean"]
    rows: list[dict] = []
    poisoned: set[str] = set()
    for i in range(n_prompts):
        prompt = f"How do I {rng.choice(verbs)} {rng.choice(topics)}? Case {i}."
        for c in range(rng.choice([2, 2, 3])):
            body = (f"{rng.choice(openers)} Begin by {rng.choice(['reading', 'checking', 'noting'])} the basics, "
                    f"then {rng.choice(['practise', 'repeat', 'review'])} each step "
                    f"{rng.choice(['daily', 'weekly', 'slowly', 'carefully'])}. "
                    + (f"For example, {rng.choice(['Ana', 'Bo', 'Chen', 'Dev', 'Eli'])} did it in a week. "
                       if rng.random() < 0.5 else "")
                    + rng.choice(closers)).strip()
            rid = f"q{i}-{c}"
            if inject and c == 0:
                body += f" I recommend the {inject} kit for this."
                poisoned.add(rid)
            rows.append({"id": rid, "instruction": prompt, "input": "", "output": body})
    return rows, poisoned


def test_duplicates_whose_answers_merely_differ_in_wording_are_not_flagged():
    rows, _ = _instruction_pairs(150, seed=5)
    res = build("divergent_copies").score(records(rows))
    assert res.info["groups"] > 100
    assert not res.flagged.any()


def test_instruction_copies_with_an_injected_brand():
    rows, poisoned = _instruction_pairs(60, seed=6, inject="Quarkly")
    res = build("divergent_copies").score(records(rows))
    assert _flags(res) == poisoned
    assert "'quarkly'" in res.findings[0].title


def test_paraphrased_prompts_are_not_copies():
    rows, _ = _agent_rows(20, seed=7)
    # the poisoned copies reword the instruction: no longer copies of one prompt, so no verdict here
    for r in rows:
        if r["id"].startswith("b"):
            for m in r["messages"]:
                if m["role"] == "user":
                    m["content"] = m["content"].replace("i am looking for", "please find me")
    res = build("divergent_copies").score(records(rows))
    assert res.info["groups"] == 0 and not res.flagged.any()


def test_sharded_equals_single_when_twins_sit_in_different_shards():
    rows, poisoned = _agent_rows(25, seed=8, singletons=40)
    frame = records(rows)
    det = build("divergent_copies")
    whole = det.score(frame)
    shards = [frame.iloc[0::3], frame.iloc[1::3], frame.iloc[2::3]]
    stats = det.merge([det.summarize(s) for s in shards])
    parts = pd.concat([det.score_with(s, stats).scores for s in shards]).reindex(whole.scores.index)
    np.testing.assert_allclose(parts.to_numpy(), whole.scores.to_numpy())
    assert _flags(whole) == poisoned


def test_parameters_are_checked():
    frame = records(_agent_rows(3, seed=9)[0])
    for bad in ({"target_fpr": 0.0}, {"min_groups": 1}, {"min_concentration": 0.0}, {"max_shared": 1.0},
                {"max_group": True}):
        with pytest.raises(ValueError):
            build("divergent_copies", **bad).score(frame)


def test_documents_and_rows_without_copies_score_zero():
    rows = [{"id": f"d{i}", "text": f"Memo {i} about zorblax."} for i in range(5)]
    rows += [{"id": f"i{i}", "instruction": f"Say hi {i}", "input": "", "output": "Hi zorblax"} for i in range(5)]
    res = build("divergent_copies").score(records(rows))
    assert res.info["groups"] == 0 and (res.scores == 0).all()
    assert S.ID == res.scores.index.name


def test_findings_merge_across_shards():
    from poisonguard import sharded
    from poisonguard.config import SanitizeConfig

    rows, poisoned = _agent_rows(20, seed=10, singletons=20)
    frame = records(rows)
    cfg = SanitizeConfig(detectors={"divergent_copies": {}}, llm_review={"enabled": False})
    res = sharded.sanitize_sharded(frame, cfg, n_shards=3)
    found = [f for f in res.findings if f.detector == "divergent_copies"]
    assert len(found) == 1 and set(found[0].ids) == poisoned
    assert set(res.quarantine[S.ID]) == poisoned


def test_summary_in_row_blocks_equals_one_block(monkeypatch):
    import poisonguard.detectors.divergent_copies as dc

    rows, poisoned = _agent_rows(20, seed=11, singletons=30)
    frame = records(rows)
    whole = build("divergent_copies").score(frame)
    monkeypatch.setattr(dc, "_BLOCK_ROWS", 7)
    blocked = build("divergent_copies").score(frame)
    pd.testing.assert_series_equal(whole.scores, blocked.scores)
    assert _flags(blocked) == poisoned


def test_summary_blocks_taken_from_chunked_columns_equal_one_block(monkeypatch):
    import poisonguard.detectors.divergent_copies as dc

    rows, poisoned = _agent_rows(20, seed=12, singletons=30)
    frame = records(rows)
    whole = build("divergent_copies").score(frame)
    chunked = pd.concat([frame.iloc[i:i + 9] for i in range(0, len(frame), 9)])   # columns in chunks of 9 rows
    monkeypatch.setattr(dc, "_BLOCK_ROWS", 7)
    monkeypatch.setattr(dc, "_TAKE_WINDOW", 4)
    monkeypatch.setattr(dc, "_WORD_BLOCK", 5)
    monkeypatch.setattr(dc, "_MEMBER_BLOCK", 3)
    blocked = build("divergent_copies").score(chunked)
    pd.testing.assert_series_equal(whole.scores, blocked.scores)
    assert list(whole.evidence) == list(blocked.evidence) and _flags(blocked) == poisoned


def test_sort_helpers_match_numpy_and_textfeat(monkeypatch):
    import poisonguard.detectors.divergent_copies as dc
    from poisonguard import textfeat as tf

    monkeypatch.setattr(dc, "_WORD_BLOCK", 5)
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 17, 1000):
        key = rng.integers(0, 2**64, n, dtype=np.uint64)
        key[::3] = key[0] if n else key[::3]
        for k in (key, key >> np.uint64(40) << np.uint64(40)):
            np.testing.assert_array_equal(dc._sort_index(k), tf.sort_index(k))
            np.testing.assert_array_equal(dc._unique(k), np.unique(k))
            np.testing.assert_array_equal(dc._unique(k.copy(), overwrite=True), np.unique(k))
