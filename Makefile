# Two entry points for a fresh clone (see README): `make demo` and `make test`.
# Both create .venv and install the project first. torch is installed on its own, before the
# project, so pip never swaps it: `torch==2.13.0` is a CUDA build on a GPU machine and the local
# CPU wheel on a CPU-only one. Override with e.g. `make test TORCH="torch==2.13.0 --index-url ..."`.
PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
DEMO_EXTRAS := dev
TEST_EXTRAS := dev,opencompass,lmeval
PY          := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist loadfile  # two workers (pytest-xdist), one test file per worker at a time

# $(call install,EXTRAS): venv + torch + the project with EXTRAS, once per set of extras (again when setup.py
# changes, e.g. a new dependency)
define install
	@test $(VENV)/.installed-$(1) -nt setup.py || { \
	  $(PYTHON) -m venv $(VENV) && \
	  $(PY) -m pip install --quiet $(TORCH) && \
	  $(PY) -m pip install --quiet -e ".[$(1)]" && \
	  touch $(VENV)/.installed-$(1); }
endef

.PHONY: demo test clean

demo:
	$(call install,$(DEMO_EXTRAS))
	$(PY) demo.py

test:
	$(call install,$(TEST_EXTRAS))
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out
