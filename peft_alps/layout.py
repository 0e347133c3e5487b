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
        missing = [p for p in PARTS if p not in self.modules]
        if missing:
            raise LayoutError(f"layout.modules must name a module for each of {PARTS}; missing {missing}.")
        if self.fused not in (None, "blocks", "interleaved"):
            raise LayoutError(f"layout.fused must be None, 'blocks' or 'interleaved', got {self.fused!r}.")
        if self.num_heads % self.num_kv_heads:
            raise LayoutError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.")
        if self.fused == "interleaved" and self.num_kv_heads != self.num_heads:
            raise LayoutError("An interleaved fused qkv layout requires num_kv_heads == num_heads.")

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
    def from_dict(cls, data: dict) -> "HeadLayout":
        return cls(**data)

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

    def locate(self, key: str, parts) -> tuple[int, str] | None:
        """Map a full module name to ``(layer_index, module_path)`` if it holds one of ``parts``, else None."""
        for module in self.module_names(parts):
            m = re.search(rf"(?:^|\.){re.escape(self.layers)}\.(\d+)\.{re.escape(module)}$", key)
            if m:
                return int(m.group(1)), module
        return None
