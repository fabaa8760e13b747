"""`make bench-divergence`: how far the served top-k KL is from the exact full-vocabulary KL.

For every variant of a run, on the eval stage's own divergence documents: full log-probs of bf16 and the
variant from transformers (bf16 compute), the exact per-token KL(bf16||variant), and the top-k estimate
the eval stage computes from k=20 log-probs per side (qgcore.divergence). Prints, per variant, exact vs
estimated mean and p99 and their ratio, and writes them to JSON: the README quotes the figures.
Needs only the checkpoints (no server): the top-k method's error, not vLLM's numerics.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from evals.divergence import TOP_K, build_set
from evals.variants import variant_manifests
from qgcore.divergence import full_kl, token_divergence, topk_of
from qgcore.paths import DEFAULT_SLUG


def _logprobs(checkpoint: Path, docs: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.bfloat16).eval()
    out = []
    with torch.no_grad():
        for ids in docs:
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, dim=-1).numpy())  # float32: 0.4 GB a document at 49k vocab
    return out


def measure(run_dir: Path, n_docs: int, max_len: int, k: int = TOP_K) -> dict[str, dict[str, float]]:
    manifests = variant_manifests(run_dir, None)
    ref_name, variants = manifests[0].recipe, [m.recipe for m in manifests[1:]]
    dset = build_set(run_dir / ref_name / "checkpoint", n_docs=n_docs, doc_tokens=max_len - 1)
    ref = _logprobs(run_dir / ref_name / "checkpoint", dset.docs)
    ref_top = [topk_of(r, k) for r in ref]
    covered = float(np.mean(np.concatenate([np.exp(t.logprobs).sum(1) for t in ref_top])))
    out = {}
    for name in variants:
        t0 = time.perf_counter()
        var = _logprobs(run_dir / name / "checkpoint", dset.docs)
        exact = np.concatenate([full_kl(r, v) for r, v in zip(ref, var, strict=True)]).astype(np.float64)
        est = np.concatenate([token_divergence(t, topk_of(v, k))[0] for t, v in zip(ref_top, var, strict=True)])
        out[name] = {"exact_mean": float(exact.mean()), "topk_mean": float(est.mean()),
                     "ratio_mean": float(est.mean() / exact.mean()),
                     "exact_p99": float(np.quantile(exact, 0.99)), "topk_p99": float(np.quantile(est, 0.99)),
                     "ratio_p99": float(np.quantile(est, 0.99) / np.quantile(exact, 0.99)),
                     "max_token_underestimate": float((exact - est).max()),
                     "reference_topk_mass": covered, "n_tokens": int(exact.size),
                     "seconds": round(time.perf_counter() - t0, 1)}
        r = out[name]
        print(f"{name:>8}: mean KL exact {r['exact_mean']:.4f} top-{k} {r['topk_mean']:.4f} "
              f"(ratio {r['ratio_mean']:.3f}); p99 exact {r['exact_p99']:.4f} top-{k} {r['topk_p99']:.4f} "
              f"(ratio {r['ratio_p99']:.3f}); {ref_name} top-{k} mass {covered:.3f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench-divergence", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs") / DEFAULT_SLUG, help="run folder with checkpoints")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: <run>/bench-divergence.json)")
    a = p.parse_args(argv)
    res = measure(a.run, a.docs, a.max_len)
    out = a.out or a.run / "bench-divergence.json"
    out.write_text(json.dumps({"docs": a.docs, "max_len": a.max_len, "k": TOP_K, "variants": res}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
