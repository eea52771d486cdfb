# ftmpi: two commands on a fresh machine with Python >= 3.11:
#   make demo   set up .venv (idempotent) and run the demo: a chain loses its head mid-run
#   make test   set up .venv (idempotent) and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; override (e.g. TORCH_SPEC='torch>=2.1') for another build.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.ftmpi-installed

.PHONY: setup demo test lint bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/install-horovod.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test]'
	scripts/install-horovod.sh $(VENV)
	$(VENV)/bin/ompi_info | grep -q 'FT MPI support: yes' || \
	  { echo "Open MPI in $(VENV) has no ULFM fault tolerance"; exit 1; }
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q -ra --durations=20

lint: setup
	$(VENV)/bin/ruff check ftmpi launch tests examples benchmarks
	$(VENV)/bin/ruff format --check ftmpi launch tests examples benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/ftmpi-run bench

clean-venv:
	rm -rf $(VENV)
