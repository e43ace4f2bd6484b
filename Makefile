# Two commands on a fresh clone: `make pipeline` (the whole DAG) and `make test` (the suite).
# Both create .venv, install torch and the project, and build the C++/CUDA extension; `make
# test` adds the test tools (the `dev` extra).
PYTHON ?= python3
VENV ?= .venv
# CUDA users: make pipeline TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
CORES ?= all
SNAKEMAKE_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_STAMP := $(VENV)/.torch-installed
BUILD_TOOLS_STAMP := $(VENV)/.build-tools-installed
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
TEAM_STAMP := $(VENV)/.team-installed
EXT_STAMP := $(VENV)/.ext-built
KERNEL_SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)

.PHONY: setup setup-dev pipeline pipeline-slurm test lint bench dag report docs docs-dag clean-results mlflow-ui mlflow-server

# The runtime set-up (what `make pipeline` needs): the project's dependencies and the extension,
# side by side (two make jobs: pip mostly waits on files, the compiler on the CPU).
setup:
	@$(MAKE) --no-print-directory -j2 $(RUNTIME_STAMP) $(EXT_STAMP)

# The test tools on top (pytest, ruff, transformers, PostgreSQL's driver, the SLURM plugin).
setup-dev: setup
	@$(MAKE) --no-print-directory $(DEV_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(TORCH_STAMP): $(PY)
	$(PIP) install --quiet $(TORCH_SPEC)
	touch $@

$(BUILD_TOOLS_STAMP): $(TORCH_STAMP) constraints.txt
	$(PIP) install --quiet setuptools wheel ninja -c constraints.txt
	touch $@

# --no-build-isolation: an isolated build would fetch another torch. PIPELINE_SKIP_EXTENSION:
# the editable install would compile the extension in a throwaway build folder; it is built
# once, below, where ninja can rebuild only what changed.
$(RUNTIME_STAMP): $(BUILD_TOOLS_STAMP) pyproject.toml constraints.txt
	PIPELINE_SKIP_EXTENSION=1 $(PIP) install --quiet --no-build-isolation -c constraints.txt -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP)
	PIPELINE_SKIP_EXTENSION=1 $(PIP) install --quiet --no-build-isolation -c constraints.txt -e ".[dev]"
	touch $@

# PostgreSQL's driver for `make mlflow-server` (the `team` extra).
$(TEAM_STAMP): $(RUNTIME_STAMP)
	PIPELINE_SKIP_EXTENSION=1 $(PIP) install --quiet --no-build-isolation -c constraints.txt -e ".[team]"
	touch $@

$(EXT_STAMP): $(BUILD_TOOLS_STAMP) setup.py $(KERNEL_SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

pipeline: setup
	$(VENV)/bin/snakemake --profile profiles/local --cores $(CORES) $(SNAKEMAKE_ARGS)

# The same DAG on SLURM (README: Scaling out), e.g.
# make pipeline-slurm SNAKEMAKE_ARGS="--configfile configs/gpu-cluster.yaml"
pipeline-slurm: setup
	$(VENV)/bin/snakemake --profile profiles/slurm $(SNAKEMAKE_ARGS)

# -n 2: the cluster tests (mostly waiting on SLURM) and the tutorials in one worker beside the
# rest (tests/conftest.py); --durations: the slowest tests, to keep the suite's time in view.
test: setup-dev
	$(PY) -m pytest -q -n 2 --durations=25

# ruff; pyright over pipeline/ (pyproject.toml: [tool.pyright]); snakemake --lint, failing on
# every finding but its conda/container advisory: no conda channel
# or container registry is reachable where this is developed, so neither could be tested (the
# rules run in this venv); pipeline/workflow_lint.py says more.
lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyright
	$(PY) -m pipeline.workflow_lint

bench: setup
	$(PY) benchmarks/attention.py

# Through temporary files, so a failing snakemake or dot fails the target and leaves no dag.svg.
dag: setup
	@command -v dot > /dev/null || { echo "error: make dag needs Graphviz's dot (apt install graphviz, brew install graphviz)" >&2; exit 1; }
	@set -e; tmp=$$(mktemp); trap 'rm -f "$$tmp" "$$tmp.svg"' EXIT; \
	$(VENV)/bin/snakemake --dag > "$$tmp"; dot -Tsvg "$$tmp" > "$$tmp.svg"; mv "$$tmp.svg" dag.svg
	@echo "wrote dag.svg"

# Snakemake's report of the last run (every stage's figures and tables, Snakefile: REPORTED), one
# self-contained file; written in a temporary folder here, so a failure leaves no report.html.
# Pass the run's own --configfile in SNAKEMAKE_ARGS.
report: setup
	@set -e; tmp=$$(mktemp -d .report.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	$(VENV)/bin/snakemake --report "$$tmp/report.html" $(SNAKEMAKE_ARGS); \
	mv "$$tmp/report.html" report.html
	@echo "wrote report.html"

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or anchor, or a
# page missing from the nav, fails it. The reference pages are rendered from the code
# (docs/hooks.py). Needs the `dev` extra (mkdocs-material).
docs: setup-dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The picture of the rules on the site and in README.md (needs Graphviz's dot).
docs-dag: setup
	@set -e; tmp=$$(mktemp); trap 'rm -f "$$tmp" "$$tmp.svg"' EXIT; \
	$(VENV)/bin/snakemake --rulegraph > "$$tmp"; dot -Tsvg -Grankdir=LR "$$tmp" > "$$tmp.svg"; \
	mv "$$tmp.svg" docs/images/dag.svg
	@echo "wrote docs/images/dag.svg"

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# A tracking server for a team (README: Tracking for a team); bound to 127.0.0.1 unless
# MLFLOW_HOST is set, which also needs --allowed-hosts in MLFLOW_SERVER_ARGS.
MLFLOW_BACKEND ?= postgresql://mlflow@127.0.0.1:5432/mlflow
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlflow-artifacts
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_SERVER_ARGS ?=
mlflow-server: setup $(TEAM_STAMP)
	$(VENV)/bin/mlflow server --backend-store-uri $(MLFLOW_BACKEND) \
		--artifacts-destination $(MLFLOW_ARTIFACTS) --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		$(MLFLOW_SERVER_ARGS)

clean-results:
	rm -rf results logs .resume .snakemake/metadata
