# Two commands for a new user: `make run` and `make test`.
# Both create .venv when it is missing and install the pinned requirements into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test test-fast browser bench train sweep tensorboard clean-venv

# The stamp is older than any requirements file edited since the last install, so make reinstalls.
$(STAMP): requirements.txt requirements-test.txt requirements-sweep.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-test.txt -r requirements-sweep.txt
	@touch $(STAMP)

# Debian's Chromium drives the browser tests (Playwright cannot download its own browser here).
browser:
	@test -x $(CHROMIUM) || { \
	  echo "installing Debian chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }
	@test -x $(CHROMIUM) || { echo "chromium is still missing at $(CHROMIUM)"; exit 1; }

run: $(STAMP)
	$(PY) concat_world_model_explorer_gradio.py

test: $(STAMP) browser
	$(PY) -m pytest -q

# Everything except the browser tests, for a quick loop while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not browser"

bench: $(STAMP)
	$(PY) benchmarks/bench_world_model.py --quick

# The headless trainer: make train ARGS="--session NAME --iterations 200 --tensorboard runs"
train: $(STAMP)
	$(PY) train_world_model.py $(ARGS)

# The learning sweep on a local Ray cluster: make sweep ARGS="--seeds 11 22 --threads-list 1 --seconds 60"
sweep: $(STAMP)
	$(PY) benchmarks/bench_learning.py --matrix $(ARGS)

# TensorBoard over the trainer's and the app's logs: make tensorboard LOGDIR=runs
LOGDIR ?= runs
tensorboard: $(STAMP)
	$(PY) -m tensorboard.main --logdir $(LOGDIR)

clean-venv:
	rm -rf $(VENV)
