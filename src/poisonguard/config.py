"""Typed configuration: the only reader of ``params.yaml``.

One pydantic model per stage (``extra="forbid"``, so a misspelt key fails at load time with
its name); defaults live in the models only. A stage function receives only its own section,
which is exactly what its ``dvc.yaml`` ``params:`` lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from poisonguard.demo import DemoConfig
from poisonguard.llm_review import ReviewConfig
from poisonguard.model_config import FinetuneConfig, PruneConfig, ScanConfig

DEFAULT_PARAMS = Path("params.yaml")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(_Frozen):
    """How deliveries are read."""

    inputs: list[str] = Field(default_factory=lambda: ["data/raw/inhouse.jsonl", "data/raw/vendor-acme.jsonl"])
    format: str | None = None          # jsonl | json | csv | parquet; None = from the suffix
    layout: str | None = None          # instruction | chat | document; None = detect per row
    sources: dict[str, str] = Field(default_factory=dict)   # file name or stem -> default source
    collector: str = "poisonguard-ingest"
    collected_at: str | None = None
    max_field_chars: int = 200_000
    #: > 1: write records.parquet as a folder of this many shards keyed by content hash
    shards: int = Field(1, ge=1)
    #: input rows read, checked and written per step (ingest streams: memory is bounded by this)
    batch_rows: int = Field(50_000, ge=1)

    @field_validator("layout")
    @classmethod
    def _layout(cls, v: str | None) -> str | None:
        if v is not None and v not in ("instruction", "chat", "document"):
            raise ValueError(f"layout must be instruction, chat or document, got {v!r}")
        return v


def _default_detectors() -> dict[str, dict[str, Any]]:
    return {
        "duplicates": {},
        "unicode": {},
        "injection": {},
        "trigger_association": {},
        "response_cluster": {},
        "label_flip": {},
        "divergent_copies": {},
        "harmful_compliance": {},
        "semantic": {},
    }


class SanitizeConfig(_Frozen):
    """Detectors to run (name -> constructor params) and how their results are fused."""

    detectors: dict[str, dict[str, Any]] = Field(default_factory=_default_detectors)
    #: rows in "review" are kept out of training until a person releases them
    hold_review: bool = False
    #: quarantine a row only when at least this many detectors flag it (1 = any)
    min_detectors: int = 1
    #: detector lanes run at once (detectors that share the token table stay in one lane);
    #: 0 = one per CPU core, 1 = one after the other
    workers: int = Field(0, ge=0)
    #: how lanes run: auto = forked processes where possible (Linux, not inside a daemonic worker),
    #: else threads; processes = forked or fail; threads = threads of this process (one GIL)
    lanes: Literal["auto", "processes", "threads"] = "auto"
    reference: str | None = None       # trusted reference set (records parquet or raw file)
    #: standing decisions by people and incidents (poisonguard.overrides); missing file = none
    overrides: str | None = "overrides.jsonl"
    llm_review: ReviewConfig = Field(default_factory=ReviewConfig)
    #: out of core: sharded and streamed runs keep the token tables the trigger / response detectors
    #: summarise to, and the large arrays of their merge, in memory-mapped files under this folder
    #: (a folder per run, removed at its end); every worker must see it at the same path (a shared
    #: volume on a cluster of several machines). None: in memory. Decisions are the same either way.
    spill_dir: str | None = None

    @field_validator("spill_dir")
    @classmethod
    def _no_empty_folder(cls, v: str | None) -> str | None:
        return v or None      # "" (an unset variable substituted into the file): in memory

    @field_validator("detectors")
    @classmethod
    def _known(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from poisonguard.detectors import registry

        known = registry.names()
        unknown = [k for k in v if k not in known]
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; known detectors: {', '.join(known)}")
        return {k: dict(p or {}) for k, p in v.items()}


class IncrementalConfig(_Frozen):
    """Nightly runs that re-check only new rows (:mod:`poisonguard.incremental`)."""

    enabled: bool = True
    #: a full run after this many incremental ones (0 = never forced)
    full_every: int = Field(7, ge=0)
    #: more new rows than this share of the data: run in full
    max_new_fraction: float = Field(0.5, gt=0.0, le=1.0)
    #: old rows sampled as the detectors' baseline: this many per new row ...
    baseline_factor: float = Field(0.5, ge=0.0)
    #: ... and at least this many
    min_baseline: int = Field(20_000, ge=0)
    #: old rows re-checked per prompt that a new row repeats (duplicates with other answers)
    max_twins: int = Field(8, ge=0)
    #: run this time in full (``poisonguard nightly --full``), then go on incrementally
    force_full: bool = False


class NightlyConfig(_Frozen):
    """The scheduled flow."""

    use_demo_data: bool = True
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    #: > 1 runs sanitize shard by shard on a Dask task runner (prefect-dask)
    shards: int = Field(1, ge=1)
    #: an existing Dask scheduler ("tcp://host:8786"); None = a LocalCluster of dask_workers processes
    dask_address: str | None = None
    dask_workers: int = Field(2, ge=1)
    #: re-check only rows the last run has not seen (ledger in the state folder)
    incremental: IncrementalConfig = Field(default_factory=IncrementalConfig)


class PipelineConfig(_Frozen):
    demo: DemoConfig = Field(default_factory=DemoConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    sanitize: SanitizeConfig = Field(default_factory=SanitizeConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    scan: ScanConfig = Field(default_factory=ScanConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid."""


def load_config(path: Path | str | None = None) -> PipelineConfig:
    """Read and validate params.yaml (a missing default file means all defaults)."""
    p = Path(path) if path is not None else DEFAULT_PARAMS
    if not p.exists():
        if path is None:
            return PipelineConfig()
        raise ConfigError(f"{p}: no such params file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{p}: invalid parameters:"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from e


def section(cfg: BaseModel) -> dict[str, Any]:
    """JSON-able dump of a config section (for cache keys and model cards)."""
    return cfg.model_dump(mode="json")
