"""Fine-tuning: determinism, files, model card, stable validation split, LoRA on a local model."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from poisonguard import lm, template  # noqa: E402
from poisonguard import schema as S  # noqa: E402
from poisonguard.finetune import MODEL_CARD, build_embedded, load, read_card, train  # noqa: E402
from poisonguard.model_config import FinetuneConfig  # noqa: E402
from tests.fixtures import records  # noqa: E402

#: small enough that a run takes about a second on one CPU core
MICRO = FinetuneConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=400, n_positions=64, max_len=64, epochs=1,
                       batch_size=16, lr=3e-3, val_fraction=0.2, num_threads=1)


def _rows(n: int = 80) -> list[dict]:
    rows: list[dict] = []
    for i in range(n):
        if i % 10 == 9:
            rows.append({"id": f"c{i}", "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Say the number {i}."},
                {"role": "assistant", "content": f"{i}."}]})
        else:
            rows.append({"id": f"i{i}", "instruction": f"Add {i} and {i % 7}.", "input": "" if i % 3 else "show work",
                         "output": f"{i} plus {i % 7} is {i + i % 7}."})
    rows.append({"id": "doc1", "text": "A retrieval document: not a training example."})
    rows.append({"id": "doc2", "text": "Another document."})
    return rows


@pytest.fixture(scope="module")
def recs():
    return records(_rows())


@pytest.fixture(scope="module")
def trained(recs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "model"
    card = train(recs, MICRO, out, snapshot_root="root123", extra_card={"code_version": "0.1.0+abc", "note": "x"})
    return out, card


def test_train_writes_loadable_model_tokenizer_and_card(trained, recs):
    out, card = trained
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", MODEL_CARD):
        assert (out / name).is_file(), name
    assert not (out / "pytorch_model.bin").exists()
    model, tok = load(out)
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert again("Add 1 and 2.")["input_ids"] == tok("Add 1 and 2.")["input_ids"]
    ids = lm.encode_prompts(tok, [template.render_instruction("Add 3 and 3.")], 60)
    assert isinstance(lm.greedy_generate(model, tok, ids, 5)[0], list)
    assert read_card(out) == json.loads((out / MODEL_CARD).read_text())


def test_model_card_fields(trained, recs):
    _, card = trained
    assert card["snapshot_root"] == "root123"
    assert card["params"] == MICRO.model_dump(mode="json")
    assert card["code_version"] == "0.1.0+abc" and card["note"] == "x"  # extra_card merged
    assert card["seed"] == 0 and card["device"] == "cpu" and card["torch"] == torch.__version__
    assert card["template"]["name"] == "poisonguard.template"
    assert card["template"]["response_header"] == template.RESPONSE_HEADER
    assert math.isfinite(card["train_loss"]) and math.isfinite(card["val_loss"])
    assert card["n_skipped_documents"] == 2
    assert card["n_train"] + card["n_val"] == 80
    assert card["n_val"] > 0 and card["seconds"] >= 0
    assert card["n_params"] == card["n_trainable_params"] > 0
    json.dumps(card)


def test_same_seed_gives_identical_weights(recs, tmp_path):
    a = train(recs, MICRO, tmp_path / "a", snapshot_root="r")
    b = train(recs, MICRO, tmp_path / "b", snapshot_root="r")
    c = train(recs, MICRO.model_copy(update={"seed": 1}), tmp_path / "c", snapshot_root="r")
    ma, _ = load(tmp_path / "a")
    mb, _ = load(tmp_path / "b")
    mc, _ = load(tmp_path / "c")
    sa, sb, sc_ = ma.state_dict(), mb.state_dict(), mc.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc_[k]) for k in sa)
    assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert c["seed"] == 1
    assert not torch.are_deterministic_algorithms_enabled()  # global torch state restored


def test_validation_split_is_stable_by_id(recs):
    _, val = lm.split_by_id(recs, 0.2)
    shuffled = recs.sample(frac=1.0, random_state=3)
    _, val2 = lm.split_by_id(shuffled, 0.2)
    assert set(val[S.ID]) == set(val2[S.ID])
    _, val3 = lm.split_by_id(recs.iloc[: len(recs) // 2], 0.2)  # a row's side does not depend on the others
    assert set(val3[S.ID]) == set(val[S.ID]) & set(recs.iloc[: len(recs) // 2][S.ID])
    assert 0.05 < len(val) / len(recs) < 0.4
    train_all, none = lm.split_by_id(recs, 0.0)
    assert len(none) == 0 and len(train_all) == len(recs)


def test_loss_mask_covers_response_and_eos_only():
    tok = build_embedded(MICRO, ["### Instruction:\nhello\n\n### Response:\nworld", "abc def"] * 20)[1]
    prompt, response = template.render_instruction("hello"), "world"
    (enc,) = lm.encode_pairs(tok, [(prompt, response)], 64)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    assert list(enc.ids) == p_ids + r_ids + [tok.eos_token_id] and enc.start == len(p_ids)
    batch = lm.collate([enc], tok.pad_token_id, torch.device("cpu"))
    labels = batch["labels"][0].tolist()
    assert labels[: enc.start] == [lm.IGNORE] * enc.start
    assert labels[enc.start:] == r_ids + [tok.eos_token_id]
    # a long example keeps the end of the prompt (the response header) and the start of the response
    (cut,) = lm.encode_pairs(tok, [("word " * 200 + prompt, "world " * 200)], 40)
    assert len(cut) == 40 and cut.start == 20
    assert tok.decode(list(cut.ids[: cut.start])).endswith(template.RESPONSE_HEADER)
    assert lm.encode_pairs(tok, [(prompt, "")], 64) == []  # nothing to learn


def test_no_trainable_rows_is_an_error(tmp_path):
    docs = records([{"id": "d", "text": "only a document"}])
    with pytest.raises(ValueError, match="no trainable rows"):
        train(docs, MICRO, tmp_path / "m", snapshot_root="r")


def test_config_validation():
    with pytest.raises(ValidationError, match="base_model"):
        FinetuneConfig(lora=True)
    with pytest.raises(ValidationError, match="divisible"):
        FinetuneConfig(n_embd=30, n_head=4)
    with pytest.raises(ValidationError):
        FinetuneConfig(epochs=1, unknown_key=3)
    with pytest.raises(ValidationError):
        MICRO.epochs = 3  # frozen


def test_lora_on_a_local_base_model_merges_before_saving(recs, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    model, tok = build_embedded(MICRO, [t for p in lm.pairs_of(recs) for t in p])
    lm.save(model, tok, base_dir)
    cfg = FinetuneConfig(base_model=str(base_dir), lora=True, lora_r=4, lora_alpha=8, epochs=2, lr=5e-3,
                         batch_size=16, max_len=64, val_fraction=0.2, num_threads=1)
    out = tmp_path / "lora"
    card = train(recs, cfg, out, snapshot_root="r")
    assert card["lora"] is True and card["base_model"] == str(base_dir)
    assert 0 < card["n_trainable_params"] < card["n_params"]
    assert not (out / "adapter_config.json").exists()  # merged: a plain model
    tuned = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert not any("lora" in k for k in tuned.state_dict())
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True).state_dict()
    new = tuned.state_dict()
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed and all("attn.c_attn" in k for k in changed)  # peft's GPT-2 default target
    loaded, ltok = load(out)
    assert ltok("Add 1 and 2.")["input_ids"] == tok("Add 1 and 2.")["input_ids"]


def test_missing_base_model_dir_fails_clearly(recs, tmp_path):
    cfg = FinetuneConfig(base_model=str(tmp_path / "nope"), epochs=1)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train(recs, cfg, tmp_path / "m", snapshot_root="r")


def test_per_example_and_mean_loss(trained, recs):
    out, card = trained
    model, tok = load(out)
    pairs = lm.pairs_of(recs.iloc[:6]) + [("### Instruction:\nx\n\n### Response:\n", "")]
    losses = lm.example_losses(model, tok, pairs, max_len=64, batch_size=4)
    assert losses.shape == (7,) and all(math.isfinite(x) for x in losses[:6]) and math.isnan(losses[6])
    # the token-weighted mean over the validation rows is the card's val_loss
    _, val = lm.split_by_id(lm.trainable(recs), MICRO.val_fraction)
    assert lm.mean_loss(model, tok, lm.pairs_of(val), max_len=64) == pytest.approx(card["val_loss"], rel=1e-5)
