"""What a saved head-mask adapter holds (:func:`summarize`) and its Hub model card (:func:`write_model_card`).

``HeadMaskConfig.save_pretrained`` calls :func:`write_model_card` after PEFT has written the adapter's weights
and its own ``README.md`` card, so every ``model.save_pretrained(dir)`` / ``push_to_hub`` leaves a card with the
standard PEFT metadata (``library_name: peft``, ``base_model``, tags plus ``peft-alps`` and ``head-mask``) and a
human summary between two HTML comments; saving again replaces that section and nothing else.
``peft-alps inspect`` prints the same summary.
"""

from __future__ import annotations

import math
from pathlib import Path

from .adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, read_config, read_heads, split_head_key
from .files import atomic_write
from .safetensors import SafetensorsError, read_header

CARD_NAME = "README.md"
TAGS = ("peft-alps", "head-mask")
_START, _END = "<!-- peft-alps summary: start -->", "<!-- peft-alps summary: end -->"
_AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
               "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
               "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}


def summarize(folder) -> dict:
    """What the head-mask adapter in ``folder`` holds, from its ``adapter_config.json`` and the safetensors
    header of its weights (the tensors are not read).

    Keys: ``peft_type``, ``base_model``, ``task_type``, ``base_class`` (the transformers class to load the base
    with), ``model_type``, ``num_layers``, ``num_heads`` (query
    heads per layer), ``num_kv_heads``, ``heads`` (``{layer: [heads]}``), ``selected`` and ``total`` heads,
    ``ratio`` (selected / total), ``kv_groups`` (key/value groups touched), ``parts``, ``selection`` (how the heads
    were chosen, if recorded), ``modules`` (wrapped projections), ``delta_params`` / ``delta_bytes`` (the head
    slices), ``extra_params`` / ``extra_bytes`` (``modules_to_save``), ``dtypes``, ``file_bytes`` (None when the
    weights file is missing), ``num_labels`` and ``id2label`` (``{int: str}``; a classifier's, else None).
    """
    folder = Path(folder)
    config = read_config(folder)
    heads, parts, layout = read_heads(config, folder / CONFIG_NAME)
    mapping = config.get("auto_mapping") or {}  # PEFT records the base class when there is no task_type
    base_class = _AUTO_CLASS.get(str(config.get("task_type")).split(".")[-1])
    if base_class is None and str(mapping.get("parent_library", "")).startswith("transformers"):
        base_class = mapping.get("base_model_class")
    selected = sum(map(len, heads.values()))
    total = layout.num_layers * layout.num_heads
    info = dict(peft_type="HEADMASK", base_model=config.get("base_model_name_or_path"),
                task_type=config.get("task_type"), base_class=base_class or "AutoModel",
                model_type=layout.model_type, num_layers=layout.num_layers,
                num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads, heads=heads, selected=selected,
                total=total, ratio=selected / total,
                kv_groups=len({(layer, layout.kv_group(h)) for layer, hs in heads.items() for h in hs}),
                parts=parts, selection=config.get("selection"),
                modules=len(config.get("target_modules") or []), delta_params=0, delta_bytes=0, extra_params=0,
                extra_bytes=0, dtypes=[], file_bytes=None, num_labels=None, id2label=None)
    if config.get("id2label"):  # recorded by the tuner for a classifier; JSON keys are strings
        info["id2label"] = {int(k): str(v) for k, v in config["id2label"].items()}
        info["num_labels"] = len(info["id2label"])
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        try:
            shard = read_header(weights)
        except SafetensorsError as e:
            raise AdapterError(str(e)) from None
        for entry in shard.entries.values():
            kind = "delta" if split_head_key(entry.name) else "extra"
            info[f"{kind}_params"] += math.prod(entry.shape)
            info[f"{kind}_bytes"] += entry.nbytes
        info["dtypes"] = sorted({e.dtype for e in shard.entries.values()})
        info["file_bytes"] = weights.stat().st_size
    return info


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def summary_lines(info: dict) -> list[str]:
    """The human summary of :func:`summarize`'s ``info`` as markdown lines (a table and the heads per layer)."""
    rows = [
        ("base model", f"`{info['base_model']}`" if info["base_model"] else "not recorded"),
        ("architecture", f"{info['model_type']}: {info['num_layers']} layers x {info['num_heads']} query heads "
                         f"({info['num_kv_heads']} key/value heads)"),
        ("selected heads", f"{info['selected']} of {info['total']} ({info['ratio']:.1%}); "
                           f"{info['kv_groups']} key/value groups touched"),
        ("parts", ", ".join(info["parts"])),
    ]
    if info.get("id2label"):
        rows.append(("labels", f"{info['num_labels']}: " + ", ".join(f"{k} {v}" for k, v in info["id2label"].items())))
    if info["selection"]:
        rows.append(("selection", ", ".join(f"{k}: {v}" for k, v in info["selection"].items())))
    rows.append(("trainable parameters", f"{info['delta_params']:,} in {info['modules']} projections"
                 + (f" (+ {info['extra_params']:,} in modules_to_save)" if info["extra_params"] else "")))
    if info["file_bytes"] is not None:
        rows.append(("delta size", f"{info['delta_bytes']:,} bytes ({_size(info['delta_bytes'])}, "
                                   f"{'/'.join(info['dtypes'])}); {WEIGHTS_NAME}: {info['file_bytes']:,} bytes"))
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "Heads per layer (query-head indices; layers not listed are untouched):", "",
              "| layer | heads |", "|---|---|"]
    lines += [f"| {layer} | {', '.join(map(str, hs))} |" for layer, hs in info["heads"].items()]
    return lines


