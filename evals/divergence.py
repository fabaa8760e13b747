"""Divergence from BF16, measured where the variant is served: top-k prompt log-probs of long documents.

The documents (offline default): held-out standard-library docstrings, concatenated in a seeded order until
each fills the served context (max_model_len - 1 tokens), so every depth bucket up to max_model_len has
tokens. `--divergence-data` takes any text file or a Hugging Face dataset id (its `text` column) instead.
Each variant's top-k is fetched from its own vLLM server (`prompt_logprobs=k` on /v1/completions, one
document per request) or, when scored by emulation, from transformers; saved as `<variant>/eval/
divergence-topk.npz` under a content key, so a rerun fetches nothing and bf16 is fetched once.
The statistics are qgcore.divergence's; this module only gets the numbers.
"""

from __future__ import annotations

import json
import random
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evals import emulation
from qgcore import corpus
from qgcore.divergence import TopK
from qgcore.errors import ConfigError
from qgcore.hashing import content_key, file_sha256

TOP_K = 20  # vLLM's default --max-logprobs: the most a stock server returns
DEFAULT_DOCS = 24
SEED = 0


@dataclass(frozen=True)
class DivergenceSet:
    docs: list[list[int]]  # token ids, BOS first where the tokenizer has one
    source: str
    key: str  # content key of the token ids: part of every divergence cache key


def _texts(data: str | None, n: int, min_chars: int) -> tuple[list[str], str]:
    if data is None:
        docs = list(corpus.documents("heldout"))
        random.Random(SEED).shuffle(docs)
        source = f"{corpus.CORPUS_ID}/heldout@{corpus.corpus_hash('heldout')} (concatenated, seed {SEED})"
        return _concat(docs, n, min_chars, source), source
    path = Path(data)
    if path.is_file():
        text = path.read_text(errors="replace")
        chunks = [c for c in text.split("\n\n") if c.strip()]
        return _concat(chunks, n, min_chars, str(path)), f"file {path}"
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets ships with lm-eval
        raise ConfigError(f"--divergence-data {data}: not a file, and `datasets` is missing ({err})") from None
    try:
        ds = datasets.load_dataset(data, split="test")
    except Exception as err:  # noqa: BLE001 - the hub's errors are many; the message names the fix
        raise ConfigError(f"--divergence-data {data}: neither a text file nor a loadable dataset "
                          f"({type(err).__name__}: {str(err)[:200]}); pass a path to a .txt file") from None
    if "text" not in ds.column_names:
        raise ConfigError(f"--divergence-data {data}: dataset has no `text` column ({ds.column_names})")
    return _concat([str(t) for t in ds["text"] if t], n, min_chars, data), f"dataset {data} (test split)"


def _concat(pieces: list[str], n: int, min_chars: int, what: str) -> list[str]:
    out, cur = [], []
    size = 0
    for p in pieces:
        cur.append(p.strip())
        size += len(p)
        if size >= min_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
            if len(out) == n:
                return out
    raise ConfigError(f"{what}: only {len(out)} documents of {min_chars} characters; asked for {n} "
                      "(pass fewer with --divergence-docs)")


CPU_DOC_TOKENS = 2048  # on CPU: prompt log-probs of an 8k document cost ~4x a 2k one, for every variant
GPU_DOC_TOKENS = 16384  # on a GPU: deep enough for FP8-KV damage, small enough to fetch (20 log-probs a token)


def doc_tokens_for(platform: str, max_model_len: int, asked: int | None = None) -> int:
    """Tokens per divergence document: asked (at most the served context), else the platform's default."""
    want = asked if asked is not None else (GPU_DOC_TOKENS if platform == "cuda" else CPU_DOC_TOKENS)
    return max(min(want, max_model_len - 1), 2)


