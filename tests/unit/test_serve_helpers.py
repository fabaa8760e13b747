# ruff: noqa: E501  (verbatim vLLM log lines)
"""Serving without a server: flags and environment from ServeConfig, sizing (KV bytes, tensor parallel,
context), start-up timeouts, error codes and root causes from vLLM's log, and vLLM's log / metrics numbers."""

from pathlib import Path

import pytest

from evals.serve import ServerError, VllmServer, _root_cause, startup_timeout
from evals.vllm_stats import parse_cache_config_info, parse_startup
from qgcore import serving
from qgcore.artifacts import model_config_summary
from qgcore.device import Platform, parse_target
from qgcore.kernels import check
from qgcore.serving import (
    ServeConfig,
    config_for,
    deploy_command,
    flags_of,
    gpus_for,
    kv_bytes_per_token,
    moves_numbers,
    pinned_environment,
    plan_serving,
    server_environment,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm"
GIB = 2**30
CPU = Platform("cpu", cpu="test", cpu_isa="avx512")
H100 = parse_target("H100")


def _after(flags: list[str], flag: str) -> str:
    return flags[flags.index(flag) + 1]


# --- flags -----------------------------------------------------------------------------------------------------

def test_cli_flags_from_serve_config():
    cfg = ServeConfig(platform="cuda", kv_cache_dtype="fp8", max_model_len=8192, tensor_parallel=4, max_num_seqs=48,
                      extra_args=("--dtype", "bfloat16"))
    a = cfg.args()
    assert _after(a, "--tensor-parallel-size") == "4" and _after(a, "--distributed-executor-backend") == "mp"
    assert _after(a, "--max-model-len") == "8192" and _after(a, "--max-num-seqs") == "48"
    assert _after(a, "--kv-cache-dtype") == "fp8" and _after(a, "--gpu-memory-utilization") == "0.85"
    assert "--enable-prefix-caching" in a and "--enforce-eager" not in a
    assert a[-2:] == ["--dtype", "bfloat16"]  # the recipe's extra args come last
    one = ServeConfig(platform="cpu", enable_prefix_caching=False).args()
    assert "--tensor-parallel-size" not in one and "--max-num-seqs" not in one  # vLLM's defaults
    assert "--no-enable-prefix-caching" in one and "--enforce-eager" in one and "--gpu-memory-utilization" not in one
    assert _after(one, "--max-model-len") == "2048" and _after(one, "--seed") == "0"


@pytest.mark.parametrize(("cores", "tp", "bind"), [
    ((0, 1), 2, "0|1"),
    ((0, 1, 2, 3), 2, "0,1|2,3"),
    ((4, 5, 6, 7), 4, "4|5|6|7"),
    ((0, 1, 2), 2, "0|1"),  # an odd core left out, never shared by two ranks
])
def test_cpu_tensor_parallel_needs_explicit_core_lists(cores, tp, bind):
    env = ServeConfig(platform="cpu", tensor_parallel=tp, cpu_cores=cores).env()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == bind
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_cpu_tensor_parallel_defaults_to_the_machines_cores(monkeypatch):
    monkeypatch.setattr(serving.os, "cpu_count", lambda: 2)
    assert ServeConfig(platform="cpu", tensor_parallel=2).env()["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_cpu_environment_by_purpose():
    assert ServeConfig(platform="cuda", tensor_parallel=2).env() == {}
    assert ServeConfig(platform="cpu").env() == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    assert ServeConfig(platform="cpu", cpu_reserved_cores=0).env()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    cell = ServeConfig(platform="cpu", cpu_threads=3, cpu_reserved_cores=0).env()
    assert cell["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and cell["OMP_NUM_THREADS"] == "3"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in cell


def test_config_for_scoring_and_bench():
    plan = plan_serving(weight_bytes=GIB, model={"max_position_embeddings": 4096}, on=CPU)
    spec = {"kv_cache_dtype": "fp8", "extra_args": ["--dtype", "bfloat16"]}
    score = config_for(spec, plan, CPU, purpose="score")
    bench = config_for(spec, plan, CPU, purpose="bench", max_num_seqs=16)
    assert score.env()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"  # prefill-only scoring uses every core
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in bench.env()  # bench runs as vLLM's defaults
    assert score.max_model_len == bench.max_model_len == 4096 and score.kv_cache_dtype == "fp8"
    assert score.extra_args == ("--dtype", "bfloat16") and _after(bench.args(), "--max-num-seqs") == "16"
    threads = config_for({}, plan, CPU, purpose="score", cpu_threads=1)
    assert threads.env()["OMP_NUM_THREADS"] == "1" and threads.kv_cache_dtype == "auto"


def test_deploy_command_is_the_gpu_line():
    cfg = ServeConfig(platform="cpu", kv_cache_dtype="fp8", max_model_len=4096, tensor_parallel=2,
                      cpu_reserved_cores=0, extra_args=("--max-num-seqs", "64"))
    line = deploy_command("/ckpt/fp8-kv", "fp8-kv", cfg)
    assert line.startswith("vllm serve /ckpt/fp8-kv --served-model-name fp8-kv ")
    assert "--enforce-eager" not in line and "--gpu-memory-utilization 0.85" in line
    assert "--tensor-parallel-size 2" in line and "--kv-cache-dtype fp8" in line and line.endswith("--max-num-seqs 64")


# --- environment ------------------------------------------------------------------------------------------------

def test_which_variables_move_numbers():
    for key in ("OMP_NUM_THREADS", "VLLM_ATTENTION_BACKEND", "VLLM_CPU_KVCACHE_SPACE", "MKL_NUM_THREADS",
                "TORCH_CUDNN_V8_API_DISABLED", "CUDA_LAUNCH_BLOCKING", "KMP_AFFINITY"):
        assert moves_numbers(key), key
    for key in ("PATH", "HOME", "VLLM_CACHE_ROOT", "VLLM_NO_USAGE_STATS", "VLLM_LOGGING_LEVEL", "TORCH_HOME",
                "CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE"):
        assert not moves_numbers(key), key
    assert pinned_environment({"PATH": "/bin", "OMP_NUM_THREADS": "2", "VLLM_CACHE_ROOT": "/c", "MKL_X": "1"}) == {
        "MKL_X": "1", "OMP_NUM_THREADS": "2"}


def test_server_environment_uses_the_pinned_values(tmp_path: Path):
    cfg = ServeConfig(platform="cpu", cpu_reserved_cores=0)
    # a library set OMP_NUM_THREADS=8 and VLLM_FOO in this process after the run started; the run pinned 2
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "8", "VLLM_FOO": "1", "HF_HUB_OFFLINE": "0"}
    pinned = {"OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "4"}
    se = server_environment(cfg, base, cache_root=tmp_path, pinned=pinned)
    assert se.env["OMP_NUM_THREADS"] == "2" and "VLLM_FOO" not in se.env
    assert se.env["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the caller's explicit setting wins over the config's 2 ...
    assert se.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"  # ... and the config fills what the caller did not set
    assert se.recorded == {"OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert se.env["PATH"] == "/bin" and se.env["HF_HUB_OFFLINE"] == "0" and se.env["PYTHONUNBUFFERED"] == "1"
    assert se.env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm") and "VLLM_CACHE_ROOT" not in se.recorded
    assert flags_of(cfg, se.recorded) == cfg.args() + ["OMP_NUM_THREADS=2", "VLLM_CPU_KVCACHE_SPACE=4",
                                                       "VLLM_CPU_NUM_OF_RESERVED_CPU=0"]
    # without a pinned set, this process's own number-moving variables are what is served and recorded
    unpinned = server_environment(cfg, base, cache_root=tmp_path)
    assert unpinned.env["OMP_NUM_THREADS"] == "8" and unpinned.recorded["VLLM_FOO"] == "1"
    assert server_environment(ServeConfig(platform="cuda"), {}, cache_root=tmp_path).recorded == {}


# --- sizing -----------------------------------------------------------------------------------------------------

def test_kv_bytes_per_token_known_configs():
    # Llama-3-8B: 32 layers x 8 KV heads x 128 head dim x (K and V) x 2 bytes = 128 KiB per token
    llama3_8b = {"num_hidden_layers": 32, "num_key_value_heads": 8, "head_dim": 128}
    assert kv_bytes_per_token(llama3_8b, "auto") == 32 * 8 * 128 * 2 * 2 == 131072
    assert kv_bytes_per_token(llama3_8b, "fp8") == kv_bytes_per_token(llama3_8b, "fp8_e4m3") == 65536
    # SmolLM2-135M's config.json (no head_dim: hidden / heads = 576 / 9 = 64): 30 x 3 x 64 x 2 x 2
    smol = model_config_summary({"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                 "hidden_size": 576, "max_position_embeddings": 8192})
    assert kv_bytes_per_token(smol, "auto") == 30 * 3 * 64 * 2 * 2 == 23040
    assert kv_bytes_per_token({"num_hidden_layers": 2}, "auto") is None
    assert kv_bytes_per_token({"num_hidden_layers": None, "num_key_value_heads": 1, "head_dim": 8}, "auto") is None


def test_gpus_for_rounds_up_to_a_power_of_two():
    usable = 80 * GIB * 0.85  # of one 80 GiB GPU
    assert gpus_for(1 * GIB, 80 * GIB) == 1
    assert gpus_for(usable / 1.3, 80 * GIB) == 1  # exactly fills one GPU with headroom
    assert gpus_for(usable / 1.3 * 1.01, 80 * GIB) == 2
    assert gpus_for(usable / 1.3 * 2.5, 80 * GIB) == 4  # 2.5 GPUs' worth: 4, never 3
    assert gpus_for(141e9, 80 * GIB) == 4  # Llama-3-70B in BF16 on H100s
    assert gpus_for(141e9, 80 * GIB, max_gpus=2) == 2
    sizes = [gpus_for(w * GIB, 80 * GIB) for w in range(1, 400, 7)]
    assert sizes == sorted(sizes) and all(s & (s - 1) == 0 for s in sizes)


def test_plan_serving_context_and_tensor_parallel():
    model = {"max_position_embeddings": 32768, "num_attention_heads": 32}
    big = plan_serving(weight_bytes=141 * 10**9, model=model, on=H100)
    assert big.tensor_parallel == big.gpus == 4 and big.max_model_len == 32768
    assert "H100" in big.sources["tensor_parallel"] and "max_position_embeddings" in big.sources["max_model_len"]
    small = plan_serving(weight_bytes=16 * GIB, model=model, on=H100, max_model_len_cap=8192)
    assert small.tensor_parallel == 1 and small.max_model_len == 8192 and "--max-model-len 8192" in \
        small.sources["max_model_len"]
    assert plan_serving(weight_bytes=GIB, model=model, on=H100, max_model_len_cap=10**6).max_model_len == 32768
    forced = plan_serving(weight_bytes=GIB, model=model, on=H100, tp_override=2)
    assert forced.tensor_parallel == forced.gpus == 2 and forced.sources["tensor_parallel"] == "--tensor-parallel"
    cpu = plan_serving(weight_bytes=141 * 10**9, model={}, on=CPU)
    assert (cpu.tensor_parallel, cpu.gpus, cpu.max_model_len) == (1, 0, 2048)  # no context in the config: 2048
    unknown = plan_serving(weight_bytes=141 * 10**9, model=model, on=Platform("cuda", gpu_count=1))
    assert unknown.tensor_parallel == 1 and "GPU memory unknown" in unknown.sources["tensor_parallel"]


def test_plan_sizes_by_memory_and_the_preflight_checks_the_heads():
    # Qwen2.5-7B-like head count (28) with weights that need 8 H100s: the plan sizes by memory alone; the kernel
    # preflight is what refuses a TP that does not divide the heads (no power of two above 4 divides 28)
    model = {"max_position_embeddings": 32768, "num_attention_heads": 28, "num_key_value_heads": 4}
    plan = plan_serving(weight_bytes=330 * GIB, model=model, on=H100)
    assert plan.tensor_parallel == 8
    s = check({"quantized": False}, {}, model, tp=plan.tensor_parallel, on=H100)
    assert not s.ok and "28 attention heads" in s.reason


def test_startup_timeout_grows_with_checkpoint_bytes():
    assert startup_timeout(0) == 600.0
    assert startup_timeout(140 * 10**9) == pytest.approx(600.0 + 1400.0)  # 140 GB at 100 MB/s
    times = [startup_timeout(b) for b in (10**8, 10**9, 10**10, 10**11)]
    assert times == sorted(times) and len(set(times)) == 4
    assert startup_timeout(10**12, override=30.0) == 30.0


# --- the server object, its errors and its log --------------------------------------------------------------------

def _server(tmp_path: Path, log: str, cfg: ServeConfig | None = None, name: str = "gptq-4") -> VllmServer:
    cfg = cfg or ServeConfig(platform="cpu")
    env = server_environment(cfg, {"PATH": "/bin"}, cache_root=tmp_path, pinned={"OMP_NUM_THREADS": "2"})
    log_path = tmp_path / f"{name}.log"
    log_path.write_text(log)
    return VllmServer(tmp_path / "ckpt", name=name, log_path=log_path, config=cfg, env=env, python="/venv/bin/python",
                      startup_timeout=startup_timeout(10**9))


def test_server_command_flags_and_provenance(tmp_path: Path):
    cfg = ServeConfig(platform="cpu", kv_cache_dtype="fp8", max_model_len=1024)
    srv = _server(tmp_path, "", cfg, name="fp8-kv")
    cmd = srv.command()
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _after(cmd, "--model") == str(tmp_path / "ckpt") and _after(cmd, "--served-model-name") == "fp8-kv"
    assert _after(cmd, "--port") == str(srv.port) and srv.url == f"http://127.0.0.1:{srv.port}"
    assert srv.base_url == srv.url + "/v1" and cmd[-len(cfg.args()):] == cfg.args()
    assert srv.flags() == flags_of(cfg, srv.environment.recorded) and "OMP_NUM_THREADS=2" in srv.flags()
    prov = srv.provenance()
    assert prov["env"] == srv.environment.recorded and prov["config"]["kv_cache_dtype"] == "fp8"
    assert srv.deploy_command().startswith(f"vllm serve {tmp_path / 'ckpt'} --served-model-name fp8-kv")
    assert srv.startup_timeout == 610.0 and not srv.alive()
    srv.stop()  # never started: nothing to stop, no error


LOG = """(APIServer pid=1) WARNING 11-28 [system_utils.py:255] failed with error ... `OSError: [Errno 24] Too many open files`.
(Worker pid=2) ERROR 11-28 [multiproc_executor.py:953] ValueError: Failed to find a kernel that can implement the NVFP4 linear layer. Reasons:
(EngineCore pid=3) ERROR 11-28 [core.py:1510] Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_root_cause_skips_warnings_and_wrappers():
    assert _root_cause(LOG.splitlines()).startswith("ValueError: Failed to find a kernel")
    assert _root_cause(["RuntimeError: Engine core initialization failed. See root cause above."]).startswith(
        "RuntimeError")
    assert _root_cause(["x", "KeyError: 'bad'", "RuntimeError: failed to start. See root cause"]) == "KeyError: 'bad'"
    assert _root_cause([]) == ""


def test_crash_on_a_real_avx2_log_names_the_missing_kernel(tmp_path: Path):
    srv = _server(tmp_path, (FIXTURES / "cpu_avx2_gptq4.log").read_text())
    err = srv.error("vLLM died while scoring mmlu", "failed:crash")
    assert isinstance(err, ServerError) and err.code == "failed:crash"
    assert "AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'" in str(err)
    assert str(err).startswith("vLLM died while scoring mmlu: ") and str(srv.log_path) in str(err)
    assert err.log_tail == srv.log_tail() and len(err.log_tail) <= 25
    assert err.log_tail[-1].endswith("See stack trace (above) for the root cause.")


def test_start_errors_add_the_fix(tmp_path: Path):
    refused = _server(tmp_path, LOG, name="nvfp4").error("vLLM exited with code 1 during start-up", "failed:start")
    assert refused.code == "failed:start" and "NVFP4" in str(refused) and "preflight's rule is out of date" in str(refused)
    kv = ("(EngineCore pid=3) ERROR 11-28 [core.py:1510] ValueError: To serve at least one request with the model's max seq len "
          "(131072), (16.0 GiB KV cache is needed, which is larger than the available KV cache memory (9.5 GiB). "
          "Try increasing `gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or decreasing "
          "`max_model_len` when initializing the engine. See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.\n")
    small = _server(tmp_path, kv, name="bf16").error("vLLM exited with code 1 during start-up", "failed:start")
    assert "ValueError: To serve at least one request" in str(small) and "--max-model-len" in str(small)
    plain = _server(tmp_path, "Traceback\nOSError: Address already in use\n", name="fp8").error("vLLM exited", "failed:start")
    assert str(plain).startswith("vLLM exited: OSError: Address already in use")
    assert "preflight" not in str(plain) and "--max-model-len" not in str(plain)
    assert str(_server(tmp_path, "", name="x").error("vLLM exited", "failed:start")).startswith("vLLM exited (log: ")


def test_startup_info_on_real_cpu_log(tmp_path: Path):
    srv = _server(tmp_path, (FIXTURES / "cpu_fp8.log").read_text(), name="fp8")
    info = srv.startup_info()
    assert info["kernels"]["linear"] == ["ChannelWiseTorchFP8ScaledMMLinearKernel"]
    assert info["kernels"]["max_model_len"] == 2048
    assert info["kv_cache_bytes"] == 2 * GIB and "Explicitly set" in info["sources"]["kv_cache_bytes"]
    assert info["kv_cache_tokens"] == 4_194_304 and info["kv_cache_device"] == "CPU"
    assert "weights_bytes" not in info and info["checkpoint_bytes"] == 0  # CPU builds print no device weights
    assert "startup_seconds" not in info  # never started


# --- vLLM's numbers: start-up log and /metrics ----------------------------------------------------------------------

def test_cpu_startup_log_real_format():
    info = parse_startup((FIXTURES / "cpu_startup.log").read_text(), cpu_kv_cache_gib=2)
    assert info["kv_cache_tokens"] == 4_194_304 and info["max_concurrency_context_len"] == 2048
    assert info["max_concurrency"] == 2048.0 and info["kv_cache_device"] == "CPU"
    assert info["kv_cache_bytes"] == 2 * GIB and "VLLM_CPU_KVCACHE_SPACE" in info["sources"]["kv_cache_bytes"]
    assert "checkpoint_bytes" in info and "weights_bytes" not in info


def test_gpu_startup_log_format():
    info = parse_startup((FIXTURES / "gpu_startup.log").read_text())
    assert info["weights_bytes"] == int(15.06 * GIB) and info["weights_load_seconds"] == 4.512345
    assert info["kv_cache_bytes"] == int(101.44 * GIB) and info["kv_cache_tokens"] == 830_944
    assert info["kv_cache_device"] == "GPU" and info["max_concurrency"] == 405.73
    assert set(info["sources"]) >= {"weights_bytes", "kv_cache_bytes", "kv_cache_tokens"}


def test_two_ranks_summed_or_scaled():
    # V2 runner: every rank prints its weights (summed); the KV memory comes from local rank 0 only (x TP)
    info = parse_startup((FIXTURES / "gpu_h100_tp2_nvfp4.log").read_text(), tensor_parallel=2)
    assert info["weights_bytes"] == int((2.79 + 2.81) * GIB) and "summed over 2 ranks" in info["sources"]["weights_bytes"]
    assert info["kv_cache_bytes"] == int(2 * 60.5 * GIB) and "rank 0 only" in info["sources"]["kv_cache_bytes"]
    assert info["kv_cache_tokens"] == 991_232 and info["max_concurrency_context_len"] == 32_768
    assert info["checkpoint_bytes"] == int(5.35 * GIB)
    # V1 runner at TP 2: only rank 0 prints "Model loading took": one shard x 2
    v1 = parse_startup((FIXTURES / "gpu_startup.log").read_text(), tensor_parallel=2)
    assert v1["weights_bytes"] == int(2 * 15.06 * GIB) and "rank 0 only" in v1["sources"]["weights_bytes"]
    # CPU at TP 2: every rank prints its own "Explicitly set (...) GiB for KV cache"
    lines = (FIXTURES / "cpu_fp8.log").read_text().splitlines()
    rank1 = [ln.replace("(Worker pid=18314)", "(Worker_TP1 pid=18315)").replace("(2.0/", "(3.0/")
             for ln in lines if "Explicitly set" in ln]
    cpu = parse_startup("\n".join(lines + rank1), tensor_parallel=2)
    assert cpu["kv_cache_bytes"] == 5 * GIB and "summed over 2 ranks" in cpu["sources"]["kv_cache_bytes"]


def test_cache_config_info_metric_real_format():
    info = parse_cache_config_info((FIXTURES / "cpu_metrics.txt").read_text())
    assert info["kv_cache_tokens"] == 93_184 and info["kv_cache_bytes"] == 2 * GIB
    assert info["cache_dtype"] == "auto" and "kv_cache_size_tokens" in info["sources"]["kv_cache_tokens"]
    blocks_only = 'vllm:cache_config_info{block_size="16",cache_dtype="fp8",num_gpu_blocks="100"} 1.0\n'
    assert parse_cache_config_info(blocks_only)["kv_cache_tokens"] == 1600
    assert parse_cache_config_info("# nothing here\n") == {}


def test_metrics_page_with_two_engines():
    from evals.perf import parse_metrics

    text = (FIXTURES / "cpu_metrics.txt").read_text()
    second = "\n".join(ln.replace('engine="0"', 'engine="1"').replace("} 0.0", "} 0.25")
                       for ln in text.splitlines() if ln.startswith(("vllm:num_requests_waiting{", "vllm:kv_cache")))
    m = parse_metrics(text + second + "\n")
    assert m["kv_cache_usage_perc"] == pytest.approx(0.25) and m["num_requests_waiting"] == pytest.approx(0.25)
    assert m["num_requests_running"] is None  # not on the page
    # the cache config is one engine's (the first label set), not a sum
    assert parse_cache_config_info(text + second + "\n")["kv_cache_tokens"] == 93_184
