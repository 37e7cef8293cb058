# Front for CMake and the scripts in scripts/. `make help` lists the targets.
SHELL := /bin/bash
MAKEFLAGS += --no-print-directory
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := build

JOBS ?= 2
BUILD_DIR ?= build
ASAN_DIR ?= build-asan
CMAKE_ARGS ?=
CTEST_ARGS ?=
FORMAT_DIRS := shared edge workers test bench

export BG_BUILD_DIR := $(BUILD_DIR)

.PHONY: all help deps configure build run test test-fast test-run lint format bench clean

all: build

help:
	@echo "make build      install missing Debian packages, configure $(BUILD_DIR)/ (-Werror) and build"
	@echo "make run        build, then run the whole service locally (scripts/run.sh)"
	@echo "make test       build; unit+integration+e2e tests, then again under ASan+UBSan ($(ASAN_DIR)/)"
	@echo "make test-fast  the same without the sanitizer pass"
	@echo "make lint       clang-tidy, cppcheck, banned functions, clang-format, shellcheck"
	@echo "make format     clang-format -i every .c/.h under $(FORMAT_DIRS)"
	@echo "make bench      run bench/run-all.sh"
	@echo "make clean      remove $(BUILD_DIR)/ and $(ASAN_DIR)/ (not .data/)"

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

# Internal: expects BG_TEST_DATABASE_URL (scripts/test-stack.sh); ASAN=1 adds the sanitizer pass.
test-run:
	@plain=FAIL; asan=skipped; \
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
	           ctest --test-dir $(ASAN_DIR) --output-on-failure -j$(JOBS) $(CTEST_ARGS); then asan=PASS; fi; \
	    else \
	        asan="FAIL (build)"; \
	    fi; \
	fi; \
	echo; \
	if [[ $$plain == PASS && $$asan != FAIL* ]]; then \
	    echo "make test: OK (tests: $$plain, ASan+UBSan: $$asan)"; \
	else \
	    echo "make test: FAILED (tests: $$plain, ASan+UBSan: $$asan)"; exit 1; \
	fi

lint: deps
	scripts/lint.sh

format:
	@find $(FORMAT_DIRS) -type d -name node_modules -prune -o -type f \( -name '*.c' -o -name '*.h' \) -print0 \
	    | xargs -0 -r clang-format -i
	@echo "format: done"

bench: build
	@if [[ -x bench/run-all.sh ]]; then bench/run-all.sh; else echo "bench: bench/run-all.sh not found"; fi

clean:
	rm -rf -- $(BUILD_DIR) $(ASAN_DIR)
