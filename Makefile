# Two entry points (see README): `make demo` and `make test`. Each creates/updates .venv by itself, from the lock.
#
# The environment is requirements/lock.txt: every package of the default and test installs at an exact version,
# with its hashes, for every platform and Python >= 3.10 (uv's universal resolution). uv installs it; uv itself
# comes first from requirements/uv.txt (the same version, with its hashes) through the venv's pip. Two fresh
# machines get the same versions; a new upstream release changes nothing until `make lock` is run and committed.
#
#   make lock          resolve the newest releases that pyproject.toml allows into the lock (then run make test)
#   make test-latest   the suite against the newest releases of everything, ignoring the lock (.venv-latest)
#   make test-lowest   the suite against the lowest versions pyproject.toml allows for bnfold's direct
#                      dependencies (.venv-lowest)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
LOCK   := requirements/lock.txt
STAMP  := $(VENV)/.bnfold-installed
EXTRAS := --extra onnx --extra tvm --extra images --extra test
# what `make lock` resolves: bnfold's dependencies with every extra, and the tools above, with hashes
COMPILE = pip compile pyproject.toml requirements/tools.in $(EXTRAS) --universal --python-version 3.10 \
          --generate-hashes --no-header --quiet

.PHONY: demo test test-all test-latest test-lowest lock lint bench clean browser

$(UV):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements/uv.txt

$(LOCK): | $(UV)
	@echo "no $(LOCK): resolving the newest releases pyproject.toml allows into a new lock"
	$(UV) $(COMPILE) -o $(LOCK)
	@awk '/^uv==/{p=1} p{print} p && !/\\$$/{exit}' $(LOCK) > requirements/uv.txt

lock: | $(UV)
	$(UV) $(COMPILE) --upgrade -o $(LOCK)
	@awk '/^uv==/{p=1} p{print} p && !/\\$$/{exit}' $(LOCK) > requirements/uv.txt
	@echo "updated $(LOCK) and requirements/uv.txt: run make test, then commit both"

$(STAMP): $(UV) $(LOCK) pyproject.toml
	$(UV) pip sync --quiet --python $(PY) --require-hashes $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps --no-build-isolation -e .
	# the native statistics kernel is built here, once, not inside the first user call (no compiler: fallback)
	-$(PY) -m bnfold.recalibration.native
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnfold demo

# one pytest worker per core (pytest-xdist), a test file per worker at a time: module fixtures are built once
PYTEST = -m pytest -q -n auto --dist loadfile

# report.html is checked in a real headless Chromium (tests/htmlreport). Missing, it is installed with apt when this
# is root (or has password-less sudo) on a Debian/Ubuntu machine; otherwise the browser tests skip -- except under CI
# (CI=true), where they fail: a CI run never passes without the browser. BNFOLD_CHROMIUM=/path picks another one.
CHROMIUM_NAMES := chromium chromium-browser google-chrome google-chrome-stable

browser:
	@found="$$BNFOLD_CHROMIUM$$(for b in $(CHROMIUM_NAMES); do command -v $$b; done)"; \
	if [ -n "$$found" ]; then :; \
	elif command -v apt-get >/dev/null; then \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	        echo "no Chromium and no root: the report.html browser tests will skip (fail under CI)"; exit 0; fi; \
	    echo "installing chromium with apt (for the report.html browser tests)"; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; \
	else echo "no Chromium and no apt-get: the report.html browser tests will skip (fail under CI)"; fi

test: $(STAMP) browser
	$(PY) -m ruff check bnfold tests bench
	$(PY) $(PYTEST)

test-all: $(STAMP) browser
	BNFOLD_SLOW=1 $(PY) $(PYTEST)

# A fresh venv beside the locked one, resolved without the lock: the newest release of every dependency (within
# pyproject.toml's ranges) or the lowest one of each direct dependency. The versions used are printed and kept
# in the venv's versions.txt.
# (ruff's rules change between its releases: the lowest run skips the lint, the latest one keeps it.)
test-latest test-lowest: test-%: | $(UV)
	rm -rf $(VENV)-$*
	$(PYTHON) -m venv $(VENV)-$*
	$(UV) pip compile pyproject.toml $(EXTRAS) --no-header --quiet \
	    $(if $(filter lowest,$*),--resolution lowest-direct,) -o $(VENV)-$*/requirements.txt
	$(UV) pip sync --quiet --python $(VENV)-$*/bin/python $(VENV)-$*/requirements.txt
	$(UV) pip install --quiet --python $(VENV)-$*/bin/python --no-deps -e .
	-$(VENV)-$*/bin/python -m bnfold.recalibration.native
	$(UV) pip freeze --python $(VENV)-$*/bin/python > $(VENV)-$*/versions.txt
	@grep -iE '^(torch|torchvision|transformers|timm|onnx|onnxruntime|onnxscript|onnxsim|numpy|apache-tvm)==' \
	    $(VENV)-$*/versions.txt | tr '\n' ' '; echo
	$(if $(filter latest,$*),$(VENV)-$*/bin/python -m ruff check bnfold tests bench,)
	$(VENV)-$*/bin/python $(PYTEST)

# The benchmarks behind BENCHMARKS.md that run in minutes; the TVM one tunes for about an hour, so it is printed.
bench: $(STAMP)
	nice -n 10 $(PY) bench/bench_recalibrate.py
	nice -n 10 $(PY) bench/bench_recalibrate_graphs.py
	$(PY) bench/zoo.py
	$(PY) bench/bias_precision.py
	@echo "TVM tuning benchmark (~1 h): $(PY) bench/bench_tvm.py --cache-dir ~/.cache/bnfold-tvm"

clean:
	rm -rf $(VENV) $(VENV)-latest $(VENV)-lowest .pytest_cache
