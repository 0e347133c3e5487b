"""Layout inference for an architecture without a built-in entry: read the attention from the module tree.

1. The config gives the head count (``num_attention_heads``, which transformers maps from ``n_head``,
   ``num_heads`` ...), and the head size where it states one (``head_dim``, T5's ``d_kv``).
2. Every ``nn.Linear`` / GPT-2 ``Conv1D`` named ``<stack>.<i>.<path>`` is a projection of block ``i`` of a layer
   stack. In block 0 an attention is a parent module holding a q, k and v projection by name (``q_proj``,
   ``query``, ``q_lin`` ... or a fused ``qkv_proj``, ``c_attn``, ``query_key_value``, ``Wqkv`` ...) whose
   features fit the head count, plus the output projection (``o_proj``, ``out_proj``, ``dense``, ``c_proj``,
   ``Wo`` ...) reading ``num_heads * head_dim`` features into the hidden size, nearest to it in the tree.
3. The shapes give the head size, the kv head count and the hidden size; the block count gives ``num_layers``.
4. The order of a fused q/k/v module (``"blocks"`` or ``"interleaved"``) is not visible in any shape: both are
   tried with the perturbed forward passes of :func:`~peft_alps.heads.check.check_layout` on the model
   (:func:`~peft_alps.heads.perturb.prove`), and the inferred layout is returned only once proven head by head.

Exactly one attention must be found; a model with several (an encoder-decoder's self- and cross-attention) or
none gets a LayoutError saying what was found and what could not be determined.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from .layout import HeadLayout, LayoutError
from .modules import conv1d_names, projection_shapes
from .perturb import prove

_NAMES = {
    "q": {"q", "q_proj", "query", "q_lin", "query_proj", "wq", "q_attn"},
    "k": {"k", "k_proj", "key", "k_lin", "key_proj", "wk"},
    "v": {"v", "v_proj", "value", "v_lin", "value_proj", "wv"},
    "qkv": {"qkv", "qkv_proj", "c_attn", "query_key_value", "wqkv", "w_pack", "att_proj", "in_proj", "qkv_lin"},
    "o": {"o", "o_proj", "out_proj", "dense", "c_proj", "wo", "out_lin", "proj", "out", "o_lin", "attn_out"},
}


def infer_layout(model: nn.Module, warn: bool = False) -> HeadLayout:
    """The attention layout of ``model`` (a transformers model of any architecture, or a PeftModel of one) read
    from its modules and config and proven by perturbed forward passes (:func:`~peft_alps.heads.perturb.prove`, see
    the module docstring); LayoutError saying what could not be determined otherwise. ``warn``: also warn, showing the
    layout (what ``get_peft_model`` and the scorers do when they infer one)."""
    layout = _infer(model)
    if warn:
        warnings.warn(f"peft_alps has no built-in layout for model_type={layout.model_type!r}: inferred one from the "
                      f"model's modules and proved it head by head (peft_alps.check_layout): {layout.to_dict()}. "
                      f"Pass it as layout=... to make it explicit.", stacklevel=4)
    return layout


def _infer(model: nn.Module) -> HeadLayout:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None) or type(inner).__name__
    num_heads = _config_int(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if num_heads is None:
        raise LayoutError(f"Cannot infer the attention layout of {model_type}: its config states no head count "
                          f"(num_attention_heads); pass HeadMaskConfig(layout={{...}}).")
    stated_head_dim = _config_int(config, "head_dim", "d_kv")
    shapes = projection_shapes(inner)
    transposed = conv1d_names(inner)
    stacks = _stacks(shapes)
    found = []
    for stack, blocks in stacks.items():
        for attention in _attentions(blocks[0], num_heads, stated_head_dim):
            found.append((stack, len(blocks), attention))
    if not found:
        listing = "; ".join(f"{stack}.0: " + ", ".join(f"{p} {s[0]}x{s[1]}" for p, s in list(blocks[0].items())[:8])
                            for stack, blocks in list(stacks.items())[:3])
        raise LayoutError(f"Cannot infer the attention layout of {model_type}: no block holds q, k and v "
                          f"projections (by name, e.g. q_proj / query / qkv_proj, with out features fitting "
                          f"{num_heads} heads) next to an output projection. Projections found: "
                          f"{listing or 'none'}. Pass HeadMaskConfig(layout={{...}}).")
    if len(found) > 1:
        where = ", ".join(f"{stack}.N.{a['modules']['q']}" for stack, _, a in found)
        raise LayoutError(f"{model_type} has {len(found)} attention stacks ({where}): inference cannot tell which one "
                          f"to train. Pass one layout with HeadMaskConfig(layout={{...}}) (modules inside a block, "
                          f"layers naming its stack).")
    stack, num_layers, attention = found[0]
    names = _short_stack_name(stack, list(stacks))
    fields = dict(model_type=model_type, num_layers=num_layers, num_heads=num_heads, layers=names,
                  transposed=f"{stack}.0.{attention['modules']['o']}" in transposed, **attention)
    orders = [None] if fields.pop("fused_shape") is None else ["blocks", "interleaved"]
    failures = []
    for fused in orders:
        layout = HeadLayout(**fields, fused=fused)
        try:
            prove(inner, layout, type(inner).__name__)
            return layout
        except LayoutError as e:
            failures.append(f"fused={fused!r}: {e}")
    raise LayoutError(f"Found the attention of {model_type} at {stack}.N ({fields['modules']}) but no layout for it "
                      f"passes the head-by-head check: {' | '.join(failures)}. Pass HeadMaskConfig(layout={{...}}).")


def _config_int(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _stacks(shapes: dict) -> dict[str, list[dict]]:
    """``{stack path: [block 0's {path inside block: (out, in)}, block 1's, ...]}`` of every numbered module list
    whose blocks are numbered 0..n-1 (the first number in a module name is its block index)."""
    stacks: dict[str, dict[int, dict]] = {}
    for name, shape in shapes.items():
        m = re.match(r"^(.*?)\.(\d+)\.(.+)$", name)
        if m:
            stacks.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = shape
    return {stack: [blocks[i] for i in range(len(blocks))] for stack, blocks in stacks.items()
            if sorted(blocks) == list(range(len(blocks)))}


def _attentions(block: dict, num_heads: int, stated_head_dim):
    """The attentions of one block: dicts of the HeadLayout fields modules, head_dim, num_kv_heads, hidden_size
    and ``fused_shape`` (None for separate q/k/v)."""
    by_parent: dict[str, dict[str, str]] = {}
    for path in block:
        parent, _, leaf = path.rpartition(".")
        for role, names in _NAMES.items():
            if leaf.lower() in names and role != "o":
                by_parent.setdefault(parent, {})[role] = path
    for parent, roles in by_parent.items():
        if {"q", "k", "v"} <= set(roles):
            (q_out, hidden), (k_out, k_in), (v_out, v_in) = (block[roles[p]] for p in "qkv")
            head_dim = stated_head_dim or (q_out // num_heads if q_out % num_heads == 0 else None)
            if head_dim is None or q_out != num_heads * head_dim or k_out != v_out or k_out % head_dim:
                continue
            modules, kv, fused = {p: roles[p] for p in "qkv"}, k_out // head_dim, None
        elif "qkv" in roles:
            out, hidden = block[roles["qkv"]]
            head_dim = stated_head_dim or hidden // num_heads
            kv2 = out // head_dim - num_heads if out % head_dim == 0 else -1
            if kv2 <= 0 or kv2 % 2:
                continue
            modules, kv, fused = {p: roles["qkv"] for p in "qkv"}, kv2 // 2, out
        else:
            continue
        o = _output_projection(block, parent, hidden, num_heads * head_dim)
        if o is None or num_heads % kv:
            continue
        yield {"modules": {**modules, "o": o}, "head_dim": head_dim, "num_kv_heads": kv, "hidden_size": hidden,
               "fused_shape": fused}


def _output_projection(block: dict, parent: str, hidden: int, width: int):
    """The module named like an output projection that maps ``width`` features to ``hidden``, nearest to the q/k/v
    ``parent`` in the module tree (BERT: ``attention.self`` -> ``attention.output.dense``); None if none."""
    def shared(path):
        a, b = path.split("."), parent.split(".") if parent else []
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    candidates = [p for p, shape in block.items() if shape == (hidden, width)
                  and p.rpartition(".")[2].lower() in _NAMES["o"]]
    if not candidates:
        return None
    best = max(shared(p) for p in candidates)
    nearest = [p for p in candidates if shared(p) == best]
    return nearest[0] if len(nearest) == 1 and best > 0 or len(candidates) == 1 else None


def _short_stack_name(stack: str, stacks: list[str]) -> str:
    """The shortest dotted suffix of ``stack`` that no other stack ends with (``model.layers`` -> ``layers``,
    T5's ``encoder.block`` stays ``encoder.block``), as ``HeadLayout.layers`` takes it."""
    parts = stack.split(".")
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if not any(other != stack and (other == suffix or other.endswith("." + suffix)) for other in stacks):
            return suffix
    return stack
