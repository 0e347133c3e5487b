"""A layout proves itself: change one head's rows and watch which heads change.

A :class:`~peft_alps.heads.layout.HeadLayout` claims that rows ``part_channels(p, h)`` of the q/k/v projection
belong to query head ``h`` (its kv group for k and v) and that head ``h``'s context vector enters the output
projection at columns ``part_channels("o", h)``. :func:`check_layout` tests that claim against what the
architecture computes: it adds noise to one row of q, k or v in layer 0 and compares the input of layer 0's output
projection (every head's context vector, ``[tokens, num_heads * head_dim]``) with the unperturbed one:

* a q row of head ``h`` may change only head ``h``'s columns (all of them: the attention weights move);
* a k row of group ``g`` only the columns of the query heads reading ``g``;
* a v row at position ``j`` of group ``g`` only column ``j`` of each of those heads.

Untouched heads come out bit for bit equal (the same arithmetic on the same numbers), so "changed" needs no
tolerance tuning. Two probes per head and part (its first and last row) catch a wrong ``fused`` order, kv count,
head size or output projection. Architectures whose math mixes heads (OLMo 2 normalises q and k over all heads)
change every head from one row: that part is reported as coupled, and the layout is proven with the others.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .infer import infer_layout
from .layout import PARTS, HeadLayout, LayoutError, resolve_layout
from .perturb import prove


@dataclass
class LayoutCheck:
    """What :func:`check_layout` found: the layout proven, the parts whose single-row changes moved every head
    (``coupled``), and how many perturbed forward passes it took."""

    layout: HeadLayout
    coupled: tuple[str, ...] = ()
    probes: int = 0
    where: str = "the model"

    def summary(self) -> str:
        proven = [p for p in PARTS if p not in self.coupled]
        text = (f"{self.layout.model_type}: layout proven on {self.where} with {self.probes} perturbed forward passes "
                f"(layer 0): {', '.join(proven)} map each head to its own channels.")
        if self.coupled:
            text += (f" {' and '.join(self.coupled)} couple the heads (one head's rows change every head's output, "
                     f"e.g. a norm over all heads): training them for selected heads changes the other heads' "
                     f"outputs too; their rows are still each head's own.")
        return text


def check_layout(model, layout=None, stack: str | None = None) -> LayoutCheck:
    """Prove ``layout`` against what ``model`` computes (see the module docstring); LayoutError naming the wrong
    field otherwise.

    ``model``: a transformers model (checked in place, every weight restored bit for bit), a transformers config,
    or a folder / ``config.json`` path: then a one-layer random model is built from the config (small vocabulary,
    the config's head numbers). ``layout``: a HeadLayout or its dict (None: the built-in layout of the config,
    ``stack`` choosing one of a model's several attention stacks, or for an unknown architecture the inferred
    one). Returns a :class:`LayoutCheck`.
    """
    model, where, full_config = _model_to_check(model)
    config = getattr(model, "config", None)
    if layout is None and stack is not None:
        layout = HeadLayout.from_model_config(full_config or config, stack)
    elif layout is None:
        layout = resolve_layout(None, full_config or config, infer=lambda: infer_layout(model))
        if full_config is not None and layout.num_layers != full_config.num_hidden_layers:  # inferred on one layer
            layout = HeadLayout.from_dict({**layout.to_dict(), "num_layers": full_config.num_hidden_layers})
    reported = layout = HeadLayout.coerce(layout)
    if full_config is not None:  # the one-layer model has layer 0 only
        layout = HeadLayout.from_dict({**layout.to_dict(), "num_layers": 1})
    coupled, count = prove(model, layout, where)
    return LayoutCheck(reported, coupled, count, where)


# ----- the model to check -----
def _model_to_check(model) -> tuple[nn.Module, str, object]:
    """``(model to probe, its description, the full config it was built from or None)``."""
    if isinstance(model, nn.Module):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        return inner, type(inner).__name__, None
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        path = Path(model)
        if path.is_file():
            config = AutoConfig.from_pretrained(path.parent) if path.name == "config.json" else None
            if config is None:
                raise LayoutError(f"{path}: expected a model folder or its config.json.")
        elif (path / "config.json").is_file():
            config = AutoConfig.from_pretrained(path)
        else:
            raise LayoutError(f"{path}: no config.json there; pass a model folder, its config.json or a config.")
        model = config
    return tiny_model(model), "a one-layer random model of the config", model


def tiny_model(config, vocab: int = 512) -> nn.Module:
    """A random float32 model of ``config`` with one layer per stack and at most ``vocab`` tokens: the same
    attention (heads, kv heads, head size, hidden size), cheap to build for any config size."""
    from transformers import AutoModel

    config = copy.deepcopy(config)
    for attr in ("num_hidden_layers", "num_layers", "num_decoder_layers"):
        if isinstance(getattr(config, attr, None), int) and not isinstance(getattr(config, attr), bool):
            setattr(config, attr, 1)
    if isinstance(getattr(config, "vocab_size", None), int) and config.vocab_size > vocab:
        config.vocab_size = vocab
        for attr, value in list(vars(config).items()):
            if attr.endswith("token_id") and isinstance(value, int) and value >= vocab:
                setattr(config, attr, vocab - 1)
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()
