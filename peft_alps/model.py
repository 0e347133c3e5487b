"""``HeadMaskModel``: the PEFT tuner that wraps the projections holding selected heads."""

from __future__ import annotations

import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTuner

from .config import HeadMaskConfig
from .layer import HeadMaskLayer, Linear
from .layout import HeadLayout, LayoutError


def resolve_layout(config: HeadMaskConfig, model: nn.Module) -> HeadLayout:
    """The layout derived from ``model``, checked against the one recorded in ``config`` (if any)."""
    model_config = getattr(model, "config", None)
    recorded = HeadLayout.from_dict(config.layout) if config.layout else None
    try:
        derived = HeadLayout.from_model_config(model_config)
    except LayoutError:
        if recorded is None:
            raise
        return recorded  # custom layout for an architecture peft_alps does not know
    if recorded is not None and recorded.shape_key() != derived.shape_key():
        raise LayoutError(
            f"This adapter was made for attention shaped {recorded.shape_key()} but the model has "
            f"{derived.shape_key()}: load it onto the base model it was trained on."
        )
    return recorded or derived


def plan_targets(config: HeadMaskConfig, model: nn.Module, layout: HeadLayout) -> dict[str, tuple[list[int], str]]:
    """Full module name -> (channels, dim) for every projection the adapter touches.

    Validates heads against the layout and module shapes; raises before anything is modified.
    """
    bad_layers = [layer for layer in config.heads if layer >= layout.num_layers]
    if bad_layers:
        raise ValueError(f"heads names layer(s) {bad_layers} but the model has {layout.num_layers} layers "
                         f"(valid: 0..{layout.num_layers - 1}).")
    for layer, hs in config.heads.items():
        if hs[-1] >= layout.num_heads:
            raise ValueError(f"heads[{layer}] = {hs} but each layer has {layout.num_heads} query heads "
                             f"(valid: 0..{layout.num_heads - 1}).")
    plan = {}
    for key, module in model.named_modules():
        found = layout.locate(key, config.parts)
        if found is None or found[0] not in config.heads:
            continue
        layer, path = found
        base = module.get_base_layer() if isinstance(module, HeadMaskLayer) else module
        dim = layout.slice_dim(path)
        size = _features(base)[0 if dim == "out" else 1]
        channels = layout.channels(path, config.parts, config.heads[layer])
        if channels[-1] >= size:
            raise LayoutError(f"{key} has {size} {dim}put features but head channels reach {channels[-1]}: the "
                              f"layout {layout.to_dict()} does not match this model.")
        plan[key] = (channels, dim)
    expected = {(layer, m) for layer in config.heads for m in layout.module_names(config.parts)}
    seen = {layout.locate(k, config.parts) for k in plan}
    if expected - seen:
        missing = sorted(expected - seen)[:4]
        raise LayoutError(f"Could not find the attention module(s) {missing} (layer, path) in the model; the "
                          f"layout's module names {layout.modules} under '{layout.layers}.N' do not match it.")
    return plan


def _features(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an nn.Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1], module.weight.shape[0]
    raise TypeError(f"HeadMask can wrap nn.Linear or transformers Conv1D modules, got {type(module).__name__}.")


class HeadMaskModel(BaseTuner):
    """Creates a head-mask adapter: trainable slices of the selected attention heads only.

    Example::

        import peft_alps
        from peft import get_peft_model
        model = get_peft_model(base_model, peft_alps.HeadMaskConfig(heads={3: [0, 5]}, parts=["q", "k", "v", "o"]))
    """

    prefix: str = "headmask_"
    tuner_layer_cls = HeadMaskLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # target modules are resolved from the layout in _prepare_model

    def _prepare_model(self, peft_config: HeadMaskConfig, model: nn.Module) -> None:
        """Resolve layout and targets and validate everything before any module is replaced."""
        layout = resolve_layout(peft_config, model)
        plan = plan_targets(peft_config, model, layout)
        peft_config.layout = layout.to_dict()
        peft_config.target_modules = sorted(plan)
        self._headmask_plan = plan

    def _check_target_module_exists(self, peft_config, key):
        return key in getattr(self, "_headmask_plan", {}) or key in set(peft_config.target_modules or ())

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key not in self._headmask_plan:
            raise ValueError(f"The adapter weights name {current_key!r}, which its config's heads do not select.")
        channels, dim = self._headmask_plan[current_key]
        args = dict(init_weights=peft_config.init_weights, forward_strategy=peft_config.forward_strategy,
                    grad_mask_ratio=peft_config.grad_mask_ratio, inference_mode=peft_config.inference_mode)
        if isinstance(target, HeadMaskLayer):
            target.update_layer(adapter_name, channels, dim, **args)
        else:
            new_module = Linear(target, adapter_name, channels, dim, **args)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added adapter is not trainable until set active
            self._replace_module(parent, target_name, new_module, target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if self.prefix not in name:
                param.requires_grad = False

    def _check_finite(self, adapter_names=None) -> None:
        """Raise before merging if any delta of the adapters to merge holds NaN or inf."""
        names = adapter_names or self.active_adapters
        for module_name, module in self.model.named_modules():
            if isinstance(module, HeadMaskLayer):
                for name in names:
                    for params in (module.headmask_delta, module.headmask_bias):
                        if name in params and not torch.isfinite(params[name]).all():
                            raise ValueError(f"NaN or inf in adapter {name!r} at {module_name}; nothing was merged.")

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_finite(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and safe_merge:
            self._check_finite(adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)
