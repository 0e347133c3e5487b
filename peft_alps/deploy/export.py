"""Exact export of a head-mask (HEADMASK) adapter to a stock PEFT LoRA adapter.

A head-mask adapter makes, per projection, a slice update (its delta kind's, :mod:`peft_alps.heads.delta`):

* q/k/v (``axis="out"``): ``D`` of shape ``[n, in]``, the update of output rows ``idx``;
* o (``axis="in"``): ``D`` of shape ``[out, n]``, the update of input columns ``idx``.

Both are products of two factors, so each is an exact LoRA update with rank ``n``
(the number of selected channels) and scaling 1 (``lora_alpha = r``):

* rows: ``B = onehot[out, n]`` (``B[idx[j], j] = 1``), ``A = D``; ``B @ A`` puts D's rows at ``idx``;
* columns: ``A = onehot[n, in]`` (``A[j, idx[j]] = 1``), ``B = D``; ``B @ A`` puts D's columns at ``idx``.

Bias slices of biased q/k/v projections (Qwen2, GPT-2, BERT, GPT-NeoX) become PEFT's
``lora_bias`` (the bias of LoRA's B): the bias delta scattered at ``idx``, zero elsewhere.
All in the ``nn.Linear`` frame; GPT-2 ``Conv1D`` modules get ``fan_in_fan_out=True``.

Merging the exported LoRA gives the head-mask merged weight exactly (``B @ A`` is ``D``
placed at ``idx``, with no rounding); the LoRA forward ``x @ W^T + x @ (B @ A)^T`` agrees
with the head-mask forward ``x @ (W + D)^T`` to float rounding (~1e-6 in fp32).

A kind whose update is already a thin product (:meth:`~peft_alps.heads.delta.HeadDelta.factors`, ``D = L @ R``,
e.g. KaSA: rank ``r + r_t`` per head unit) exports its factors instead: rows ``B = L`` placed at ``idx``, ``A = R``;
columns ``B = L``, ``A = R`` placed at ``idx``; the LoRA rank is the factors' width (exact, but ``B @ A`` is then
a float product, equal to ``D`` to rounding). A kind with buffers computed from the base (KaSA's truncation) is
exported from a ``PeftModel`` holding it (the base is needed; a folder export raises naming the fix).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from ..heads.delta import delta_kind_of
from ..io.adapter import (BIN_NAME, CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterError, check_headmask, check_weights,
                          expected_tensors, head_tensor_key, read_config, read_heads, split_head_key)
from ..io.files import staged_folder
from ..io.integrity import IntegrityError, check_file
from ..io.safetensors import SafetensorsError, read_header


class ExportError(AdapterError):
    """The adapter cannot be exported (not a head-mask adapter, inconsistent files, unsupported feature)."""


@dataclasses.dataclass
class _Slice:
    """One wrapped projection of the adapter, in the ``nn.Linear`` frame."""

    module: str  # full module name inside the base model, e.g. "model.layers.3.self_attn.q_proj"
    axis: str  # "out" (rows) or "in" (columns)
    index: torch.Tensor  # LongTensor of the selected channels
    out_features: int
    in_features: int
    delta: torch.Tensor  # the slice update D: [n, in] (rows) or [out, n] (columns)
    bias: Optional[torch.Tensor]  # [n] bias update (rows of a biased projection) or None
    conv1d: bool
    base_has_bias: Optional[bool]  # None: unknown (exported from a folder without the base model)
    factors: Optional[tuple] = None  # (L, R) with L @ R == delta, from the delta kind (HeadDelta.factors)

    @property
    def rank(self) -> int:
        return int(self.factors[1].shape[0]) if self.factors is not None else int(self.index.numel())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` with ``B @ A`` equal to the dense update."""
        delta = self.delta.detach().to("cpu")
        r = self.rank
        cols = torch.arange(r)
        if self.factors is not None:  # the kind's thin factors, placed at the selected channels
            left, right = (f.detach().to("cpu", delta.dtype).contiguous() for f in self.factors)
            if self.axis == "out":
                b = torch.zeros(self.out_features, r, dtype=delta.dtype)
                b[self.index] = left
                return right, b
            a = torch.zeros(r, self.in_features, dtype=delta.dtype)
            a[:, self.index] = right
            return a, left
        if self.axis == "out":
            b = torch.zeros(self.out_features, r, dtype=delta.dtype)
            b[self.index, cols] = 1
            return delta.contiguous(), b
        a = torch.zeros(r, self.in_features, dtype=delta.dtype)
        a[cols, self.index] = 1
        return a, delta.contiguous()

    def lora_bias(self) -> torch.Tensor:
        """B's bias ``[out]``: the bias delta at ``index``, zero elsewhere."""
        out = torch.zeros(self.out_features, dtype=self.delta.dtype)
        if self.bias is not None:
            out[self.index] = self.bias.detach().to("cpu", self.delta.dtype)
        return out


