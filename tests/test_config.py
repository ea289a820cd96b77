"""params.yaml is validated at load time; misspelt keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from poisonguard.config import ConfigError, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_yaml_is_valid():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, PipelineConfig)
    assert "trigger_association" in cfg.sanitize.detectors


def test_misspelt_key_is_named(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"sanitize": {"detectorz": {}}}))
    with pytest.raises(ConfigError, match="sanitize.detectorz"):
        load_config(p)


def test_missing_explicit_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dvc_yaml_matches_stages():
    """Each dvc.yaml stage lists existing deps and exactly the params section its command reads."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    expected_params = {"demo_data": ["demo"], "ingest": ["ingest"], "provenance": [], "sanitize": ["sanitize"],
                       "finetune": ["finetune"], "scan": ["scan"], "prune": ["prune"], "report": []}
    assert set(dvc) == set(expected_params)
    for name, stage in dvc.items():
        assert stage.get("params", []) == expected_params[name], name
        assert stage["cmd"] == f"python -m poisonguard stage {name.replace('_', '-')}"
        for dep in stage["deps"]:
            if dep.startswith("src/"):
                assert (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"
    # every library module a stage imports is a dep of that stage
    assert "src/poisonguard/detectors" in dvc["sanitize"]["deps"]
    assert "src/poisonguard/finetune.py" in dvc["finetune"]["deps"]
