# gmtrouter — common tasks. Every target installs what it needs on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

UV ?= uv
PY := .venv/bin/python
TOOLS := $(CURDIR)/.tools/bin
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.0
PROTO_SRC := protos/gmtrouter/v1/router.proto
GO_OUT := protos/gen/go

.PHONY: help install uv proto proto-check go-build go-test helm-check helm-schema lint typecheck \
        check test demo serve \
        neo4j-install neo4j-start neo4j-stop neo4j-status clean bench soak

help:
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

uv:  ## install uv itself when missing
	@command -v $(UV) >/dev/null || python3 -m pip install -q "uv==0.13.8"

install: uv  ## create .venv from uv.lock (CPU/GPU torch from PyPI; cached by uv)
	$(UV) sync --frozen

$(TOOLS)/protoc-gen-go:
	GOBIN=$(TOOLS) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)

$(TOOLS)/protoc-gen-go-grpc:
	GOBIN=$(TOOLS) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

proto: install $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc  ## regenerate Python and Go stubs
	$(PY) -m grpc_tools.protoc -I protos \
	  --python_out=protos --grpc_python_out=protos --mypy_out=protos --mypy_grpc_out=protos \
	  --plugin=protoc-gen-mypy=.venv/bin/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=.venv/bin/protoc-gen-mypy_grpc \
	  $(PROTO_SRC)
	mkdir -p $(GO_OUT)
	$(PY) -m grpc_tools.protoc -I protos \
	  --plugin=protoc-gen-go=$(TOOLS)/protoc-gen-go \
	  --plugin=protoc-gen-go-grpc=$(TOOLS)/protoc-gen-go-grpc \
	  --go_out=$(GO_OUT) --go_opt=paths=source_relative \
	  --go-grpc_out=$(GO_OUT) --go-grpc_opt=paths=source_relative \
	  $(PROTO_SRC)

proto-check: proto  ## fail when the committed stubs differ from freshly generated ones
	@git diff --exit-code -- protos || { echo "generated stubs are stale: run 'make proto' and commit" >&2; exit 1; }
	@test -z "$$(git status --porcelain -- protos)" || { git status --porcelain -- protos; echo "untracked generated files: run 'make proto' and commit" >&2; exit 1; }

go-build:  ## compile the generated Go stubs (and every Go package of the module)
	go build ./...
	go vet ./...

go-test: install  ## Go client tests against the real service
	go test -count=1 ./...

helm-check:  ## lint, render and validate the Helm chart; hadolint the Dockerfile (tools in .tools/)
	tools/helm-check.sh

helm-schema: install  ## regenerate helm/gmtrouter/values.schema.json from server/config.py
	$(PY) helm/gen-values-schema.py

lint: install  ## ruff (lint + format check)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck: install  ## mypy
	.venv/bin/mypy

check: lint typecheck proto-check go-build helm-check  ## every static check CI runs

test: install neo4j-install  ## the test suite, against a throw-away local Neo4j unless NEO4J_URI is set
	tools/run-tests.sh

DEMO_DIR := out/demo
DEMO_SPLIT := --holdout-fraction 0.5 --split-seed 0

# Retrained when the network or its training changes (an older checkpoint would still load).
$(DEMO_DIR)/gmtrouter-llmfao.pt: model/network.py model/training.py model/data.py | install
	.venv/bin/gmtrouter train --dataset llmfao --data-path examples/data/llmfao $(DEMO_SPLIT) \
	  --out $@

demo: install $(DEMO_DIR)/gmtrouter-llmfao.pt  ## train on half the bundled LLMFAO workers, replay the other half through the live API
	.venv/bin/gmtrouter replay --dataset llmfao --data-path examples/data/llmfao --embedded \
	  --config examples/demo.yaml $(DEMO_SPLIT) \
	  --json $(DEMO_DIR)/replay-llmfao.json --plot $(DEMO_DIR)/replay-llmfao.png

serve: install  ## gmtrouter serve on the embedded store
	.venv/bin/gmtrouter serve

bench: install neo4j-install  ## benchmarks against a served checkpoint -> bench/results/latest.json (~6 min)
	$(PY) -m bench.run --out bench/results/latest.json

soak: install  ## 5-minute soak of gmtrouter serve on SQLite -> out/soak/sqlite.json (exit 1 on a failed criterion)
	$(PY) -m bench.soak --duration-s 300 --store sqlite --json out/soak/sqlite.json

neo4j-install:  ## download the Neo4j server jars from Maven Central (cached in ~/.m2)
	tools/neo4j/neo4j.sh install

neo4j-start: neo4j-install  ## start the local Neo4j (Bolt 127.0.0.1:7687, Browser :7474)
	tools/neo4j/neo4j.sh start

neo4j-stop:  ## stop the local Neo4j by its recorded PID
	tools/neo4j/neo4j.sh stop

neo4j-status:  ## is the local Neo4j running?
	tools/neo4j/neo4j.sh status

clean:
	rm -rf .tools .mypy_cache .ruff_cache .pytest_cache