def export_lora(adapter, out_dir, overwrite: bool = False, adapter_name: str = "default",
                force: bool = False) -> Path:
    """Write the head-mask adapter ``adapter`` as a stock PEFT LoRA adapter into ``out_dir``; return ``out_dir``.

    ``adapter``: a saved head-mask adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``;
    the base model is not needed; a pickle ``adapter_model.bin`` is refused, never loaded) or a ``PeftModel``
    holding a HEADMASK adapter named ``adapter_name``.

    The LoRA adapter loads with ``PeftModel.from_pretrained(base, out_dir)`` without peft_alps installed and
    computes the same outputs (to float rounding; merged weights are equal). Per module ``r`` = number of
    selected channels (``rank_pattern``), ``lora_alpha = r`` (scaling 1), ``lora_dropout = 0``; bias deltas use
    ``lora_bias=True`` (only when some bias delta is non-zero). ``out_dir`` must be missing or empty unless
    ``overwrite`` (then ``adapter_config.json`` and the weights file are replaced, other files left alone).
    Everything is validated and written into a temporary folder first: on an error nothing is written. A folder
    whose weights fail the checksum stamped at save time (:mod:`peft_alps.io.integrity`) is refused unless
    ``force``.
    ``modules_to_save`` (e.g. a trained classification head) are copied. Stock PEFT cannot merge
    ``lora_bias`` into a module without a bias (Qwen2's ``o_proj``); a model export warns about it.
    """
    out = Path(out_dir)
    _check_out_dir(out, overwrite, adapter)
    if isinstance(adapter, (str, os.PathLike)):
        config, slices, extra = _read_folder(Path(adapter), force)
    else:
        config, slices, extra = _read_model(adapter, adapter_name)
    lora_config, tensors = _to_lora(config, slices, extra)
    _write(out, lora_config, tensors)
    return out


