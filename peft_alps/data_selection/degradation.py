"""How much a modified model degraded on each sample: per-sample Jensen-Shannon divergence, or own loss.

Definitions (natural logarithm). For a text of ``T`` tokens (after truncation), with ``p_t`` and ``q_t`` the
next-token distributions (softmax of the logits over the vocabulary) of ``model`` and ``reference`` at position
``t``::

    JSD_t  = 1/2 KL(p_t || m_t) + 1/2 KL(q_t || m_t),   m_t = (p_t + q_t) / 2
    score  = (1/T) sum_{t=1..T} JSD_t                     (mean over the attention mask)

PASER's code sums over positions (and over a batch of one), which makes long texts count more; the mean keeps
the score a per-token quantity, and the length enters PASER's ranking separately (``JSD / log(len^2)``).
Without a reference (``reference=None`` and a model that is not a PeftModel), ``score`` is the model's own
mean next-token loss on the text, ``-(1/(T-1)) sum_{t=1..T-1} log p_t(x_{t+1})`` (0 for a one-token text).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .embed import progress_bar


def token_jsd(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``[...]`` Jensen-Shannon divergence (nats) between ``softmax(logits_p)`` and ``softmax(logits_q)``, both
    ``[..., vocab]``, computed in float32 from log-probabilities (exact zeros follow 0 log 0 = 0)."""
    lp = torch.log_softmax(logits_p.float(), dim=-1)
    lq = torch.log_softmax(logits_q.float(), dim=-1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    kl_pm = torch.where(lp.isneginf(), 0.0, lp.exp() * (lp - lm)).sum(-1)
    kl_qm = torch.where(lq.isneginf(), 0.0, lq.exp() * (lq - lm)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp(min=0)


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def degradation_mode(model, reference) -> str:
    """``"jsd"`` (against ``reference``), ``"jsd-base"`` (a PeftModel against its disabled adapter) or
    ``"loss"`` (the model's own loss)."""
    if reference is not None:
        return "jsd"
    return "jsd-base" if _is_peft(model) else "loss"


@torch.no_grad()
def sample_degradation(model, tokenizer, texts: list[str], reference=None, batch_size: int = 4,
                       max_length: int = 256, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [N] float64, lengths [N] int64)``: each text's degradation (module docstring) and its number
    of tokens after truncation to ``max_length``.

    ``model``: a causal LM (``model(input_ids, attention_mask).logits`` is ``[batch, seq, vocab]``);
    ``reference``: the original model (same tokenizer), or None (see :func:`degradation_mode`). Texts are
    batched by token length (less padding); padded positions are masked out, so the result does not depend on
    the batching. Memory: a few ``[batch_size, max_length, vocab]`` float32 tensors.
    """
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}.")
    mode = degradation_mode(model, reference)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError(f"text {int(np.argmax(lengths == 0))} has no tokens: drop empty texts first.")
    order = np.lexsort((np.arange(len(ids)), lengths))
    scores = np.zeros(len(ids), dtype=np.float64)
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        for start in progress_bar(range(0, len(ids), batch_size), progress, desc="Degradation", unit="batch"):
            rows = order[start:start + batch_size]
            width = int(lengths[rows].max())
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # right padding: causal outputs at real positions ignore the pads
                input_ids[r, :lengths[i]] = torch.tensor(ids[i])
                mask[r, :lengths[i]] = 1
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            if mode == "loss":
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                        input_ids[:, 1:].reshape(-1), reduction="none")
                nll = nll.view(len(rows), width - 1)                                # [b, seq-1]
                target = mask[:, 1:].to(nll.dtype)
                per = (nll * target).sum(1) / target.sum(1).clamp(min=1)
            else:
                if mode == "jsd":
                    other = reference(input_ids=input_ids, attention_mask=mask).logits
                else:
                    with model.disable_adapter():
                        other = model(input_ids=input_ids, attention_mask=mask).logits
                per = torch.stack([token_jsd(logits[r, :lengths[i]], other[r, :lengths[i]]).mean()
                                   for r, i in enumerate(rows)])  # one row at a time: bounded temporaries
            scores[rows] = per.double().numpy()
    finally:
        for m, was in modes:
            m.train(was)
    return scores, lengths
