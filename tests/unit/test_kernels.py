"""The vLLM 0.32 kernel preflight (qgcore.kernels.check) and what a server log says it chose (read_log).

Inputs are what a manifest records: config.json's quantization summary, the Linear shapes and the model config
(the tiny Llama's are copied from a real run's manifest.json); platforms are qgcore.device.Platform values
(GPUs from the device table by name, as TARGET_GPU gives them).
"""

from pathlib import Path

import pytest

from qgcore.device import Platform, parse_target
from qgcore.kernels import check, partitions, read_log, scheme_of

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm"

BF16 = {"quantized": False, "dtype": "bfloat16"}
FP8 = {"quantized": True, "quant_method": "compressed-tensors", "format": "float-quantized",
       "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "group_size": None},
       "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
       "kv_cache_scheme": None, "ignore": ["lm_head"]}


def _w4a16(group: int = 64, symmetric: bool = True) -> dict:
    return {"quantized": True, "quant_method": "compressed-tensors", "format": "pack-quantized",
            "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group,
                        "symmetric": symmetric, "actorder": "static" if symmetric else None},
            "input_activations": None, "kv_cache_scheme": None, "ignore": ["lm_head"]}


GPTQ = _w4a16(64)  # recipes/gptq-4.yaml
AWQ = _w4a16(64, symmetric=False)  # an asymmetric AWQ checkpoint (zero points)
NVFP4 = {"quantized": True, "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
         "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True},
         "input_activations": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                               "dynamic": "local"},
         "kv_cache_scheme": None, "ignore": ["lm_head"]}

# the tiny Llama of the CPU runs (runs/tiny-llama/*/manifest.json)
TINY_SHAPES = {"q_proj": [128, 128], "k_proj": [128, 64], "v_proj": [128, 64], "o_proj": [128, 128],
               "gate_proj": [128, 256], "up_proj": [128, 256], "down_proj": [256, 128], "lm_head": [128, 512]}
TINY = {"max_position_embeddings": 2048, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128,
        "num_hidden_layers": 2, "head_dim": 32, "intermediate_size": 256, "vocab_size": 512}


def _llama_like(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int = 128) -> tuple[dict, dict]:
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"q_proj": [hidden, q], "k_proj": [hidden, kv], "v_proj": [hidden, kv], "o_proj": [q, hidden],
              "gate_proj": [hidden, intermediate], "up_proj": [hidden, intermediate],
              "down_proj": [intermediate, hidden], "lm_head": [hidden, 152064]}
    model = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": hidden,
             "intermediate_size": intermediate, "head_dim": head_dim, "num_hidden_layers": 28}
    return shapes, model


QWEN25_7B = _llama_like(3584, 18944, 28, 4)  # Qwen2.5-7B's config.json

CPU_AVX2 = Platform("cpu", cpu="AMD EPYC", cpu_isa="avx2")
CPU_AVX512 = Platform("cpu", cpu="Intel Xeon", cpu_isa="avx512_bf16")
H100, A100, B200, L4, T4 = (parse_target(g) for g in ("H100", "A100", "B200", "L4", "T4"))


def _check(q: dict, on: Platform, tp: int = 1, shapes: dict = TINY_SHAPES, model: dict = TINY, **kw):
    return check(q, shapes, model, tp=tp, on=on, **kw)


# --- the scheme and the per-rank shapes -----------------------------------------------------------------------

@pytest.mark.parametrize(("q", "scheme"), [
    (BF16, "unquantized"), ({}, "unquantized"), (FP8, "fp8_w8a8"), (GPTQ, "int4_w4a16"), (AWQ, "int4_w4a16"),
    (NVFP4, "nvfp4_w4a4"),
    ({**FP8, "input_activations": None}, "fp8_w8a16"),
    ({**NVFP4, "input_activations": None}, "nvfp4_w4a16"),
    ({**GPTQ, "weights": {"num_bits": 8, "type": "int"}}, "unknown"),
])
def test_scheme_of(q, scheme):
    assert scheme_of(q) == scheme


def test_partitions_fuse_and_split_per_rank():
    one = partitions(TINY_SHAPES, 1)
    assert one == {"qkv_proj": (128, 256), "o_proj": (128, 128), "gate_up_proj": (128, 512), "down_proj": (256, 128)}
    two = partitions(TINY_SHAPES, 2)  # column-parallel layers split N, row-parallel (o, down) split K
    assert two == {"qkv_proj": (128, 128), "o_proj": (64, 128), "gate_up_proj": (128, 256), "down_proj": (128, 128)}
    assert "down_proj" not in partitions(TINY_SHAPES, 1, ignore=["down_proj"])


# --- CPU ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q", [GPTQ, AWQ], ids=["gptq-4", "awq-4"])
def test_w4a16_refused_on_an_avx2_cpu(q):
    s = _check(q, CPU_AVX2)
    assert not s.ok and s.scheme == "int4_w4a16"
    assert "cpu_gemm_wna16" in s.reason and "AVX2" in s.reason
    assert "vllm/platforms/cpu.py:657" in s.sources


