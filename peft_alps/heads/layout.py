"""Per-architecture attention head layout: which module holds q/k/v/o and which
weight rows or columns belong to attention head ``h``.

Conventions used throughout peft_alps:

* Indices are expressed in the ``nn.Linear`` frame: a projection maps
  ``in_features -> out_features`` and its weight is ``[out, in]``. GPT-2's
  ``Conv1D`` stores the transpose (``[in, out]``, ``y = x @ W + b``): ``transposed``
  layouts, and :func:`linear_frame` / :meth:`HeadLayout.stored_dim` translate.
* A head's channels lie on one *axis* of a projection (:meth:`HeadLayout.head_axis`):
  ``"out"`` (rows of the ``nn.Linear`` weight: q/k/v) or ``"in"`` (columns: o).
* q, k and v are *output* slices (rows of an ``nn.Linear`` weight): query head
  ``h`` owns ``head_dim`` output channels of q; its key/value group
  ``g(h) = h // (num_heads // num_kv_heads)`` owns ``head_dim`` channels of k and v.
* o is an *input* slice (columns of the output projection): head ``h``'s context
  vector enters ``o`` at input channels ``h * head_dim ... (h + 1) * head_dim - 1``.
* Fused projections put several parts in one module: ``"blocks"`` is
  ``[Q | K | V]`` along the output (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, old
  multi-query Falcon), ``"interleaved"`` is one group after the other, each group
  its query heads then its key and value head: ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``
  without GQA (GPT-NeoX ``query_key_value``), ``[q_0 q_1 k_0 v_0 | q_2 q_3 k_1 v_1 | ...]``
  with two query heads per group (Falcon's new decoder architecture).
"""

from __future__ import annotations

import numbers
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

PARTS = ("q", "k", "v", "o")
AXES = ("out", "in")  # nn.Linear-frame axis of a head's channels: weight rows (q/k/v) or columns (o)


def linear_dim(axis: str) -> int:
    """The ``nn.Linear``-frame weight dimension (``[out, in]``) of ``axis``: 0 for ``"out"``, 1 for ``"in"``."""
    return AXES.index(axis)


def linear_frame(weight, transposed: bool):
    """``weight`` viewed in the ``nn.Linear`` frame ``[out, in]``: transposed for a GPT-2 ``Conv1D`` (``[in, out]``)."""
    return weight.t() if transposed else weight


def find_name(names, suffix: str, where: str, missing_ok: bool = False):
    """The one name of ``names`` equal to ``suffix`` or ending with ``"." + suffix`` (None if there is none and
    ``missing_ok``); LayoutError naming ``where`` if there is none or several."""
    hits = [n for n in names if n == suffix or n.endswith("." + suffix)]
    if missing_ok and not hits:
        return None
    if len(hits) != 1:
        problem = "no tensor" if not hits else f"{len(hits)} tensors ({hits[:3]})"
        raise LayoutError(f"{where}: {problem} named like '*{suffix}'.")
    return hits[0]


def check_parts(parts) -> list[str]:
    """``parts`` validated and in ``PARTS`` order; ValueError naming the problem otherwise."""
    if isinstance(parts, str):
        raise ValueError(f"parts must be a list such as ['q', 'k', 'v'], got the string {parts!r}.")
    parts = list(parts)
    unknown = sorted({str(p) for p in parts} - set(PARTS))
    if unknown:
        raise ValueError(f"Unknown part(s) {unknown}: parts must be a non-empty subset of {list(PARTS)}.")
    if not parts:
        raise ValueError(f"parts is empty: choose a non-empty subset of {list(PARTS)}.")
    return [p for p in PARTS if p in parts]


