# Two entry points for a fresh clone (see README): `make demo` and `make test`.
# Both create .venv and install the project first. torch is installed on its own, before the
# project, so pip never swaps it: `torch==2.13.0` is a CUDA build on a GPU machine and the local
# CPU wheel on a CPU-only one. Override with e.g. `make test TORCH="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= dev
PY     := $(VENV)/bin/python

.PHONY: install demo test clean

$(VENV)/.installed-$(EXTRAS): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

demo: install
	$(PY) demo.py

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
