# lensprobe: two commands set up everything from nothing.
#   make report   virtual environment (newest TransformerLens) + the main job on the embedded default
#   make test     lint (ruff + radon) then both virtual environments (TL 4.x bridge, TL 2.18
#                 HookedTransformer) + every test
#   make lint     ruff over the package and radon's complexity grades (every function C or better)
#   make docs     the documentation site in build/docs/site (offline; executes the tutorials once)
# torch is pinned through constraints.txt (2.13.0: a local CPU wheel on the project's machines).

PYTHON    ?= python3
VENV      := .venv
VENV_TL2  := .venv-tl2
PIP_FLAGS := -q --disable-pip-version-check -c constraints.txt
OUT       ?= report
PYTEST_ARGS ?=

.PHONY: report test test-tl4 test-tl2 lint bench browser venvs docs clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[dev,ray,docs]"
	touch $@

$(VENV_TL2)/.installed: pyproject.toml constraints.txt
	test -x $(VENV_TL2)/bin/python || $(PYTHON) -m venv $(VENV_TL2)
	$(VENV_TL2)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	$(VENV_TL2)/bin/pip install $(PIP_FLAGS) "transformer-lens==2.18.*" "pyarrow<26" -e ".[dev,ray]"
	touch $@

venvs: $(VENV)/.installed $(VENV_TL2)/.installed

# Headless chromium for the browser tests (Debian package; root on the project's machines).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "could not install chromium: the browser tests will fail with instructions"; }

report: $(VENV)/.installed
	$(VENV)/bin/lensprobe report --out $(OUT)

# Executes every tutorial once (build/docs/executed, reused while the notebook, the package
# and TransformerLens are unchanged) and builds the site with mkdocs --strict; the tutorial
# and docs tests read that same build instead of executing the notebooks again.
docs: $(VENV)/.installed
	$(VENV)/bin/python scripts/build_docs.py

# The docs, tutorial and wheel tests run once, on the TL 4.x venv (they test the site,
# the notebooks and the package, not the backend).
TL4_ONLY := --ignore=tests/test_tutorials.py --ignore=tests/test_docs.py --ignore=tests/test_wheel.py

# ruff (pyproject.toml: pyflakes, bugbear, import order, McCabe <= 20) and radon: any function
# graded D or worse (cyclomatic complexity > 20) fails the build, with the list.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lensprobe
	@worse="$$($(VENV)/bin/radon cc -s -n D lensprobe)"; \
	if [ -n "$$worse" ]; then echo "radon: functions graded D or worse (split them):"; echo "$$worse"; exit 1; fi

test-tl4: $(VENV)/.installed lint browser docs
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-tl2: $(VENV_TL2)/.installed lint
	$(VENV_TL2)/bin/python -m pytest -q $(TL4_ONLY) $(PYTEST_ARGS)

test: test-tl4 test-tl2

bench: $(VENV)/.installed
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(VENV)/bin/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(VENV_TL2) $(OUT) .pytest_cache build
