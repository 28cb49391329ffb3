# Two commands for a fresh machine:  make demo   and   make test
# Each creates .venv and installs what it needs (torch pinned to the CPU wheel by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-providers test-emulated venv venv-providers clean bench example example-textures mutants

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,hf,executorch,coreml]'
	# LiteRT: litert-converter pins xdsl==0.28.0, which declares typing-extensions<4.13 while
	# pydantic 2.14 needs >=4.16; pip cannot resolve both, so the LiteRT packages go in by
	# name and typing-extensions is put back (xdsl works with it: the LiteRT tests convert)
	$(PY) -m pip install -q -c constraints.txt litert-torch ai-edge-litert ai-edge-quantizer
	$(PY) -m pip install -q typing-extensions==4.16.0
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

# aarch64 bundles under qemu-user: needs root, qemu-user-static and debootstrap; the arm64
# root is made once under the edgebuild cache (~10 min), later runs take ~2 min
test-emulated: $(STAMP)
	EDGEBUILD_TEST_EMULATED=1 $(PY) -m pytest -q -m emulated

example: $(STAMP)
	$(PY) examples/digits/make_example.py

# The realistic example: 3,600 generated 128x128 RGB images into examples/textures/data
# (gitignored; about 1 min on 2 cores), then the build. make_example.py --pretrain reproduces the
# committed backbone.safetensors (a few minutes).
example-textures: $(STAMP)
	$(PY) examples/textures/make_example.py
	$(VENV)/bin/edgebuild build examples/textures/edgebuild.yaml

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) $(PVENV) dist examples/digits/dist examples/textures/dist examples/textures/data .pytest_cache
