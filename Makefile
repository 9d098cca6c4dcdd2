# One place that creates the environment; README and .ci/run call these targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: env demo test clean

$(BIN)/pipeline: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip freeze --exclude-editable > $(VENV)/tested-versions.txt
	touch $@

env: $(BIN)/pipeline

demo: env
	$(BIN)/pipeline demo

test: env
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