@pytest.mark.parametrize("q", [GPTQ, AWQ], ids=["gptq-4", "awq-4"])
def test_w4a16_served_by_cpuwna16_with_avx512(q):
    s = _check(q, CPU_AVX512)
    assert s.ok and s.kernels == ("CPUWNA16LinearKernel",) and s.native


@pytest.mark.parametrize("on", [CPU_AVX2, CPU_AVX512], ids=["avx2", "avx512"])
def test_fp8_and_bf16_fine_on_any_cpu(on):
    fp8 = _check(FP8, on)
    assert fp8.ok and "ChannelWiseTorchFP8ScaledMMLinearKernel" in fp8.kernels
    assert _check(BF16, on).ok
    assert "FP8 KV cache" in _check(FP8, on, kv_cache_dtype="fp8").served_as


@pytest.mark.parametrize("on", [CPU_AVX2, CPU_AVX512], ids=["avx2", "avx512"])
@pytest.mark.parametrize("q", [NVFP4, {**NVFP4, "input_activations": None}], ids=["w4a4", "w4a16"])
def test_nvfp4_unsupported_on_cpu(on, q):
    s = _check(q, on)
    assert not s.ok and "no NVFP4 kernel for CPU" in s.reason


def test_cpuwna16_shape_and_group_rules():
    shapes, model = _llama_like(144, 512, 2, 1, head_dim=72)  # 144 is not a multiple of 32
    s = _check(GPTQ, CPU_AVX512, shapes=shapes, model=model)
    assert not s.ok and "CPUWNA16 needs input and output multiples of 32" in s.reason and "144" in s.reason
    odd = _check(_w4a16(63), CPU_AVX512)
    assert not odd.ok and "even group size, got 63" in odd.reason


def test_w4a16_group_rule_applies_to_cpu_tensor_parallel_too():
    shapes, model = _llama_like(4096, 18944, 32, 8)
    s = _check(_w4a16(128), CPU_AVX512, tp=8, shapes=shapes, model=model)
    assert not s.ok and "down_proj" in s.reason and "2368" in s.reason


# --- CUDA -----------------------------------------------------------------------------------------------------

def test_nvfp4_on_hopper_falls_back_to_marlin_weight_only():
    s = _check(NVFP4, H100)
    assert s.ok and not s.native and s.scheme == "nvfp4_w4a4"
    assert s.kernels == ("MarlinNvFp4LinearKernel",)
    assert s.served_as == "W4A16 (weight-only FP4, Marlin)" and "cc < 10.0" in s.reason


def test_nvfp4_on_blackwell_is_native():
    s = _check(NVFP4, B200)
    assert s.ok and s.native and s.served_as.startswith("W4A4 NVFP4")
    assert "CutlassNvFp4LinearKernel" in s.kernels and s.reason is None


def test_nvfp4_needs_inputs_in_groups_of_16():
    shapes, model = _llama_like(128, 264, 4, 2, head_dim=32)  # down_proj K 264 at TP 2: 132 per rank
    s = _check(NVFP4, B200, tp=2, shapes=shapes, model=model)
    assert not s.ok and "down_proj" in s.reason and "132" in s.reason


def test_fp8_on_ampere_falls_back_to_marlin_w8a16():
    s = _check(FP8, A100)
    assert s.ok and not s.native
    assert s.kernels == ("MarlinFP8ScaledMMLinearKernel",) and s.served_as == "W8A16 (weight-only FP8, Marlin)"
    for ada_or_later in (L4, H100):  # cc 8.9 and 9.0: FP8 tensor cores
        native = _check(FP8, ada_or_later)
        assert native.ok and native.native and native.kernels == ("CutlassFP8ScaledMMLinearKernel",)


def test_bf16_needs_ampere():
    s = _check(BF16, T4)
    assert not s.ok and "compute capability 8.0" in s.reason
    assert not _check(FP8, T4).ok


def test_w4a16_cuda_kernel_order():
    assert _check(GPTQ, H100).kernels == ("MacheteLinearKernel",)  # cc 9.0, group 64, K%64, N%128
    assert _check(GPTQ, A100).kernels == ("MarlinLinearKernel",)
    assert _check(GPTQ, A100).served_as == "W4A16 int4 (Marlin)"


