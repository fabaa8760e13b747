"""Token-level divergence of a variant from BF16 on the same text, from top-k log-probs only.

Why top-k: pulling the full vocabulary out of vLLM runs at ~1 token/s, while `prompt_logprobs=k` is
nearly free. Per position t (the distribution of token t given tokens < t), with P = BF16 and Q = the
variant, each known only on its own top k tokens:

- KL(P||Q) over P's top-k tokens plus one tail bucket (the mass P leaves outside its top k). A token of
  P's top k missing from Q's list gets Q's share min(q_k, Q's unlisted mass / number missing), the
  most it can have. Bucketing can only lower KL (data-processing inequality); the missing-token
  estimate can lower it further. Its error against full-vocabulary KL is measured, not assumed
  (`make bench-divergence`, README), and checked in tests/unit/test_divergence.py.
- top-1 agreement: both distributions put the same token first;
- p(variant, BF16's top token): how much the variant still believes BF16's choice.

KL measures *different*, not *worse*: a variant can diverge and score the same, or score better by luck.
Pure numpy + scipy (the per-document CI is scipy's BCa bootstrap over documents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float64]
TOPK_METHOD = ("top-k KL: P's top-k tokens + one tail bucket; Q's unlisted tokens get at most Q's k-th "
               "probability (lower bound up to that estimate)")
DEPTH_EDGES = (0, 512, 2048, 8192, 32768, 131072)  # position buckets: 0-512, 512-2k, 2k-8k, ...


@dataclass(frozen=True)
class TopK:
    """Top-k log-probs of one document: row t is the distribution of token t+1 given tokens 0..t."""

    ids: NDArray[np.int64]  # [T, k], each row sorted by descending log-prob
    logprobs: NDArray[np.float64]  # [T, k]

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape or self.ids.ndim != 2:
            raise ValueError(f"top-k ids {self.ids.shape} and log-probs {self.logprobs.shape} must be [T, k]")


def token_divergence(ref: TopK, var: TopK) -> tuple[Floats, NDArray[np.bool_], Floats]:
    """Per position: (KL(ref||var) estimate in nats, same top-1 token, var's probability of ref's top token)."""
    if ref.ids.shape[0] != var.ids.shape[0]:
        raise ValueError(f"documents differ in length: {ref.ids.shape[0]} vs {var.ids.shape[0]} positions")
    p = np.exp(ref.logprobs)
    q_list = np.exp(var.logprobs)
    p_tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_unlisted = np.clip(1.0 - q_list.sum(axis=1), 1e-12, 1.0)
    q_kth = q_list.min(axis=1)
    # Q's probability of each of P's top-k tokens: exact when listed, else capped as documented above
    match = ref.ids[:, :, None] == var.ids[:, None, :]  # [T, k_ref, k_var]
    listed = match.any(axis=2)
    q_exact = (match * q_list[:, None, :]).sum(axis=2)
    n_missing = np.maximum((~listed).sum(axis=1), 1)
    q_guess = np.minimum(q_kth, q_unlisted / n_missing)
    q = np.where(listed, q_exact, q_guess[:, None])
    q = np.clip(q, 1e-12, 1.0)
    q_tail = np.clip(1.0 - q.sum(axis=1), 1e-12, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        head = (p * (np.log(np.clip(p, 1e-300, 1.0)) - np.log(q))).sum(axis=1)
        tail = np.where(p_tail > 0, p_tail * (np.log(np.clip(p_tail, 1e-300, 1.0)) - np.log(q_tail)), 0.0)
    kl = np.maximum(head + tail, 0.0)
    top1 = ref.ids[:, 0] == var.ids[:, 0]
    return kl, top1, q[:, 0]


def full_kl(ref_logprobs: Floats, var_logprobs: Floats) -> Floats:
    """Exact KL(ref||var) per position from full-vocabulary log-probs [T, V] (the reference for the bound)."""
    return np.asarray(np.maximum((np.exp(ref_logprobs) * (ref_logprobs - var_logprobs)).sum(axis=1), 0.0))


def topk_of(logprobs: Floats, k: int) -> TopK:
    """Top-k of full log-probs [T, V], sorted, as a server would return them."""
    k = min(k, logprobs.shape[1])
    part = np.argpartition(-logprobs, k - 1, axis=1)[:, :k]  # the k largest, unordered: O(V), not O(V log V)
    vals = np.take_along_axis(logprobs, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1)
    return TopK(ids=idx.astype(np.int64), logprobs=np.take_along_axis(logprobs, idx, axis=1).astype(np.float64))


def _stats(kl: Floats, top1: NDArray[np.bool_], p_top: Floats) -> dict[str, Any]:
    if kl.size == 0:
        return {"n_tokens": 0}
    return {"n_tokens": int(kl.size), "kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)),
            "kl_p90": float(np.quantile(kl, 0.90)), "kl_p99": float(np.quantile(kl, 0.99)),
            "top1_agreement": float(top1.mean()), "p_ref_top_mean": float(p_top.mean())}


def doc_mean_ci(doc_means: list[float], level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """BCa bootstrap CI of the mean of per-document mean KL (documents are the independent units)."""
    from scipy import stats  # noqa: PLC0415 (heavy import, only where a CI is asked for)

    x = np.asarray(doc_means, dtype=np.float64)
    if x.size < 3 or float(x.std()) == 0.0:
        return None
    res = stats.bootstrap((x,), np.mean, confidence_level=level, n_resamples=4000, method="BCa",
                          random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else None


def summarize(ref_docs: list[TopK], var_docs: list[TopK], max_len: int, level: float = 0.95) -> dict[str, Any]:
    """Overall and per-depth statistics over documents, plus the per-document CI of mean KL."""
    if len(ref_docs) != len(var_docs) or not ref_docs:
        raise ValueError(f"{len(ref_docs)} reference documents vs {len(var_docs)} variant documents")
    kls: list[Floats] = []
    ptops: list[Floats] = []
    top1s: list[NDArray[np.bool_]] = []
    depths: list[NDArray[np.int64]] = []
    doc_means: list[float] = []
    for ref, var in zip(ref_docs, var_docs, strict=True):
        d_kl, d_top1, d_p_top = token_divergence(ref, var)
        kls.append(d_kl)
        top1s.append(d_top1)
        ptops.append(d_p_top)
        depths.append(np.arange(1, d_kl.size + 1))  # row t predicts token t+1 from t+1 tokens of context
        doc_means.append(float(d_kl.mean()) if d_kl.size else 0.0)
    kl, p_top = np.concatenate(kls), np.concatenate(ptops)
    top1: NDArray[np.bool_] = np.concatenate(top1s).astype(bool)
    depth: NDArray[np.int64] = np.concatenate(depths).astype(np.int64)
    out: dict[str, Any] = {"overall": _stats(kl, top1, p_top), "n_docs": len(ref_docs), "doc_kl_mean": doc_means}
    ci = doc_mean_ci(doc_means, level)
    out["overall"]["kl_mean_ci"] = list(ci) if ci else None
    out["overall"]["ci_level"] = level
    buckets = []
    edges = [e for e in DEPTH_EDGES if e < max_len] + [max_len]
    for lo, hi in zip(edges[:-1], edges[1:], strict=False):
        sel = (depth > lo) & (depth <= hi)
        if sel.any():
            buckets.append({"depth_from": lo, "depth_to": hi} | _stats(kl[sel], top1[sel], p_top[sel]))
    out["by_depth"] = buckets
    return out