def config_numbers(config) -> dict:
    """The attention numbers most transformers configs state under the standard names (``attribute_map`` makes
    GPT-2's ``n_head``, T5's ``d_model`` and the like answer to them); ``head_dim`` where the config states it
    (Gemma, Qwen3), else ``hidden_size // num_heads``."""
    heads = config.num_attention_heads
    return {"num_layers": config.num_hidden_layers, "num_heads": heads,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "hidden_size": config.hidden_size}


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its attention projections.

    ``layers``: name of the ModuleList holding the blocks (``model.layers.3...``
    -> ``"layers"``). ``modules``: part -> module path inside one block.
    ``fused``: ``None``, ``"blocks"`` or ``"interleaved"`` (see module docstring).
    ``transposed``: weights are stored ``[in, out]`` (GPT-2 ``Conv1D``), not ``[out, in]``.
    ``numbers``: config -> the layout fields that differ from :func:`config_numbers` (and ``fused`` where the
    config chooses it, as Falcon's and GPT-BigCode's flags do). ``coupled``: the parts whose math mixes the
    heads, e.g. OLMo 2 normalises q and k over all heads together (:func:`peft_alps.heads.check.check_layout`
    finds it; the README says what it means for head training). ``note``: one line for the README table.
    """

    layers: str
    modules: dict[str, str]
    fused: str | None = None
    transposed: bool = False
    numbers: Callable[[object], dict] | None = None
    coupled: tuple[str, ...] = ()
    note: str = ""


def _separate(q: str, k: str, v: str, o: str, layers: str = "layers", **kw) -> ArchSpec:
    return ArchSpec(layers, {"q": q, "k": k, "v": v, "o": o}, **kw)


def _fused(qkv: str, o: str, fused: str, layers: str = "layers", **kw) -> ArchSpec:
    return ArchSpec(layers, {"q": qkv, "k": qkv, "v": qkv, "o": o}, fused, **kw)


_LLAMA = _separate(*(f"self_attn.{p}_proj" for p in PARTS), note="GQA; `head_dim` from the config where stated")
_BERT = _separate("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  layers="layer")


def _falcon(config) -> dict:
    """Falcon's three attention layouts: the new decoder architecture groups each kv head with its query heads
    (``view(..., num_kv_heads, heads_per_group + 2, head_dim)``); the old multi-query one is ``[Q | K | V]``
    with one kv head; the old multi-head one ``[q_h k_h v_h]`` per head."""
    if config.new_decoder_architecture:
        return {"num_kv_heads": config.num_kv_heads, "fused": "interleaved"}
    if config.multi_query:
        return {"num_kv_heads": 1, "fused": "blocks"}
    return {"num_kv_heads": config.num_attention_heads, "fused": "interleaved"}


def _gpt_bigcode(config) -> dict:
    """GPT-BigCode: multi-query ``[Q | K | V]`` with one kv head, else ``[q_h k_h v_h]`` per head."""
    if config.multi_query:
        return {"num_kv_heads": 1, "fused": "blocks"}
    return {"num_kv_heads": config.num_attention_heads, "fused": "interleaved"}


def _t5_stacks() -> dict[str, ArchSpec]:
    """T5's three attention stacks, each trained (and scored) as its own layout: head size ``d_kv``, the decoder's
    depth ``num_decoder_layers``."""
    def attention(stack, path, layers_key):
        return _separate(*(f"{path}.{p}" for p in PARTS), layers=f"{stack}.block",
                         numbers=lambda c: {"head_dim": c.d_kv, "num_layers": getattr(c, layers_key)},
                         note=f"head size `d_kv`, `{layers_key}` blocks")
    return {"encoder": attention("encoder", "layer.0.SelfAttention", "num_layers"),
            "decoder": attention("decoder", "layer.0.SelfAttention", "num_decoder_layers"),
            "cross": attention("decoder", "layer.1.EncDecAttention", "num_decoder_layers")}


#: model_type -> ArchSpec, or {stack name: ArchSpec} for a model with several attention stacks (T5: encoder
#: self-attention, decoder self-attention, cross-attention; choose one with ``HeadLayout.from_model_config(config,
#: stack=...)``). Extend by passing ``HeadMaskConfig(layout=...)`` instead of editing this table.
ARCHITECTURES: dict[str, ArchSpec | dict[str, ArchSpec]] = {
    # separate q/k/v/o projections named like Llama's (head_dim from the config where it is stated: Gemma, Qwen3)
    **{t: _LLAMA for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                           "gemma2", "gemma3_text", "stablelm", "olmo")},
    "olmo2": _separate(*(f"self_attn.{p}_proj" for p in PARTS), coupled=("q", "k"), note="GQA"),
    "phi": _separate("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
    "opt": _separate("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "gptj": _separate("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", layers="h"),
    "distilbert": _separate("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                            layers="layer"),
    "gpt2": _fused("attn.c_attn", "attn.c_proj", "blocks", layers="h", transposed=True),
    "gpt_bigcode": _fused("attn.c_attn", "attn.c_proj", "blocks", layers="h", numbers=_gpt_bigcode,
                          note="`multi_query`: one kv head; else `[q_h k_h v_h]` per head"),
    "gpt_neox": _fused("attention.query_key_value", "attention.dense", "interleaved"),
    "falcon": _fused("self_attention.query_key_value", "self_attention.dense", "interleaved", layers="h",
                     numbers=_falcon, note="`new_decoder_architecture`: kv groups; else `multi_query`: `[Q | K | V]` "
                                           "with one kv head; else `[q_h k_h v_h]` per head"),
    "phi3": _fused("self_attn.qkv_proj", "self_attn.o_proj", "blocks", note="GQA"),
    "modernbert": _fused("attn.Wqkv", "attn.Wo", "blocks"),
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "deberta-v2": _separate("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                            "attention.output.dense", layers="layer"),
    "t5": _t5_stacks(),
    "mt5": _t5_stacks(),
}


def arch_spec(model_type, stack: str | None = None) -> ArchSpec | None:
    """The :class:`ArchSpec` of ``model_type`` (and ``stack``, for a model with several attention stacks); None
    for an architecture not in :data:`ARCHITECTURES`. LayoutError when the stack is missing or unknown."""
    entry = ARCHITECTURES.get(model_type)
    if isinstance(entry, dict):
        if stack not in entry:
            how = ", ".join(f"{name!r} ({spec.layers}.N.{spec.modules['q'].rpartition('.')[0]})"
                            for name, spec in entry.items())
            raise LayoutError(f"model_type={model_type!r} has several attention stacks: {how}. "
                              f"{'Choose one' if stack is None else f'There is no stack {stack!r}; choose one'}: "
                              f"pass layout=peft_alps.HeadLayout.from_model_config(model.config, stack="
                              f"{next(iter(entry))!r}) (HeadMaskConfig, score_heads, ...).")
        return entry[stack]
    if stack is not None and entry is not None:
        raise LayoutError(f"model_type={model_type!r} has one attention stack; leave stack unset (got {stack!r}).")
    return entry


def architecture_table() -> str:
    """The Markdown table of :data:`ARCHITECTURES` that README.md shows (a test keeps the two equal): one row per
    distinct entry (per stack for a model with several), its model types, module paths, fused order and notes."""
    rows: dict[tuple, list[str]] = {}
    for model_type, entry in ARCHITECTURES.items():
        for stack, spec in (entry.items() if isinstance(entry, dict) else [(None, entry)]):
            key = (stack, spec.layers, tuple(spec.modules.items()), spec.fused, spec.transposed,
                   getattr(spec.numbers, "__qualname__", None), spec.coupled)
            rows.setdefault(key, []).append(model_type)
    lines = ["| model_type | blocks | q / k / v | o | fused q/k/v | notes |", "|---|---|---|---|---|---|"]
    for (stack, layers, modules, fused, transposed, _, coupled), types in rows.items():
        spec = arch_spec(types[0], stack)
        qkv = dict(modules)
        if fused:
            where = f"`{qkv['q']}`" + (" (Conv1D)" if transposed else "")
        else:
            prefix = qkv["q"].rpartition(".")[0]
            leaves = [qkv[p].rpartition(".")[2] for p in "qkv"]
            same = all(qkv[p].rpartition(".")[0] == prefix for p in "qkv")
            where = (f"`{prefix + '.' if prefix else ''}{{{','.join(leaves)}}}`" if same
                     else " / ".join(f"`{qkv[p]}`" for p in "qkv"))
        order = {None: "none", "blocks": r"`[Q \| K \| V]`", "interleaved": "per kv group `[q.. k v]`"}[fused]
        notes = [spec.note] if spec.note else []
        if coupled:
            notes.append(f"{' and '.join(coupled)} couple the heads (norm over all heads)")
        name = ", ".join(types) + (f" (stack `{stack}`)" if stack else "")
        lines.append(f"| {name} | `{layers}` | {where} | `{qkv['o']}` | {order} | "
                     f"{'; '.join(notes).replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


class LayoutError(ValueError):
    """The model's attention layout is unknown or does not match an adapter."""


