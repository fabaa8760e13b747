"""The Ray executor on a real local cluster: a head and a worker node, each its own raylet process.

Default suite: quantize cells on the two-node cluster give the same checkpoints as the local executor, and a
worker that cannot see the run folder stops the run with one line naming it (exit 1). `make test-slow`: the
whole matrix (bf16 + two recipes, eval + bench) on Ray equals the local run, and a worker killed mid-cell
costs a retry, not the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from evals.bench_stage import BenchRequest
from evals.stage import EvalRequest
from quantgate.cells import Cell, CellSpec, RayExecutor, write_token
from quantgate.cli import main
from quantgate.context import resolve
from quantgate.pipeline import AllRequest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RAY_BIN = Path(ray.__file__).parents[4] / "bin" / "ray"


@pytest.fixture
def cluster():
    """Head (1 CPU) + worker (1 CPU), separate raylet processes; torn down after each test."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, worker
    ray.shutdown()
    c.shutdown()


def _manifest(run: Path, name: str) -> dict:
    return json.loads((run / name / "manifest.json").read_text())


def test_quantize_cells_on_two_nodes_match_the_local_executor(cluster, tiny_model: Path, tmp_path: Path):
    c, _ = cluster
    local = tmp_path / "local"
    assert main(["quantize", "--model", str(tiny_model), "--recipes", "bf16,fp8", "--runs", str(local)]) == 0
    ctx = resolve(runs_root=tmp_path / "ray", model=str(tiny_model))
    req = AllRequest(recipes=["bf16", "fp8"], eval=EvalRequest(), bench=BenchRequest(), policy=None, require=None,
                     target_gpu=None, demo=False)
    spec = CellSpec(ctx, req, None)
    ctx.run_dir.mkdir(parents=True)
    write_token(spec)
    ex = RayExecutor(c.address)
    refs = [ex.submit(spec, Cell("quantize", "bf16")), ex.submit(spec, Cell("quantize", "fp8"))]
    done = {r["id"]: r for r in ex.wait_all(refs, lambda *_: None)}
    assert {k: v["status"] for k, v in done.items()} == {"quantize:bf16": "ok", "quantize:fp8": "ok"}
    assert len({v["pid"] for v in done.values()}) == 2  # one fresh worker process per cell (max_calls=1)
    for name in ("bf16", "fp8"):
        a, b = _manifest(local / ctx.run_dir.name, name), _manifest(ctx.run_dir, name)
        assert a["content_key"] == b["content_key"]
        assert {f: r["sha256"] for f, r in a["files"].items()} == {f: r["sha256"] for f, r in b["files"].items()}
    # a second submission of a finished cell (same run id) redoes nothing
    again = ex.wait_all([ex.submit(spec, Cell("quantize", "fp8"))], lambda *_: None)[0]
    assert again.get("reused") is True
    assert (ctx.run_dir / "cells" / "quantize-fp8.starts").read_text().count("\n") == 1


