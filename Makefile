# `make demo` and `make test` are the README's two commands; both create the venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.farm-installed

.PHONY: demo test lint rehearse bench clean

$(STAMP): pyproject.toml Makefile  # (the Makefile: what the install step installs)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# The CPU wheel first: otherwise pip resolves `torch` to the CUDA build (several GB).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	@# DeepSpeed too: its ZeRO-2/3 stages run in the tests (on CPU, over gloo).
	$(BIN)/python -m pip install -q -e ".[test,deepspeed]"
	touch $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/farm run jobs/quickstart.yaml

# ruff (pinned in the test extra; pyproject.toml's [tool.ruff]): `ruff format farm tests bench` fixes what the second check finds.
# lint-imports (import-linter): the farm's layers, pyproject.toml's [tool.importlinter] (docs/ARCHITECTURE.md).
lint: $(STAMP)
	$(BIN)/ruff check farm tests bench
	$(BIN)/ruff format --check farm tests bench
	$(BIN)/lint-imports

# DeepSpeed compiles its CPU ops with g++ and ninja on first use (deepspeed_shm_comm: ~150 CPU-seconds,
# about a minute on 2 cores): the builds are kept in the user's cache, outside the venv, so that a clean clone (CI) reuses
# them; one folder per Python, torch and DeepSpeed version, since an op built against other headers
# loads and crashes. (Expanded when the recipe runs, after the venv exists.)
TORCH_EXT = $${XDG_CACHE_HOME:-$$HOME/.cache}/torch_extensions/farm-$(shell $(BIN)/python -c \
	'import sys, importlib.metadata as m; print("py%d%d-torch%s-deepspeed%s" % (*sys.version_info[:2], m.version("torch"), m.version("deepspeed")))')

# The venv's bin first on PATH: torch finds `ninja` (a dependency of deepspeed) there, also in Ray workers.
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" TORCH_EXTENSIONS_DIR="$${TORCH_EXTENSIONS_DIR:-$(TORCH_EXT)}" \
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} \
		$(BIN)/python -m pytest -v --durations=15

# Every paper profile rehearsed end to end (`--smoke`) on a local cluster against the hub mirror and
# a local S3 (tests/e2e/test_rehearsal.py, which `make test` runs too): ~10 min on 2 cores.
rehearse: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" TORCH_EXTENSIONS_DIR="$${TORCH_EXTENSIONS_DIR:-$(TORCH_EXT)}" \
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} \
		$(BIN)/python -m pytest -v -s tests/e2e/test_rehearsal.py

# Not tests, not in CI: each prints its figures and ratio and writes bench/results/<name>.json
# (~18 min on 2 cores; run one at a time on an otherwise idle machine).
bench: $(STAMP)
	export RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1; \
	fail=0; t0=$$(date +%s); \
	for b in farm_overhead stage_reuse label_throughput batched_scoring bench_stage_overhead step_efficiency sentence_split plan_hash; do \
		echo "== bench/$$b.py"; start=$$(date +%s); \
		$(BIN)/python bench/$$b.py || fail=1; \
		echo "($$b: $$(( $$(date +%s) - start ))s)"; echo; \
	done; \
	echo "bench: $$(( $$(date +%s) - t0 ))s in all"; exit $$fail

clean:
	rm -rf $(VENV) results/.store
