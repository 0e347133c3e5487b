"""``HeadMaskModel``: the PEFT tuner that wraps the projections holding selected heads."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from transformers.pytorch_utils import Conv1D

from .config import HeadMaskConfig
from .layer import HeadMaskLayer, Linear
from .integrity import check_fingerprint, fingerprint, sketch
from .layout import HeadLayout, resolve_layout
from .loading import BIAS, DELTA, PREFIX, expect_complete_loads


def model_layout(config: HeadMaskConfig, model: nn.Module) -> tuple[HeadLayout, dict]:
    """``(layout, {(layer, module path): full module name})`` of ``model``, checked against its real modules.

    The layout comes from :func:`~peft_alps.layout.resolve_layout` (the one recorded in ``config``, if any,
    must agree with the model's architecture) and must pass :meth:`HeadLayout.check_model`.
    """
    layout = resolve_layout(config.layout, getattr(model, "config", None))
    return layout, layout.check_model(projection_shapes(model), getattr(model, "config", None))


def projection_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Full module name -> ``(out_features, in_features)`` of every nn.Linear / Conv1D (a wrapped one: its base)."""
    shapes = {}
    for name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, (nn.Linear, Conv1D)):
            in_features, out_features = _get_in_out_features(base)
            shapes[name] = (out_features, in_features)
    return shapes


def plan_targets(config: HeadMaskConfig, layout: HeadLayout, names: dict) -> dict[str, tuple[list[int], str]]:
    """Full module name -> (channels, dim) for every projection the adapter touches.

    ``names``: :meth:`HeadLayout.check_model`'s ``{(layer, module path): full name}``. Validates heads against
    the layout; raises before anything is modified.
    """
    bad_layers = [layer for layer in config.heads if layer >= layout.num_layers]
    if bad_layers:
        raise ValueError(f"heads names layer(s) {bad_layers} but the model has {layout.num_layers} layers "
                         f"(valid: 0..{layout.num_layers - 1}).")
    for layer, hs in config.heads.items():
        if hs[-1] >= layout.num_heads:
            raise ValueError(f"heads[{layer}] = {hs} but each layer has {layout.num_heads} query heads "
                             f"(valid: 0..{layout.num_heads - 1}).")
    return {names[(layer, path)]: (layout.channels(path, config.parts, hs), layout.slice_dim(path))
            for layer, hs in config.heads.items() for path in layout.module_names(config.parts)}


def check_adapter_name(name) -> None:
    """Adapter names become parameter keys and, on save, folder names: refuse the ones that cannot be either."""
    if not isinstance(name, str) or not name or any(c in name for c in "./\\") or name == "__base__":
        raise ValueError(f"Invalid adapter name {name!r}: use a non-empty name without '.', '/' or '\\\\' (and not "
                         f"'__base__', which mixed batches use for 'no adapter'), e.g. 'task_a'.")


def _remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Undo a partial injection of ``adapter_name``; unwrap layers left without any adapter."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, HeadMaskLayer):
            continue
        for attr in (*module.adapter_layer_names, *module.other_param_names):
            held = getattr(module, attr)
            if adapter_name in held:
                del held[adapter_name]
        if not module.headmask_delta:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())


def expected_tensors(plan: dict, modules: dict) -> dict[str, tuple[int, ...]]:
    """Adapter file key (as PEFT saves it) -> shape, for every tensor an adapter with ``plan`` holds."""
    out = {}
    for name, (channels, dim) in plan.items():
        base = modules[name].get_base_layer() if isinstance(modules[name], BaseTunerLayer) else modules[name]
        in_features, out_features = _get_in_out_features(base)
        out[f"{PREFIX}{name}.{DELTA}"] = (len(channels), in_features) if dim == "out" else (out_features, len(channels))
        if dim == "out" and base.bias is not None:
            out[f"{PREFIX}{name}.{BIAS}"] = (len(channels),)
    return out


def check_weights_file(path, expected: dict) -> None:
    """The adapter file must be sound and hold exactly the head tensors ``expected`` (key -> shape) names;
    ValueError naming the file and the tensor otherwise. Other tensors (``modules_to_save``) are PEFT's."""
    from .integrity import check_file
    from .merge import MergeError, read_header

    try:
        entries = read_header(Path(path)).entries
    except MergeError as e:
        raise ValueError(f"Cannot load the head-mask adapter: {e} Nothing was modified.") from None
    held = {k: tuple(e.shape) for k, e in entries.items() if k.endswith((f".{DELTA}", f".{BIAS}"))}
    problem = next((f"holds {k} {list(shape)}, which its adapter_config.json does not select"
                    for k, shape in held.items() if k not in expected), None) \
        or next((f"has no tensor {k} although its adapter_config.json selects it" for k in expected if k not in held),
                None) \
        or next((f"holds {k} with shape {list(held[k])}; its adapter_config.json implies {list(shape)}"
                 for k, shape in expected.items() if held[k] != shape), None)
    if problem:
        raise ValueError(f"The adapter weights {path} {problem}: the config and the weights do not belong together "
                         f"(edited or mixed up). Nothing was modified.")
    check_file(path, warn=True)


def base_fingerprint(plan: dict, modules: dict) -> dict | None:
    """:func:`peft_alps.integrity.fingerprint` of the base slices ``plan`` selects, keyed ``<module>.weight`` /
    ``<module>.bias``; None if a weight is not a real floating-point tensor (meta device, quantized)."""
    sketches, dtype = {}, None
    for name, (channels, dim) in plan.items():
        base = modules[name].get_base_layer() if isinstance(modules[name], BaseTunerLayer) else modules[name]
        weight = base.weight
        if not weight.is_floating_point() or weight.device.type == "meta":
            return None
        idx = torch.tensor(channels, device=weight.device)
        linear = weight.t() if isinstance(base, Conv1D) else weight
        sketches[f"{name}.weight"] = sketch(linear.index_select(0 if dim == "out" else 1, idx))
        if dim == "out" and base.bias is not None:
            sketches[f"{name}.bias"] = sketch(base.bias.index_select(0, idx))
        dtype = weight.dtype
    return fingerprint(sketches, dtype)


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

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """PEFT's injection, with the adapter name checked first and a failed injection undone: the model keeps
        the adapters it had (no module holds a part of ``adapter_name``, no wrapper is left without adapters)."""
        check_adapter_name(adapter_name)
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except BaseException:
            _remove_adapter(model, adapter_name)
            raise
        expect_complete_loads(model)

    def _prepare_model(self, peft_config: HeadMaskConfig, model: nn.Module) -> None:
        """Resolve layout and targets and validate everything before any module is replaced: the layout
        against the real modules, the adapter weights file (when loading one) against the config, and the base
        against the fingerprint recorded with the adapter (a warning)."""
        layout, names = model_layout(peft_config, model)
        plan = plan_targets(peft_config, layout, names)
        modules = dict(model.named_modules())
        weights_file = getattr(peft_config, "_weights_file", None)
        if weights_file is not None:
            check_weights_file(weights_file, expected_tensors(plan, modules))
        current = base_fingerprint(plan, modules)
        if current is not None:
            if peft_config.base_fingerprint is None:
                peft_config.base_fingerprint = current
            else:
                check_fingerprint(peft_config.base_fingerprint, current, "Loading the head-mask adapter", warn=True)
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

    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PEFT's context for ``model(..., adapter_names=[...])``: one adapter per sample (mixed-adapter batch)."""
        from .mixed_batch import mixed_batch_hooks

        return mixed_batch_hooks(self, *args, **kwargs)
