# twinioc: `make run` starts the BESSY II twin, `make test` runs the checks. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: install run test lint browser screenshots bench derive container-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: install            ## start the BESSY II twin (make run ARGS="--machine mls")
	$(BIN)/twinioc $(ARGS)

lint: install
	$(BIN)/ruff check .

test: lint browser      ## ruff, then the unit and integration tests (the browser test, too, where Chromium is)
	$(BIN)/python -m pytest

browser:                ## Debian's Chromium and ChromeDriver for the dashboard's browser test; installed as root
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (Debian) for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "no Chromium here, and not root to install it: the browser test skips (apt-get install chromium chromium-driver)"; \
	fi

screenshots: install browser  ## the README's pictures of the dashboard, made by its browser test
	TWINIOC_SCREENSHOTS=docs/screenshots TWINIOC_REQUIRE_BROWSER=1 $(BIN)/python -m pytest tests/test_dashboard.py

container-check:        ## the Dockerfile's install, start and health-check steps, without Docker
	$(PYTHON) .ci/container_steps.py

bench: install          ## each twin under a control room's load; writes bench/results/<machine>.md
	$(BIN)/python bench/bench_twin.py --machine bessy2
	$(BIN)/python bench/bench_twin.py --machine mls
	$(BIN)/python bench/bench_journal.py
	$(BIN)/python bench/bench_fixture.py
	$(BIN)/python bench/bench_restart.py
	$(BIN)/python bench/bench_equilibrium.py
	$(BIN)/python bench/bench_measurements.py
	$(BIN)/python bench/bench_dashboard.py
	$(BIN)/python bench/bench_shadow.py
	$(BIN)/python bench/bench_calibration.py

derive: install         ## rebuild db/ from ../shared/reference
	$(BIN)/python tools/derive_bessy2.py
	$(BIN)/python tools/derive_mls.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache var bench/.build