def is_index(value) -> bool:
    """True for an integer: ``int``, a numpy integer or a 0-d integer array/tensor; False for bools."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    shape, dtype = getattr(value, "shape", None), str(getattr(value, "dtype", ""))
    return shape is not None and tuple(shape) == () and "int" in dtype


@dataclass
class HeadLayout:
    """Shapes and module names of one model's attention, JSON-serialisable.

    Stored in ``adapter_config.json`` so a reader can tell exactly which weight
    slices an adapter holds, and so loading onto a differently shaped model fails
    with a clear error.
    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    layers: str
    modules: dict[str, str] = field(default_factory=dict)
    fused: str | None = None
    transposed: bool = False

    def __post_init__(self):
        missing = [p for p in PARTS if p not in (self.modules or {})]
        if missing:
            raise LayoutError(f"layout.modules must name a module for each of {PARTS}; missing {missing}.")
        if self.fused not in (None, "blocks", "interleaved"):
            raise LayoutError(f"layout.fused must be None, 'blocks' or 'interleaved', got {self.fused!r}.")
        if self.num_heads % self.num_kv_heads:
            raise LayoutError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.")
        qkv = {self.modules[p] for p in "qkv"}
        if self.fused is None and len(qkv) < 3:
            raise LayoutError(f"layout.modules puts q, k and v in {sorted(qkv)} but fused is None: set fused to "
                              f"'blocks' ([Q | K | V] along the output) or 'interleaved' ([q_h k_h v_h] per head).")
        if self.fused is not None and len(qkv) != 1:
            raise LayoutError(f"layout.fused={self.fused!r} needs q, k and v in one module, got {self.modules}; "
                              f"set fused=None for separate projections (partly fused q/k/v is not supported).")
        if self.modules["o"] in qkv:
            raise LayoutError(f"layout.modules names {self.modules['o']!r} for o and for q/k/v; o is the output "
                              f"projection that reads the heads' context vectors.")

    # ----- construction -----
    @classmethod
    def from_model_config(cls, config, stack: str | None = None) -> "HeadLayout":
        """The layout of a transformers ``PretrainedConfig`` of a built-in architecture (``stack``: which
        attention stack, for a model with several, e.g. T5's ``"encoder"``, ``"decoder"`` or ``"cross"``);
        LayoutError for any other architecture."""
        model_type = getattr(config, "model_type", None)
        spec = arch_spec(model_type, stack)
        if spec is None:
            raise LayoutError(
                f"peft_alps does not know the attention layout of model_type={model_type!r}. Built in: "
                f"{sorted(ARCHITECTURES)}. For another architecture peft_alps.infer_layout(model) proposes one "
                f"from the model's modules and config, or pass HeadMaskConfig(layout={{...}}) with the keys of "
                f"peft_alps.HeadLayout (num_layers, num_heads, num_kv_heads, head_dim, hidden_size, layers, "
                f"modules={{'q': ..., 'k': ..., 'v': ..., 'o': ...}}, fused)."
            )
        fields = {**config_numbers(config), "fused": spec.fused, **(spec.numbers(config) if spec.numbers else {})}
        return cls(model_type=model_type, layers=spec.layers, modules=dict(spec.modules),
                   transposed=spec.transposed, **fields)

    @classmethod
    def from_dict(cls, data) -> "HeadLayout":
        """The layout recorded as ``data`` (as :meth:`to_dict` writes it); LayoutError naming any unknown,
        missing or ill-typed key."""
        if not isinstance(data, dict):
            raise LayoutError(f"layout must be a dict with the keys {_LAYOUT_KEYS} (or a HeadLayout), got "
                              f"{type(data).__name__}.")
        unknown = sorted(set(map(str, data)) - set(_LAYOUT_KEYS))
        missing = [k for k in _LAYOUT_KEYS if k not in data and k not in _LAYOUT_DEFAULTS]
        if unknown or missing:
            raise LayoutError(f"layout has {f'unknown key(s) {unknown}' if unknown else ''}"
                              f"{' and ' if unknown and missing else ''}{f'no {missing}' if missing else ''}; "
                              f"a layout has the keys {_LAYOUT_KEYS} (fused and transposed are optional).")
        ints = [k for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")
                if not is_index(data[k]) or data[k] < 1]
        if ints:
            raise LayoutError(f"layout {ints} must be positive integers, got {[data[k] for k in ints]}.")
        if not isinstance(data["layers"], str) or not data["layers"] or not isinstance(data["model_type"], str):
            raise LayoutError(f"layout model_type and layers must be non-empty strings, got "
                              f"{data['model_type']!r} and {data['layers']!r}.")
        modules = data["modules"]
        if not isinstance(modules, dict) or not all(isinstance(v, str) and v for v in modules.values()):
            raise LayoutError(f"layout modules must map each of {list(PARTS)} to a module path inside a block, "
                              f"got {modules!r}.")
        extra = sorted(set(modules) - set(PARTS))
        if extra:
            raise LayoutError(f"layout modules has unknown part(s) {extra}; parts are {list(PARTS)}.")
        if not isinstance(data.get("transposed", False), bool):
            raise LayoutError(f"layout transposed must be true or false, got {data['transposed']!r}.")
        return cls(**{k: int(v) if k in _INT_KEYS else v for k, v in data.items()})

    @classmethod
    def coerce(cls, layout) -> "HeadLayout":
        """A :class:`HeadLayout` from a HeadLayout (returned as is) or its dict form (:meth:`from_dict`)."""
        return layout if isinstance(layout, HeadLayout) else cls.from_dict(layout)

    def to_dict(self) -> dict:
        return asdict(self)

    def shape_key(self) -> dict:
        """The numbers two models must share for an adapter to transfer between them."""
        return {k: getattr(self, k) for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")}

    # ----- head -> channels -----
    def kv_group(self, head: int) -> int:
        """Key/value group read by query head ``head`` (Hugging Face GQA layout)."""
        return head // (self.num_heads // self.num_kv_heads)

    def part_channels(self, part: str, head: int) -> range:
        """Output channels (q/k/v) or input channels (o) of ``part`` for query head ``head``."""
        d = self.head_dim
        if part == "o":
            return range(head * d, (head + 1) * d)
        if self.fused == "interleaved":  # per kv group g: its r query heads, then k_g, then v_g
            r, group = self.num_heads // self.num_kv_heads, self.kv_group(head)
            start = (group * (r + 2) + {"q": head % r, "k": r, "v": r + 1}[part]) * d
            return range(start, start + d)
        unit = head if part == "q" else self.kv_group(head)
        start = unit * d
        if self.fused == "blocks":
            start += {"q": 0, "k": self.num_heads * d, "v": (self.num_heads + self.num_kv_heads) * d}[part]
        return range(start, start + d)

    def channels(self, module: str, parts, heads) -> list[int]:
        """Sorted distinct channels of ``module`` touched by ``heads`` for the given ``parts``.

        ``module`` is a module path inside a block (a value of ``self.modules``).
        Channels index the output dim for q/k/v modules and the input dim for o.
        """
        chans = set()
        for part in parts:
            if self.modules[part] == module:
                for h in heads:
                    chans.update(self.part_channels(part, h))
        return sorted(chans)

    def head_axis(self, module: str) -> str:
        """The axis of ``module`` (a value of ``self.modules``) that holds the heads' channels, in the
        ``nn.Linear`` frame: ``"in"`` (columns) for the output projection, ``"out"`` (rows) for q/k/v."""
        return "in" if module == self.modules["o"] else "out"

    def stored_dim(self, module: str) -> int:
        """The dimension of ``module``'s *stored* weight that :meth:`head_axis` is (``transposed`` swaps it)."""
        return linear_dim(self.head_axis(module)) ^ int(self.transposed)

    def linear_shape(self, stored_shape) -> tuple[int, int]:
        """``(out_features, in_features)`` of a stored 2-D weight shape."""
        return tuple(stored_shape[::-1] if self.transposed else stored_shape)

    def part_index(self, part: str) -> list[int]:
        """Channels of ``part`` for every query head, in head order (``num_heads * head_dim`` entries; under GQA
        the key/value group's channels repeat for each query head of the group)."""
        return [c for head in range(self.num_heads) for c in self.part_channels(part, head)]

    def module_name(self, layer: int, module: str) -> str:
        """The block-relative name of ``module`` in ``layer``, e.g. ``"layers.3.self_attn.q_proj"``."""
        return f"{self.layers}.{layer}.{module}"

    def targets(self, heads: dict, parts) -> dict:
        """``{(layer, module path): (channels, axis)}`` of every projection an adapter training ``heads``
        (``{layer: sorted heads}``, as :func:`normalise_heads` gives) on ``parts`` touches; LayoutError if a layer
        or head does not exist in this layout."""
        bad_layers = [layer for layer in heads if layer >= self.num_layers]
        if bad_layers:
            raise LayoutError(f"heads names layer(s) {bad_layers} but the model has {self.num_layers} layers "
                              f"(valid: 0..{self.num_layers - 1}).")
        for layer, hs in heads.items():
            if hs[-1] >= self.num_heads:
                raise LayoutError(f"heads[{layer}] = {hs} but each layer has {self.num_heads} query heads "
                                  f"(valid: 0..{self.num_heads - 1}).")
        return {(layer, module): (self.channels(module, parts, hs), self.head_axis(module))
                for layer, hs in heads.items() for module in self.module_names(parts)}

    def module_names(self, parts) -> list[str]:
        """Distinct module paths (inside a block) that hold the given parts, in q, k, v, o order."""
        return list(dict.fromkeys(self.modules[p] for p in PARTS if p in parts))

    def features(self, module: str) -> tuple[int, int]:
        """``(out_features, in_features)`` that ``module`` (a value of ``self.modules``) has under this layout,
        in the ``nn.Linear`` frame."""
        d = self.head_dim
        if module == self.modules["o"]:
            return self.hidden_size, self.num_heads * d
        per_part = {"q": self.num_heads, "k": self.num_kv_heads, "v": self.num_kv_heads}
        return sum(per_part[p] for p in "qkv" if self.modules[p] == module) * d, self.hidden_size

    def check_model(self, shapes: dict, config=None, where: str = "the model", parts=PARTS) -> dict:
        """Check this layout against a real model; return ``{(layer, module path): full module name}``.

        ``shapes``: full module name -> ``(out_features, in_features)`` in the ``nn.Linear`` frame, for the
        model's projections (extra names are ignored); ``config``: the model's transformers config, if any.
        Every layer ``0..num_layers-1`` must hold each module of ``parts`` exactly once (one layer stack), with
        the features :meth:`features` implies, and the config's head counts and sizes must agree. LayoutError
        naming the field to fix otherwise. The one layout-vs-model check: the live model, the scorers (which
        may read checkpoints holding q/k/v only: ``parts``) and the file merge all use it.
        """
        found: dict = {}
        for name in shapes:
            hit = self.locate(name, parts)
            if hit is not None:
                found.setdefault(hit, []).append(name)
        stacks = {k: v for k, v in found.items() if len(v) > 1}
        if stacks:
            (layer, module), names = next(iter(stacks.items()))
            prefixes = sorted(n[: n.index(f"{self.layers}.{layer}.")] + self.layers for n in names)
            raise LayoutError(f"layout.layers={self.layers!r} matches several layer stacks in {where} "
                              f"({prefixes}): set layers to exactly one of them, e.g. {prefixes[0]!r}.")
        modules = self.module_names(parts)
        missing = [(i, m) for i in range(self.num_layers) for m in modules if (i, m) not in found]
        if missing:
            names = ", ".join(self.module_name(layer, module) for layer, module in missing[:4])
            raise LayoutError(f"Could not find the attention module(s) {names} in {where}; the layout's module "
                              f"names {self.modules} under '{self.layers}.N' (num_layers={self.num_layers}) do not "
                              f"match it.")
        beyond = sorted({i for i, _ in found if i >= self.num_layers})
        if beyond:
            first = next(found[(beyond[0], m)][0] for m in modules if (beyond[0], m) in found)
            raise LayoutError(f"{where} has {first} but layout num_layers={self.num_layers}: set "
                              f"num_layers={beyond[-1] + 1}.")
        for layer in range(self.num_layers):
            for module in modules:
                (name,) = found[(layer, module)]
                want, got = self.features(module), tuple(shapes[name])
                if got != want:
                    wrong = " and ".join(f"{got[i]} {side} features" for i, side in enumerate(("output", "input"))
                                         if got[i] != want[i])
                    raise LayoutError(f"{name} has {wrong} but the layout implies {want[0]} x {want[1]} (output x "
                                      f"input): the layout does not match {where}; check "
                                      f"{self._suspects(module, got, want)} (layout: {self._fields()}).")
        if config is not None:
            self._check_config(config, where)
        return {key: names[0] for key, names in found.items()}

    def _fields(self) -> str:
        """The layout as ``key=value`` pairs (for error messages)."""
        return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in self.to_dict().items())

    def _suspects(self, module: str, got, want) -> str:
        """The layout fields a wrong feature count points at (for the error message)."""
        parts = [p for p in PARTS if self.modules[p] == module]
        if got[1 if parts != ["o"] else 0] != want[1 if parts != ["o"] else 0]:
            return "hidden_size"
        if parts == ["o"] or parts == ["q"]:
            return "num_heads and head_dim"
        if len(parts) == 3:
            return "fused, num_heads, num_kv_heads and head_dim"
        return "num_kv_heads and head_dim"

    def _check_config(self, config, where: str) -> None:
        """The numbers the model's config states must be the layout's (head_dim only where stated)."""
        stated = {"num_heads": getattr(config, "num_attention_heads", None),
                  "hidden_size": getattr(config, "hidden_size", None),
                  "head_dim": getattr(config, "head_dim", None)}
        wrong = {k: v for k, v in stated.items() if is_index(v) and v != getattr(self, k)}
        if wrong:
            raise LayoutError(f"The layout has {', '.join(f'{k}={getattr(self, k)}' for k in wrong)} but the config "
                              f"of {where} says {', '.join(f'{k}={v}' for k, v in wrong.items())}: fix the layout's "
                              f"{' and '.join(wrong)}.")

    def locate(self, key: str, parts) -> tuple[int, str] | None:
        """Map a full module name to ``(layer_index, module_path)`` if it holds one of ``parts``, else None."""
        for module in self.module_names(parts):
            m = re.search(rf"(?:^|\.){re.escape(self.layers)}\.(\d+)\.{re.escape(module)}$", key)
            if m:
                return int(m.group(1)), module
        return None