def _can_unshare() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare(1) to hide the run folder from one node")
def test_a_worker_that_cannot_see_the_run_folder_stops_the_run_naming_it(tiny_model: Path, tmp_path: Path):
    """The only node with CPUs runs in a mount namespace where a tmpfs hides the runs folder, as a node
    without the shared volume would; the cell fails at once and the CLI exits 1 with one line."""
    runs = tmp_path / "runs"
    runs.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path(tempfile.mkdtemp(prefix="qgray-", dir="/tmp"))  # Ray's socket paths must stay short
    home = tmp_path / "home"  # a private ~/.ray: no auth token left by another Ray cluster on this machine
    home.mkdir()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HOME=str(home))
    subprocess.run([str(RAY_BIN), "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                    f"--temp-dir={temp}"], check=True, capture_output=True, env=env, timeout=120)
    blind = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              f"mount -t tmpfs tmpfs {runs} && exec {RAY_BIN} start --block "
                              f"--address=127.0.0.1:{port} --num-cpus=1"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the driver is the real CLI in its own process: no Ray state shared with this test process
        probe = ("import ray, time, sys\n"
                 f"ray.init(address='127.0.0.1:{port}')\n"
                 "for _ in range(90):\n"
                 "    if sum(n['Resources'].get('CPU', 0) for n in ray.nodes() if n['Alive']) >= 1: sys.exit(0)\n"
                 "    time.sleep(1)\n"
                 "sys.exit(1)\n")
        joined = subprocess.run([sys.executable, "-c", probe], capture_output=True, env=env, timeout=180, check=False)
        assert joined.returncode == 0, "the blind worker never joined: " + joined.stderr.decode()[-500:]
        out = subprocess.run([sys.executable, "-m", "quantgate.cli", "all", "--executor", "ray", "--ray-address",
                              f"127.0.0.1:{port}", "--model", str(tiny_model), "--recipes", "bf16", "--runs", str(runs),
                              "--divergence-docs", "0"], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=600, check=False)
        lines = (out.stdout + out.stderr).strip().splitlines()
        assert out.returncode == 1, lines[-20:]
        assert any("cannot see" in line and str(runs.resolve()) in line for line in lines), lines[-20:]
    finally:
        blind.send_signal(signal.SIGTERM)
        subprocess.run([str(RAY_BIN), "stop", "--force"], capture_output=True, env=env, timeout=120, check=False)
        blind.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def _bench_yaml(tmp: Path) -> Path:
    p = tmp / "bench.yaml"
    p.write_text("workloads: [{name: random, kind: random, input_len: 16, output_len: 8}]\nstart: 1\nmax_load: 2\n"
                 "prompts_per_load: 1\nmin_prompts: 2\nwarmup_prompts: 1\nmin_level_seconds: 1\nrepeats: 2\n"
                 "pair_looks: 1\nslo: {ttft_p95_s: 30, itl_p95_ms: 5000}\nprometheus: false\n")
    return p


ARGS = ["--recipes", "bf16,fp8", "--tasks", "qg_stdlib_ppl,qg_mmlu_dev", "--limit", "12", "--divergence-docs", "1"]


def _servers(root: Path) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if "vllm.entrypoints.openai.api_server" in " ".join(p.info["cmdline"] or []) and str(root) in
            " ".join(p.info["cmdline"] or [])]


@pytest.mark.slow
def test_the_whole_matrix_on_ray_equals_the_local_run_and_survives_a_killed_worker(cluster, tiny_model: Path,
                                                                                  tmp_path: Path):
    """Values, not outcomes: every item score and the divergence numbers of the Ray run equal the local run's;
    a worker killed mid-cell costs one retry of that cell."""
    c, worker = cluster
    bench = _bench_yaml(tmp_path)
    local, remote = tmp_path / "local", tmp_path / "ray"
    common = ["--model", str(tiny_model), *ARGS, "--config", str(bench)]
    rc_local = main(["all", "--runs", str(local), *common])
    slug = tiny_model.name

    killed: list[int] = []

    def kill_first_eval_worker() -> None:  # SIGKILL the worker process running fp8's eval cell, once
        starts = remote / slug / "cells" / "eval-fp8-0.starts"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not killed:
            if starts.is_file() and starts.read_text().strip():
                pid = int(starts.read_text().split()[2])
                time.sleep(5)  # let it start its server
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.5)

    threading.Thread(target=kill_first_eval_worker, daemon=True).start()
    rc_ray = main(["all", "--runs", str(remote), "--executor", "ray", "--ray-address", c.address, *common])
    assert killed, "the kill never happened"
    assert rc_ray == rc_local
    for name in ("bf16", "fp8"):
        a = json.loads((local / slug / name / "eval.json").read_text())
        b = json.loads((remote / slug / name / "eval.json").read_text())
        for task, t in a["tasks"].items():
            assert t["items"].keys() == b["tasks"][task]["items"].keys()
            for k, v in t["items"].items():
                assert b["tasks"][task]["items"][k] == pytest.approx(v, rel=1e-3), (name, task, k)
        assert json.loads((remote / slug / name / "bench.json").read_text())["status"] == "served"
    da = json.loads((local / slug / "fp8" / "divergence.json").read_text())
    db = json.loads((remote / slug / "fp8" / "divergence.json").read_text())
    assert da["status"] == db["status"] == "measured", (da.get("reason"), db.get("reason"))
    for key in ("kl_mean", "kl_median", "kl_p99", "top1_agreement", "n_tokens"):
        assert db["overall"][key] == pytest.approx(da["overall"][key], rel=1e-3), key
    cells = remote / slug / "cells"
    starts = {p.stem: p.read_text().count("\n") for p in cells.glob("*.starts")}
    assert starts.pop("eval-fp8-0") == 2  # killed once, retried once
    assert set(starts.values()) == {1}, starts  # no other cell ran twice
    assert not _servers(tmp_path)  # the killed worker's vLLM server died with it
    assert not [p for p in remote.rglob("*") if ".tmp" in p.name]  # no half-written cache entry left
