"""Shared causal-LM helpers for fine-tuning, the trigger scan and fine-pruning.

Everything that touches token ids lives here: device selection, loading and saving a model
with its tokenizer, encoding (prompt, response) pairs with the loss mask, deterministic
length-bucketed batching, per-example response loss, teacher-forced next-token log-probs and
batched greedy generation (left padding, KV cache).

Prompts are always built by :mod:`poisonguard.template`; this module only tokenizes them.
The prompt and the response are tokenized separately and concatenated, in training and at
inference alike, so the first response token is predicted from exactly the prompt tokens the
model will see when it is deployed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from poisonguard import schema as S
from poisonguard import template

log = logging.getLogger("poisonguard.lm")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TRAINABLE_KINDS = (S.KIND_INSTRUCTION, S.KIND_CHAT)
IGNORE = -100


# ---------------------------------------------------------------- devices and files

def select_device(preference: str = "auto") -> torch.device:
    """``cuda`` when requested or available (``auto``), else ``cpu``.

    Raises
    ------
    ValueError
        ``preference`` is ``cuda`` but CUDA is not available, or is not a known value.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        return torch.device("cuda")
    if preference == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (None = leave torch's setting), restoring it after."""
    if not n:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def quiet_transformers() -> None:
    """Silence transformers' progress bars and advisory warnings (library use, logs stay ours)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def save(model: nn.Module, tokenizer: Any, out_dir: Path | str) -> Path:
    """Write ``model.safetensors`` + ``config.json`` and the tokenizer files to ``out_dir``."""
    quiet_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load(model_dir: Path | str, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local directory; never touches a model hub.

    The model is returned in eval mode on ``device`` (``auto`` = CUDA when available).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a saved model directory)")
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ensure_pad(tok)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    dev = select_device(device) if isinstance(device, str) else device
    model.to(dev).eval()
    return model, tok


def ensure_pad(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token its EOS token as pad (padding is always masked)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def stable_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) from the SHA-256 of ``salt + key``: stable across runs and row sets."""
    h = hashlib.sha256((salt + key).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_by_id(records: pd.DataFrame, val_fraction: float, salt: str = "val") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val) split by a hash of the ``id``: a row's side never depends on the other rows."""
    if val_fraction <= 0 or records.empty:
        return records, records.iloc[0:0]
    is_val = records[S.ID].astype(str).map(lambda i: stable_fraction(i, salt) < val_fraction).to_numpy(bool)
    return records[~is_val], records[is_val]


def trainable(records: pd.DataFrame) -> pd.DataFrame:
    """Rows that are fine-tuning examples (instruction and chat; documents are skipped)."""
    if records.empty:
        return records
    return records[records[S.KIND].isin(TRAINABLE_KINDS)]


def pairs_of(records: pd.DataFrame) -> list[tuple[str, str]]:
    """(prompt, response) pairs rendered by :func:`poisonguard.template.render_example`."""
    return [template.render_example(r) for r in trainable(records).to_dict("records")]


# ---------------------------------------------------------------- encoding and batching

@dataclass(frozen=True)
class Encoded:
    """One training sequence: token ids and where the response (the loss) starts."""

    ids: tuple[int, ...]
    start: int  # index of the first response token in ids

    def __len__(self) -> int:
        return len(self.ids)


def _token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_len: int) -> list[Encoded]:
    """Tokenize (prompt, response) pairs into ``prompt + response + EOS``.

    Long examples keep the end of the prompt (it holds the response header) and the start of
    the response; the response keeps at least half of ``max_len`` when it needs it. Pairs with
    an empty response have no loss tokens and are left out.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no EOS token")
    p_ids = _token_ids(tokenizer, [p for p, _ in pairs])
    r_ids = _token_ids(tokenizer, [r for _, r in pairs])
    out: list[Encoded] = []
    for p, r in zip(p_ids, r_ids, strict=True):
        if not r:
            continue
        r = list(r) + [eos]
        if len(p) + len(r) > max_len:
            r_keep = min(len(r), max(max_len - len(p), max_len // 2))
            p_keep = max_len - r_keep
            p, r = p[len(p) - p_keep:] if p_keep else [], r[:r_keep]
        if not p or not r:
            continue
        out.append(Encoded(tuple(p) + tuple(r), len(p)))
    return out


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Prompt token ids, cut from the left to ``max_tokens`` (the response header survives)."""
    return [list(ids[-max_tokens:]) for ids in _token_ids(tokenizer, prompts)]