# ----- reading the head-mask adapter -----
def _check_out_dir(out: Path, overwrite: bool, adapter) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"The output path exists and is not a folder: {out}")
    if isinstance(adapter, (str, os.PathLike)) and out.exists() and Path(adapter).exists() \
            and out.resolve() == Path(adapter).resolve():
        raise ExportError(f"The output folder is the head-mask adapter folder itself ({out}); choose another one.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"The output folder is not empty: {out} (pass overwrite=True / --overwrite to "
                              f"replace its {CONFIG_NAME} and {WEIGHTS_NAME}).")


def _read_folder(folder: Path, force: bool = False) -> tuple[dict, list[_Slice], dict]:
    if not folder.is_dir():
        raise FileNotFoundError(f"The adapter folder does not exist: {folder}")
    config = read_config(folder, ExportError)
    heads, parts, layout = read_heads(config, folder / CONFIG_NAME, ExportError)
    try:
        kind = delta_kind_of(config)
    except ValueError as e:
        raise ExportError(f"{folder / CONFIG_NAME}: {e}") from None
    if kind.buffers:
        raise ExportError(f"{folder} is a {kind.name!r} adapter whose update depends on the base weights (e.g. "
                          f"KaSA's truncation, kasa_truncate > 0), which a folder export does not have: load it on "
                          f"its base and export the model, export_lora(PeftModel.from_pretrained(base, "
                          f"{str(folder)!r}), out_dir).")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / BIN_NAME).is_file():  # a pickle: never loaded here
            raise ExportError(f"{folder} holds {BIN_NAME} (a pickle file) and no {WEIGHTS_NAME}: peft-alps reads "
                              f"only safetensors. Convert it with PEFT: after `import peft_alps`, load it with "
                              f"PeftModel.from_pretrained(base_model, {str(folder)!r}) and save it with "
                              f"save_pretrained(new_folder, safe_serialization=True).")
        raise ExportError(f"{folder} has no {WEIGHTS_NAME}.")
    try:  # a clear error for a truncated or corrupted file (safetensors' own is cryptic)
        check_file(weights, force=force)
    except (IntegrityError, SafetensorsError) as e:
        raise ExportError(str(e)) from None
    from safetensors import safe_open

    # the base is not here: module names come from target_modules, feature counts from the layout, biases from
    # the file
    keys = set(read_header(weights).entries)
    try:
        targets, located = layout.targets(heads, parts), {}
    except ValueError as e:  # LayoutError: a head the layout does not have
        raise ExportError(f"{folder / CONFIG_NAME}: {e}") from None
    for module in config.get("target_modules") or ():
        found = layout.locate(module, parts)
        if found not in targets:
            raise ExportError(f"{folder}: target module {module!r} does not hold a selected head of the layout.")
        located[module] = targets[found] + (found[1],)
    unnamed = sorted(set(targets) - {layout.locate(m, parts) for m in located})
    if unnamed:
        raise ExportError(f"{folder}: adapter_config.json's target_modules name no module for (layer, module) "
                          f"{unnamed[:3]}, which its heads select; save the adapter with peft_alps.")
    projections = {}
    for module, (channels, axis, path) in located.items():
        shape = (len(channels), axis, *layout.features(path))
        bias_only = set(kind.shapes(*shape, True)) - set(kind.shapes(*shape, False))  # the base's bias: in the file?
        projections[module] = (*shape, any(head_tensor_key(module, t) in keys for t in bias_only))
    check_weights(weights, expected_tensors(kind, projections), ExportError)

    slices, extra = [], {}
    with safe_open(weights, framework="pt") as f:
        for key in sorted(keys):
            if not split_head_key(key):
                extra[key] = f.get_tensor(key)  # modules_to_save
        for module, (channels, axis, _) in located.items():
            tensors = {t: f.get_tensor(head_tensor_key(module, t)) for t in kind.tensors
                       if head_tensor_key(module, t) in keys}
            delta, bias = kind.update(tensors, axis)
            n, _, out_f, in_f, has_bias = projections[module]
            slices.append(_Slice(module, axis, torch.tensor(channels, dtype=torch.long), out_f, in_f, delta, bias,
                                 bool(layout.transposed), True if has_bias else (False if axis == "out" else None),
                                 kind.factors(tensors, axis)))
    return config, slices, extra


def _read_model(model, adapter_name: str) -> tuple[dict, list[_Slice], dict]:
    from peft.utils import get_peft_model_state_dict

    from ..tuner.layer import HeadMaskLayer

    peft_configs = getattr(model, "peft_config", None)
    if not isinstance(peft_configs, dict) or not hasattr(model, "base_model"):
        raise ExportError(f"export_lora takes a head-mask adapter folder or a PeftModel, got {type(model).__name__}.")
    if adapter_name not in peft_configs:
        raise ExportError(f"The PeftModel has no adapter named {adapter_name!r} (it has {sorted(peft_configs)}); "
                          f"pass adapter_name=...")
    config = peft_configs[adapter_name].to_dict()
    check_headmask(config, f"Adapter {adapter_name!r}", ExportError)
    base_model = model.base_model.model
    # as PeftModel.save_pretrained fills them, so a folder and a model export write the same config
    if config.get("base_model_name_or_path") is None:
        config["base_model_name_or_path"] = base_model.__dict__.get("name_or_path") or None
    if config.get("task_type") is None:
        config["auto_mapping"] = {"base_model_class": type(base_model).__name__,
                                  "parent_library": type(base_model).__module__}
    slices = []
    for name, layer in base_model.named_modules():
        if not isinstance(layer, HeadMaskLayer) or adapter_name not in layer.headmask_kind:
            continue
        delta, bias = layer.slice_update(adapter_name)
        slices.append(_Slice(name, layer.headmask_axis[adapter_name], layer.headmask_index[adapter_name].cpu(),
                             layer.out_features, layer.in_features, delta, bias, layer.is_conv1d,
                             layer.get_base_layer().bias is not None, layer.slice_factors(adapter_name)))
    if not slices:
        raise ExportError(f"Adapter {adapter_name!r} wraps no module of the model.")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    extra = {k: v for k, v in state.items() if not split_head_key(k)}
    return config, sorted(slices, key=lambda s: s.module), extra


