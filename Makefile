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
# extras installed into .venv (the image uses EXTRAS=cluster: object stores and Ray's job server)
EXTRAS ?= test
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= cliptex:$(VERSION)
TASK ?= seg
HEAD ?= linear
DATA ?=
CKPT ?=
ARCH ?=
RUNS ?= runs/probe runs/zeroshot
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: help install sample test pseudolabel train preview bench bench-gpu download docker clean probe zeroshot probe-table

help:
	@echo 'targets: install sample test pseudolabel train preview bench bench-gpu download docker clean probe zeroshot probe-table'
	@echo 'e.g. make pseudolabel SHARDS=sample PROFILE=smoke; make train SHARDS=sample PROFILE=smoke STEPS=50'
	@echo '     make probe TASK=seg HEAD=linear DATA=/data/VOC CKPT=runs/<run>/export; make zeroshot DATA=... CKPT=...'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml (they only import as a pair)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
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

# frozen-encoder probes and zero-shot evaluation (docs/PROBE.md); datasets and weights by path, never downloaded
# --check first: a missing dataset or weight file is one error line (exit 2), not a torchrun failure report
PROBE_ARGS = --task $(TASK) --head $(HEAD) --data "$(DATA)" --ckpt "$(CKPT)" --profile $(PROFILE) \
  $(if $(ARCH),--arch $(ARCH)) $(if $(RUN),--run-dir $(RUN))
probe: install
	@$(OFFLINE) $(PY) -m probe $(PROBE_ARGS) --check
	$(OFFLINE) $(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m probe $(PROBE_ARGS) --resume latest

zeroshot: install
	$(OFFLINE) $(PY) -m probe.zeroshot --data "$(DATA)" --ckpt "$(CKPT)" $(if $(ARCH),--arch $(ARCH))

probe-table: install
	$(PY) -m probe.table $(RUNS)

# G1-G4 on the GPU (no Ray needed; bench/gpu_run.sh runs the same without the venv)
bench-gpu: install sample
	$(OFFLINE) $(PY) -m bench.run --device cuda

download: install
	$(PY) -m pipeline.download --shards $(SHARDS) --tsv "$(TSV)"

# the cluster image (needs a Docker engine; push it where your cluster pulls from, then name
# that image in docker/*.yaml)
docker:
	docker build -f docker/Dockerfile -t $(IMAGE) .

clean:
	rm -rf data/labels runs bench/results.json