def build_set(tokenizer_dir: Path, *, n_docs: int, doc_tokens: int, data: str | None = None,
              cache_dir: Path | None = None, tokenizer_key: str = "") -> DivergenceSet:
    """`n_docs` documents of exactly `doc_tokens` tokens (at most the served context minus the one the server
    adds). Cached by what they are made of (the tokenizer's files, the count, the length, the data), so a
    rerun computes no key from scratch."""
    cache = None
    if cache_dir is not None:
        origin = data if data is None or not Path(data).is_file() else file_sha256(Path(data))
        cache = cache_dir / "divergence" / (content_key([tokenizer_key, n_docs, doc_tokens, origin,
                                                         file_sha256(Path(corpus.__file__))]) + ".json")
        if cache.is_file():
            known = json.loads(cache.read_text())
            return DivergenceSet(docs=known["docs"], source=known["source"], key=known["key"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts, source = _texts(data, n_docs, min_chars=doc_tokens * 6)  # >= 6 chars per token leaves room to cut
    docs = []
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for text in texts:
        ids = bos + tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) < doc_tokens:
            raise ConfigError(f"divergence document too short ({len(ids)} < {doc_tokens} tokens) from {source}")
        docs.append([int(i) for i in ids[:doc_tokens]])
    out = DivergenceSet(docs=docs, source=source, key=content_key(docs))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"docs": out.docs, "source": out.source, "key": out.key}))
    return out


def _one_doc(url: str, name: str, ids: list[int], k: int) -> TopK:
    body = json.dumps({"model": name, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                       "prompt_logprobs": k}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        out = json.loads(r.read())
    rows = out["choices"][0].get("prompt_logprobs") or out.get("prompt_logprobs")
    if not rows or len(rows) != len(ids):
        raise RuntimeError(f"vLLM returned {len(rows or [])} prompt log-prob rows for {len(ids)} tokens")
    tid = np.zeros((len(ids) - 1, k), dtype=np.int64)
    tlp = np.full((len(ids) - 1, k), -np.inf, dtype=np.float64)
    for t, row in enumerate(rows[1:]):  # row 0 (the first token) has no distribution
        best = sorted(((float(v["logprob"]), int(tok_id)) for tok_id, v in row.items()), reverse=True)[:k]
        for j, (lp, tok_id) in enumerate(best):
            tid[t, j], tlp[t, j] = tok_id, lp
    return TopK(ids=tid, logprobs=tlp)


def server_topk(url: str, name: str, dset: DivergenceSet, k: int = TOP_K, concurrent: int = 2) -> list[TopK]:
    """Top-k prompt log-probs of every document from a running vLLM server (OpenAI completions API)."""
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        return list(pool.map(lambda ids: _one_doc(url, name, ids, k), dset.docs))


def hf_topk(checkpoint: Path, dset: DivergenceSet, k: int = TOP_K, device: str = "cpu",
            dtype: str = "bfloat16") -> list[TopK]:
    """The same from transformers (emulated variants, and the full-vocabulary reference of the bound), in the
    platform's compute dtype (qgcore.serving.compute_dtype), as the emulated scores are."""
    import torch
    from transformers import AutoModelForCausalLM

    out = []
    # the whole use, not only the load: compressed-tensors may decompress NVFP4 weights at the first forward
    with emulation.loading(dtype), torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=getattr(torch, dtype)).to(device).eval()
        for ids in dset.docs:
            logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(lp, k, dim=-1)
            out.append(TopK(ids=top.indices.cpu().numpy().astype(np.int64),
                            logprobs=top.values.cpu().numpy().astype(np.float64)))
    return out


def save(path: Path, key: str, docs: list[TopK], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, key=np.array(key), meta=np.array(json.dumps(meta)),
                        ids=np.stack([d.ids for d in docs]).astype(np.int32),
                        logprobs=np.stack([d.logprobs for d in docs]).astype(np.float32))
    tmp.replace(path)  # never a half-written cache entry


def load(path: Path, key: str) -> tuple[list[TopK], dict[str, Any]] | None:
    """The cached top-k if it was computed under `key`, else None."""
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            meta = json.loads(str(z["meta"]))
            return [TopK(ids=i.astype(np.int64), logprobs=lp.astype(np.float64))
                    for i, lp in zip(z["ids"], z["logprobs"], strict=True)], meta
    except (OSError, KeyError, ValueError):
        return None
