# The two commands: `make run` (the main job) and `make test` (the tests).
# Everything else here is a step they share.

CARGO ?= cargo
MODELS_DIR ?= models
MODEL_DIR := $(MODELS_DIR)/smollm2-135m-instruct
RELEASE_BIN := target/release/instructd
DEBUG_BIN := target/debug/instructd
TEST_VENV := .cache/test-venv
# The PyTorch training job's packages (deploy/trainer-job): its own venv, so the test venv stays small.
JOB_VENV := .cache/trainer-job-venv

.PHONY: run demo test test-venv trainer-job-venv model chat bench bench-compare lint fmt build-release build-debug

## run: Redis (started if none answers), the default model and the pre-training corpus (fetched once),
## the trainer and the gateway.
run: build-release
	bash scripts/ensure-redis.sh
	$(RELEASE_BIN) model fetch-default --models-dir $(MODELS_DIR)
	$(RELEASE_BIN) model fetch-corpus
	bash scripts/run-all.sh $(RELEASE_BIN)

## demo: two answers from the default model on the command line.
demo: build-release
	$(RELEASE_BIN) model fetch-default --models-dir $(MODELS_DIR)
	$(RELEASE_BIN) generate --model $(MODEL_DIR) --chat --max-tokens 64 "What is the capital of France?"

## test: every unit and end-to-end test (fetches the real model once into models/,
## and the Python `openai` client the end-to-end tests drive the gateway with).
test: build-debug test-venv trainer-job-venv
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	command -v haproxy >/dev/null || (apt-get update -qq && apt-get install -y -qq haproxy)
	$(DEBUG_BIN) model fetch-default --models-dir $(MODELS_DIR)
	$(DEBUG_BIN) model fetch-corpus
	bash scripts/build-llama-server.sh
	INSTRUCTD_REQUIRE_LLAMA_SERVER=1 INSTRUCTD_TEST_MODEL=$(abspath $(MODEL_DIR)) INSTRUCTD_TEST_PYTHON=$(abspath $(TEST_VENV))/bin/python INSTRUCTD_REQUIRE_BROWSER=1 INSTRUCTD_REQUIRE_FLEET=1 \
		INSTRUCTD_TRAINER_JOB_PYTHON=$(abspath $(JOB_VENV))/bin/python INSTRUCTD_REQUIRE_TRAINER_JOB=1 \
		$(CARGO) test --workspace --all-targets

test-venv: $(TEST_VENV)/.installed
$(TEST_VENV)/.installed: tests/e2e/requirements.txt
	test -x $(TEST_VENV)/bin/python || python3 -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q -r tests/e2e/requirements.txt
	touch $@

## trainer-job-venv: torch, transformers and accelerate for deploy/trainer-job (CPU use; the wheels are large).
trainer-job-venv: $(JOB_VENV)/.installed
$(JOB_VENV)/.installed: deploy/trainer-job/requirements.txt
	test -x $(JOB_VENV)/bin/python || python3 -m venv $(JOB_VENV)
	$(JOB_VENV)/bin/pip install -q -r deploy/trainer-job/requirements.txt
	touch $@

## chat: talk to the default model interactively.
chat: build-release
	$(RELEASE_BIN) model fetch-default --models-dir $(MODELS_DIR)
	$(RELEASE_BIN) generate --model $(MODEL_DIR) --chat

## bench: the engine benchmark table on the default model.
bench: build-release
	$(RELEASE_BIN) model fetch-default --models-dir $(MODELS_DIR)
	$(RELEASE_BIN) bench --model $(MODEL_DIR)

## bench-compare: the same table for instructd and llama.cpp, back to back.
bench-compare:
	bash bench/compare.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

build-release:
	$(CARGO) build --release --bin instructd

build-debug:
	$(CARGO) build --bin instructd

## bench-gateway: gateway load test (requests/s, p50/p99 at 1, 16, 64 clients) with oha.
.PHONY: bench-gateway
bench-gateway:
	bash bench/gateway/run.sh

## bench-feedback: feedback events/s accepted end to end (HTTP to stream) at 16 and 64 clients, beside redis-benchmark XADD.
.PHONY: bench-feedback
bench-feedback:
	bash bench/feedback/run.sh

## check-cuda: type-check the CUDA build (`cargo check --features cuda --all-targets`) with nvcc and the
## CUDA 13 headers from PyPI wheels (cached in .cache/cuda-venv, target dir .cache/cuda-target); no GPU needed.
.PHONY: check-cuda
check-cuda:
	bash scripts/check-cuda.sh

## bench-external: the gateway's overhead in front of llama-server (requests/s, p50/p99 added), alternating with direct calls.
.PHONY: bench-external
bench-external:
	bash bench/external/run.sh
