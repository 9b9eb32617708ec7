# The README's two commands are `make demo` and `make test`; `make install` is their shared step.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROMPT ?= a red circle on a blue background

.PHONY: install demo test lint protos clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml setup.py
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[serve,dev]"
	touch $(STAMP)

install: $(STAMP)

protos: install
	$(PY) protos/generate.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest -q

demo: install
	mkdir -p out
	$(VENV)/bin/ditserve demo --prompt "$(PROMPT)" -o out/demo.png

clean:
	rm -rf $(VENV) out build *.egg-info
