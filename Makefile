# depthlab: `make test` and `make demo` work on a fresh clone with only Python present.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.depthlab-installed
DEMO_RECIPE ?= recipes/demo_digits.yaml
DEMO_OUTPUT ?= runs/demo_digits
# accelerate launch gives a CPU process one thread unless told (it uses every core only with --cpu)
CPU_THREADS ?= $(shell nproc)

# Debian's Chromium + ChromeDriver for the dashboard's browser test (tests/test_dashboard.py); root or sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test demo lint clean browser

install: $(STAMP)

# Re-installs only when the package metadata changes; a second `make` reuses .venv.
$(STAMP): setup.cfg pyproject.toml
	@if [ ! -x "$(PY)" ]; then echo ">> creating virtual environment $(VENV)"; $(PYTHON) -m venv $(VENV); \
	else echo ">> reusing virtual environment $(VENV)"; fi
	@echo ">> installing depthlab (editable) with its test extras"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo ">> installing Debian's chromium and chromium-driver (the dashboard's browser test)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

test: $(STAMP) browser
	@echo ">> running the test suite"
	$(PY) -m pytest -q -n 2 --dist worksteal

demo: $(STAMP)
	@echo ">> training the embedded default ($(DEMO_RECIPE)) with accelerate"
	$(VENV)/bin/accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(CPU_THREADS) \
		trainer/train.py --recipe $(DEMO_RECIPE) --output $(DEMO_OUTPUT) --resume auto

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
