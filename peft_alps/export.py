"""Exact export of a head-mask (HEADMASK) adapter to a stock PEFT LoRA adapter.

A head-mask adapter stores, per projection, a slice of the weight update:

* q/k/v (``dim="out"``): ``D`` of shape ``[n, in]``, the update of output rows ``idx``;
* o (``dim="in"``): ``D`` of shape ``[out, n]``, the update of input columns ``idx``.

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

from .layout import HeadLayout

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_DELTA, _BIAS = "headmask_delta", "headmask_bias"


class ExportError(ValueError):
    """The adapter cannot be exported (not a head-mask adapter, inconsistent files, unsupported feature)."""


@dataclasses.dataclass
class _Slice:
    """One wrapped projection of the adapter, in the ``nn.Linear`` frame."""

    module: str  # full module name inside the base model, e.g. "model.layers.3.self_attn.q_proj"
    dim: str  # "out" (rows) or "in" (columns)
    index: torch.Tensor  # LongTensor of the selected channels
    out_features: int
    in_features: int
    delta: torch.Tensor  # [n, in] (rows) or [out, n] (columns)
    bias: Optional[torch.Tensor]  # [n] bias delta (rows of a biased projection) or None
    conv1d: bool
    base_has_bias: Optional[bool]  # None: unknown (exported from a folder without the base model)

    @property
    def rank(self) -> int:
        return int(self.index.numel())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` with ``B @ A`` equal to the dense update."""
        delta = self.delta.detach().to("cpu")
        r = self.rank
        cols = torch.arange(r)
        if self.dim == "out":
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
    whose weights fail the checksum stamped at save time (:mod:`peft_alps.integrity`) is refused unless
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
                              f"replace its {CONFIG_NAME} and {SAFETENSORS_NAME}).")


def _check_headmask(config: dict, where: str) -> None:
    peft_type = str(config.get("peft_type", "")).split(".")[-1]
    if peft_type != "HEADMASK":
        raise ExportError(f"{where} is a {peft_type or 'untyped'} adapter, not a peft-alps head-mask (HEADMASK) "
                          f"adapter; only HEADMASK adapters can be exported to LoRA.")
    for key in ("heads", "parts", "layout", "target_modules"):
        if not config.get(key):
            raise ExportError(f"{where}: adapter_config.json has no {key!r}; save the adapter with "
                              f"peft_alps' save_pretrained.")


def _read_folder(folder: Path, force: bool = False) -> tuple[dict, list[_Slice], dict]:
    if not folder.is_dir():
        raise FileNotFoundError(f"The adapter folder does not exist: {folder}")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise ExportError(f"{folder} has no {CONFIG_NAME}: it is not a saved PEFT adapter folder.")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{config_file} is not valid JSON: {e}") from None
    _check_headmask(config, str(folder))
    try:  # checked before the weights are read; LayoutError (a ValueError) names the bad key
        layout = HeadLayout.from_dict(config["layout"])
    except (ValueError, TypeError) as e:
        raise ExportError(f"{config_file}: {e}") from None
    if (folder / SAFETENSORS_NAME).is_file():
        from safetensors.torch import load_file

        from .merge import MergeError, read_header

        from .integrity import IntegrityError, check_file

        try:  # a clear error for a truncated or corrupted file (safetensors' own is cryptic)
            read_header(folder / SAFETENSORS_NAME)
            check_file(folder / SAFETENSORS_NAME, force=force)
        except (MergeError, IntegrityError) as e:
            raise ExportError(str(e)) from None
        state = load_file(folder / SAFETENSORS_NAME)
    elif (folder / BIN_NAME).is_file():  # a pickle: never loaded here
        raise ExportError(f"{folder} holds {BIN_NAME} (a pickle file) and no {SAFETENSORS_NAME}: peft-alps reads "
                          f"only safetensors. Convert it with PEFT: after `import peft_alps`, load it with "
                          f"PeftModel.from_pretrained(base_model, {str(folder)!r}) and save it with "
                          f"save_pretrained(new_folder, safe_serialization=True).")
    else:
        raise ExportError(f"{folder} has no {SAFETENSORS_NAME}.")

    parts = config["parts"]
    heads = {int(k): sorted(v) for k, v in config["heads"].items()}
    deltas, biases, extra = {}, {}, {}
    for key, tensor in state.items():
        name = key.removeprefix(_PREFIX)
        if name.endswith("." + _DELTA):
            deltas[name[: -len(_DELTA) - 1]] = tensor
        elif name.endswith("." + _BIAS):
            biases[name[: -len(_BIAS) - 1]] = tensor
        else:
            extra[key] = tensor  # modules_to_save
    targets = set(config["target_modules"])
    unknown = sorted((set(deltas) | set(biases)) - targets)
    missing = sorted(targets - set(deltas))
    if unknown or missing:
        raise ExportError(f"{folder}: the weights file does not match adapter_config.json's target_modules "
                          f"(deltas for modules not targeted: {unknown[:3]}; targeted modules without a delta: "
                          f"{missing[:3]}).")
    slices = []
    for module in sorted(targets):
        found = layout.locate(module, parts)
        if found is None or found[0] not in heads:
            raise ExportError(f"{folder}: target module {module!r} does not hold a selected head of the layout.")
        layer, path = found
        dim = layout.slice_dim(path)
        index = torch.tensor(layout.channels(path, parts, heads[layer]), dtype=torch.long)
        delta, bias = deltas[module], biases.get(module)
        n = index.numel()
        if dim == "out":
            per_part = {"q": layout.num_heads, "k": layout.num_kv_heads, "v": layout.num_kv_heads}
            out_f = sum(per_part[p] * layout.head_dim for p in "qkv" if layout.modules[p] == path)
            in_f = delta.shape[1] if delta.dim() == 2 else -1
            expected = (n, in_f)
        else:
            out_f = delta.shape[0] if delta.dim() == 2 else -1
            in_f = layout.num_heads * layout.head_dim
            expected = (out_f, n)
        if tuple(delta.shape) != expected or (bias is not None and (dim != "out" or tuple(bias.shape) != (n,))):
            raise ExportError(f"{folder}: {module} holds a delta of shape {tuple(delta.shape)}"
                              f"{'' if bias is None else f' and a bias of shape {tuple(bias.shape)}'}, but its "
                              f"config selects {n} {dim}put channels: the files do not belong together.")
        if int(index.max()) >= (out_f if dim == "out" else in_f):
            raise ExportError(f"{folder}: the layout {config['layout']} does not fit module {module}.")
        slices.append(_Slice(module, dim, index, out_f, in_f, delta, bias, bool(layout.transposed),
                             True if bias is not None else (False if dim == "out" else None)))
    return config, slices, extra


