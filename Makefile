# Two entry points: `make quickstart` (main job on the embedded default) and `make test`.
# Both create .venv, install the package and the Debian Fashion-MNIST dataset when missing; only `test` also
# installs the [test] extra (pytest, Playwright) and chromium, which nothing but the test suite uses.
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/quickstart
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data browser quickstart test bench fuzz clean

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
	$(PY) benchmarks/bench.py a b c e
	$(PY) benchmarks/memory.py
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $(PY) benchmarks/gpu.py; \
	else echo "no CUDA device: benchmarks/gpu.py (the GPU section) skipped"; fi

# Generated hostile files for every loader (tests/test_fuzz.py, hypothesis profile `full`): 1,000 cases per test
# function, a fresh seed each run; and every stage killed at four moments (tests/test_kill.py). The last line
# counts the cases per loader family. `make test` runs a fixed-seed short version of both. FUZZ_CASES=N changes
# the cases per test function.
FUZZ_CASES ?= 1000
fuzz: setup
	@rm -f .fuzz-counts.json
	PATCHSAE_FUZZ=full PATCHSAE_FUZZ_CASES=$(FUZZ_CASES) PATCHSAE_FUZZ_COUNTS=.fuzz-counts.json \
	  PATCHSAE_KILL_POINTS=all $(PY) -m pytest -q -p no:warnings tests/test_fuzz.py tests/test_kill.py
	@$(PY) tests/fuzzing.py .fuzz-counts.json

clean:
	rm -rf $(VENV) runs
