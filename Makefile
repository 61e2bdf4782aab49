# samora_pl: every target calls the `samora` CLI inside a virtual environment this Makefile builds on first use.
# Newcomers need two commands: `make demo` (the whole chain on built-in data) and `make test`.

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
SAMORA   := $(BIN)/samora
STAMP    := $(VENV)/.installed-samora

DATA     ?= demo
RUN      ?= default
LEVEL    ?= all
TEACHER  ?= all
FRACTION ?=
DATA_DIR ?=
PROFILE  ?=
DEVICES  ?=
NUM_NODES ?=
PRECISION ?=
SEED     ?=
NAME     ?= mechanism
SEEDS    ?= 1
ARGS     ?=
RAW      ?=
SOURCE   ?=
OUT      ?=
IN       ?=
TRIALS   ?=
OVERRIDES ?=

COMMON = data.name=$(DATA) run=$(RUN) \
	$(if $(DATA_DIR),data.dir=$(DATA_DIR)) $(if $(PROFILE),profile=$(PROFILE)) \
	$(if $(DEVICES),trainer.devices=$(DEVICES)) $(if $(NUM_NODES),trainer.num_nodes=$(NUM_NODES)) \
	$(if $(PRECISION),trainer.precision=$(PRECISION)) $(if $(SEED),seed=$(SEED)) \
	$(if $(FRACTION),data.fraction=$(FRACTION)) $(if $(OVERRIDES),overrides_file=$(OVERRIDES)) $(ARGS)

.PHONY: setup demo test test-fast test-slow smoke-paper lint format typecheck cpt distill finetune evaluate predict bundle probe check prepare ablation sweep bench tensorboard clean-venv

setup: $(STAMP)

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml (a matched pair).
# sam2 (SAM 2's model code, model.family=sam2) is a source package whose build imports torch: it is installed
# after torch, without build isolation (an isolated build would fetch another torch) and without its optional
# CUDA extension (SAM2_BUILD_CUDA=0; the image path does not use it).
SAM2_PIN := sam2==1.1.0
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/python -m pip install --quiet -e ".[dev,wandb]"
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --quiet --no-build-isolation "$(SAM2_PIN)"
	touch $(STAMP)

demo: $(STAMP)
	$(SAMORA) demo $(COMMON)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# everything not marked slow (no CLI subprocesses, no DDP): the quick loop while editing
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# PROFILE=paper at its real sizes (ViT-B 224, R50-2x+SK, MAE ViT-L) through the README's Synapse commands, from
# weight files in the official layouts, 2 batches per stage on the CPU (tests/test_smoke_paper.py; docs/design.md)
smoke-paper: $(STAMP)
	$(BIN)/python -m pytest -q -s -m slow tests/test_smoke_paper.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# rewrite the tree as lint wants it (imports sorted, fixable rules applied, formatted)
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# mypy on the packages pyproject.toml's [tool.mypy] lists (config/ and models/)
typecheck: $(STAMP)
	$(BIN)/mypy

cpt: $(STAMP)
	$(SAMORA) cpt cpt.teacher=$(TEACHER) $(COMMON)

distill: $(STAMP)
	$(SAMORA) distill distill.level=$(LEVEL) $(COMMON)

finetune: $(STAMP)
	$(SAMORA) finetune $(COMMON)

evaluate: $(STAMP)
	$(SAMORA) evaluate $(COMMON)

# make predict IN=<volume or folder> OUT=<folder> RUN=... [ARGS="finetune.tag=... predict.overlay=true"]
predict: $(STAMP)
	$(SAMORA) predict $(COMMON) $(if $(IN),predict.input=$(IN)) $(if $(OUT),predict.output=$(OUT))

# make bundle RUN=... [OUT=<folder>, default runs/<RUN>/bundle/<tag>] [ARGS="finetune.tag=..."]: a MONAI bundle
bundle: $(STAMP)
	$(SAMORA) bundle $(COMMON) $(if $(OUT),out=$(OUT))

probe: $(STAMP)
	$(SAMORA) probe $(COMMON)

check: $(STAMP)
	$(SAMORA) check $(COMMON)

# make prepare DATA=synapse|la|promise12 RAW=<download> [OUT=<folder>, default data/<DATA>]
# make prepare DATA=generic SOURCE=colin27 RAW=/usr/share/mricron/templates OUT=data/colin27 (real MRI, Debian's mricron-data)
prepare: $(STAMP)
	$(SAMORA) prepare $(COMMON) $(if $(RAW),prepare.raw=$(RAW)) $(if $(OUT),prepare.out=$(OUT)) $(if $(SOURCE),prepare.source=$(SOURCE))

ablation: $(STAMP)
	$(SAMORA) ablation $(NAME) seeds=$(SEEDS) $(COMMON)

# make sweep NAME=lr FRACTION=0.1 [TRIALS=N]: Optuna over experiments/sweeps/NAME.yaml, scored on held-out training slices;
# the best settings land in runs/$(RUN)/sweeps/NAME/best.yaml: make finetune OVERRIDES=runs/$(RUN)/sweeps/NAME/best.yaml
sweep: $(STAMP)
	$(SAMORA) sweep $(NAME) $(if $(TRIALS),trials=$(TRIALS)) $(COMMON)

bench: $(STAMP)
	for script in $(filter-out benchmarks/perf_summary.py benchmarks/_%,$(wildcard benchmarks/*.py)); do echo "== $$script"; $(BIN)/python $$script || exit 1; done

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir runs/$(RUN)

clean-venv:
	rm -rf $(VENV)
