"""``HeadMaskModel``: the PEFT tuner that wraps the projections holding selected heads."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, _get_in_out_features
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..heads.delta import KasaDelta, delta_kind_of
from ..heads.infer import infer_layout
from ..heads.layout import HeadLayout, linear_dim, resolve_layout
from ..heads.modules import TASK_HEADS, base_layer, is_dtensor, is_zero3_partition, projection_shapes
from ..io.adapter import AdapterError, check_weights, expected_tensors
from ..io.integrity import check_file, check_fingerprint, fingerprint, sketch
from .config import HeadMaskConfig
from .layer import HeadMaskLayer, Linear
from .loading import expect_complete_loads
from .quantized import dequantized_weight, merge_refusal, precision, quantization_backend
from .mixed_batch import BASE, mixed_batch_hooks
from .mixture import weighted_adapter


def model_layout(config: HeadMaskConfig, model: nn.Module) -> tuple[HeadLayout, dict]:
    """``(layout, {(layer, module path): full module name})`` of ``model``, checked against its real modules.

    The layout comes from :func:`~peft_alps.heads.layout.resolve_layout` (the one recorded in ``config``, if any,
    must agree with the model's architecture; none for an unknown architecture: inferred and proven on the model,
    :func:`~peft_alps.heads.infer.infer_layout`) and must pass :meth:`HeadLayout.check_model`.
    """
    layout = resolve_layout(config.layout, getattr(model, "config", None), infer=lambda: infer_layout(model, warn=True))
    return layout, layout.check_model(projection_shapes(model), getattr(model, "config", None))


def module_targets(config: HeadMaskConfig, layout: HeadLayout, names: dict) -> dict[str, tuple[list[int], str]]:
    """Full module name -> ``(channels, axis)`` for every projection the adapter touches.

    ``names``: :meth:`HeadLayout.check_model`'s ``{(layer, module path): full name}``. Validates heads against
    the layout (:meth:`HeadLayout.targets`); raises before anything is modified.
    """
    return {names[key]: target for key, target in layout.targets(config.heads, config.parts).items()}


def check_adapter_name(name) -> None:
    """Adapter names become parameter keys and, on save, folder names: refuse the ones that cannot be either."""
    if not isinstance(name, str) or not name or any(c in name for c in "./\\") or name == BASE:
        raise ValueError(f"Invalid adapter name {name!r}: use a non-empty name without '.', '/' or '\\\\' (and not "
                         f"{BASE!r}, which mixed batches use for 'no adapter'), e.g. 'task_a'.")


def _remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Undo a partial injection of ``adapter_name``; unwrap layers left without any adapter."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, HeadMaskLayer):
            continue
        for attr in (*module.adapter_layer_names, *module.other_param_names):
            held = getattr(module, attr)
            if adapter_name in held:
                del held[adapter_name]
        if not module.headmask_kind:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())


def head_tensors(config: HeadMaskConfig, targets: dict, modules: dict, layout: HeadLayout | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Saved name -> shape of every head tensor an adapter with ``config`` and ``targets`` holds on this model
    (``layout``: the model's, if ``config`` does not record it yet)."""
    projections = {}
    for name, (channels, axis) in targets.items():
        base = base_layer(modules[name])
        in_features, out_features = _get_in_out_features(base)
        projections[name] = (len(channels), axis, out_features, in_features, axis == "out" and base.bias is not None)
    options = vars(config) if layout is None else {**vars(config), "layout": layout.to_dict()}
    return expected_tensors(delta_kind_of(options), projections)


def quantized_targets(config: HeadMaskConfig, targets: dict, modules: dict) -> dict:
    """Full module name -> PEFT quantization backend of every quantized projection in ``targets``
    (:mod:`peft_alps.tuner.quantized`). ValueError, before anything is wrapped, for a quantization head-mask adapters
    cannot train on (naming the module and what is supported), or for ``forward_strategy="merged"`` on a quantized
    base (it needs the full weight)."""
    backends = {}
    for name in targets:
        backend = quantization_backend(base_layer(modules[name]), name)
        if backend is not None:
            backends[name] = backend
    if backends and config.forward_strategy == "merged":
        raise ValueError(f"forward_strategy='merged' merges the head slices into a temporary copy of the full weight, "
                         f"which {next(iter(backends))} (quantized) cannot give without dequantizing it at every "
                         f"step: use forward_strategy='output_add', or leave it unset (None: 'output_add' on a "
                         f"quantized base). Nothing was wrapped.")
    return backends


CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS")
_CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")


def _task(config) -> str:
    return str(config.task_type).split(".")[-1] if config.task_type is not None else ""


def check_modules_to_save(config: HeadMaskConfig, model: nn.Module) -> None:
    """Every ``modules_to_save`` name must match a module of ``model`` (PEFT's rule: a module name ending with
    it), else the module would silently stay frozen at its (for a new classifier: random) init. The task heads
    PEFT adds for ``task_type`` SEQ_CLS / TOKEN_CLS (``classifier`` and ``score``) need only one of them to match.
    ValueError naming the missing names, the model's top-level modules and the fix; nothing is modified."""
    names = list(dict.fromkeys(config.modules_to_save or ()))
    if not names:
        return
    keys = [key for key, _ in model.named_modules()]
    missing = [n for n in names if not any(key.endswith(n) for key in keys)]
    if _task(config) in CLASSIFIER_TASKS and any(n in TASK_HEADS for n in names) and \
            any(any(key.endswith(h) for key in keys) for h in TASK_HEADS):
        missing = [n for n in missing if n not in TASK_HEADS]
    if missing:
        children = sorted(name for name, _ in model.named_children())
        head = next((n for n in TASK_HEADS if n in children), None)
        hint = (f" Its classification head is {head!r}: pass task_type='SEQ_CLS' (PEFT then trains and saves it) or "
                f"modules_to_save=[{head!r}]." if head else "")
        raise ValueError(f"modules_to_save names {missing}, which match no module of {type(model).__name__} (its "
                         f"top-level modules: {children}); such a module would stay frozen and unsaved.{hint} "
                         f"Nothing was modified.")


def classifier_labels(config: HeadMaskConfig, model: nn.Module) -> dict | None:
    """The base config's ``id2label`` (``{int: str}``) when ``model`` is a classifier (task_type SEQ_CLS /
    TOKEN_CLS, or a ``*ForSequenceClassification`` / ``*ForTokenClassification`` class), else None."""
    model_config = getattr(model, "config", None)
    classifier = _task(config) in CLASSIFIER_TASKS or type(model).__name__.endswith(_CLASSIFIER_SUFFIXES)
    if not classifier or getattr(model_config, "id2label", None) is None:
        return None
    return {int(k): str(v) for k, v in model_config.id2label.items()}


def check_labels(config: HeadMaskConfig, model: nn.Module) -> dict | None:
    """The classifier labels to record in ``config.id2label`` (a new adapter; None when there is nothing to
    record), or, loading one, check that the base was built with as many labels as the adapter's head holds
    (ValueError with the loading call that fixes it); other label names than the adapter's only warn."""
    labels = classifier_labels(config, model)
    if labels is None or config.id2label is None:
        return labels
    if len(labels) != len(config.id2label):
        raise ValueError(f"The adapter's classifier has {len(config.id2label)} labels, but the base model was loaded "
                         f"with {len(labels)}: load the base with num_labels={len(config.id2label)}, "
                         f"id2label={config.id2label}, label2id={{v: k for k, v in id2label.items()}} (the adapter's "
                         f"model card shows the call). Nothing was modified.")
    if labels != config.id2label:
        import warnings

        warnings.warn(f"The base model's id2label {labels} differs from the adapter's {config.id2label}; the "
                      f"classifier's outputs follow the adapter's order.", stacklevel=3)
    return None


def check_weights_file(path, expected: dict) -> None:
    """The adapter file must be sound and hold exactly the head tensors ``expected`` (key -> shape) names;
    ValueError naming the file and the tensor otherwise (nothing is modified). A checksum mismatch warns."""
    try:
        check_weights(path, expected)
    except AdapterError as e:
        raise ValueError(f"Cannot load the head-mask adapter: {e} Nothing was modified.") from None
    check_file(path, warn=True)