def _read_model(model, adapter_name: str) -> tuple[dict, list[_Slice], dict]:
    from peft.utils import get_peft_model_state_dict

    from .layer import HeadMaskLayer

    peft_configs = getattr(model, "peft_config", None)
    if not isinstance(peft_configs, dict) or not hasattr(model, "base_model"):
        raise ExportError(f"export_lora takes a head-mask adapter folder or a PeftModel, got {type(model).__name__}.")
    if adapter_name not in peft_configs:
        raise ExportError(f"The PeftModel has no adapter named {adapter_name!r} (it has {sorted(peft_configs)}); "
                          f"pass adapter_name=...")
    config = peft_configs[adapter_name].to_dict()
    _check_headmask(config, f"Adapter {adapter_name!r}")
    base_model = model.base_model.model
    # as PeftModel.save_pretrained fills them, so a folder and a model export write the same config
    if config.get("base_model_name_or_path") is None:
        config["base_model_name_or_path"] = base_model.__dict__.get("name_or_path") or None
    if config.get("task_type") is None:
        config["auto_mapping"] = {"base_model_class": type(base_model).__name__,
                                  "parent_library": type(base_model).__module__}
    slices = []
    for name, layer in base_model.named_modules():
        if not isinstance(layer, HeadMaskLayer) or adapter_name not in layer.headmask_delta:
            continue
        base = layer.get_base_layer()
        bias = layer.headmask_bias[adapter_name] if adapter_name in layer.headmask_bias else None
        slices.append(_Slice(name, layer.headmask_dim[adapter_name], layer.headmask_index[adapter_name].cpu(),
                             layer.out_features, layer.in_features, layer.headmask_delta[adapter_name],
                             bias, layer.is_conv1d, base.bias is not None))
    if not slices:
        raise ExportError(f"Adapter {adapter_name!r} wraps no module of the model.")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    extra = {k: v for k, v in state.items() if not k.endswith((f".{_DELTA}", f".{_BIAS}"))}
    return config, sorted(slices, key=lambda s: s.module), extra


# ----- building the LoRA adapter -----
def _lora_supports_bias() -> bool:
    from peft import LoraConfig

    return "lora_bias" in {f.name for f in dataclasses.fields(LoraConfig)}


def _to_lora(config: dict, slices: list[_Slice], extra: dict):
    from peft import LoraConfig

    for s in slices:
        tensors = [s.delta] + ([s.bias] if s.bias is not None else [])
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
        key = f"{_PREFIX}{s.module}"
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

    from .fileio import staged_folder

    with staged_folder(out, stale=(BIN_NAME,)) as stage:
        (stage / CONFIG_NAME).write_text(_config_json(lora_config))
        save_file(tensors, str(stage / SAFETENSORS_NAME), metadata={"format": "pt"})


def describe(out_dir) -> dict:
    """Summary of an exported LoRA folder: modules, ranks, lora_bias, file bytes (for the CLI)."""
    out = Path(out_dir)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    ranks = {m: cfg.get("rank_pattern", {}).get(m, cfg["r"]) for m in cfg["target_modules"]}
    return {"modules": len(ranks), "ranks": ranks, "lora_bias": bool(cfg.get("lora_bias")),
            "bytes": (out / SAFETENSORS_NAME).stat().st_size}


__all__ = ["ExportError", "export_lora"]
