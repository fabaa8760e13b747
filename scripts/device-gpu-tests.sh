#!/usr/bin/env bash
# The GPU checks in one call on a lent CUDA machine (no vLLM there, no network): the `gpu`-marked tests.
# Prepare here once (wheels for what that image lacks, py3.12; ~14 MiB):
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform any -d .whl llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru pydantic==2.12.5 \
#     pydantic-core==2.41.5 annotated-types typing-inspection datasets==5.2.0 dill multiprocess \
#     auto-round==0.15.1 lm-eval==0.4.13
# Then run this script there with `.whl` carried; what it measured lands in $OUT (gpu-summary.json, logs).
set -uo pipefail
out=${OUT:-/tmp/quantgate-gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD QUANTGATE_DEVICE=cuda HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false QUANTGATE_CACHE=/tmp/qgcache QUANTGATE_GPU_OUT="$out/gpu-summary.json"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv > "$out/nvidia-smi.csv" 2>&1
python3 -c "import torch, transformers, llmcompressor, lm_eval; print(torch.__version__, torch.version.cuda, \
transformers.__version__, llmcompressor.__version__)" 2>&1 | tail -1 | tee "$out/versions.txt"
python3 -m pytest tests/gpu -m gpu -o addopts="" -p no:cacheprovider -q -rA --durations=10 2>&1 | tee "$out/pytest-gpu.log"
exit "${PIPESTATUS[0]}"
