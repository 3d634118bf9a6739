# Two commands a newcomer needs: `make demo` (the whole flow on bundled demo data) and `make test`.
# Each installs what it needs first; a second `make setup` is a no-op.
PY := .venv/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup test lint demo tiny bench clean chromium
setup: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

tiny: setup          ## build the tiny offline models into .cache/tiny
	$(PY) -m demo.tiny_models .cache/tiny

chromium:            ## Debian's chromium for the report tests (installed if missing and root)
	tools/ensure-chromium

test: setup chromium
	$(PY) -m pytest -q

lint: setup          ## ruff (lint + format check), mypy strict on shards/ and common/, every `# noqa` with its reason
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	@! grep -rnE --include='*.py' --exclude-dir=.venv --exclude-dir=.cache '# noqa(: *[A-Z]+[0-9]+(, *[A-Z]+[0-9]+)*)? *$$' . \
	  || { echo "a # noqa above carries no reason: write it as '# noqa: CODE - why'"; exit 1; }

demo: setup
	$(PY) -m demo.run --out demo-out

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf demo-out .cache/tiny .pytest_cache
