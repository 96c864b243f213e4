# Set-up and entry points.  Everything installs what it needs itself, so on a
# fresh Debian 12 machine, as root, `make demo` and `make test` are enough.

VENV   ?= .venv
PY     := $(VENV)/bin/python
# Debian's python3, not a per-user build: the venv must be usable by the
# unprivileged users the tests run as.
SYSPY  ?= /usr/bin/python3
DEBS   := fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc attr strace \
          bindfs util-linux procps

.PHONY: deps venv demo test lint bench bench-full clean

deps:
	@missing=""; for p in $(DEBS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml | deps
	test -x $(PY) || $(SYSPY) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

demo: venv
	$(PY) -m noatimefs.demo

lint: venv
	$(VENV)/bin/ruff check noatimefs tests bench
	$(VENV)/bin/ruff format --check noatimefs tests bench
	$(VENV)/bin/mypy

test: venv
	$(VENV)/bin/pytest -m 'not slow' $(PYTEST_ARGS)

bench: venv
	$(PY) bench/run.py --small

bench-full: venv
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
