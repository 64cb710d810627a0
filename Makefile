# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test stop

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# system tools: bc/curl (demo), chromium (browser test), docker-compose (compose validation)
	@command -v bc >/dev/null && command -v curl >/dev/null && command -v chromium >/dev/null \
		&& command -v docker-compose >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends \
			bc curl chromium docker-compose)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[airflow,test]"
	touch $@

demo:
	@t0=$$(date +%s); $(MAKE) --no-print-directory setup; echo "=== install: $$(( $$(date +%s) - t0 )) s"
	./deploy/demo.sh

test: setup
	$(BIN)/python -m pytest

stop:
	@if [ -f data/api.pid ]; then kill $$(cat data/api.pid) 2>/dev/null || true; rm -f data/api.pid; echo stopped; fi
