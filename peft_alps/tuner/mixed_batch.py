"""Mixed-adapter batches at inference: ``model(..., adapter_names=[...])``, one adapter name per sample.

PEFT's ``PeftModel.forward`` and ``generate`` (0.20 and 0.21 alike) enter the tuner's
``_enable_peft_forward_hooks(*args, **kwargs)`` context and drop ``adapter_names`` from the kwargs
they pass on to the base model. As LoRA does, the context checks the names and registers a
pre-forward hook on every head-mask layer (and every ``modules_to_save`` wrapper) that passes
``adapter_names`` to its ``forward``; each layer then adds each adapter's slices to that adapter's
samples only (``Linear._mixed_batch_forward``). ``"__base__"`` names a sample run without adapter.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

from peft.tuners.lora.model import _adapter_names_pre_forward_hook, _get_encoder
from peft.utils.other import AuxiliaryTrainingWrapper

BASE = "__base__"


@contextmanager
def mixed_batch_hooks(tuner, *args, **kwargs):
    """Context in which every head-mask layer of ``tuner`` receives ``kwargs["adapter_names"]`` (if given).

    Refuses training mode and unknown adapter names. With ``num_beams > 1`` (``generate``) each name is
    repeated once per beam, except for an encoder, which sees the samples unexpanded.
    """
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None:
        yield
        return
    if tuner.training:
        raise ValueError("adapter_names (a mixed-adapter batch) is for inference only, but the model is in "
                         "training mode: call model.eval() first.")
    if not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list with one adapter name per sample ('{BASE}' for no "
                        f"adapter), got {type(adapter_names).__name__}.")
    layers = [m for m in tuner.modules() if isinstance(m, tuner.tuner_layer_cls)]
    known = sorted(set().union(*(layer.headmask_kind.keys() for layer in layers)))
    unknown = sorted(set(adapter_names) - set(known) - {BASE})
    if unknown:
        raise ValueError(f"unknown adapter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; this "
                         f"model has {known} and '{BASE}' (no adapter): pass one of these names per sample.")
    names = list(adapter_names)
    num_beams = kwargs.get("num_beams")
    if isinstance(num_beams, int) and num_beams > 1:
        names = [name for name in adapter_names for _ in range(num_beams)]  # generate repeats each sample
    hooked = (tuner.tuner_layer_cls, AuxiliaryTrainingWrapper)
    handles = []
    try:
        for module in tuner.modules():
            if isinstance(module, hooked):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        encoder = _get_encoder(tuner.model)
        if len(names) != len(adapter_names) and encoder is not None:
            for module in encoder.modules():  # registered later, so it overrides: the encoder is not expanded
                if isinstance(module, hooked):
                    hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:  # also when the forward raises: a hook left behind would feed stale names to later calls
        for handle in handles:
            handle.remove()


def check_layer_call(layer, x, adapter_names) -> None:
    """Refuse a mixed batch the layer cannot run: wrong number of names, or adapters merged into its weight."""
    if len(adapter_names) != len(x):
        raise ValueError(f"Got {len(adapter_names)} adapter names for a batch of {len(x)} samples: adapter_names "
                         f"needs exactly one name per sample ('{BASE}' for no adapter).")
    if layer.merged:
        raise ValueError(f"Cannot run a mixed-adapter batch (adapter_names) while adapter(s) {layer.merged_adapters} "
                         "are merged into the base weights: call unmerge_adapter() first.")
