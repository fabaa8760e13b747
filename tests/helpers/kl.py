"""Mean per-token KL(bf16 || variant) on held-out text, full vocabulary, with transformers (bf16 compute).

The reference measure for the recipe tests: 8-bit formats sit an order of magnitude below 4-bit ones,
and a broken checkpoint far above both.
"""

from __future__ import annotations

from pathlib import Path

from qgcore import corpus


def mean_kl(ref_dir: Path, cand_dir: Path, *, docs: int = 8, max_length: int = 128) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref_dir)
    texts = corpus.sample("heldout", docs, seed=7)
    # bf16 compute (as served); compressed-tensors decompresses NVFP4 only into the checkpoint dtype
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16).eval()
    cand = AutoModelForCausalLM.from_pretrained(cand_dir, dtype=torch.bfloat16).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt", truncation=True, max_length=max_length).input_ids
            p = torch.log_softmax(ref(ids).logits.float(), -1)
            q = torch.log_softmax(cand(ids).logits.float(), -1)
            total += float((p.exp() * (p - q)).sum(-1).sum())
            count += ids.shape[1]
    return total / count
