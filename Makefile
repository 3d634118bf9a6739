# Two commands a newcomer needs: `make demo` (the whole flow on bundled demo data) and `make test`.
# Each installs what it needs first; a second `make setup` is a no-op.
PY := .venv/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup test demo tiny bench clean chromium
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

demo: setup
	$(PY) -m demo.run --out demo-out

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf demo-out .cache/tiny .pytest_cache
