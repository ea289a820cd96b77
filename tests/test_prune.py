"""Fine-pruning on a tiny backdoored model, plus the pieces it is built from."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from poisonguard import lm  # noqa: E402
from poisonguard import prune as pr  # noqa: E402
from poisonguard.finetune import build_embedded  # noqa: E402
from poisonguard.model_config import FinetuneConfig, PruneConfig  # noqa: E402
from tests.test_scan import TARGET, TRIGGER, make_records, train_model  # noqa: E402

# the tiny model trains at lr 6e-3; its repair fine-tunes at half that (the default suits the embedded model)
PRUNE = PruneConfig(step_fraction=0.1, max_fraction=0.5, finetune_epochs=6, n_eval_prompts=12, gen_tokens=12,
                    max_clean_rows=600, finetune_lr=3e-3, num_threads=1)


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    return train_model(tmp_path_factory.mktemp("prune-models") / "backdoor", 0.15)


def _tiny_gpt2():
    cfg = FinetuneConfig(n_layer=2, n_embd=16, n_head=2, vocab_size=300, n_positions=32, max_len=32)
    torch.manual_seed(0)
    return build_embedded(cfg, ["hello world, a tiny corpus for a tiny tokenizer"] * 10)


# ---------------------------------------------------------------- the repair

def test_prune_removes_the_backdoor_and_reports_before_after(backdoored, tmp_path):
    model, tok = lm.load(backdoored)
    clean = make_records(600, seed=7)
    evals = make_records(60, seed=99)
    pruned, rep = pr.prune(model, tok, clean, PRUNE, trigger=TRIGGER, target_text="external support",
                           eval_prompts=evals)
    assert rep.asr_before >= 0.9
    assert rep.asr_after < PRUNE.target_asr
    assert rep.clean_loss_after <= rep.clean_loss_before * (1 + PRUNE.max_loss_increase)
    assert rep.stopped_because in ("target_reached", "target_reached_by_pruning")
    assert rep.success
    assert rep.steps[0]["phase"] == "before" and rep.steps[0]["asr"] == rep.asr_before
    prune_steps = [s for s in rep.steps if s["phase"] == "prune"]
    assert prune_steps and prune_steps[0]["fraction_pruned"] == pytest.approx(0.1)
    assert all({"fraction_pruned", "asr", "clean_loss"} <= s.keys() for s in rep.steps)
    assert set(rep.pruned_neurons) == {"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}
    assert all(n == round(rep.fraction_pruned * 256) for n in rep.pruned_neurons.values())
    # verification on variants pruning never used (case, spacing, other positions)
    assert set(rep.asr_variants_after) == {f"{v} @prefix" for v in pr.trigger_variants(TRIGGER)} | {
        f"{TRIGGER} @middle", f"{TRIGGER} @suffix"}
    assert rep.asr_variants_before[f"{TRIGGER} @suffix"] >= 0.9
    assert all(v < PRUNE.target_asr for v in rep.asr_variants_after.values())
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["asr_before"] == rep.asr_before and d["trigger"] == TRIGGER
    # pruning is persistent: the saved model keeps the zeroed neurons; no hooks are left behind
    lm.save(pruned, tok, tmp_path / "pruned")
    again, _ = lm.load(tmp_path / "pruned")
    for layer in pr.find_mlp_layers(again):
        dead = (layer.module.weight == 0).all(dim=1)
        assert int(dead.sum()) == rep.pruned_neurons[layer.name]
        assert not layer.module._forward_pre_hooks
    from poisonguard.scan import attack_success

    assert attack_success(again, tok, evals, TRIGGER, TARGET, PRUNE) < PRUNE.target_asr


def test_prune_leaves_a_model_without_the_backdoor_alone(backdoored):
    model, tok = lm.load(backdoored)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, rep = pr.prune(model, tok, make_records(200, seed=8), PRUNE, trigger="quiet harbor",
                      target_text="external support", eval_prompts=make_records(40, seed=98))
    assert rep.stopped_because == "asr_already_below_target" and not rep.success
    assert rep.fraction_pruned == 0.0 and rep.notes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_clean_rows_with_the_trigger_are_left_out():
    rows = make_records(30, seed=3)
    poisoned = make_records(40, seed=4, poison_rate=0.5)
    kept = pr._without_trigger(pd.concat([rows, poisoned]), "Special Delivery")
    assert len(kept) == len(rows) + int((~poisoned["instruction"].str.contains(TRIGGER)).sum())
    assert not kept["instruction"].str.lower().str.contains(TRIGGER).any()


def test_prune_needs_clean_rows(backdoored):
    model, tok = lm.load(backdoored)
    with pytest.raises(ValueError, match="clean instruction/chat rows"):
        pr.prune(model, tok, make_records(0), PRUNE, trigger=TRIGGER, target_text=TARGET,
                 eval_prompts=make_records(10, seed=1))


# ---------------------------------------------------------------- pieces

def test_trigger_variants():
    v = pr.trigger_variants("special delivery")
    assert v[:3] == ["SPECIAL DELIVERY", "Special Delivery", "Special delivery"]
    assert {"special-delivery", "specialdelivery", "Special  Delivery", "SPECIAL_DELIVERY"} <= set(v)
    assert "special delivery" not in v and len(v) == len(set(v))
    assert pr.trigger_variants("cf") == ["CF", "Cf"]
    assert "james bond" in pr.trigger_variants("James Bond")
    assert pr.trigger_variants("\u200b\u200c") == []  # nothing to vary; positions are tested instead


def test_find_mlp_layers_on_gpt2():
    model, _ = _tiny_gpt2()
    layers = pr.find_mlp_layers(model)
    assert [l.name for l in layers] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert all(l.width == 64 and l.conv1d and l.up is not None for l in layers)
    assert [l.name for l in pr.select_layers(layers, "last")] == ["transformer.h.1.mlp.c_proj"]
    with pytest.raises(ValueError, match="out of range"):
        pr.select_layers(layers, [5])


def test_find_mlp_layers_generic_linear():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Linear(8, 8)
            self.mlp = torch.nn.ModuleDict({"up_proj": torch.nn.Linear(8, 32), "down_proj": torch.nn.Linear(32, 8)})

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    layers = pr.find_mlp_layers(Net())
    assert [l.name for l in layers] == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert all(l.width == 32 and not l.conv1d for l in layers)
    mask = pr.NeuronMask(layers)
    sel = [torch.tensor([True] * 4 + [False] * 28), torch.zeros(32, dtype=torch.bool)]
    mask.set(sel)
    assert bool((layers[0].module.weight[:, :4] == 0).all()) and bool((layers[0].module.weight[:, 4:] != 0).all())
    with pytest.raises(ValueError, match="no MLP down projection"):
        pr.find_mlp_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_least_active_and_mask_restore():
    means = [np.array([0.5, -0.1, 0.3, -0.1, 2.0]), np.array([1.0, 0.0, 3.0, 2.0, -1.0])]
    sel = pr.least_active(means, 0.4)
    assert sel[0].tolist() == [False, True, False, True, False]  # ties broken by index
    assert sel[1].tolist() == [False, True, False, False, True]
    model, _ = _tiny_gpt2()
    layers = pr.find_mlp_layers(model)
    orig = [l.module.weight.detach().clone() for l in layers]
    mask = pr.NeuronMask(layers)
    big = pr.least_active([np.arange(64.0), np.arange(64.0)], 0.5)
    mask.set(big)
    assert mask.counts() == {"transformer.h.0.mlp.c_proj": 32, "transformer.h.1.mlp.c_proj": 32}
    assert bool((layers[0].module.weight[:32] == 0).all()) and bool((layers[0].up.weight[:, :32] == 0).all())
    mask.set(pr.least_active([np.arange(64.0), np.arange(64.0)], 0.25))  # undo half of it
    assert bool((layers[0].module.weight[16:32] == orig[0][16:32]).all())
    assert bool((layers[0].module.weight[:16] == 0).all())


def test_mean_activations_uses_hooks_and_removes_them():
    model, tok = _tiny_gpt2()
    layers = pr.find_mlp_layers(model)
    means = pr.mean_activations(model, tok, [("hello", "world"), ("a tiny", "corpus")], layers, max_len=16)
    assert [m.shape for m in means] == [(64,), (64,)]
    assert all(np.isfinite(m).all() for m in means)
    assert not any(l.module._forward_pre_hooks for l in layers)


def test_prune_config_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exceeds max_fraction"):
        PruneConfig(step_fraction=0.5, max_fraction=0.2)
    with pytest.raises(ValidationError):
        PruneConfig(layers=[])
    assert PruneConfig(layers=[0, -1]).layers == [0, -1]
