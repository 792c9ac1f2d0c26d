# Two commands: `make run` and `make test`. Both create .venv and install
# everything first (Debian build packages included when missing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.aiod-installed
ARGS   ?=

.PHONY: install run test bench clean

$(STAMP): pyproject.toml deploy/debian-deps.sh
	@sh deploy/debian-deps.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

install: $(STAMP)

run: install
	$(BIN)/aiod run $(ARGS)

test: install
	@sh deploy/debian-deps.sh --test
	$(BIN)/python -m pytest $(ARGS)

bench: install
	$(BIN)/python benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
