"""Per-architecture attention head layout: which module holds q/k/v/o and which
weight rows or columns belong to attention head ``h``.

Conventions used throughout peft_alps:

* Indices are expressed in the ``nn.Linear`` frame: a projection maps
  ``in_features -> out_features`` and its weight is ``[out, in]``. GPT-2's
  ``Conv1D`` stores the transpose (``[in, out]``, ``y = x @ W + b``); the layer
  code handles that, the layout does not care.
* q, k and v are *output* slices (rows of an ``nn.Linear`` weight): query head
  ``h`` owns ``head_dim`` output channels of q; its key/value group
  ``g(h) = h // (num_heads // num_kv_heads)`` owns ``head_dim`` channels of k and v.
* o is an *input* slice (columns of the output projection): head ``h``'s context
  vector enters ``o`` at input channels ``h * head_dim ... (h + 1) * head_dim - 1``.
* Fused projections put several parts in one module: ``"blocks"`` is
  ``[Q | K | V]`` along the output (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``),
  ``"interleaved"`` is ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` per head
  (GPT-NeoX ``query_key_value``).
"""

from __future__ import annotations

import numbers
import re
from dataclasses import asdict, dataclass, field

PARTS = ("q", "k", "v", "o")


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


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its attention projections.

    ``layers``: name of the ModuleList holding the blocks (``model.layers.3...``
    -> ``"layers"``). ``modules``: part -> module path inside one block.
    ``fused``: ``None``, ``"blocks"`` or ``"interleaved"`` (see module docstring).
    ``transposed``: weights are stored ``[in, out]`` (GPT-2 ``Conv1D``), not ``[out, in]``.
    """

    layers: str
    modules: dict[str, str]
    fused: str | None = None
    transposed: bool = False


_LLAMA = ArchSpec("layers", {p: f"self_attn.{p}_proj" for p in PARTS})
_BERT = ArchSpec(
    "layer",
    {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value", "o": "attention.output.dense"},
)

#: model_type -> ArchSpec. Extend by passing ``HeadMaskConfig(layout=...)`` instead of editing this table.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": ArchSpec("h", {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj"}, "blocks",
                    transposed=True),
    "gpt_neox": ArchSpec(
        "layers",
        {"q": "attention.query_key_value", "k": "attention.query_key_value", "v": "attention.query_key_value",
         "o": "attention.dense"},
        "interleaved",
    ),
    "phi3": ArchSpec("layers", {"q": "self_attn.qkv_proj", "k": "self_attn.qkv_proj", "v": "self_attn.qkv_proj",
                                "o": "self_attn.o_proj"}, "blocks"),
    "bert": _BERT,
    "roberta": _BERT,
}


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
        if self.fused == "interleaved" and self.num_kv_heads != self.num_heads:
            raise LayoutError("An interleaved fused qkv layout requires num_kv_heads == num_heads.")
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
    def from_model_config(cls, config) -> "HeadLayout":
        """Build the layout of a transformers ``PretrainedConfig``; raise LayoutError if unsupported."""
        model_type = getattr(config, "model_type", None)
        spec = ARCHITECTURES.get(model_type)
        if spec is None:
            raise LayoutError(
                f"peft_alps does not know the attention layout of model_type={model_type!r}. Supported: "
                f"{sorted(ARCHITECTURES)}. For another architecture pass HeadMaskConfig(layout={{...}}) with the keys "
                f"of peft_alps.HeadLayout (num_layers, num_heads, num_kv_heads, head_dim, hidden_size, layers, "
                f"modules={{'q': ..., 'k': ..., 'v': ..., 'o': ...}}, fused)."
            )
        num_heads = config.num_attention_heads
        hidden = config.hidden_size
        return cls(
            model_type=model_type,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or hidden // num_heads,
            hidden_size=hidden,
            layers=spec.layers,
            modules=dict(spec.modules),
            fused=spec.fused,
            transposed=spec.transposed,
        )

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
        if self.fused == "interleaved":  # [q_h k_h v_h] per head, no GQA
            start = head * 3 * d + "qkv".index(part) * d
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

    def slice_dim(self, module: str) -> str:
        """``"in"`` if ``module`` is the output projection (head = input columns), else ``"out"``."""
        return "in" if module == self.modules["o"] else "out"

    def module_names(self, parts) -> list[str]:
        """Distinct module paths (inside a block) that hold the given parts, in q, k, v, o order."""
        return list(dict.fromkeys(self.modules[p] for p in PARTS if p in parts))

    def features(self, module: str) -> tuple[int, int]:
        """``(out_features, in_features)`` that ``module`` (a value of ``self.modules``) has under this layout,
        in the ``nn.Linear`` frame."""
        d = self.head_dim
        if module == self.modules["o"]:
            return self.hidden_size, self.num_heads * d
        if self.fused == "interleaved":
            return 3 * self.num_heads * d, self.hidden_size
        per_part = {"q": self.num_heads, "k": self.num_kv_heads, "v": self.num_kv_heads}
        return sum(per_part[p] for p in "qkv" if self.modules[p] == module) * d, self.hidden_size

    def check_model(self, shapes: dict, config=None, where: str = "the model") -> dict:
        """Check this layout against a real model; return ``{(layer, module path): full module name}``.

        ``shapes``: full module name -> ``(out_features, in_features)`` in the ``nn.Linear`` frame, for the
        model's projections (extra names are ignored); ``config``: the model's transformers config, if any.
        Every layer ``0..num_layers-1`` must hold each q/k/v/o module exactly once (one layer stack), with the
        features :meth:`features` implies, and the config's head counts and sizes must agree. LayoutError
        naming the field to fix otherwise.
        """
        found: dict = {}
        for name in shapes:
            hit = self.locate(name, PARTS)
            if hit is not None:
                found.setdefault(hit, []).append(name)
        stacks = {k: v for k, v in found.items() if len(v) > 1}
        if stacks:
            (layer, module), names = next(iter(stacks.items()))
            prefixes = sorted(n[: n.index(f"{self.layers}.{layer}.")] + self.layers for n in names)
            raise LayoutError(f"layout.layers={self.layers!r} matches several layer stacks in {where} "
                              f"({prefixes}): set layers to exactly one of them, e.g. {prefixes[0]!r}.")
        modules = self.module_names(PARTS)
        missing = [(i, m) for i in range(self.num_layers) for m in modules if (i, m) not in found]
        if missing:
            raise LayoutError(f"Could not find the attention module(s) {missing[:4]} (layer, path) in {where}; the "
                              f"layout's module names {self.modules} under '{self.layers}.N' (num_layers="
                              f"{self.num_layers}) do not match it.")
        beyond = sorted({i for i, _ in found if i >= self.num_layers})
        if beyond:
            raise LayoutError(f"layout.num_layers={self.num_layers} but {where} has attention layers up to "
                              f"{beyond[-1]}: set num_layers={beyond[-1] + 1}.")
        for (layer, module), (name,) in sorted(found.items()):
            want, got = self.features(module), tuple(shapes[name])
            if got != want:
                raise LayoutError(f"{name} has {got[0]} output and {got[1]} input features but the layout implies "
                                  f"{want[0]} x {want[1]}: check {self._suspects(module, got, want)} "
                                  f"({self.to_dict()}).")
        if config is not None:
            self._check_config(config, where)
        return {key: names[0] for key, names in found.items()}

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


def resolve_layout(recorded, model_config) -> HeadLayout:
    """The one layout resolution used by the live model, the scorers and the file merge.

    ``recorded``: a layout passed by the user or saved with an adapter (HeadLayout, dict or None);
    ``model_config``: the model's transformers config. For an architecture in :data:`ARCHITECTURES` a recorded
    layout must equal the derived one in every field but ``model_type``; for any other architecture the recorded
    layout is required. The result still has to pass :meth:`HeadLayout.check_model` against the real modules.
    """
    recorded = None if recorded is None else HeadLayout.coerce(recorded)
    try:
        derived = HeadLayout.from_model_config(model_config)
    except LayoutError:
        if recorded is None:
            raise
        return recorded
    if recorded is None:
        return derived
    mine, theirs = recorded.to_dict(), derived.to_dict()
    differ = [k for k in mine if k != "model_type" and mine[k] != theirs[k]]
    if differ:
        raise LayoutError(f"The layout (recorded with the adapter or passed in the config) was made for "
                          f"{recorded.model_type} attention shaped "
                          f"{ {k: mine[k] for k in differ} } but this {derived.model_type} model has "
                          f"{ {k: theirs[k] for k in differ} }: load the adapter onto the base model it was trained "
                          f"on; for a built-in architecture leave layout unset.")
    return recorded