def test_w4a16_refused_where_tp_splits_a_quant_group():
    # 18944 (Qwen2.5-7B's intermediate size) / TP 8 = 2368 = 18.5 groups of 128 (2368 % 128 = 64); 32 heads so
    # that the heads rule does not decide first
    shapes, model = _llama_like(4096, 18944, 32, 8)
    s = _check(_w4a16(128), H100, tp=8, shapes=shapes, model=model)
    assert not s.ok and s.served_as == "not servable at this TP"
    assert "down_proj" in s.reason and "2368" in s.reason and "18944 / TP 8" in s.reason
    assert s.sources == ("vllm/distributed/utils.py:75",)
    assert _check(_w4a16(128), H100, tp=4, shapes=shapes, model=model).ok  # 4736 = 37 x 128
    assert _check(_w4a16(64), H100, tp=8, shapes=shapes, model=model).ok  # 2368 = 37 x 64


def test_qwen25_7b_tensor_parallel():
    shapes, model = QWEN25_7B
    at8 = _check(_w4a16(128), H100, tp=8, shapes=shapes, model=model)
    assert not at8.ok and "28 attention heads are not divisible by tensor parallel size 8" in at8.reason
    at4 = _check(_w4a16(128), H100, tp=4, shapes=shapes, model=model)  # 7 heads per rank, 4736 and 896 per rank
    assert at4.ok and at4.kernels == ("MacheteLinearKernel",)


@pytest.mark.parametrize("on", [CPU_AVX512, H100], ids=["cpu", "h100"])
@pytest.mark.parametrize("q", [BF16, FP8, GPTQ])
def test_heads_not_divisible_by_tp_refused_for_every_scheme(on, q):
    s = _check(q, on, tp=8)  # 4 heads
    assert not s.ok and "4 attention heads are not divisible by tensor parallel size 8" in s.reason
    assert _check(q, on, tp=2).ok  # 2 heads per rank


def test_an_unknown_scheme_is_left_to_vllm():
    q = {**GPTQ, "weights": {"num_bits": 8, "type": "int", "group_size": None}}
    for on in (CPU_AVX2, H100):
        s = _check(q, on)
        assert s.ok and s.scheme == "unknown" and "vLLM decides" in s.served_as


# --- read_log: what vLLM says it chose ------------------------------------------------------------------------

def _log(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_read_log_cpu_w4a16_real_lines():
    k = read_log(_log("cpu_avx2_gptq4.log"))
    assert k.linear == ["CPUWNA16LinearKernel"]  # printed twice ("mixed-precision linear", "...WNA16"): listed once
    assert k.max_model_len == 2048 and k.served_as is None and not k.padded and k.attention == []
    assert "vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py:138" \
        in k.sources and "vllm/model_executor/kernels/linear/__init__.py:923" in k.sources
    # the AVX2 rule's evidence: CPUWNA16 was chosen, then its GEMM is missing from the AVX2 build
    assert "no attribute 'cpu_gemm_wna16'" in _log("cpu_avx2_gptq4.log")


def test_read_log_cpu_fp8_real_lines():
    k = read_log(_log("cpu_fp8.log"))
    assert k.linear == ["ChannelWiseTorchFP8ScaledMMLinearKernel"] and k.max_model_len == 2048
    assert k.sources == ["vllm/model_executor/kernels/linear/__init__.py:797", "vllm/config/model.py:2152"]
    assert k.served_as is None
    # the preflight expected what this CPU chose
    assert set(k.linear) <= set(_check(FP8, CPU_AVX2).kernels)


def test_read_log_nvfp4_hopper_fallback():
    k = read_log(_log("gpu_h100_tp2_nvfp4.log"))
    assert k.linear == ["MarlinNvFp4LinearKernel"] and k.attention == ["FLASH_ATTN"] and k.max_model_len == 32768
    expected = _check(NVFP4, H100, tp=2)
    assert k.served_as == expected.served_as == "W4A16 (weight-only FP4, Marlin)"
    assert set(k.linear) == set(expected.kernels)
    assert "vllm/model_executor/kernels/linear/nvfp4/marlin.py:35" in k.sources


def test_read_log_fp8_ampere_fallback():
    k = read_log(_log("gpu_a100_fp8.log"))
    assert k.linear == []  # the W8A16 FP8 scheme logs no "Selected ..." line; the warning says what it is
    assert k.served_as == _check(FP8, A100).served_as == "W8A16 (weight-only FP8, Marlin)"
    assert k.max_model_len == 8192 and k.attention == ["FLASH_ATTN"]


def test_read_log_w4a16_kernels_and_padding():
    k = read_log(_log("gpu_h100_gptq4_padded.log"))
    assert k.linear == ["MacheteLinearKernel", "MarlinLinearKernel"]  # in the order printed, each once
    assert k.padded and k.attention == ["FLASHINFER"] and k.max_model_len == 4096
    assert "vllm/model_executor/layers/quantization/utils/marlin_utils.py:240" in k.sources


def test_read_log_ignores_memory_lines_and_unrelated_text():
    k = read_log(_log("gpu_startup.log") + _log("cpu_startup.log") + "Using a sliding window for nothing\n")
    assert k.to_dict() == {"linear": [], "attention": [], "max_model_len": None, "served_as": None, "padded": False,
                           "sources": []}
