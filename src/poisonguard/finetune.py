"""Supervised fine-tuning on sanitized records, with a model card for lineage.

Two model paths:

* **Embedded default** (``FinetuneConfig.base_model`` unset): a small GPT-2-class causal LM
  (``GPT2LMHeadModel`` built from a hand-written ``GPT2Config``; about 1M parameters with the
  defaults) is trained from scratch, with a byte-level BPE tokenizer trained on the training
  rows by the ``tokenizers`` library. Nothing is downloaded; it runs on a CPU.
* **Local Hugging Face model** (``base_model`` = a directory): loaded with
  ``local_files_only=True`` and fine-tuned fully, or with LoRA adapters (peft) that are merged
  into the weights before saving, so the scan and pruning see a plain model.

Training examples are instruction and chat rows rendered by
:func:`poisonguard.template.render_example` (the template the scan uses too); the loss is taken
on the response tokens and the EOS token only. A validation split is chosen by a hash of the
row id, so a row's side never depends on the other rows.

On CPU, two runs with the same seed and data give bit-identical weights (seeded init, seeded
length-bucketed batch order, ``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import platform
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from poisonguard import lm
from poisonguard import template
from poisonguard.model_config import FinetuneConfig

log = logging.getLogger("poisonguard.finetune")

MODEL_CARD = "model_card.json"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"

load = lm.load


def template_info() -> dict[str, str]:
    """Name and content hash of the prompt template module (recorded in every model card)."""
    src = inspect.getsource(template)
    return {"name": "poisonguard.template", "response_header": template.RESPONSE_HEADER,
            "sha256": hashlib.sha256(src.encode("utf-8")).hexdigest()[:16]}


@contextmanager
def deterministic(seed: int, num_threads: int | None) -> Iterator[None]:
    """Seed every generator and turn on deterministic kernels; restore global torch state after."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with lm.num_threads(num_threads):
            yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for ``AutoTokenizer``.

    Special tokens: ``<|endoftext|>`` (EOS and BOS) and ``<pad>``. Byte-level, so any text
    (including invisible Unicode triggers) encodes without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=1_000_000)


def build_embedded(cfg: FinetuneConfig, texts: list[str]) -> tuple[nn.Module, Any]:
    """A fresh GPT-2-class model and a BPE tokenizer trained on ``texts`` (seed set by caller)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_tokenizer(texts, cfg.vocab_size, cfg.tokenizer_min_frequency)
    config = GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, activation_function="gelu_pytorch_tanh",  # fused tanh-GELU: fast on CPU
                        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(config), tok


def build_from_base(cfg: FinetuneConfig) -> tuple[nn.Module, Any, nn.Module]:
    """(trainable wrapper, tokenizer, plain model) from a local directory; LoRA when ``cfg.lora``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cfg.base_model is not None
    base = Path(cfg.base_model)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"finetune.base_model={cfg.base_model!r}: no config.json there "
                                "(must be a local Hugging Face causal-LM directory; nothing is downloaded)")
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    lm.ensure_pad(tok)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    if not cfg.lora:
        return model, tok, model
    from peft import LoraConfig, get_peft_model

    fan_in_fan_out = getattr(model.config, "model_type", "") == "gpt2"  # GPT-2 uses Conv1D
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out)
    with warnings.catch_warnings():  # peft calls transformers APIs that transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lcfg)
    return peft_model, tok, peft_model.get_base_model()


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98), eps=1e-8)


def _schedule(total: int, warmup_fraction: float) -> Any:
    warm = max(1, int(total * warmup_fraction))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def fit(model: nn.Module, forward_model: nn.Module, tokenizer: Any, encoded: list[lm.Encoded], *, epochs: int,
        batch_size: int, lr: float, seed: int, weight_decay: float = 0.01, warmup_fraction: float = 0.05,
        grad_clip: float = 1.0, after_step: Any = None, progress: bool = False,
        label: str = "finetune") -> list[float]:
    """Train ``model`` (its parameters) with the response loss of ``forward_model``.

    Returns the token-weighted mean training loss of each epoch. ``after_step`` (optional) is
    called after every optimiser step (fine-pruning uses it to keep pruned weights at zero).
    """
    opt = _optimizer(model, lr, weight_decay)
    dev = lm.model_device(forward_model)
    pad = tokenizer.pad_token_id
    lengths = [len(e) for e in encoded]
    n_batches = math.ceil(len(encoded) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(epochs * n_batches, warmup_fraction))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs * n_batches, desc=label, unit="batch")
    history: list[float] = []
    forward_model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for b in lm.length_batches(lengths, batch_size, seed=seed * 1009 + epoch):
            batch = lm.collate([encoded[i] for i in b], pad, dev)
            sums, counts = lm.response_loss(forward_model, batch)
            n_tok = counts.sum()
            loss = sums.sum() / n_tok.clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            total += float(sums.detach().sum())
            count += int(n_tok)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.3f}")
        history.append(total / max(count, 1))
        log.info("%s: epoch %d/%d train loss %.4f", label, epoch + 1, epochs, history[-1])
    if bar is not None:
        bar.close()
    forward_model.eval()
    return history