# ----- building the LoRA adapter -----
def _lora_supports_bias() -> bool:
    from peft import LoraConfig

    return "lora_bias" in {f.name for f in dataclasses.fields(LoraConfig)}


def _to_lora(config: dict, slices: list[_Slice], extra: dict):
    from peft import LoraConfig

    for s in slices:
        tensors = [s.delta] + ([s.bias] if s.bias is not None else []) + list(s.factors or ())
        if not all(torch.isfinite(t.detach()).all() for t in tensors):
            raise ExportError(f"NaN or inf in the delta of {s.module}; nothing was exported.")
    conv1d = {s.conv1d for s in slices}
    if len(conv1d) > 1:
        raise ExportError("The adapter wraps both nn.Linear and Conv1D modules, which one LoRA config cannot "
                          "express (fan_in_fan_out is global).")
    use_bias = any(s.bias is not None and bool(s.bias.detach().ne(0).any()) for s in slices)
    if use_bias and not _lora_supports_bias():
        import peft

        raise ExportError(f"The adapter has non-zero bias deltas, which a LoRA adapter can only hold with "
                          f"LoraConfig(lora_bias=True), and the installed peft {peft.__version__} does not support "
                          f"it: upgrade peft (pip install -U 'peft>=0.20').")
    if use_bias:
        no_bias = [s.module for s in slices if s.base_has_bias is False]
        if no_bias:
            warnings.warn(f"The exported LoRA uses lora_bias=True (for the bias deltas), but {len(no_bias)} targeted "
                          f"module(s) such as {no_bias[0]} have no bias: stock PEFT runs the adapter exactly but "
                          f"cannot merge it (merge_and_unload raises). Leave out the 'o' part (bias-less output "
                          f"projection) to get a mergeable export.", UserWarning, stacklevel=3)

    ranks = {s.module: s.rank for s in slices}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    kwargs = dict(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=sorted(ranks),
        lora_dropout=0.0, use_rslora=False, use_dora=False, bias="none", fan_in_fan_out=conv1d.pop(),
        init_lora_weights=True, modules_to_save=config.get("modules_to_save"), task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"), revision=config.get("revision"),
        inference_mode=True,
    )
    if use_bias:
        kwargs["lora_bias"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_config = LoraConfig(**kwargs)
    lora_config.auto_mapping = config.get("auto_mapping")

    tensors = {}
    for s in slices:
        a, b = s.lora_factors()
        key = f"{PREFIX}{s.module}"
        tensors[f"{key}.lora_A.weight"] = a
        tensors[f"{key}.lora_B.weight"] = b
        if use_bias:
            tensors[f"{key}.lora_B.bias"] = s.lora_bias()
    for key, t in extra.items():
        tensors[key] = t.detach().to("cpu").contiguous()
    return lora_config, tensors


# ----- writing -----
def _config_json(lora_config) -> str:
    data = lora_config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _write(out: Path, lora_config, tensors: dict) -> None:
    """Write config and weights into a staging folder next to ``out``, then move them in (a stale ``.bin`` of an
    earlier adapter in ``out`` is removed: it would not match the new config)."""
    from safetensors.torch import save_file

    with staged_folder(out, stale=(BIN_NAME,)) as stage:
        (stage / CONFIG_NAME).write_text(_config_json(lora_config))
        save_file(tensors, str(stage / WEIGHTS_NAME), metadata={"format": "pt"})


def describe(out_dir) -> dict:
    """Summary of an exported LoRA folder: modules, ranks, lora_bias, file bytes (for the CLI)."""
    out = Path(out_dir)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    ranks = {m: cfg.get("rank_pattern", {}).get(m, cfg["r"]) for m in cfg["target_modules"]}
    return {"modules": len(ranks), "ranks": ranks, "lora_bias": bool(cfg.get("lora_bias")),
            "bytes": (out / WEIGHTS_NAME).stat().st_size}


__all__ = ["ExportError", "export_lora"]
