# Two entry points: `make quickstart` (main job on the embedded default) and `make test`.
# Both create .venv, install the package and the Debian Fashion-MNIST dataset when missing; only `test` also
# installs the [test] extra (pytest, Playwright) and chromium, which nothing but the test suite uses.
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/quickstart
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data browser quickstart test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $@

# pytest, httpx and Playwright (the [test] extra): only `make test` needs them
$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed data

data:
	@test -f $(FMNIST) || $(SUDO) apt-get install -y dataset-fashion-mnist \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

# Debian's chromium drives the explorer's browser tests (Playwright uses it; no browser download)
browser:
	@test -x /usr/bin/chromium || $(SUDO) apt-get install -y chromium \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

quickstart: $(VENV)/.installed data
	$(PY) -m patchsae quickstart --run $(RUN)

test: $(VENV)/.test-installed data browser
	$(PY) -m pytest -q

# Speed and memory benchmarks (ratios measured side by side in one process; docs/speed.md).
# Installs the peers of the [bench] extra (sae-lens) into the same venv: it leaves torch and transformers as pinned.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

bench: setup $(VENV)/.bench-installed
	$(PY) benchmarks/bench.py a b c
	$(PY) benchmarks/memory.py
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $(PY) benchmarks/gpu.py; \
	else echo "no CUDA device: benchmarks/gpu.py (the GPU section) skipped"; fi

clean:
	rm -rf $(VENV) runs
