# Two commands do all the set-up: `make lab` and `make test`. Both create or refresh .venv and install the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prune_lab-installed
# torch and torchvision are pinned together here (pyproject.toml keeps lower bounds only).
CONSTRAINTS ?= constraints.txt

.PHONY: lab test venv bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

# JupyterLab refuses to start as root unless told: allow it only when running as root (containers).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) $(LAB_ARGS) notebooks/01_quickstart.ipynb

test: $(STAMP)
	PRUNE_LAB_SMOKE=1 $(PY) -m pytest --nbmake tests notebooks $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/slider_latency.py
	$(PY) benchmarks/lab_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
