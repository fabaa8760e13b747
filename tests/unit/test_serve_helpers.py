# ruff: noqa: E501  (verbatim vLLM log lines)
from pathlib import Path

from evals.serve import ServeConfig, VllmServer, _root_cause

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


def test_unsupported_is_told_apart_from_a_crash(tmp_path: Path):
    log = tmp_path / "log"
    srv = VllmServer(tmp_path, name="nvfp4", log_path=log)
    log.write_text(LOG)
    err = srv._error("vLLM exited with code 1 during start-up")
    assert err.unsupported and "NVFP4" in str(err) and err.log_tail
    log.write_text("Traceback\nOSError: Address already in use\n")
    assert not srv._error("vLLM exited").unsupported


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


def test_startup_info_parsed_from_log(tmp_path: Path):
    log = tmp_path / "l"
    log.write_text("INFO [kv_cache_utils.py] CPU KV cache size: 93,184 tokens\n"
                   "INFO Maximum concurrency for 2,048 tokens per request: 45.50x\n"
                   "INFO Model loading took 0.25 GiB memory\n")
    info = VllmServer(tmp_path, name="x", log_path=log).startup_info()
    assert info == {"kv_cache_tokens": 93184, "max_concurrency_context_len": 2048, "max_concurrency": 45.5,
                    "weights_gib": 0.25}
