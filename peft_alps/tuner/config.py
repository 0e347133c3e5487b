"""``HeadMaskConfig``: which attention heads to train, and how."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from peft.config import PeftConfig

from ..heads.delta import delta_kind_of
from ..heads.layout import HeadLayout, check_parts, normalise_heads
from ..io.adapter import WEIGHTS_NAME
from ..io.card import write_model_card
from ..io.integrity import stamp_checksum

FORWARD_STRATEGIES = ("merged", "output_add")


@dataclass
class HeadMaskConfig(PeftConfig):
    """Configuration of a head-mask adapter (ALPS-style attention head fine-tuning).

    Only the selected heads' weight slices become trainable tensors; every other
    weight stays frozen and receives no gradient.

    Example::

        import peft_alps
        from peft import get_peft_model
        model = get_peft_model(base, peft_alps.HeadMaskConfig(heads={3: [0, 5], 11: [2]}))
    """

    heads: dict[int, list[int]] = field(
        default_factory=dict,
        metadata={
            "help": "Layer index -> list of query-head indices to train, e.g. {3: [0, 5], 11: [2]}. "
            "Layer keys may be strings (as after a JSON round trip); they are converted to int."
        },
    )
    parts: list[str] = field(
        default_factory=lambda: ["q", "k", "v"],
        metadata={
            "help": "Subset of q, k, v, o to train for each selected head (default q, k, v as in the ALPS paper). "
            "k/v train the key/value group the query head reads under GQA; o trains the head's input columns of "
            "the output projection."
        },
    )
    layout: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Attention layout (see peft_alps.HeadLayout). Filled from the model config for built-in "
            "architectures (inferred and proven on the model for others: peft_alps.infer_layout) and saved with the "
            "adapter. Pass it to choose a stack (T5: HeadLayout.from_model_config(config, stack='cross')) or to make "
            "an inferred layout explicit."
        },
    )
    forward_strategy: Optional[str] = field(
        default=None,
        metadata={
            "help": "'merged': one matmul with the head slices merged into a temporary weight (custom "
            "autograd): in bf16/fp16 the training forward equals the merged model bit for bit. 'output_add': base "
            "output plus x @ D^T added into the selected channels (no weight copy). Within noise of each other in "
            "speed on CPU (benchmarks/README.md); mixed-adapter batches always add per sample. None (default): "
            "'merged' on a floating-point base, 'output_add' on a quantized one (where 'merged' is refused)."
        },
    )
    delta_kind: str = field(
        default="dense",
        metadata={"help": "How the selected slices are trained (peft_alps.heads.delta): 'dense' (default, ALPS) "
                  "trains every entry of the slices; 'kasa' trains a KaSA singular-value update of rank kasa_rank "
                  "per head; other kinds are registered with register_delta_kind."},
    )
    kasa_rank: int = field(
        default=8,
        metadata={"help": "delta_kind='kasa': rank r of each head's update dU diag(dsigma) dV^T."},
    )
    kasa_truncate: Optional[int] = field(
        default=0,
        metadata={"help": "delta_kind='kasa': number r_t of smallest singular components of each head's base slice "
                  "the delta removes (computed from the base at load, never stored, the base itself untouched). "
                  "0 (default): no truncation, the model at init is the base; None: kasa_rank, as the paper and "
                  "PEFT (on SmolLM2-135M even r_t=1 on 10% of the heads raised the held-out loss by 0.22 nats "
                  "before any training: benchmarks/README.md, KaSA head deltas)."},
    )
    kasa_beta: float = field(
        default=1e-4,
        metadata={"help": "delta_kind='kasa': weight of ||dsigma||^2 in model.kasa_loss() (PEFT's KasaConfig.beta)."},
    )
    kasa_gamma: float = field(
        default=1e-3,
        metadata={"help": "delta_kind='kasa': weight of ||dU^T dU - I||_F + ||dV^T dV - I||_F in model.kasa_loss() "
                  "(PEFT's KasaConfig.gamma)."},
    )
    kasa_loss_in_forward: bool = field(
        default=False,
        metadata={"help": "delta_kind='kasa': in training mode, add model.kasa_loss() to the `loss` the model "
                  "returns (when it returns one, i.e. labels were passed): Trainer and TRL then train on it."},
    )
    grad_mask_ratio: float = field(
        default=0.0,
        metadata={
            "help": "GMT (gradient-mask tuning): before each optimizer step, zero the floor(ratio * numel) "
            "smallest-|gradient| entries of every head-slice tensor (per tensor, on the accumulated gradient). "
            "In [0, 1); 0 (default) trains every entry of the slices. See peft_alps.tuner.gmt."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: deltas start at zero (the model is unchanged at init). False: small random "
                  "deltas, for tests."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Extra modules trained in full and saved with the adapter, e.g. ['classifier'] for a "
                  "BERT-style classification head (decoders: ['score']); task_type='SEQ_CLS' / 'TOKEN_CLS' adds the "
                  "head by itself. A name that matches no module is refused."},
    )
    id2label: Optional[dict] = field(
        default=None,
        metadata={"help": "Filled automatically for a classifier (a *ForSequenceClassification / "
                  "*ForTokenClassification base, or task_type SEQ_CLS / TOKEN_CLS): the base config's id2label "
                  "(its length is num_labels), so that the model card's load snippet and loaders rebuild the head "
                  "with the right size; do not set it."},
    )
    selection: Optional[dict] = field(
        default=None,
        metadata={"help": "How the heads were chosen, for the model card and readers, e.g. {'method': 'ALPS', "
                  "'metric': 'pad', 'ratio': 0.1}. Free-form JSON-serialisable values; not used for training."},
    )
    base_fingerprint: Optional[dict] = field(
        default=None,
        metadata={"help": "Filled automatically: a sketch of the base weight slices the adapter was made on "
                  "(peft_alps.io.integrity), checked when the adapter is loaded, merged or exported; do not set it."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Filled automatically with the exact module names that hold selected heads; "
                  "do not set it."},
    )

    def __post_init__(self):
        super().__post_init__()
        from peft.utils import PeftType

        self.peft_type = PeftType.HEADMASK
        self.heads = normalise_heads(self.heads)
        self.parts = check_parts(self.parts)
        if self.forward_strategy is not None and self.forward_strategy not in FORWARD_STRATEGIES:
            raise ValueError(
                f"forward_strategy must be one of {FORWARD_STRATEGIES} or None (chosen by the base), got "
                f"{self.forward_strategy!r}."
            )
        self.grad_mask_ratio = _check_grad_mask_ratio(self.grad_mask_ratio)
        if self.layout is not None:  # a HeadLayout object or its dict; validated here, stored as a dict
            self.layout = HeadLayout.coerce(self.layout).to_dict()
        delta_kind_of(self)  # ValueError naming the known kinds, or the kind's bad option
        if self.id2label is not None:  # JSON keys are strings
            self.id2label = {int(k): str(v) for k, v in dict(self.id2label).items()}
        if self.selection is not None and not isinstance(self.selection, dict):
            raise ValueError(f"selection must be a dict (e.g. {{'metric': 'pad', 'ratio': 0.1}}) or None, got "
                             f"{type(self.selection).__name__}.")

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """PEFT's ``adapter_config.json``, then the Hub model card (``README.md``, :mod:`peft_alps.io.card`).

        ``PeftModel.save_pretrained`` writes the weights and PEFT's own card before calling this, so the card's
        summary describes the saved weights."""
        super().save_pretrained(save_directory, **kwargs)
        weights = Path(save_directory) / WEIGHTS_NAME
        if weights.is_file():  # PEFT wrote it just before; transformers writes it after the config (no stamp)
            stamp_checksum(weights)
        write_model_card(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        """PEFT's loader, remembering where the adapter's weights file is so that ``PeftModel.from_pretrained``
        can check it against the config before the model is modified (:meth:`HeadMaskModel._prepare_model`)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        if (folder / WEIGHTS_NAME).is_file():
            config._weights_file = folder / WEIGHTS_NAME
        elif not folder.exists():  # a Hub id: the file, if already downloaded
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(pretrained_model_name_or_path), "/".join(filter(None, (
                subfolder, WEIGHTS_NAME))), cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"))
            config._weights_file = Path(cached) if isinstance(cached, str) else None
        return config

    @property
    def num_selected_heads(self) -> int:
        return sum(len(v) for v in self.heads.values())


def _check_grad_mask_ratio(ratio) -> float:
    ok = isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) and 0 <= ratio < 1
    if not ok:
        raise ValueError(f"grad_mask_ratio must be a number in [0, 1) (fraction of gradient entries zeroed per "
                         f"step; 0 disables gradient masking), got {ratio!r}.")
    return float(ratio)
