# Two commands: `make run` and `make test`. Both create .venv and install
# everything first (Debian build packages included when missing).
# `make deb` builds the Debian package into dist/; `make wheel` the wheel,
# for hosts without it (deploy/install.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.aiod-installed
ARGS   ?=

.PHONY: install run lint test bench deb wheel clean

# aiod/_engine.c too: the editable install builds the engine, and a test run
# must never use an engine built from an older copy of the C.
$(STAMP): pyproject.toml deploy/debian-deps.sh aiod/_engine.c
	@sh deploy/debian-deps.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

install: $(STAMP)

run: install
	$(BIN)/aiod run $(ARGS)

# The gates before any test: lint, strict types on aiod/, types on tests/.
lint: install
	$(BIN)/ruff check
	$(BIN)/mypy --strict aiod
	$(BIN)/mypy tests

# The system tests build the .deb from this tree themselves (tests/system).
test: lint
	@sh deploy/debian-deps.sh --test
	$(BIN)/python -m pytest $(ARGS)

bench: install
	$(BIN)/python benchmarks/run.py $(ARGS)

deb:
	@sh deploy/debian-deps.sh --deb
	@sh deploy/build-deb.sh dist

# A throwaway venv of its own for pip: no system pip, no project venv needed.
wheel:
	@test -x build/wheel-env/bin/pip || $(PYTHON) -m venv build/wheel-env
	build/wheel-env/bin/pip wheel -q --disable-pip-version-check --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info
