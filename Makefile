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

# The deployment tests scrape a real run with the distribution's Prometheus (Debian's package).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "error: prometheus not found and no apt-get to install it (install Prometheus 2.x and put it on PATH)"; exit 1; }; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian's prometheus package (the deployment tests scrape a real run with it)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	}

demo: $(STAMP)
	$(BIN)/fedmoe demo

test: $(STAMP) prometheus
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .fedmoe
