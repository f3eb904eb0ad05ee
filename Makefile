# The two commands: `make run` (the main job) and `make test` (the tests).
# Everything else here is a step they share.

CARGO ?= cargo
MODELS_DIR ?= models
MODEL_DIR := $(MODELS_DIR)/smollm2-135m-instruct
RELEASE_BIN := target/release/instructd
DEBUG_BIN := target/debug/instructd

.PHONY: run test model chat bench bench-compare lint fmt build-release build-debug

## run: fetch and import the default model if absent, then a short demo.
run: build-release
	$(RELEASE_BIN) model fetch-default --models-dir $(MODELS_DIR)
	$(RELEASE_BIN) generate --model $(MODEL_DIR) --chat --max-tokens 64 "What is the capital of France?"
	$(RELEASE_BIN) generate --model $(MODEL_DIR) --chat --max-tokens 96 "Give me three tips for writing clear documentation."

## test: every unit and end-to-end test (fetches the real model once into models/).
test: build-debug
	$(DEBUG_BIN) model fetch-default --models-dir $(MODELS_DIR)
	INSTRUCTD_TEST_MODEL=$(abspath $(MODEL_DIR)) $(CARGO) test --workspace --all-targets

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
