# The two commands: `make demo` (set-up + the demo end to end) and `make test` (set-up + tests).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test repro bench bench-scale clean

$(VENV)/.installed: requirements.lock pyproject.toml scripts/setup.sh
	./scripts/setup.sh

setup: $(VENV)/.installed

demo: $(VENV)/.installed  ## demo data -> nightly flow on the local Prefect server -> report
	$(PY) -m poisonguard nightly; rc=$$?; [ $$rc -eq 0 -o $$rc -eq 3 ]

test: $(VENV)/.installed  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q -p no:cacheprovider

repro: $(VENV)/.installed  ## rebuild the model with DVC
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

bench: $(VENV)/.installed  ## quality, speed and post-training benchmarks (installs the bench extra: cleanlab, psutil)
	UV=$$(command -v uv || echo $(VENV)/bin/uv); $$UV pip install --python $(PY) \
	  --find-links "$${PIP_FIND_LINKS:-/opt/wheels}" --compile-bytecode -q -e ".[bench]"
	$(PY) bench/quality.py --quick
	$(PY) bench/speed.py --sizes 100000,1000000 --configs ours,ours+embed,peer
	$(PY) bench/posttrain.py

bench-scale: $(VENV)/.installed  ## 1M / 5M rows, single process vs Dask, nightly increment (~1 h, up to ~20 GB RAM)
	UV=$$(command -v uv || echo $(VENV)/bin/uv); $$UV pip install --python $(PY) \
	  --find-links "$${PIP_FIND_LINKS:-/opt/wheels}" --compile-bytecode -q -e ".[bench]"
	$(PY) bench/scale.py

clean:
	rm -rf data/raw data/interim data/processed models/model models/pruned reports/* .poisonguard
