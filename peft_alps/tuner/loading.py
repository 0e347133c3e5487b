"""The guarantee that loading an adapter's weights loads all of them.

PEFT saves a head-mask adapter's tensors as ``base_model.model.<module>.headmask_delta`` (and
``.headmask_bias``) and loads them with ``load_state_dict(strict=False)``, which silently skips a tensor
that lands in no module and leaves a module without its tensor at its initial value. For head-mask
adapters both are errors: the config (heads, parts, layout) decides which modules exist, so a file that
does not fit it was edited or belongs to another config. :func:`expect_complete_loads` installs two
``load_state_dict`` hooks on the wrapped model that enforce it, whatever the loader
(``PeftModel.from_pretrained``, ``load_adapter``, transformers' ``model.load_adapter``,
``set_peft_model_state_dict``).
"""

from __future__ import annotations

import re

from torch import nn

from ..io.adapter import HEAD_TENSOR

_ADAPTER_KEY = re.compile(rf"{HEAD_TENSOR}\.([^.]+)$")  # as loaded: with the adapter name (the last group)
_HEAD_TENSOR = re.compile(rf"{HEAD_TENSOR}(?:\.[^.]+)?$")  # PEFT leaves the adapter name out for unwrapped modules


class AdapterLoadError(ValueError):
    """An adapter's weights do not fit its config: a tensor would land in no module, or a module gets none."""


def expect_complete_loads(model: nn.Module) -> None:
    """Make every ``model.load_state_dict`` that carries head-mask tensors check they all land, and that every
    module of the adapters it loads gets its tensors (AdapterLoadError naming the tensor). Idempotent."""
    if getattr(model, "_headmask_load_hooks", False):
        return
    model._register_load_state_dict_pre_hook(_note_loaded_adapters, with_module=True)
    model.register_load_state_dict_post_hook(_check_complete)
    model._headmask_load_hooks = True


def _note_loaded_adapters(module, state_dict, prefix, *args) -> None:
    module._headmask_loading = {m.group(2) for k in state_dict if k.startswith(prefix)
                                for m in [_ADAPTER_KEY.search(k)] if m}


def _check_complete(module, incompatible) -> None:
    loading = getattr(module, "_headmask_loading", set())
    module._headmask_loading = set()
    stray = [k for k in incompatible.unexpected_keys if _HEAD_TENSOR.search(k)]
    if stray:
        raise AdapterLoadError(f"The adapter weights hold {stray[0]}{f' (and {len(stray) - 1} more)' if len(stray) > 1 else ''}"
                               f", which no module of the model takes: the adapter config (heads, parts, layout) "
                               f"does not select it. The weights and adapter_config.json do not belong together "
                               f"(edited, or from another adapter).")
    missing = [k for k in incompatible.missing_keys if (m := _ADAPTER_KEY.search(k)) and m.group(2) in loading]
    if missing:
        raise AdapterLoadError(f"The adapter weights have no tensor for {missing[0]}"
                               f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which the adapter "
                               f"config selects: the weights and adapter_config.json do not belong together "
                               f"(edited, or from another adapter).")