def base_fingerprint(targets: dict, modules: dict, backends: dict | None = None) -> dict | None:
    """:func:`peft_alps.io.integrity.fingerprint` of the base slices ``targets`` selects, keyed ``<module>.weight`` /
    ``<module>.bias``; None on the meta device. A quantized projection (``backends``: :func:`quantized_targets`) is
    sketched from its dequantized weight, and the fingerprint's dtype is its precision (``"int8"``/``"int4"``, the
    coarsest if several). DeepSpeed ZeRO-3 partitions weights (``zero.Init``): they are gathered while read (PEFT's
    ``gather_params_ctx``, a no-op otherwise; every rank runs get_peft_model)."""
    from peft.utils.integrations import gather_params_ctx

    bases = [base_layer(modules[name]) for name in targets]
    params = [p for base in bases for p in (base.weight, base.bias) if p is not None]
    with gather_params_ctx(params, modifier_rank=None):
        return _fingerprint(targets, modules, backends or {})


def _fingerprint(targets: dict, modules: dict, backends: dict) -> dict | None:
    sketches, dtypes = {}, set()
    for name, (channels, axis) in targets.items():
        base = base_layer(modules[name])
        weight = base.weight
        if weight.device.type == "meta" or (name not in backends and not weight.is_floating_point()):
            return None
        idx = torch.tensor(channels, device=weight.device)
        full = dequantized_weight(base, backends.get(name), isinstance(base, Conv1D))
        sketches[f"{name}.weight"] = sketch(full.index_select(linear_dim(axis), idx))
        if axis == "out" and base.bias is not None:
            sketches[f"{name}.bias"] = sketch(base.bias.index_select(0, idx))
        dtypes.add(precision(base) if name in backends else weight.dtype)
    quantized = sorted(d for d in dtypes if isinstance(d, str))  # "int4" before "int8": the coarsest
    return fingerprint(sketches, quantized[0] if quantized else dtypes.pop())


def kasa_loss(model: nn.Module, adapter_names=None, in_forward_only: bool = False) -> torch.Tensor | float:
    """:meth:`HeadMaskModel.kasa_loss` of the wrapped ``model`` (its HeadMaskLayers hold each KaSA adapter's
    ``(beta, gamma, in_forward)``); ``adapter_names`` None: each layer's active adapters."""
    total = 0.0
    for module in model.modules():
        if not isinstance(module, HeadMaskLayer):
            continue
        for name in adapter_names if adapter_names is not None else module.active_adapters:
            options = module.headmask_kasa_loss.get(name)
            if options is not None and (options[2] or not in_forward_only):
                total = total + KasaDelta.regularization(module.adapter_tensors(name), options[0], options[1])
    return total


