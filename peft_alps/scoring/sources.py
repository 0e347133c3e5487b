"""Where the scorers read attention weights from: an in-memory model, a local safetensors checkpoint, or the
q/k/v weights of a probe fine-tune (:class:`ProbeWeights`). Each source gives a weight by name and the
``(out, in)`` shapes of its projections (for :meth:`~peft_alps.heads.layout.HeadLayout.check_model`); a
checkpoint is read lazily, one tensor at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..heads.infer import infer_layout
from ..heads.layout import find_name, linear_frame, resolve_layout
from ..io.files import atomic_write
from ..io.safetensors import read_header


@dataclass
class ProbeWeights:
    """The q/k/v weights of a probe fine-tune, named as in the model (``"model.layers.0.self_attn.q_proj.weight"``)
    and stored as in the module (GPT-2 ``Conv1D``: ``[in, out]``), plus the model's config.

    Pass it as ``task`` to :func:`~peft_alps.scoring.weight_scores.score_heads`, or ``save(folder)`` it: the folder
    (``config.json`` + ``model.safetensors`` with these tensors only) is a checkpoint ``score_heads`` and
    ``peft-alps localize`` read like any other.
    """

    config: object  # transformers PretrainedConfig
    tensors: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)  # training loss per step
    seconds: float = 0.0

    def save(self, folder) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``folder``."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        blob = save({k: v.contiguous() for k, v in self.tensors.items()}, metadata={"format": "pt"})
        with atomic_write(folder / "model.safetensors", "wb") as f:
            f.write(blob)
        with atomic_write(folder / "config.json") as f:
            f.write(self.config.to_json_string())
        return folder


class ModuleSource:
    """Weights of an in-memory model. PEFT tuner layers give base weight + active unmerged adapters."""

    def __init__(self, model):
        self.modules = dict(model.named_modules())
        self.where = type(model).__name__

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Module name -> stored shape of every 2-D ``weight`` (a PEFT layer: its base layer's)."""
        out = {}
        for name, module in self.modules.items():
            weight = getattr(module.get_base_layer() if hasattr(module, "get_base_layer") else module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                out[name] = tuple(weight.shape)
        return out

    def get(self, name: str) -> torch.Tensor:
        module = self.modules[find_name(self.modules, name.removesuffix(".weight"), self.where)]
        if not hasattr(module, "get_base_layer"):
            return module.weight.detach()
        weight = module.get_base_layer().weight.detach()
        if module.merged or module.disable_adapters:
            return weight
        for adapter in module.active_adapters:
            if any(adapter in getattr(module, n) for n in module.adapter_layer_names):
                delta = module.get_delta_weight(adapter).detach()
                # HeadMask deltas are in the nn.Linear frame (transposing maps it back to Conv1D's stored frame);
                # other PEFT layers use the stored frame
                weight = weight + linear_frame(delta, getattr(module, "is_conv1d", False))
        return weight


class CheckpointSource:
    """Weights of a local safetensors checkpoint (single file or sharded with an index), read lazily."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.files = {k: single.name for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json.")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Module name -> stored shape of every 2-D ``*.weight`` tensor (read from the headers, no data)."""
        out = {}
        for file in sorted(set(self.files.values())):
            for entry in read_header(self.path / file).entries.values():
                if entry.name.endswith(".weight") and len(entry.shape) == 2:
                    out[entry.name.removesuffix(".weight")] = tuple(entry.shape)
        return out

    def get(self, name: str) -> torch.Tensor:
        key = find_name(self.files, name, str(self.path))
        with safe_open(self.path / self.files[key], framework="pt") as f:
            return f.get_tensor(key)


class DictSource:
    """Weights held in a ``{name: tensor}`` dict (a :class:`ProbeWeights`)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Module name -> stored shape of every 2-D ``*.weight`` tensor (probe weights hold q/k/v only)."""
        return {k.removesuffix(".weight"): tuple(t.shape) for k, t in self.tensors.items()
                if k.endswith(".weight") and t.dim() == 2}

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[find_name(self.tensors, name, "probe weights")]


def open_model(model):
    """``(config, tensor source factory, description)`` of a model object, probe weights or a checkpoint folder."""
    if isinstance(model, ProbeWeights):
        return model.config, lambda: DictSource(model.tensors), f"probe fine-tune ({len(model.losses)} steps)"
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        path = Path(model)
        return AutoConfig.from_pretrained(path), lambda: CheckpointSource(path), str(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "config", None), lambda: ModuleSource(inner), type(model).__name__


def scoring_layout(config, layout, caller: str, model=None, infer=None):
    """The layout to score a model of ``config`` with: :func:`~peft_alps.heads.layout.resolve_layout` of ``layout``
    (None: derived from ``config``; for an unknown architecture ``infer()``, or inferred from ``model`` if it is
    an in-memory model)."""
    if infer is None and isinstance(model, torch.nn.Module):
        infer = lambda: infer_layout(model, warn=True)  # noqa: E731
    return resolve_layout(layout, config, f"Here: pass {caller}(..., layout={{...}}) with those keys (or a "
                                          f"HeadLayout).", infer=infer)


def check_source(layout, source, config, parts, where: str) -> dict:
    """:meth:`~peft_alps.heads.layout.HeadLayout.check_model` of ``layout`` against the source's weights (the
    modules of ``parts``) and ``config``; returns ``{(layer, module path): full module name}``."""
    shapes = {name: layout.linear_shape(shape) for name, shape in source.shapes().items()}
    return layout.check_model(shapes, config, where=where, parts=parts)
