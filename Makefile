# On a fresh machine: `make demo` (the API on the shipped model), `make test`, and `make stack`
# (object store + Airflow + API without Docker; `make stack-stop` stops it).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup setup-base setup-stack demo test stop stack stack-stop

# setup-base: what the demo needs (the service, the indexer, the model); setup-stack: + Airflow
# and the S3 server, for `make stack`; setup: + the test tools (browser, Milvus server), for
# `make test`
setup: $(VENV)/.installed
setup-base: $(VENV)/.installed-base
setup-stack: $(VENV)/.installed-stack

$(VENV)/.installed-base: pyproject.toml requirements/serving.txt requirements/models.txt
	@# system tools of the demo script
	@command -v bc >/dev/null && command -v curl >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends bc curl)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-stack: $(VENV)/.installed-base
	$(BIN)/pip install -q -e ".[airflow,s3-server]"
	touch $@

$(VENV)/.installed: $(VENV)/.installed-stack
	@# chromium (browser test), docker-compose (compose validation)
	@command -v chromium >/dev/null && command -v docker-compose >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium docker-compose)
	$(BIN)/pip install -q -e ".[airflow,test]"
	touch $@

demo:
	@t0=$$(date +%s); $(MAKE) --no-print-directory setup-base; echo "=== install: $$(( $$(date +%s) - t0 )) s"
	./deploy/demo.sh

# test files spread over TEST_WORKERS processes (each with its own servers: S3, Milvus)
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

stop:
	@if [ -f data/api.pid ]; then kill $$(cat data/api.pid) 2>/dev/null || true; rm -f data/api.pid; echo stopped; fi

stack: setup-stack
	./deploy/local_stack.sh start

stack-stop:
	./deploy/local_stack.sh stop
