# ruff: noqa: E501  (verbatim vLLM log lines)
from pathlib import Path

import pytest

from evals.bench_stage import memory_summary
from evals.serve import NO_KERNELS, ServeConfig, VllmServer, _root_cause
from evals.vllm_stats import parse_cache_config_info, parse_startup

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


def test_unsupported_is_told_apart_from_a_crash(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(VllmServer, "__init__", _cpu_init)
    log = tmp_path / "log"
    srv = VllmServer(tmp_path, name="nvfp4", log_path=log, scheme="nvfp4")
    log.write_text(LOG)
    err = srv._error("vLLM exited with code 1 during start-up")
    assert err.unsupported and "NVFP4" in str(err) and err.log_tail
    log.write_text("Traceback\nOSError: Address already in use\n")
    assert not srv._error("vLLM exited").unsupported


def _cpu_init(self, checkpoint, *, name, log_path, config=None, scheme=None):
    self.checkpoint, self.name, self.log_path, self.scheme, self.cuda = checkpoint, name, log_path, scheme, False


@pytest.mark.parametrize("text", [
    "ValueError: Failed to find a kernel that can implement the W4A16 linear layer.",  # a kernel refusal, wrong scheme
    "safetensors_rust.SafetensorError: Error while deserializing header: MetadataIncompleteBuffer",
    "NotImplementedError: Unsupported something in a corrupt config",  # the old regex called this unsupported
    "OSError: Can't load tokenizer for '/ckpt'. Make sure the tokenizer files exist",
])
def test_only_the_platform_tables_refusals_are_unsupported(tmp_path: Path, monkeypatch, text):
    monkeypatch.setattr(VllmServer, "__init__", _cpu_init)
    log = tmp_path / "log"
    log.write_text(f"(EngineCore pid=3) ERROR 11-28 [core.py:1] {text}\n")
    assert not VllmServer(tmp_path, name="gptq-4", log_path=log, scheme="gptq_w4a16")._error("x").unsupported
    assert NO_KERNELS["cpu"] == {"nvfp4"}


def test_flags_cpu_vs_gpu_and_deploy_line(tmp_path: Path):
    cfg = ServeConfig(kv_cache_dtype="fp8", extra_args=["--max-num-seqs", "64"])
    cpu, gpu = cfg.args(cuda=False), cfg.args(cuda=True)
    assert "--enforce-eager" in cpu and "--enforce-eager" not in gpu
    assert "--gpu-memory-utilization" in gpu
    for flags in (cpu, gpu):
        assert flags[flags.index("--kv-cache-dtype") + 1] == "fp8"
        assert "--enable-prefix-caching" in flags and flags[-2:] == ["--max-num-seqs", "64"]
    srv = VllmServer(tmp_path, name="fp8-kv", log_path=tmp_path / "l", config=cfg)
    assert srv.deploy_command().startswith(f"vllm serve {tmp_path} --served-model-name fp8-kv")
    assert srv.command()[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert srv.url.startswith("http://127.0.0.1:")


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm"


def test_cpu_startup_log_real_format():
    info = parse_startup((FIXTURES / "cpu_startup.log").read_text(), cpu_kv_cache_gib=2)
    assert info["kv_cache_tokens"] == 4_194_304 and info["max_concurrency_context_len"] == 2048
    assert info["max_concurrency"] == 2048.0 and info["kv_cache_device"] == "CPU"
    assert info["kv_cache_bytes"] == 2 * 2**30 and "VLLM_CPU_KVCACHE_SPACE" in info["sources"]["kv_cache_bytes"]
    assert "checkpoint_bytes" in info and "weights_bytes" not in info  # CPU builds print no device weights


def test_gpu_startup_log_format():
    info = parse_startup((FIXTURES / "gpu_startup.log").read_text())
    assert info["weights_bytes"] == int(15.06 * 2**30) and info["weights_load_seconds"] == 4.512345
    assert info["kv_cache_bytes"] == int(101.44 * 2**30) and info["kv_cache_tokens"] == 830_944
    assert info["kv_cache_device"] == "GPU" and info["max_concurrency"] == 405.73
    assert set(info["sources"]) >= {"weights_bytes", "kv_cache_bytes", "kv_cache_tokens"}


def test_cache_config_info_metric_real_format():
    info = parse_cache_config_info((FIXTURES / "cpu_metrics.txt").read_text())
    assert info["kv_cache_tokens"] == 93_184 and info["kv_cache_bytes"] == 2 * 2**30
    assert info["cache_dtype"] == "auto" and "kv_cache_size_tokens" in info["sources"]["kv_cache_tokens"]
    blocks_only = 'vllm:cache_config_info{block_size="16",cache_dtype="fp8",num_gpu_blocks="100"} 1.0\n'
    assert parse_cache_config_info(blocks_only)["kv_cache_tokens"] == 1600
    assert parse_cache_config_info("# nothing here\n") == {}


def test_memory_summary_never_reports_whole_device_memory():
    class Fake:
        peak_bytes, mean_bytes, samples = 3 * 2**30, 2 * 2**30, 7

    startup = parse_startup((FIXTURES / "gpu_startup.log").read_text())
    mem = memory_summary(startup, {}, True, Fake(), Fake())
    assert mem["server_gpu_bytes_peak"] == 3 * 2**30 and "NVML per-process" in mem["sources"]["server_gpu_bytes_peak"]
    assert "whole" not in mem["kind"] and mem["weights_bytes"] == startup["weights_bytes"]
    cpu = memory_summary(parse_startup((FIXTURES / "cpu_startup.log").read_text(), cpu_kv_cache_gib=2), {}, False,
                         Fake(), Fake())
    assert "server_gpu_bytes_peak" not in cpu and cpu["weights_bytes"] == cpu["checkpoint_bytes"]


def test_scoring_servers_use_every_cpu_core_bench_servers_run_as_vllm_defaults():
    scoring, bench = ServeConfig.from_spec({}, scoring=True), ServeConfig.from_spec({})
    assert scoring.env(cuda=False)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in bench.env(cuda=False)
    assert scoring.env(cuda=True) == bench.env(cuda=True) == {}
    assert scoring.args(cuda=False) == bench.args(cuda=False)  # same served model, same flags
