# Each target installs what it needs into .venv first, so each works from a fresh clone.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# SFT base models are trained once and cached here (tests, notebooks and `xxpo train` share them).
export XXPO_CACHE ?= $(CURDIR)/.xxpo_cache
export HF_HUB_OFFLINE := 1

.PHONY: test book reproduce clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,notebooks,book,verl]"
	$(BIN)/pip install --quiet --no-deps verl==0.9.1
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadgroup

book: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going

reproduce: $(STAMP)
	$(BIN)/xxpo reproduce --profile full

clean:
	rm -rf _build
