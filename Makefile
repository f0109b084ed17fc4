# Two entry points for a fresh clone (see README): `make demo` and `make test`.
# Both create .venv and install the project first. torch is installed on its own, before the
# project, so pip never swaps it: `torch==2.13.0` is a CUDA build on a GPU machine and the local
# CPU wheel on a CPU-only one. Override with e.g. `make test TORCH="torch==2.13.0 --index-url ..."`.
# `make test` also installs the distribution's Chromium for the app's browser test (tests/test_app.py).
PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
DEMO_EXTRAS := dev
TEST_EXTRAS := dev,opencompass,lmeval,app
CHROMIUM    := /usr/bin/chromium
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

# the browser the app's test drives (playwright's own browser download cannot work offline): the distribution's
# package, installed with apt-get when missing and this is root; otherwise a note, and the test skips (fails in CI)
define chromium
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (apt-get) for tests/test_app.py" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
	      echo "note: apt-get install chromium failed; tests/test_app.py's browser test cannot run"; \
	  else \
	    echo "note: $(CHROMIUM) is missing; install it as root (apt-get install chromium) to run the browser test"; \
	  fi; }
endef

.PHONY: demo test clean

demo:
	$(call install,$(DEMO_EXTRAS))
	$(PY) demo.py

test:
	$(call install,$(TEST_EXTRAS))
	$(call chromium)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out
