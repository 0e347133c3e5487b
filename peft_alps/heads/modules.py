"""The attention projections of a live model: which modules are ``nn.Linear`` / GPT-2 ``Conv1D`` layers, their
``(out_features, in_features)`` in the ``nn.Linear`` frame, seen through any PEFT wrapper."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from transformers.pytorch_utils import Conv1D

# The task heads PEFT's SEQ_CLS / TOKEN_CLS task types add to modules_to_save: BERT-style encoders name theirs
# `classifier`, decoders (Llama, Qwen, GPT-2 ...) `score`; a model has one of them, so the other never matches.
TASK_HEADS = ("classifier", "score")


def is_dtensor(tensor) -> bool:
    """An FSDP2 shard (a ``torch.distributed`` DTensor), told by its type without importing torch.distributed."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor")


def is_zero3_partition(param) -> bool:
    """A parameter DeepSpeed ZeRO-3 has partitioned across ranks (it carries ``ds_numel``)."""
    return hasattr(param, "ds_numel")


def base_layer(module: nn.Module) -> nn.Module:
    """The layer a PEFT tuner layer wraps (``module`` itself if it is not one)."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def projection_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Full module name -> ``(out_features, in_features)`` of every nn.Linear / Conv1D (a wrapped one: its base)."""
    shapes = {}
    for name, module in model.named_modules():
        base = base_layer(module)
        if isinstance(base, (nn.Linear, Conv1D)):
            in_features, out_features = _get_in_out_features(base)
            shapes[name] = (out_features, in_features)
    return shapes


def conv1d_names(model: nn.Module) -> set[str]:
    """Names of the modules whose (base) layer is a GPT-2 ``Conv1D``: weights stored ``[in, out]``."""
    return {name for name, module in model.named_modules() if isinstance(base_layer(module), Conv1D)}
