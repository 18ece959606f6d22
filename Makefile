# Two commands for a new user: `make run` and `make test`.
# Both create .venv when it is missing and install the pinned requirements into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test test-fast browser bench clean-venv

$(STAMP): requirements.txt requirements-test.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-test.txt
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

clean-venv:
	rm -rf $(VENV)
