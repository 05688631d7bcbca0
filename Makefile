# Set-up on a fresh machine is two commands: `make demo` (the main job) and `make test`.
# Each creates .venv with the pinned dev stack (requirements-dev.txt) and builds the C++ kernels
# the first time, and again whenever the requirements or the build inputs change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kplora-installed
PYTEST_ARGS ?=

.PHONY: demo test bench clean

$(STAMP): requirements-dev.txt pyproject.toml setup.py kplora_kernels/ops/cpp_build.py $(wildcard csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(PY) -m kplora_kernels demo

# Tests and benchmarks (each benchmark runs once, untimed, so it cannot rot). The C++ kernels must
# have built: KPLORA_REQUIRE_CPP=1 turns a missing extension into a failure instead of a skip.
test: $(STAMP)
	KPLORA_REQUIRE_CPP=1 $(PY) -m pytest -q --benchmark-disable $(PYTEST_ARGS)

# Timed benchmarks at full size (minutes on 2 cores); see bench/README.md.
bench: $(STAMP)
	KPLORA_BENCH_FULL=1 $(PY) -m pytest bench --benchmark-only --benchmark-columns=min,median,mean,rounds $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info kplora_kernels/*.so .pytest_cache .benchmarks
