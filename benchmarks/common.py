"""Shared pieces of the benchmark scripts: model sizes, the timed training step, machine info, JSON output,
and the ALPS paper's training recipe (``paper_recipe_hooks``, also used by tests/test_paper_recipe.py)."""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import torch
import transformers as tf
from peft import get_peft_model

import peft_alps
from peft_alps import HeadMaskConfig
from peft_alps.heads.layout import HeadLayout, check_parts

SIZES = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2),
    "large": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=12, num_attention_heads=16,
                  num_key_value_heads=4),
}


def llama(size: str, seed: int = 0) -> tf.LlamaForCausalLM:
    """A Llama built from config (``SIZES[size]``, vocab 4096, GQA, eager attention), seeded."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=4096, **SIZES[size])
    config._attn_implementation = "eager"
    return tf.LlamaForCausalLM(config)


def headmask_trainers(base, configs: dict) -> dict:
    """``{name: (peft model, AdamW)}``: a copy of ``base`` per ``{name: HeadMaskConfig kwargs}``."""
    variants = {}
    for name, kwargs in configs.items():
        model = get_peft_model(copy.deepcopy(base), HeadMaskConfig(**kwargs))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
        variants[name] = (model, opt)
    return variants


def time_training_steps(variants: dict, ids: torch.Tensor, rounds: int, warmup: int = 2):
    """Interleaved round-robin training steps (forward, backward, optimizer step) of every variant.

    Returns ``(step_seconds, optimizer_seconds)``, each ``{name: [seconds per timed round]}``."""
    steps, opt_steps = {k: [] for k in variants}, {k: [] for k in variants}
    for r in range(rounds + warmup):
        for name, (model, opt) in variants.items():
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if r >= warmup:
                steps[name].append(t2 - t0)
                opt_steps[name].append(t2 - t1)
    return steps, opt_steps


def machine() -> dict:
    return dict(torch=torch.__version__, transformers=tf.__version__, peft_alps=peft_alps.__version__,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())


def write_json(path, data) -> None:
    """Write ``data`` as JSON to ``path`` (folders created; temp file, then rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(out)


def paper_recipe_hooks(model: torch.nn.Module, heads: dict, parts=("q", "k", "v")) -> list:
    """The ALPS paper's training recipe, for comparison with HeadMask: train whole projections, mask gradients.

    Freezes ``model`` except the full weight of every projection that holds one of ``parts`` (and the bias of
    q/k/v projections), in every layer, and registers tensor hooks that zero the gradient rows (q/k/v: output
    channels) or columns (o: input channels) of the heads not in ``heads`` (``{layer: [query heads]}``). As in
    HeadMask, a k/v group is kept under GQA if any of its query heads is selected, and the output projection's
    bias belongs to no head and stays frozen. Channels come from ``peft_alps.heads.layout.HeadLayout``; GPT-2's
    transposed ``Conv1D`` weights are handled. Returns the hook handles (``handle.remove()`` undoes the masking,
    not the freezing).

    Non-selected heads get exactly zero gradients, yet an optimizer with decoupled weight decay (AdamW,
    ``weight_decay > 0``) still shrinks their weights at every step (tests/test_paper_recipe.py), and every step
    computes and stores full ``[out, in]`` weight gradients and optimizer state for the whole projections.
    """
    layout = HeadLayout.from_model_config(model.config)
    parts = check_parts(parts)
    heads = {int(layer): list(hs) for layer, hs in heads.items()}
    model.requires_grad_(False)
    handles = []
    for name, module in model.named_modules():
        found = layout.locate(name, parts)
        if found is None:
            continue
        layer, path = found
        channels = torch.tensor(layout.channels(path, parts, heads.get(layer, [])), dtype=torch.long)
        rows = layout.head_axis(path) == "out"  # nn.Linear frame: q/k/v own rows, o owns columns
        axis = (0 if rows else 1) ^ int(layout.transposed)  # storage axis of the weight
        weight = module.weight
        keep = torch.zeros(weight.shape[axis], dtype=weight.dtype).index_fill_(0, channels, 1)
        weight_keep = keep.view(-1, 1) if axis == 0 else keep.view(1, -1)
        weight.requires_grad_(True)
        handles.append(weight.register_hook(lambda g, m=weight_keep: g * m))
        if rows and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
            handles.append(module.bias.register_hook(lambda g, m=keep.to(module.bias.dtype): g * m))
    if not handles:
        raise ValueError(f"No module of {type(model).__name__} holds parts {parts}.")
    return handles
