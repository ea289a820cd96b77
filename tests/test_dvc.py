"""`dvc repro` on tiny params in a scratch copy of the project: the whole DAG runs through the
CLI stages, a second repro does nothing, a changed sanitize param reruns sanitize and what
follows but not ingest, and the artifacts push to the local DVC remote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_flows import TINY_PARAMS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"


def full_params(**override: dict) -> dict:
    """The repository's params.yaml with the tiny sections laid over it (DVC needs every section)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in {**TINY_PARAMS, **override}.items():
        params[section] = {**params.get(section, {}), **values}
    return params


pytestmark = pytest.mark.skipif(not DVC.exists(), reason=f"dvc is not installed beside {sys.executable}")


def _dvc(proj: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(proj / "src"),
               DVC_NO_ANALYTICS="1")
    r = subprocess.run([str(DVC), *args], cwd=proj, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def proj(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dvcproj")
    shutil.copytree(ROOT / "src", d / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    shutil.copy(ROOT / "overrides.jsonl", d / "overrides.jsonl")
    (d / "params.yaml").write_text(yaml.safe_dump(full_params()))
    _dvc(d, "init", "--no-scm", "-q")
    _dvc(d, "remote", "add", "-d", "local", "../dvc-remote")  # as in the project's .dvc/config
    return d


def test_repro_builds_everything_then_is_a_no_op(proj):
    _dvc(proj, "repro")
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    assert {"demo_data", "ingest", "provenance", "sanitize", "finetune", "scan", "prune", "report"} <= set(lock)
    card = json.loads((proj / "models/model/model_card.json").read_text())
    snap = json.loads((proj / "data/interim/provenance/snapshot.json").read_text())
    assert card["ingest_snapshot_root"] == snap["snapshot_root"]
    assert json.loads((proj / "reports/run/metrics.json").read_text())["rows_in"] == 700

    model = proj / "models/model/model.safetensors"
    mtime = model.stat().st_mtime_ns
    again = _dvc(proj, "repro")
    assert "Running stage" not in again.stdout, again.stdout
    assert model.stat().st_mtime_ns == mtime

    # reproduction: retraining from the same data, params and seed gives identical weights on CPU
    import hashlib

    before = hashlib.sha256(model.read_bytes()).hexdigest()
    _dvc(proj, "repro", "--force", "--single-item", "finetune")
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
    assert json.loads((proj / "models/model/model_card.json").read_text())["snapshot_root"] == card["snapshot_root"]

    _dvc(proj, "push")
    assert any((proj.parent / "dvc-remote").rglob("*")), "artifacts pushed to the local remote"


def test_changed_sanitize_param_reruns_sanitize_not_ingest(proj):
    if not (proj / "dvc.lock").exists():
        pytest.skip("needs the first repro")
    ingested = proj / "data/interim/ingested/records.parquet"
    mtime = ingested.stat().st_mtime_ns
    (proj / "params.yaml").write_text(yaml.safe_dump(full_params(sanitize={"hold_review": True})))
    status = _dvc(proj, "status").stdout
    assert "sanitize" in status and "ingest:" not in status
    out = _dvc(proj, "repro").stdout
    assert "Running stage 'sanitize'" in out and "Running stage 'ingest'" not in out
    assert ingested.stat().st_mtime_ns == mtime