def load_snippet(info: dict, adapter: str = "ADAPTER_REPO_OR_FOLDER") -> list[str]:
    """The Python lines that load the adapter :func:`summarize` describes onto its base (a classifier's base with
    its ``num_labels``, ``id2label`` and ``label2id``, which the new head's size needs)."""
    auto = info["base_class"]
    base = info["base_model"] or "BASE_MODEL"
    lines = ["import peft_alps  # pip install peft-alps", "from peft import PeftModel",
             f"from transformers import {auto}", ""]
    if info.get("id2label"):
        lines += [f"id2label = {info['id2label']!r}",
                  f'base = {auto}.from_pretrained("{base}", num_labels={info["num_labels"]}, id2label=id2label,',
                  f"{' ' * (len(auto) + 24)}label2id={{v: k for k, v in id2label.items()}})"]
    else:
        lines.append(f'base = {auto}.from_pretrained("{base}")')
    return lines + [f'model = PeftModel.from_pretrained(base, "{adapter}")',
                    "model = model.merge_and_unload()  # optional: a plain transformers model again"]


def card_section(info: dict) -> str:
    """The peft-alps section of the model card: what the adapter is, its summary, how to load it."""
    return "\n".join([
        _START,
        "## peft-alps head-mask adapter",
        "",
        "This adapter trains only selected attention heads (ALPS, Chen et al., ACL 2025): the listed heads' "
        "query rows, their key/value groups' rows and, with part `o`, their output-projection columns. It was "
        "made with [peft-alps](https://pypi.org/project/peft-alps/), a plugin that adds the `HEADMASK` method to "
        "PEFT; the weights file holds only those slices.",
        "",
        *summary_lines(info),
        "",
        "Load it (`import peft_alps` first: it registers the HEADMASK method with PEFT):",
        "",
        "```python",
        *load_snippet(info),
        "```",
        _END,
    ])


def write_model_card(folder) -> Path:
    """Add the peft-alps metadata and summary to ``folder/README.md`` (created if missing; written atomically).

    Keeps what is there (PEFT's card, the user's text): sets ``library_name: peft``, ``base_model`` when the
    adapter records one, adds the tags ``peft-alps`` and ``head-mask``, and replaces the section between the
    peft-alps markers (or inserts it after the first heading). Returns the card's path.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    info = summarize(folder)
    path = folder / CARD_NAME
    card = ModelCard.load(path) if path.is_file() else ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    if info["base_model"] and not card.data.base_model:
        card.data.base_model = info["base_model"]
    if not card.data.base_model:  # PEFT writes base_model: '' for a model without a name; the Hub rejects it
        card.data.base_model = None
    tags = set(card.data.tags or []) - {"base_model:adapter:"}  # PEFT's tag for an unnamed base model
    card.data.tags = sorted(tags | set(TAGS))
    section = card_section(info)
    text = card.text
    if _START in text and _END in text:
        text = text[:text.index(_START)] + section + text[text.index(_END) + len(_END):]
    else:
        lines = text.splitlines()
        at = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
        text = "\n".join(lines[:at] + ["", section, ""] + lines[at:])
    card.text = text
    with atomic_write(path, "w") as f:
        f.write(str(card))
    return path
