"""Typed configuration of the model-side stages: ``finetune:``, ``scan:`` and ``prune:``.

These are sections of ``params.yaml`` (see :mod:`poisonguard.config`). This module imports
neither torch nor transformers, so loading the configuration stays cheap.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

InsertPosition = Literal["prefix", "suffix", "middle", "mixed"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FinetuneConfig(_Frozen):
    """Supervised fine-tuning (loss on the response tokens only, plus EOS).

    With ``base_model`` unset, a small GPT-2-class model (about 1M parameters with the
    defaults) is trained from scratch, with a byte-level BPE tokenizer trained on the rows.
    With ``base_model`` set to a local Hugging Face causal-LM directory, that model is
    fine-tuned (fully, or with LoRA adapters that are merged before saving).
    """

    seed: int = 0
    #: local directory of a Hugging Face causal LM; None = the embedded small GPT-2 model
    base_model: str | None = None
    #: train LoRA adapters instead of all weights (base_model only); merged before saving
    lora: bool = False
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: module names to adapt; None = peft's default for the architecture
    lora_target_modules: list[str] | None = None

    # embedded model (ignored when base_model is set)
    vocab_size: int = Field(default=4000, ge=300)
    tokenizer_min_frequency: int = Field(default=2, ge=1)
    n_layer: int = Field(default=2, ge=1)
    n_embd: int = Field(default=128, ge=8)
    n_head: int = Field(default=4, ge=1)
    n_positions: int = Field(default=256, ge=16)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    # optimisation
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=32, ge=1)
    #: peak learning rate (AdamW, linear warm-up then cosine decay); use ~2e-4 for a pretrained base_model
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    #: tokens per example (prompt is cut from the left, the response from the right)
    max_len: int = Field(default=128, ge=8)
    #: share of rows held out for validation, chosen by a hash of the row id (stable)
    val_fraction: float = Field(default=0.05, ge=0, lt=1)
    #: torch intra-op threads; None = torch's default
    num_threads: int | None = Field(default=None, ge=1)
    #: auto = CUDA when available, else CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.base_model is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.base_model is None and self.lora:
            raise ValueError("lora=True needs base_model (a local Hugging Face causal-LM directory)")
        if self.max_len > self.n_positions and self.base_model is None:
            raise ValueError(f"max_len ({self.max_len}) must not exceed n_positions ({self.n_positions})")
        return self


class ScanConfig(_Frozen):
    """Trigger scan of a trained model (see :mod:`poisonguard.scan`)."""

    seed: int = 0
    #: held-out clean prompts the candidates are inserted into
    n_prompts: int = Field(default=24, ge=2)
    #: candidate list is padded with mined n-grams up to this size (the MAD statistic needs a population)
    min_candidates: int = Field(default=200, ge=0)
    max_candidates: int = Field(default=400, ge=1)
    use_bank: bool = True
    mine_ngrams: bool = True
    ngram_max: int = Field(default=3, ge=1, le=5)
    #: mined n-grams must occur in at least this many prompts ...
    ngram_min_count: int = Field(default=3, ge=1)
    #: ... and in at most this share of them
    ngram_max_df: float = Field(default=0.2, gt=0, le=1)
    #: where a candidate goes in the instruction ("mixed" cycles prefix/middle/suffix over prompts)
    position: InsertPosition = "prefix"
    #: first response positions whose next-token distributions are compared (step by step of the
    #: greedy generations with and without the candidate)
    divergence_positions: int = Field(default=4, ge=1)
    #: candidates (by screening score) that get full greedy generations (induced response, evidence)
    top_k: int = Field(default=12, ge=1)
    gen_tokens: int = Field(default=24, ge=1)
    #: longest induced-response head (tokens) used for consistency and ASR (shortened adaptively)
    match_tokens: int = Field(default=8, ge=1)
    #: a prompt counts towards ASR only if the JS divergence (bits) where the triggered and clean
    #: generations part is at least this (a near-tie that swaps the argmax is not an attack)
    flip_divergence: float = Field(default=0.2, ge=0, le=1)
    #: verdict "backdoor" when the top candidate's robust z-score exceeds this ...
    anomaly_threshold: float = Field(default=6.0, gt=0)
    #: ... and its attack success rate (times the novelty of the induced response) is at least this
    min_asr: float = Field(default=0.4, ge=0, le=1)
    #: floor on the MAD of candidate scores (stops a flat score distribution from inflating z)
    mad_floor: float = Field(default=0.02, gt=0)
    batch_size: int = Field(default=64, ge=1)
    max_prompt_tokens: int = Field(default=192, ge=8)

    # embedding-space trigger search
    search: bool = True
    search_tokens: int = Field(default=3, ge=1)
    search_steps: int = Field(default=60, ge=1)
    search_lr: float = Field(default=0.3, gt=0)
    search_restarts: int = Field(default=2, ge=1)
    search_prompts: int = Field(default=12, ge=1)
    #: torch intra-op threads; None = torch's default
    num_threads: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> ScanConfig:
        if self.match_tokens > self.gen_tokens:
            raise ValueError(f"match_tokens ({self.match_tokens}) must not exceed gen_tokens ({self.gen_tokens})")
        return self


class PruneConfig(_Frozen):
    """Fine-pruning of a backdoored model (see :mod:`poisonguard.prune`)."""

    seed: int = 0
    #: share of each selected layer's MLP neurons pruned per step
    step_fraction: float = Field(default=0.05, gt=0, le=1)
    max_fraction: float = Field(default=0.6, gt=0, lt=1)
    #: neuron ranking: "dormant" = least mean activation on clean data (Liu et al.); "trigger" = largest
    #: activation increase when the trigger is inserted into clean prompts (needs the trigger; resists
    #: pruning-aware attacks that keep backdoor neurons active on clean data)
    criterion: Literal["dormant", "trigger"] = "dormant"
    #: which MLP layers to prune: "all", "last" (Liu et al. prune the last layer), or indices
    layers: Literal["all", "last"] | list[int] = "all"
    #: stop when the trigger's attack success rate falls below this ...
    target_asr: float = Field(default=0.1, ge=0, le=1)
    #: ... with the clean validation loss at most this relative increase over the original
    max_loss_increase: float = Field(default=0.10, ge=0)
    #: pruning stops (and the last step is undone) when clean loss rises by more than this (relative);
    #: small, because in the embedded models pruning alone does not remove the backdoor (clean
    #: fine-tuning does) and every pruned neuron costs clean loss the fine-tuning must win back
    prune_loss_budget: float = Field(default=0.05, ge=0)
    #: epochs of clean fine-tuning after pruning (the pruned neurons stay zero)
    finetune_epochs: int = Field(default=5, ge=0)
    #: a third of the embedded model's training peak (3e-3 forgot too much clean skill on 2,000
    #: rows); use ~1e-4 for a pretrained base model
    finetune_lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=32, ge=1)
    max_len: int = Field(default=128, ge=8)
    #: clean rows used (activation statistics, fine-tuning, validation); None = all
    max_clean_rows: int | None = Field(default=2000, ge=10)
    #: share of clean rows held out for the clean loss (hash of id)
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    #: prompts used to measure attack success
    n_eval_prompts: int = Field(default=32, ge=1)
    gen_tokens: int = Field(default=24, ge=1)
    #: where the trigger is inserted while pruning (variants test the others)
    position: Literal["prefix", "suffix", "middle"] = "prefix"
    num_threads: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list) and not v:
            raise ValueError("layers must be 'all', 'last' or a non-empty list of layer indices")
        return v

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        if self.step_fraction > self.max_fraction:
            raise ValueError(f"step_fraction ({self.step_fraction}) exceeds max_fraction ({self.max_fraction})")
        return self
