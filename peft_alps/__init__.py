"""peft-alps: fine-tune only the attention heads that matter, as a PEFT method.

``import peft_alps`` registers the ``HEADMASK`` method with PEFT, so that
``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModel*`` and
transformers' ``model.load_adapter`` work with head-mask adapters.

The import itself loads neither torch, transformers nor peft (so ``peft-alps --help`` answers at once): the
names in ``__all__`` are imported on first use (PEP 562), and the registration runs as soon as PEFT is loaded,
which PEFT must be before it can see an adapter. If PEFT is already loaded, ``import peft_alps`` registers right
away. Otherwise a finder on ``sys.meta_path`` (:class:`_RegisterWhenPeftLoads`, which removes itself once PEFT
is loaded) registers right after the first ``import peft``, by any code, and loads PEFT before any peft_alps
submodule except the command line (``peft_alps.cli``, ``peft_alps.__main__``).
"""

import enum
import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

# public name -> submodule that defines it (imported on first access, see __getattr__)
_LAZY = {
    "ARCHITECTURES": "heads.layout", "HeadLayout": "heads.layout", "LayoutError": "heads.layout",
    "check_layout": "heads.check", "LayoutCheck": "heads.check", "infer_layout": "heads.infer",
    "architecture_table": "heads.layout", "HeadDelta": "heads.delta", "register_delta_kind": "heads.delta",
    "HeadMaskConfig": "tuner.config", "HeadMaskLayer": "tuner.layer", "HeadMaskModel": "tuner.model",
    "HeadScores": "scoring.scores", "score_heads": "scoring.weight_scores", "ProbeWeights": "scoring.sources",
    "probe_task_model": "scoring.probe", "gradient_head_scores": "scoring.gradient_scores",
    "layer_consistent_heads": "scoring.selection", "random_heads": "scoring.selection",
    "select_heads": "scoring.selection", "adapter_mixture": "tuner.mixture", "select_data": "data_selection.select",
    "DataSelection": "data_selection.select", "ClusterStats": "data_selection.select",
    "export_lora": "deploy.export", "merge_checkpoint": "deploy.merge",
}
__all__ = ["ARCHITECTURES", "ClusterStats", "DataSelection", "HeadDelta", "HeadLayout", "HeadMaskConfig",
           "HeadMaskLayer", "HeadMaskModel", "HeadScores", "LayoutCheck", "LayoutError", "ProbeWeights",
           "adapter_mixture", "architecture_table", "check_layout", "export_lora", "gradient_head_scores",
           "infer_layout", "layer_consistent_heads", "merge_checkpoint", "probe_task_model", "random_heads",
           "register_delta_kind", "score_heads", "select_data", "select_heads"]
# submodules that load without PEFT: the command line, whose commands import the rest when they run
_WITHOUT_PEFT = frozenset({f"{__name__}.cli", f"{__name__}.__main__"})


def __getattr__(name: str):
    """``peft_alps.NAME`` for a name of ``__all__``: imported from its submodule on first access (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _add_peft_type(name: str) -> None:
    """Add member ``name`` to PEFT's ``PeftType`` str-enum (idempotent).

    PEFT's ``register_peft_method`` only accepts names present in ``PeftType``, and
    transformers reads ``peft_config.peft_type.value``, so a plain string will not do:
    the member must be a real ``PeftType`` instance, found by name and by value.
    """
    from peft.utils import PeftType

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
    """Register HEADMASK with PEFT (idempotent); imports peft."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType, register_peft_method

    from .tuner.config import HeadMaskConfig
    from .tuner.model import HeadMaskModel

    _add_peft_type("HEADMASK")
    if PeftType.HEADMASK not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="headmask", config_cls=HeadMaskConfig, model_cls=HeadMaskModel, prefix="headmask_")


# ----- registering when PEFT is loaded -----
class _RegisterWhenPeftLoads(importlib.abc.MetaPathFinder):
    """On ``sys.meta_path`` from ``import peft_alps`` until PEFT is loaded.

    It finds nothing itself: for ``peft`` and for peft_alps' submodules (but those in ``_WITHOUT_PEFT``) it
    takes the spec the other finders return and wraps its loader, so that PEFT registers HEADMASK right after
    its own ``__init__`` has run (:class:`_PeftLoader`), and a peft_alps submodule loads PEFT before it runs
    (:class:`_AfterPeftLoader`; the registration needs ``peft_alps.tuner.config`` and ``.tuner.model``, which
    import peft: loading PEFT from inside them would find them half-initialized).
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "peft":
            wrap = _PeftLoader
        elif fullname.startswith(f"{__name__}.") and fullname not in _WITHOUT_PEFT and "peft" not in sys.modules:
            wrap = _AfterPeftLoader
        else:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = wrap(spec.loader)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    """Delegates to the module's own loader, which is put back on the module before its code runs."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_source, is_package, get_resource_reader, ... of the real loader
        if name.startswith("__") or name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)


class _PeftLoader(_Loader):
    """``peft``'s loader; registers HEADMASK once PEFT's ``__init__`` has run."""

    def exec_module(self, module):
        super().exec_module(module)
        _stop_waiting()
        _register()


class _AfterPeftLoader(_Loader):
    """A peft_alps submodule's loader that loads PEFT (which registers HEADMASK) first.

    The registration may import this very submodule: then that module is the one returned, not run twice.
    """

    def __init__(self, loader):
        super().__init__(loader)
        self.loaded = None

    def create_module(self, spec):
        import peft  # noqa: F401  (the registration, through _PeftLoader)

        self.loaded = sys.modules.get(spec.name)
        if self.loaded is not None:
            self.loaded_spec = self.loaded.__spec__  # the import system sets __spec__ to ``spec`` next
            return self.loaded
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if module is self.loaded:
            module.__spec__ = self.loaded_spec
            return
        super().exec_module(module)


def _stop_waiting() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterWhenPeftLoads)]


if "peft" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterWhenPeftLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenPeftLoads())
