# Each target installs what it needs into .venv first, so each works from a fresh clone.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test book reproduce clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,notebooks,book]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

book: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/jupyter-book build . -W -n --keep-going

reproduce: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/xxpo reproduce --profile full

clean:
	rm -rf _build
