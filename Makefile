# The two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Flower must not reinstall the app's dependencies (torch) per run, nor phone home.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_HOME := $(CURDIR)/.fedmoe/flwr-home
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean prometheus

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (fedmoe needs Python 3.11; set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

# The deployment tests scrape a real run with the distribution's Prometheus: Debian's package,
# downloaded and unpacked under .fedmoe/ (not installed: no root needed, and the system's
# /usr/share/doc, which the demo corpora are built from, stays as it is).
PROMETHEUS := .fedmoe/prometheus/usr/bin/prometheus

prometheus: $(PROMETHEUS)

$(PROMETHEUS):
	@command -v apt-get >/dev/null 2>&1 || { echo "error: no apt-get to fetch Debian's prometheus package (put a Prometheus 2.x binary at $(PROMETHEUS))"; exit 1; }
	@echo "fetching Debian's prometheus package into .fedmoe/prometheus (the deployment tests scrape a real run with it)"
	@rm -rf .fedmoe/prometheus-deb && mkdir -p .fedmoe/prometheus-deb
	@cd .fedmoe/prometheus-deb && { apt-get download prometheus >/dev/null 2>&1 || \
	  { echo "updating apt's package lists"; $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && apt-get download prometheus >/dev/null; }; }
	@dpkg-deb -x .fedmoe/prometheus-deb/prometheus_*.deb .fedmoe/prometheus
	@rm -rf .fedmoe/prometheus-deb
	@$(PROMETHEUS) --version | head -1

demo: $(STAMP)
	$(BIN)/fedmoe demo

test: $(STAMP) prometheus
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .fedmoe