_LAYOUT_KEYS = ["model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "layers",
                "modules", "fused", "transposed"]
_LAYOUT_DEFAULTS = {"fused": None, "transposed": False}
_INT_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")


def resolve_layout(recorded, model_config, fix: str = "", infer=None) -> HeadLayout:
    """The one layout resolution used by the live model, the scorers and the file merge.

    ``recorded``: a layout passed by the user or saved with an adapter (HeadLayout, dict or None);
    ``model_config``: the model's transformers config. For an architecture in :data:`ARCHITECTURES` a recorded
    layout must equal the derived one (of one of its stacks) in every field but ``model_type``; for any other
    architecture the recorded layout is used, or with none ``infer()`` (a proven inferred layout, where the
    caller has a live model), or else a LayoutError (``fix`` is added to it: how the caller takes a layout).
    The result still has to pass :meth:`HeadLayout.check_model` against the real modules.
    """
    recorded = None if recorded is None else HeadLayout.coerce(recorded)
    model_type = getattr(model_config, "model_type", None)
    entry = ARCHITECTURES.get(model_type)
    if entry is None:
        if recorded is not None:
            return recorded
        if infer is not None:
            return infer()
        try:
            HeadLayout.from_model_config(model_config)
        except LayoutError as e:
            raise LayoutError(f"{e}{f' {fix}' if fix else ''}") from None
    if recorded is None:
        return HeadLayout.from_model_config(model_config)  # LayoutError naming the stacks, for several
    candidates = [HeadLayout.from_model_config(model_config, stack) for stack in
                  (entry if isinstance(entry, dict) else [None])]
    mine = recorded.to_dict()
    differences = {id(c): [k for k, v in c.to_dict().items() if k != "model_type" and mine[k] != v] for c in candidates}
    if not all(differences.values()):
        return recorded
    derived = next((c for c in candidates if (c.layers, c.modules) == (recorded.layers, recorded.modules)),
                   candidates[0])
    theirs, differ = derived.to_dict(), differences[id(derived)]
    pick = " (or pick a stack with HeadLayout.from_model_config)"
    raise LayoutError(f"The layout (recorded with the adapter, or passed in) does not match this "
                      f"{derived.model_type} model: it was made for {recorded.model_type} attention shaped "
                      f"{ {k: mine[k] for k in differ} } but this model has { {k: theirs[k] for k in differ} }: "
                      f"load the adapter onto the base model it was trained on; for a built-in architecture leave "
                      f"layout unset{pick if len(candidates) > 1 else ''}.")


