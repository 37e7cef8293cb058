# Front for CMake and the scripts in scripts/. `make help` lists the targets.
SHELL := /bin/bash
MAKEFLAGS += --no-print-directory
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := build

JOBS ?= 2
BUILD_DIR ?= build
ASAN_DIR ?= build-asan
FUZZ_DIR ?= build-fuzz
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := fuzz_json fuzz_bodies fuzz_openai fuzz_telegram
CMAKE_ARGS ?=
CTEST_ARGS ?=
FORMAT_DIRS := shared edge workers test bench

export BG_BUILD_DIR := $(BUILD_DIR)

.PHONY: all help deps configure build run test test-fast test-run fuzz lint format bench clean screenshots

all: build

help:
	@echo "make build      install missing Debian packages, configure $(BUILD_DIR)/ (-Werror) and build"
	@echo "make run        build, then run the whole service locally (scripts/run.sh)"
	@echo "make test       build; unit+integration+e2e tests, then again under ASan+UBSan ($(ASAN_DIR)/), then make fuzz"
	@echo "make test-fast  the same without the sanitizer pass and the fuzzers"
	@echo "make fuzz       libFuzzer targets (clang, $(FUZZ_DIR)/), FUZZ_SECONDS=$(FUZZ_SECONDS) each"
	@echo "make lint       clang-tidy, cppcheck, banned functions, clang-format, shellcheck"
	@echo "make format     clang-format -i every .c/.h under $(FORMAT_DIRS)"
	@echo "make bench      run bench/run-all.sh"
	@echo "make screenshots refresh docs/screenshots/ (the browser tests in English and Russian)"
	@echo "make clean      remove $(BUILD_DIR)/, $(ASAN_DIR)/ and $(FUZZ_DIR)/ (not .data/)"

deps:
	@scripts/deps.sh

configure: deps
	cmake -S . -B $(BUILD_DIR) -DBG_WERROR=ON $(CMAKE_ARGS)

build: configure
	cmake --build $(BUILD_DIR) -j$(JOBS)

run: build
	scripts/run.sh

# One test stack (PostgreSQL + Redis) serves both passes; every pass runs even when one before
# it failed, and the summary says which failed.
test: build
	scripts/test-stack.sh $(MAKE) --no-print-directory test-run ASAN=1

test-fast: build
	scripts/test-stack.sh $(MAKE) --no-print-directory test-run ASAN=0

# Internal: expects BG_TEST_DATABASE_URL (scripts/test-stack.sh); ASAN=1 adds the sanitizer pass
# and then the fuzzers (make fuzz).
test-run:
	@plain=FAIL; asan=skipped; fuzz=skipped; \
	echo "== tests ($(BUILD_DIR)/) =="; \
	if ctest --test-dir $(BUILD_DIR) --output-on-failure -j$(JOBS) $(CTEST_ARGS); then plain=PASS; fi; \
	if [[ "$(ASAN)" == 1 ]]; then \
	    asan=FAIL; \
	    echo "== tests under ASan+UBSan ($(ASAN_DIR)/) =="; \
	    if cmake -S . -B $(ASAN_DIR) -DBG_ASAN=ON -DBG_UBSAN=ON -DBG_WERROR=ON $(CMAKE_ARGS) && \
	       cmake --build $(ASAN_DIR) -j$(JOBS); then \
	        if ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	           UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	           LSAN_OPTIONS=suppressions=$(CURDIR)/test/lsan.supp \
	           BGT_ADMISSION_SEEDS=3 \
	           ctest --test-dir $(ASAN_DIR) --output-on-failure -j$(JOBS) $(CTEST_ARGS); then asan=PASS; fi; \
	    else \
	        asan="FAIL (build)"; \
	    fi; \
	    fuzz=FAIL; \
	    if $(MAKE) --no-print-directory fuzz; then fuzz=PASS; fi; \
	fi; \
	echo; \
	if [[ $$plain == PASS && $$asan != FAIL* && $$fuzz != FAIL* ]]; then \
	    echo "make test: OK (tests: $$plain, ASan+UBSan: $$asan, fuzz: $$fuzz)"; \
	else \
	    echo "make test: FAILED (tests: $$plain, ASan+UBSan: $$asan, fuzz: $$fuzz)"; exit 1; \
	fi

