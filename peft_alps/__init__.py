"""peft-alps: fine-tune only the attention heads that matter, as a PEFT method.

``import peft_alps`` registers the ``HEADMASK`` method with PEFT, so that
``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModel*`` and
transformers' ``model.load_adapter`` work with head-mask adapters.
"""

import enum

from peft.utils import PeftType, register_peft_method

from .config import HeadMaskConfig
from .export import export_lora
from .layer import HeadMaskLayer
from .layout import ARCHITECTURES, HeadLayout, LayoutError
from .gradient_scores import gradient_head_scores
from .localize import HeadScores, score_heads
from .merge import merge_checkpoint
from .model import HeadMaskModel
from .probe import ProbeWeights, probe_task_model
from .selection import layer_consistent_heads, random_heads, select_heads

__all__ = ["ARCHITECTURES", "HeadLayout", "HeadMaskConfig", "HeadMaskLayer", "HeadMaskModel", "HeadScores",
           "LayoutError", "ProbeWeights", "export_lora", "gradient_head_scores", "layer_consistent_heads",
           "merge_checkpoint", "probe_task_model", "random_heads", "score_heads", "select_heads"]
__version__ = "0.1.0"


def _add_peft_type(name: str) -> None:
    """Add member ``name`` to PEFT's ``PeftType`` str-enum (idempotent).

    PEFT's ``register_peft_method`` only accepts names present in ``PeftType``, and
    transformers reads ``peft_config.peft_type.value``, so a plain string will not do:
    the member must be a real ``PeftType`` instance, found by name and by value.
    """
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member)  # bypass EnumType.__setattr__, which forbids it
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    assert isinstance(PeftType(name), enum.Enum) and PeftType[name] is member


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    _add_peft_type("HEADMASK")
    if PeftType.HEADMASK not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="headmask", config_cls=HeadMaskConfig, model_cls=HeadMaskModel, prefix="headmask_")


_register()
