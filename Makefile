# Two commands for a fresh machine:  make demo   and   make test
# Each creates .venv and installs what it needs (torch pinned to the CPU wheel by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-providers venv venv-providers clean bench example mutants

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,hf]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgebuild build examples/digits/edgebuild.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# plant each known bug in a copy of the tree and show the tests catch it (tests/mutants.py)
mutants: $(STAMP)
	$(PY) tests/mutants.py

# A second environment with the registry's default (unpinned) torch, torchvision and timm: the
# torchvision:/timm: provider tests run only there (pytest --providers), and only they do.
PVENV ?= .venv-providers
PSTAMP := $(PVENV)/.installed

$(PSTAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(PVENV)
	$(PVENV)/bin/python -m pip install -q --upgrade pip
	$(PVENV)/bin/python -m pip install -q torch torchvision timm
	grep -v -i -E '^torch(ao)?==' constraints.txt > $(PVENV)/constraints.txt
	$(PVENV)/bin/python -m pip install -q -c $(PVENV)/constraints.txt -e '.[dev,hf,timm,torchvision]'
	touch $(PSTAMP)

venv-providers: $(PSTAMP)

test-providers: $(PSTAMP)
	$(PVENV)/bin/python -m pytest -q --providers

example: $(STAMP)
	$(PY) examples/digits/make_example.py

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) $(PVENV) dist examples/digits/dist .pytest_cache