def train(records: pd.DataFrame, cfg: FinetuneConfig, out_dir: Path, *, snapshot_root: str,
          extra_card: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Fine-tune on ``records`` and write the model, tokenizer and model card to ``out_dir``.

    Parameters
    ----------
    records
        Normalised records (:mod:`poisonguard.schema`); instruction and chat rows are trained on,
        documents and rows with an empty response are skipped (and counted in the card).
    cfg
        The ``finetune:`` section of params.yaml.
    out_dir
        Receives ``model.safetensors``, ``config.json``, the tokenizer files and ``model_card.json``.
    snapshot_root
        Root hash of the data snapshot the rows come from (lineage).
    extra_card
        Fields merged into the model card (e.g. ``code_version``, ``git_rev``, ``sources``).
    progress
        Show a progress bar on stderr.

    Returns
    -------
    dict
        The model card.

    Raises
    ------
    ValueError
        No trainable rows (or none left after the validation split).
    """
    lm.quiet_transformers()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    rows = lm.trainable(records)
    n_skipped_kind = int(len(records) - len(rows))
    train_df, val_df = lm.split_by_id(rows, cfg.val_fraction)
    train_pairs, val_pairs = lm.pairs_of(train_df), lm.pairs_of(val_df)
    n_empty = sum(1 for _, r in train_pairs if not r) + sum(1 for _, r in val_pairs if not r)
    train_pairs = [p for p in train_pairs if p[1]]
    val_pairs = [p for p in val_pairs if p[1]]
    if not train_pairs:
        raise ValueError(f"finetune: no trainable rows (got {len(records)} records, {len(rows)} instruction/chat, "
                         f"{len(train_pairs)} in the training split with a response)")
    dev = lm.select_device(cfg.device)
    with deterministic(cfg.seed, cfg.num_threads):
        if cfg.base_model is None:
            texts = [t for pair in train_pairs for t in pair]
            model, tok = build_embedded(cfg, texts)
            wrapper, forward_model = model, model
        else:
            wrapper, tok, forward_model = build_from_base(cfg)
        wrapper.to(dev)
        max_len = cfg.max_len
        n_pos = getattr(forward_model.config, "n_positions", None) or getattr(
            forward_model.config, "max_position_embeddings", None)
        if n_pos:
            max_len = min(max_len, int(n_pos))
        enc = lm.encode_pairs(tok, train_pairs, max_len)
        if not enc:
            raise ValueError("finetune: every training example was empty after tokenization")
        n_trainable = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
        log.info("finetune: %d train / %d val examples, %d trainable parameters, device %s",
                 len(enc), len(val_pairs), n_trainable, dev)
        history = fit(wrapper, forward_model, tok, enc, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                      seed=cfg.seed, weight_decay=cfg.weight_decay, warmup_fraction=cfg.warmup_fraction,
                      grad_clip=cfg.grad_clip, progress=progress)
        if cfg.base_model is not None and cfg.lora:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = wrapper.merge_and_unload()
        else:
            model = forward_model
        model.eval()
        val_loss = lm.mean_loss(model, tok, val_pairs, max_len=max_len, batch_size=cfg.batch_size) \
            if val_pairs else None
    lm.save(model, tok, out_dir)
    card: dict[str, Any] = {
        "snapshot_root": snapshot_root,
        "params": cfg.model_dump(mode="json"),
        "code_version": None,
        "base_model": cfg.base_model or "embedded-gpt2",
        "lora": bool(cfg.lora and cfg.base_model),
        "train_loss": history[-1],
        "train_loss_history": history,
        "val_loss": val_loss,
        "n_train": len(enc),
        "n_val": len(val_pairs),
        "n_skipped_documents": n_skipped_kind,
        "n_skipped_empty_response": n_empty,
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "n_trainable_params": int(n_trainable),
        "vocab_size": int(len(tok)),
        "max_len": max_len,
        "seed": cfg.seed,
        "device": str(dev),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "template": template_info(),
    }
    card["seconds"] = card["wall_seconds"] = round(time.perf_counter() - t0, 3)
    if extra_card:
        card.update(extra_card)
    (out_dir / MODEL_CARD).write_text(json.dumps(card, indent=2, ensure_ascii=False, default=str) + "\n",
                                      encoding="utf-8")
    log.info("finetune: train loss %.4f, val loss %s, %.1fs", history[-1], val_loss, card["wall_seconds"])
    return card


def read_card(model_dir: Path | str) -> dict[str, Any]:
    """The ``model_card.json`` of a saved model directory."""
    p = Path(model_dir) / MODEL_CARD
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no model card (was the model written by poisonguard.finetune?)")
    return json.loads(p.read_text(encoding="utf-8"))


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


__all__ = ["MODEL_CARD", "FinetuneConfig", "build_embedded", "fit", "load", "read_card", "template_info",
           "train", "train_tokenizer"]