# ----- head selections -----
def normalise_heads(heads) -> dict[int, list[int]]:
    """``heads`` validated and returned with int layer keys (sorted) and sorted, distinct int heads.

    Layer keys: integers (numpy / 0-d tensor integers too) or decimal strings, as after a JSON round trip.
    Heads: an integer or a list of integers per layer. Bools, floats and keys that name the same layer twice
    (``{0: ..., "0": ...}``) are refused: each would silently select other heads than the ones written.
    """
    example = "e.g. heads={3: [0, 5], 11: [2]} (peft_alps.select_heads(scores) produces one)"
    if isinstance(heads, (list, tuple)):
        raise ValueError(f"heads must be a dict of layer index -> list of query heads, {example}; got a "
                         f"{type(heads).__name__}. For one list of heads per layer use dict(enumerate(lists)).")
    if not isinstance(heads, dict) or not heads:
        raise ValueError(f"heads is empty: pass a dict of layer index -> list of query heads, {example}.")
    out, written = {}, {}
    for layer, hs in heads.items():
        layer_idx = _layer_index(layer)
        if layer_idx in out:
            raise ValueError(f"heads names layer {layer_idx} twice (as {written[layer_idx]!r} and {layer!r}): "
                             f"merge the two lists under one key.")
        if is_index(hs):
            hs = [hs]
        elif isinstance(hs, (list, tuple, range)) or _is_vector(hs):
            hs = list(hs)
        else:
            raise ValueError(f"heads[{layer_idx}] must be a list of query-head indices, got {hs!r}.")
        if not hs:
            raise ValueError(f"heads[{layer_idx}] is empty: drop the layer or list at least one head.")
        bad = [h for h in hs if not is_index(h) or h < 0]
        if bad:
            raise ValueError(f"heads[{layer_idx}] = {hs}: head indices must be non-negative integers, got "
                             f"{bad[:3]}.")
        out[layer_idx], written[layer_idx] = sorted({int(h) for h in hs}), layer
    return dict(sorted(out.items()))


def _layer_index(layer) -> int:
    """A layer key as an int: an integer, or a string of decimal digits (JSON object keys are strings)."""
    if isinstance(layer, str) and layer.strip().isdecimal():
        return int(layer)
    if is_index(layer) and layer >= 0:
        return int(layer)
    raise ValueError(f"heads has a non-integer layer key {layer!r}: layer keys must be non-negative integers (or their "
                     f"decimal strings).")


def _is_vector(value) -> bool:
    """A 1-D numpy array or tensor (of head indices)."""
    return len(getattr(value, "shape", ())) == 1
