# Every target installs what it needs first, so each works from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARDS ?= sample
PROFILE ?= default
OUT ?= data/labels/$(SHARDS)
STEPS ?=
NPROC ?= 2
TSV ?=
TASKS ?=
RUN ?=
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: help install sample test pseudolabel train preview bench bench-gpu download clean

help:
	@echo 'targets: install sample test pseudolabel train preview bench bench-gpu download clean'
	@echo 'e.g. make pseudolabel SHARDS=sample PROFILE=smoke; make train SHARDS=sample PROFILE=smoke STEPS=50'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml (they only import as a pair)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

data/sample/00001_stats.json: pipeline/sample.py | $(VENV)/.installed
	$(PY) -m pipeline.sample --out data/sample

sample: data/sample/00001_stats.json

test: install
	$(OFFLINE) $(PY) -m pytest -q

# SHARDS names manifests/<name>.yaml; the sample is built on demand
pseudolabel: install $(if $(filter sample,$(SHARDS)),sample)
	$(PY) -m pipeline --shards $(SHARDS) --profile $(PROFILE) --out $(OUT)

train: install $(if $(filter sample,$(SHARDS)),sample)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m trainer.train \
	  --shards $(SHARDS) --labels $(OUT) --profile $(PROFILE) --resume latest \
	  $(if $(STEPS),--steps $(STEPS)) $(if $(TASKS),--tasks $(TASKS)) $(if $(RUN),--run-dir $(RUN))

preview: install
	$(PY) -m pipeline.preview --shards $(SHARDS) --labels $(OUT)

bench: install sample
	$(OFFLINE) $(PY) -m bench.run

# G1-G4 on the GPU (no Ray needed; bench/gpu_run.sh runs the same without the venv)
bench-gpu: install sample
	$(OFFLINE) $(PY) -m bench.run --device cuda

download: install
	$(PY) -m pipeline.download --shards $(SHARDS) --tsv "$(TSV)"

clean:
	rm -rf data/labels runs bench/results.json