def length_batches(lengths: Sequence[int], batch_size: int, seed: int | None = None,
                   band: int = 8) -> list[list[int]]:
    """Index batches of similar length; deterministic for a given ``seed``.

    Without a seed: sort by length (ties by index) and chunk. With a seed (training): sort by
    length band (``band`` tokens wide) with a seeded random order inside each band, chunk, and
    shuffle the batch order, so batches differ between epochs but padding stays small.
    """
    if seed is None:
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    else:
        rng = np.random.default_rng(seed)
        noise = rng.random(len(lengths))
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i] // max(band, 1), noise[i], i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if seed is not None and len(batches) > 1:
        perm = np.random.default_rng(seed + 1).permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def collate(examples: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE outside responses)."""
    n, width = len(examples), max(len(e) for e in examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        t = torch.tensor(e.ids, dtype=torch.long)
        ids[i, :len(e)] = t
        mask[i, :len(e)] = 1
        labels[i, e.start:len(e)] = t[e.start:]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# ---------------------------------------------------------------- forward passes

def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, lm_head) when logits are a plain linear map of the last hidden state.

    Computing the head only at the positions that matter (response tokens, a few scan
    positions) is the main saving on CPU; architectures that post-process logits
    (soft-capping, scaling) fall back to the full forward pass.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    if getattr(cfg, "model_type", "") in ("cohere", "cohere2", "granite", "granitemoe"):
        return None
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or not isinstance(head, nn.Linear):
        return None
    return backbone, head


def hidden_and_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """Last hidden states [B, T, H] and a function mapping hidden states to logits.

    For models without a separable head, returns the full logits and the identity.
    """
    parts = backbone_and_head(model)
    if parts is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.logits, lambda h: h
    backbone, head = parts
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state, head


def response_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed NLL over response tokens and per-example token counts.

    Logits are computed only where a label exists (the response tokens and EOS).
    """
    hidden, head = hidden_and_head(model, batch["input_ids"], batch["attention_mask"])
    targets = batch["labels"][:, 1:]
    sel = targets != IGNORE
    rows = torch.nonzero(sel, as_tuple=True)[0]
    logits = head(hidden[:, :-1][sel]).float()
    nll = nn.functional.cross_entropy(logits, targets[sel], reduction="none")
    n = targets.shape[0]
    sums = torch.zeros(n, device=nll.device, dtype=nll.dtype).index_add_(0, rows, nll)
    counts = sel.sum(dim=1)
    return sums, counts


@torch.no_grad()
def example_losses(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, max_len: int = 128,
                   batch_size: int = 32) -> np.ndarray:
    """Mean response-token NLL per (prompt, response) pair (NaN for pairs with no response)."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    eos = tokenizer.eos_token_id
    out = np.full(len(pairs), np.nan)
    enc_idx = [i for i, (_, r) in enumerate(pairs) if r]
    enc = encode_pairs(tokenizer, [pairs[i] for i in enc_idx], max_len)
    if len(enc) != len(enc_idx):  # a pair lost its prompt entirely: encode one by one to keep alignment
        keep = []
        for i in enc_idx:
            e = encode_pairs(tokenizer, [pairs[i]], max_len)
            if e:
                keep.append((i, e[0]))
        enc_idx, enc = [i for i, _ in keep], [e for _, e in keep]
    for b in length_batches([len(e) for e in enc], batch_size):
        batch = collate([enc[i] for i in b], tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos, dev)
        sums, counts = response_loss(model, batch)
        vals = (sums / counts.clamp(min=1)).cpu().numpy()
        for j, i in enumerate(b):
            out[enc_idx[i]] = vals[j]
    model.train(was_training)
    return out


@torch.no_grad()
def mean_loss(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, max_len: int = 128,
              batch_size: int = 32) -> float:
    """Token-weighted mean response NLL over ``pairs`` (NaN when there is nothing to score)."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    enc = encode_pairs(tokenizer, pairs, max_len)
    total, count = 0.0, 0
    for b in length_batches([len(e) for e in enc], batch_size):
        sums, counts = response_loss(model, collate([enc[i] for i in b], tokenizer.pad_token_id, dev))
        total += float(sums.sum())
        count += int(counts.sum())
    model.train(was_training)
    return total / count if count else float("nan")


