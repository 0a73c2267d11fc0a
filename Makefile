# Two entry points (see README): `make demo` and `make test`. Each creates/updates .venv by itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bnfold-installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision pinned together: these builds lie on this machine's disk (no multi-GB download).
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[onnx,tvm,test]"
	# the native statistics kernel is built here, once, not inside the first user call (no compiler: fallback)
	-$(PY) -m bnfold.recalibrate.native
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnfold demo

# one pytest worker per core (pytest-xdist), a test file per worker at a time: module fixtures are built once
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile

test: $(STAMP)
	$(PY) -m ruff check bnfold tests bench
	$(PYTEST)

test-all: $(STAMP)
	BNFOLD_SLOW=1 $(PYTEST)

# The benchmarks behind BENCHMARKS.md that run in minutes; the TVM one tunes for about an hour, so it is printed.
bench: $(STAMP)
	nice -n 10 $(PY) bench/bench_recalibrate.py
	nice -n 10 $(PY) bench/bench_recalibrate_graphs.py
	$(PY) bench/zoo.py
	$(PY) bench/bias_precision.py
	@echo "TVM tuning benchmark (~1 h): $(PY) bench/bench_tvm.py --cache-dir ~/.cache/bnfold-tvm"

clean:
	rm -rf $(VENV) .pytest_cache
