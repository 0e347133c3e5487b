"""A saved head-mask adapter folder: its file names, tensor keys, config, and the check that they fit together.

A folder holds ``adapter_config.json`` (PEFT's config with ``peft_type: HEADMASK``, ``heads``, ``parts``,
``layout``, ``delta_kind``) and ``adapter_model.safetensors``, whose head tensors are named
``base_model.model.<module>.headmask_<tensor>`` (:func:`head_tensor_key`; ``<tensor>`` is a name of the
adapter's delta kind, :mod:`peft_alps.heads.delta`); any other tensor belongs to ``modules_to_save``.
Every reader of a folder (loading, the streamed merge, the LoRA export, the model card, the CLI) goes through
:func:`read_config` and :func:`tensor_problem`, so they accept and refuse the same folders with the same words.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ..heads.delta import TENSOR_PREFIX
from ..heads.layout import HeadLayout, check_parts, normalise_heads

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"  # a pickle: never loaded by peft-alps
PREFIX = "base_model.model."  # PEFT's prefix of saved tensor names
HEAD_TENSOR = rf"\.{TENSOR_PREFIX}([A-Za-z0-9_]+)"  # ".headmask_<tensor>" in a saved or a loaded name
_HEAD_KEY = re.compile(rf"^(?:{re.escape(PREFIX)})?(.+){HEAD_TENSOR}$")


class AdapterError(ValueError):
    """A folder is not a readable head-mask adapter, or its files do not belong together."""


def head_tensor_key(module: str, tensor: str) -> str:
    """The saved name of tensor ``tensor`` (e.g. ``"delta"``) of the full module name ``module``."""
    return f"{PREFIX}{module}.{TENSOR_PREFIX}{tensor}"


def split_head_key(key: str) -> Optional[tuple[str, str]]:
    """``(module, tensor)`` of a head tensor's saved name (the inverse of :func:`head_tensor_key`), else None."""
    m = _HEAD_KEY.match(key)
    return (m.group(1), m.group(2)) if m else None


def read_json(path, what: str, error=AdapterError) -> dict:
    """The JSON object in ``path``; ``error`` naming ``what`` and the file if it is missing or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what}: {path} does not exist.") from None
    except (OSError, ValueError) as e:
        raise error(f"{what}: cannot read {path} ({e}).") from None
    if not isinstance(data, dict):
        raise error(f"{what}: {path} is not a JSON object.")
    return data


def check_headmask(config: dict, where: str, error=AdapterError) -> None:
    """``error`` unless ``config`` (an adapter config as a dict) is a HEADMASK one."""
    peft_type = str(config.get("peft_type") or "").split(".")[-1]  # "PeftType.LORA" from an in-memory config
    if peft_type != "HEADMASK":
        raise error(f"{where} is a {peft_type or 'untyped'} adapter, not a peft-alps head-mask (HEADMASK) adapter.")


def read_config(folder, error=AdapterError) -> dict:
    """The ``adapter_config.json`` of the head-mask adapter in ``folder``, checked to be one: a HEADMASK adapter
    with ``heads``, ``parts`` and ``layout`` (``error`` naming the folder and the fix otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"The adapter folder {'is not a folder' if folder.exists() else 'does not exist'}: {folder}")
    if not (folder / CONFIG_NAME).is_file():
        raise error(f"{folder} has no {CONFIG_NAME}: it is not a saved PEFT adapter folder.")
    config = read_json(folder / CONFIG_NAME, "adapter config", error)
    check_headmask(config, str(folder), error)
    missing = [key for key in ("heads", "parts", "layout") if not config.get(key)]
    if missing:
        raise error(f"{folder / CONFIG_NAME} has no {missing}: save the adapter with peft_alps (model."
                    f"save_pretrained after `import peft_alps`).")
    return config


def read_heads(config: dict, where, error=AdapterError) -> tuple[dict, list, HeadLayout]:
    """``(heads, parts, layout)`` of an adapter config, each validated as ``HeadMaskConfig`` validates it;
    ``error`` naming ``where`` (the config file) and the bad key otherwise."""
    try:
        return normalise_heads(config["heads"]), check_parts(config["parts"]), HeadLayout.from_dict(config["layout"])
    except (ValueError, TypeError) as e:  # LayoutError (a ValueError) names the unknown, missing or ill-typed key
        raise error(f"{where}: {e}") from None


def expected_tensors(kind, projections: dict) -> dict[str, tuple[int, ...]]:
    """Saved name -> shape of every head tensor an adapter of delta kind ``kind`` holds.

    ``projections``: full module name -> ``(n channels, axis, out_features, in_features, has bias)``."""
    return {head_tensor_key(module, tensor): shape
            for module, (n, axis, out_f, in_f, bias) in projections.items()
            for tensor, shape in kind.shapes(n, axis, out_f, in_f, bias).items()}


def tensor_problem(held: dict, expected: dict) -> Optional[str]:
    """What is wrong with the head tensors ``held`` (saved name -> shape) against ``expected``, or None.

    Names that are not head tensors (``modules_to_save``) are ignored."""
    held = {k: tuple(shape) for k, shape in held.items() if split_head_key(k)}
    stray = next((k for k in held if k not in expected), None)
    if stray is not None:
        return f"holds {stray} {list(held[stray])}, which its adapter_config.json does not select"
    missing = next((k for k in expected if k not in held), None)
    if missing is not None:
        return f"has no tensor {missing} although its adapter_config.json selects it"
    wrong = next((k for k, shape in expected.items() if held[k] != tuple(shape)), None)
    if wrong is not None:
        return f"holds {wrong} with shape {list(held[wrong])}; its adapter_config.json implies {list(expected[wrong])}"
    return None


def check_weights(path, expected: dict, error=AdapterError) -> None:
    """The adapter weights file ``path`` must be sound safetensors and hold exactly the head tensors ``expected``
    (saved name -> shape); ``error`` naming the file and the tensor otherwise."""
    from .safetensors import SafetensorsError, read_header

    try:
        entries = read_header(path).entries
    except SafetensorsError as e:
        raise error(str(e)) from None
    problem = tensor_problem({k: e.shape for k, e in entries.items()}, expected)
    if problem:
        raise error(f"The adapter weights {path} {problem}: the config and the weights do not belong together "
                    f"(edited or mixed up).")