def _add_kasa_loss(model, args, output):
    """Forward hook of the wrapped model when an adapter has ``kasa_loss_in_forward``: in training mode, a
    returned ``loss`` (a ``ModelOutput``, labels passed) gets the active such adapters' regulariser added. On the
    wrapped model, not the tuner: ``PeftModel.forward`` without a task type calls the wrapped model directly."""
    loss = output.get("loss") if hasattr(output, "get") else None
    if model.training and loss is not None:
        output["loss"] = loss + kasa_loss(model, in_forward_only=True)
    return output


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
        if getattr(self.peft_config[adapter_name], "kasa_loss_in_forward", False) \
                and not getattr(model, "_headmask_kasa_hook", False):
            model.register_forward_hook(_add_kasa_loss)
            model._headmask_kasa_hook = True

    def kasa_loss(self, adapter_names=None) -> torch.Tensor | float:
        """KaSA's regulariser summed over every head unit of every projection of the ``delta_kind="kasa"``
        adapters ``adapter_names`` (default: the active ones), each with its config's ``kasa_beta`` and
        ``kasa_gamma``: ``beta * ||dsigma||^2 + gamma * (||dU^T dU - I||_F + ||dV^T dV - I||_F)`` per head unit
        (:meth:`~peft_alps.heads.delta.KasaDelta.regularization`; PEFT's ``_get_kasa_loss`` per LoRA layer).
        ``0.0`` if none is a KaSA adapter. Add it to the task loss, or set ``kasa_loss_in_forward=True``."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names or self.active_adapters)
        return kasa_loss(self.model, names)

    def _prepare_model(self, peft_config: HeadMaskConfig, model: nn.Module) -> None:
        """Resolve layout and targets and validate everything before any module is replaced: the layout
        against the real modules, the adapter weights file (when loading one) against the config, and the base
        against the fingerprint recorded with the adapter (a warning)."""
        layout, names = model_layout(peft_config, model)
        targets = module_targets(peft_config, layout, names)
        check_modules_to_save(peft_config, model)
        labels = check_labels(peft_config, model)
        modules = dict(model.named_modules())
        backends = quantized_targets(peft_config, targets, modules)
        weights_file = getattr(peft_config, "_weights_file", None)
        if weights_file is not None:
            check_weights_file(weights_file, head_tensors(peft_config, targets, modules, layout))
        current = base_fingerprint(targets, modules, backends)
        if current is not None:
            if peft_config.base_fingerprint is None:
                peft_config.base_fingerprint = current
            else:
                check_fingerprint(peft_config.base_fingerprint, current, "Loading the head-mask adapter", warn=True)
        peft_config.layout = layout.to_dict()
        peft_config.target_modules = sorted(targets)
        if labels is not None:
            peft_config.id2label = labels
        self._headmask_targets = targets

    def _check_target_module_exists(self, peft_config, key):
        return key in getattr(self, "_headmask_targets", {}) or key in set(peft_config.target_modules or ())

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key not in self._headmask_targets:
            raise ValueError(f"The adapter weights name {current_key!r}, which its config's heads do not select.")
        channels, axis = self._headmask_targets[current_key]
        if isinstance(target, HeadMaskLayer):
            target.update_layer(adapter_name, channels, axis, peft_config, inference_mode=peft_config.inference_mode)
        else:
            new_module = Linear(target, adapter_name, channels, axis, peft_config,
                                inference_mode=peft_config.inference_mode)
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
                    for params in (getattr(module, attr) for attr in module.adapter_layer_names):
                        if name in params and not torch.isfinite(params[name]).all():
                            raise ValueError(f"NaN or inf in adapter {name!r} at {module_name}; nothing was merged.")

    def _check_not_sharded(self) -> None:
        """Merging writes slices into the base weights: refuse (before any write) when they are FSDP2 shards
        (DTensor) or DeepSpeed ZeRO-3 partitions."""
        sharded = next((name for name, module in self.model.named_modules() if isinstance(module, HeadMaskLayer)
                        and (is_dtensor(module.get_base_layer().weight)
                             or is_zero3_partition(module.get_base_layer().weight))), None)
        if sharded is not None:
            raise RuntimeError(f"Cannot merge into a sharded model ({sharded} holds a shard of its weight: FSDP2 or "
                               f"DeepSpeed ZeRO-3). Save the adapter gathered (FSDP2: get_model_state_dict(model, "
                               f"options=StateDictOptions(full_state_dict=True)) passed to save_pretrained; "
                               f"accelerate: accelerator.get_state_dict(model)) and merge it into the full "
                               f"checkpoint with peft_alps.merge_checkpoint (streamed, file to file), or load base "
                               f"and adapter in one process and merge_and_unload there. Nothing was merged.")

    def _check_not_quantized(self) -> None:
        """Merging into a quantized weight is refused (:func:`peft_alps.tuner.quantized.merge_refusal`), before
        any write."""
        quantized = next((name for name, module in self.model.named_modules() if isinstance(module, HeadMaskLayer)
                          and module.quantization_backend is not None), None)
        if quantized is not None:
            raise merge_refusal(quantized)

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        self._check_not_sharded()
        self._check_not_quantized()
        if safe_merge:
            self._check_finite(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._check_not_sharded()
            self._check_not_quantized()
        if merge and safe_merge:
            self._check_finite(adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name``: the dense head adapter whose update is the weighted sum of ``adapters``' updates
        (exact; union of their heads and parts). See :func:`peft_alps.tuner.mixture.weighted_adapter`."""
        weighted_adapter(self, adapters, weights, adapter_name)

    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PEFT's context for ``model(..., adapter_names=[...])``: one adapter per sample (mixed-adapter batch)."""
        return mixed_batch_hooks(self, *args, **kwargs)