@torch.no_grad()
def continuation_logprobs(model: nn.Module, prompt_ids: Sequence[Sequence[int]], cont_ids: Sequence[Sequence[int]],
                          k: int, pad_id: int, batch_size: int = 64) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Teacher-forced log-probs of the next token at the first ``k`` response positions.

    For each sequence ``prompt + cont[:k-1]`` yields batches of ``(indices, logp)`` with
    ``logp`` of shape [B, k, V] (float32): row ``j`` is the distribution predicting response
    token ``j`` given the prompt and ``cont[:j]``. ``cont`` must hold at least ``k - 1`` tokens
    (callers pad short continuations with EOS).
    """
    dev = model_device(model)
    seqs = [list(p) + list(c[:k - 1]) for p, c in zip(prompt_ids, cont_ids, strict=True)]
    starts = [len(p) - 1 for p in prompt_ids]
    for b in length_batches([len(s) for s in seqs], batch_size):
        width = max(len(seqs[i]) for i in b)
        ids = torch.full((len(b), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for j, i in enumerate(b):
            ids[j, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[j, :len(seqs[i])] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        hidden, head = hidden_and_head(model, ids, mask)
        pos = torch.tensor([starts[i] for i in b], device=dev)[:, None] + torch.arange(k, device=dev)[None, :]
        h = hidden[torch.arange(len(b), device=dev)[:, None], pos]
        yield b, torch.log_softmax(head(h).float(), dim=-1)


def _logits_to_keep_supported(model: nn.Module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def iter_greedy(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                batch_size: int = 64, with_logprobs: bool = False
                ) -> Iterator[tuple[list[int], list[list[int]], torch.Tensor | None]]:
    """Batched greedy decoding; yields ``(indices, tokens, logp)`` per batch.

    ``tokens[j]`` is the continuation of prompt ``indices[j]`` (EOS excluded). With
    ``with_logprobs``, ``logp`` is [B, steps, V] float32: the next-token log-distribution at
    each generated position (after an EOS the sequence keeps being fed EOS). Left padding with
    explicit ``position_ids`` and the KV cache; output equals generating each prompt alone
    (up to float noise).
    """
    was_training = model.training
    model.eval()
    dev = model_device(model)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = getattr(model, "config", None)
    n_pos = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    keep = {"logits_to_keep": 1} if _logits_to_keep_supported(model) else {}
    try:
        for b in length_batches([len(p) for p in prompt_ids], batch_size):
            prompts = [list(prompt_ids[i]) for i in b]
            if n_pos:
                prompts = [p[-(n_pos - max_new_tokens):] for p in prompts]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(b), width), pad, dtype=torch.long)
            mask = torch.zeros((len(b), width), dtype=torch.long)
            for j, p in enumerate(prompts):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            step_pos = (mask.cumsum(-1) - 1).clamp(min=0)
            done = torch.zeros(len(b), dtype=torch.bool, device=dev)
            out_tokens: list[torch.Tensor] = []
            logps: list[torch.Tensor] = []
            past = None
            step_ids = ids
            for step in range(max_new_tokens):
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past,
                            use_cache=True, **keep)
                past = out.past_key_values
                last = out.logits[:, -1].float()
                if with_logprobs:
                    logps.append(torch.log_softmax(last, dim=-1))
                nxt = last.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                out_tokens.append(nxt)
                done |= nxt == eos
                if step == max_new_tokens - 1 or (bool(done.all()) and not with_logprobs):
                    break
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones((len(b), 1), dtype=mask.dtype, device=dev)], dim=1)
            gen = torch.stack(out_tokens, dim=1).cpu().tolist()
            toks = [g[:g.index(eos)] if eos in g else g for g in gen]
            yield b, toks, (torch.stack(logps, dim=1) if with_logprobs else None)
    finally:
        model.train(was_training)


def greedy_generate(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations (token ids, EOS excluded) of each prompt (see :func:`iter_greedy`)."""
    results: list[list[int]] = [[] for _ in prompt_ids]
    for b, toks, _ in iter_greedy(model, tokenizer, prompt_ids, max_new_tokens, batch_size):
        for j, i in enumerate(b):
            results[i] = toks[j]
    return results


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)