# The README's screenshots (docs/screenshots/), taken by the browser tests in English and Russian.
screenshots: build
	BGT_SCREENSHOTS=1 scripts/test-stack.sh ctest --test-dir $(BUILD_DIR) -R '^browser_' --output-on-failure

# libFuzzer targets (test/fuzz, clang with ASan+UBSan) for FUZZ_SECONDS each, on a copy of the seed
# corpus so the tree stays clean. A crash, leak, timeout or out-of-memory fails it; the input that
# did it is kept in $(FUZZ_DIR)/findings/ and the fuzzer's output in $(FUZZ_DIR)/<target>.log.
fuzz: deps
	CC=clang cmake -S . -B $(FUZZ_DIR) -DBG_FUZZ=ON -DBG_TESTS=OFF -DBG_WERROR=ON $(CMAKE_ARGS)
	cmake --build $(FUZZ_DIR) -j$(JOBS) --target $(FUZZ_TARGETS)
	@echo "== fuzzing ($(FUZZ_DIR)/, $(FUZZ_SECONDS) s per target) =="; \
	rm -rf -- $(FUZZ_DIR)/corpus $(FUZZ_DIR)/findings; \
	mkdir -p $(FUZZ_DIR)/corpus $(FUZZ_DIR)/findings; \
	failed=(); \
	for t in $(FUZZ_TARGETS); do \
	    cp -r test/fuzz/corpus/bodies $(FUZZ_DIR)/corpus/$$t; \
	    if [[ -d test/fuzz/corpus/$${t#fuzz_} ]]; then cp test/fuzz/corpus/$${t#fuzz_}/* $(FUZZ_DIR)/corpus/$$t/; fi; \
	    if [[ -d test/fixtures/$${t#fuzz_} ]]; then cp test/fixtures/$${t#fuzz_}/*.json $(FUZZ_DIR)/corpus/$$t/; fi; \
	    rc=0; \
	    $(FUZZ_DIR)/bin/$$t -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 \
	        -rss_limit_mb=2048 -artifact_prefix=$(FUZZ_DIR)/findings/$$t- \
	        $(FUZZ_DIR)/corpus/$$t >$(FUZZ_DIR)/$$t.log 2>&1 || rc=$$?; \
	    runs=$$(sed -nE 's/^Done ([0-9]+) runs.*/\1/p' $(FUZZ_DIR)/$$t.log); \
	    found=$$(find $(FUZZ_DIR)/findings -name "$$t-*" | wc -l); \
	    if [[ $$rc -ne 0 || $$found -ne 0 ]]; then \
	        tail -n 40 $(FUZZ_DIR)/$$t.log; \
	        echo "fuzz: $$t: FAILED (exit $$rc, $$found finding(s) in $(FUZZ_DIR)/findings/)"; \
	        failed+=("$$t"); \
	    else \
	        echo "fuzz: $$t: $${runs:-?} runs in $(FUZZ_SECONDS) s, no findings"; \
	    fi; \
	done; \
	if [[ $${#failed[@]} -gt 0 ]]; then echo "fuzz: FAILED ($${failed[*]})"; exit 1; fi; \
	echo "fuzz: OK"

lint: deps
	scripts/lint.sh

format:
	@find $(FORMAT_DIRS) -type d -name node_modules -prune -o -type f \( -name '*.c' -o -name '*.h' \) -print0 \
	    | xargs -0 -r clang-format -i
	@echo "format: done"

bench: build
	@if [[ -x bench/run-all.sh ]]; then bench/run-all.sh; else echo "bench: bench/run-all.sh not found"; fi

clean:
	rm -rf -- $(BUILD_DIR) $(ASAN_DIR) $(FUZZ_DIR)
