"""`make setup` on a CUDA box: can each venv's torch see the GPU? One clear line when not, naming the driver's
CUDA version against the wheel's, because a torch that cannot see the GPU makes llmcompressor quantize on
CPU (days at 70B) and vLLM refuse to start. Stdlib only; asks each interpreter in a subprocess.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

_PROBE = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
          "'available': torch.cuda.is_available(), 'count': torch.cuda.device_count()}))")


def driver_cuda() -> tuple[str | None, str | None]:
    """(driver version, the highest CUDA version it supports) from nvidia-smi, or (None, None)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, None
    out = subprocess.run([smi], capture_output=True, text=True, check=False, timeout=30).stdout
    drv = re.search(r"Driver Version:\s*([\d.]+)", out)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", out)
    return (drv.group(1) if drv else None), (cuda.group(1) if cuda else None)


def check(python: str, what: str) -> str | None:
    """None when `python`'s torch sees a GPU, else the one line that says why not and what to do."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, check=False, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{what}: cannot run {python}: {err}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{what}: torch does not import ({last}); rebuild the venv (rm -rf .venvs && make setup)"
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if info["available"]:
        return None
    drv, drv_cuda = driver_cuda()
    wheel = info.get("cuda")
    if wheel is None:
        return (f"{what}: torch {info['torch']} is a CPU build on a machine with an NVIDIA GPU (driver {drv}); "
                "install the CUDA build (QUANTGATE_DEVICE=cuda make setup)")
    if drv_cuda and wheel and tuple(map(int, wheel.split(".")[:2])) > tuple(map(int, drv_cuda.split(".")[:2])):
        return (f"{what}: torch {info['torch']} is built for CUDA {wheel} but the driver {drv} supports CUDA up to "
                f"{drv_cuda}: update the NVIDIA driver, or install a torch built for CUDA {drv_cuda}")
    return (f"{what}: torch {info['torch']} (CUDA {wheel}) sees no GPU although nvidia-smi answers (driver {drv}, "
            f"CUDA {drv_cuda}): check CUDA_VISIBLE_DEVICES and the container's GPU runtime")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    problems = [p for p in (check(py, name) for name, py in zip(args[::2], args[1::2], strict=True)) if p]
    for p in problems:
        print(f"quantgate setup: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
