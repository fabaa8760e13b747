"""Top-k KL against the exact full-vocabulary KL, on distributions shaped like a language model's."""

from __future__ import annotations

import numpy as np
import pytest

from qgcore.divergence import DEPTH_EDGES, TopK, full_kl, summarize, token_divergence, topk_of


def _lm_like(rng: np.random.Generator, t: int, v: int, temp: float) -> np.ndarray:
    """Log-probs over a Zipf-shaped vocabulary (a few likely tokens, a long tail), as LM heads produce."""
    logits = -np.log(np.arange(1, v + 1))[None, :] * 1.1 / temp + rng.standard_normal((t, v)) * 0.5
    logits = np.take_along_axis(logits, rng.permuted(np.tile(np.arange(v), (t, 1)), axis=1), axis=1)
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def _perturbed(rng: np.random.Generator, lp: np.ndarray, noise: float) -> np.ndarray:
    x = lp + rng.standard_normal(lp.shape) * noise
    return x - np.logaddexp.reduce(x, axis=1, keepdims=True)


def test_topk_equals_exact_kl_when_k_covers_the_vocabulary():
    rng = np.random.default_rng(0)
    p = _lm_like(rng, 50, 40, 1.0)
    q = _perturbed(rng, p, 0.3)
    kl, top1, p_top = token_divergence(topk_of(p, 40), topk_of(q, 40))
    np.testing.assert_allclose(kl, full_kl(p, q), rtol=1e-9, atol=1e-12)
    assert np.array_equal(top1, p.argmax(1) == q.argmax(1))
    np.testing.assert_allclose(p_top, np.exp(q[np.arange(50), p.argmax(1)]))


@pytest.mark.parametrize("noise", [0.05, 0.2, 0.5])
def test_topk_is_close_below_exact_kl_on_peaked_distributions(noise: float):
    """k=20 of a 5,000-token vocabulary: bucketing the tail can only lose divergence (data processing), so the
    estimate sits at or below the exact value, and on LM-shaped distributions not far below it."""
    rng = np.random.default_rng(1)
    p = _lm_like(rng, 400, 5000, 0.6)
    q = _perturbed(rng, p, noise)
    exact = full_kl(p, q)
    kl, _, _ = token_divergence(topk_of(p, 20), topk_of(q, 20))
    assert kl.mean() <= exact.mean() * 1.001
    assert kl.mean() >= 0.5 * exact.mean(), (kl.mean(), exact.mean())
    # ordering is what the report relies on: a larger perturbation reads larger
    q2 = _perturbed(rng, p, noise * 2)
    kl2, _, _ = token_divergence(topk_of(p, 20), topk_of(q2, 20))
    assert kl2.mean() > kl.mean()


def test_identical_distributions_have_zero_divergence_and_full_agreement():
    rng = np.random.default_rng(2)
    p = _lm_like(rng, 30, 300, 1.0)
    kl, top1, _ = token_divergence(topk_of(p, 20), topk_of(p, 20))
    assert np.all(kl < 1e-12) and top1.all()


def test_missing_tokens_get_at_most_the_variants_kth_probability():
    """A token in bf16's top-k that the variant did not list cannot be given more than the variant's k-th."""
    ref = TopK(ids=np.array([[0, 1]]), logprobs=np.log(np.array([[0.6, 0.3]])))
    var = TopK(ids=np.array([[2, 0]]), logprobs=np.log(np.array([[0.7, 0.2]])))
    kl, top1, p_top = token_divergence(ref, var)
    # token 1 missing: q1 = min(q_kth=0.2, unlisted 0.1 / 1) = 0.1; tails: p 0.1, q 1-0.2-0.1 = 0.7
    expect = 0.6 * np.log(0.6 / 0.2) + 0.3 * np.log(0.3 / 0.1) + 0.1 * np.log(0.1 / 0.7)
    assert kl[0] == pytest.approx(expect) and not top1[0] and p_top[0] == pytest.approx(0.2)


def test_summary_buckets_by_depth_and_gives_a_document_ci():
    rng = np.random.default_rng(3)
    docs_p, docs_q = [], []
    for _ in range(6):
        p = _lm_like(rng, 700, 200, 1.0)
        q = p.copy()
        q[512:] = _perturbed(rng, p[512:], 0.4)  # damage only deep in the context, as an FP8 KV cache might
        docs_p.append(topk_of(p, 20))
        docs_q.append(topk_of(q, 20))
    s = summarize(docs_p, docs_q, max_len=701)
    assert [(b["depth_from"], b["depth_to"]) for b in s["by_depth"]] == [(0, 512), (512, 701)]
    shallow, deep = s["by_depth"]
    assert shallow["n_tokens"] == 6 * 512 and deep["n_tokens"] == 6 * 188  # row t: t+1 tokens of context
    assert shallow["kl_mean"] < 1e-9 < deep["kl_mean"] and shallow["top1_agreement"] == 1.0
    lo, hi = s["overall"]["kl_mean_ci"]
    assert lo <= s["overall"]["kl_mean"] <= hi and len(s["doc_kl_mean"]) == 6
    assert DEPTH_EDGES[:3] == (0, 512, 2048)


def test_mismatched_documents_are_refused():
    a = topk_of(np.log(np.full((5, 4), 0.25)), 2)
    b = topk_of(np.log(np.full((6, 4), 0.25)), 2)
    with pytest.raises(ValueError, match="differ in length"):
        token_divergence(a, b)
