"""Kinds of head delta: how an adapter's trainable tensors make the update of a projection's selected channels.

The seam, in the spirit of PEFT's ``LoraVariant``: everything that applies an adapter (the layer's forward in
both strategies, ``merge``/``unmerge``, ``get_delta_weight``, the streamed file merge, the LoRA export, GMT and
the model card's counts) works on the *slice update* a kind computes from its tensors, never on the tensors
themselves. A new kind (a low-rank per-head update, a scaled slice, ...) is one :class:`HeadDelta` subclass
and one :func:`register_delta_kind` call; ``HeadMaskConfig(delta_kind=...)`` chooses it.

Frame (``nn.Linear``, ``y = x @ W^T + b``, ``W`` of shape ``[out, in]``), for ``n`` selected channels ``idx``
on ``axis`` (:meth:`~peft_alps.heads.layout.HeadLayout.head_axis`):

* ``axis="out"`` (q/k/v rows): the update ``D`` is ``[n, in]``, the bias update ``[n]`` (biased projections);
* ``axis="in"`` (o columns): ``D`` is ``[out, n]``, no bias update.

The effective weight is ``W`` with ``W[idx] := merged_slice(W[idx], D)`` along the axis (:func:`merged_slice`,
the one merge formula), so merged outputs equal adapter outputs.

A kind's tensors are saved as ``<module>.headmask_<tensor name>`` (:data:`TENSOR_PREFIX`); the layer holds
each in a ``ParameterDict`` attribute of that name.

Two optional hooks, for kinds whose update depends on more than their trainable tensors (the dense kind uses
neither):

* :meth:`HeadDelta.configure`: the kind's own options from the adapter config (a mapping of its fields, or the
  saved ``adapter_config.json``), e.g. a rank; :func:`delta_kind_of` returns the configured kind;
* :attr:`HeadDelta.buffers` and :meth:`HeadDelta.prepare`: tensors computed from the *base* slice when the
  adapter is created or loaded (never saved, never trained; the layer holds them in non-persistent
  ``BufferDict`` attributes ``headmask_<buffer>``). :meth:`HeadDelta.update` gets them beside the tensors.
:meth:`HeadDelta.factors` optionally writes ``D`` as a product of two thin factors (the LoRA export uses it).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

TENSOR_PREFIX = "headmask_"  # layer attributes and saved tensor names: headmask_delta, headmask_bias, ...


def merged_slice(orig: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``orig + delta`` computed in the delta's dtype and rounded to ``orig``'s: the one merge formula."""
    return (orig.to(delta.dtype) + delta).to(orig.dtype)


class HeadDelta:
    """One kind of head delta (see the module docstring). Subclasses set :attr:`name` and :attr:`tensors` and
    implement :meth:`shapes`, :meth:`init` and :meth:`update`; the registered instance holds no state
    (:meth:`configure` returns one that holds the adapter's options)."""

    name: str = ""
    tensors: tuple[str, ...] = ()  # names of the trainable tensors (a subset may be absent, e.g. a bias)
    buffers: tuple[str, ...] = ()  # names of the tensors prepare() computes from the base slice (not saved)

    def configure(self, options: Mapping) -> "HeadDelta":
        """The kind set up with the adapter config's ``options`` (its fields as a mapping); ValueError naming a
        bad option. Default: the kind has no options."""
        return self

    def prepare(self, base_slice: torch.Tensor, axis: str) -> dict[str, torch.Tensor]:
        """Buffers computed from the base slice ``W[idx]`` (``[n, in]`` rows or ``[out, n]`` columns, the
        ``nn.Linear`` frame, the base's dtype and device), deterministically: the same base gives the same
        buffers bit for bit. Default: none."""
        return {}

    def factors(self, tensors: Mapping[str, torch.Tensor], axis: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(L, R)`` with ``L @ R == D`` (``L [n, k]``, ``R [k, in]`` for rows; ``L [out, k]``, ``R [k, n]`` for
        columns) when ``D`` has a rank ``k`` below the slice's, else None (the export then uses ``D`` itself)."""
        return None

    @staticmethod
    def shapes(n: int, axis: str, out_features: int, in_features: int, bias: bool) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors of one projection: ``n`` channels on ``axis``; ``bias``: the slice has a bias part
        (rows, ``axis="out"``, of a projection with a bias; never for columns)."""
        raise NotImplementedError

    @staticmethod
    def init(shapes: Mapping[str, tuple[int, ...]], init_weights: bool) -> dict[str, torch.Tensor]:
        """Initial values (float32). ``init_weights=True``: the update is exactly zero (the model is unchanged)."""
        raise NotImplementedError

    @staticmethod
    def update(tensors: Mapping[str, torch.Tensor], axis: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(D, bias update or None)`` from the tensors, differentiably (gradients flow back to them)."""
        raise NotImplementedError


class DenseSlice(HeadDelta):
    """Every entry of the selected slices is trainable: ``D`` is the ``delta`` tensor itself (ALPS)."""

    name = "dense"
    tensors = ("delta", "bias")

    @staticmethod
    def shapes(n, axis, out_features, in_features, bias):
        if axis == "out":
            return {"delta": (n, in_features), **({"bias": (n,)} if bias else {})}
        return {"delta": (out_features, n)}

    @staticmethod
    def init(shapes, init_weights):
        make = torch.zeros if init_weights else (lambda *s: torch.randn(*s) * 0.02)
        return {name: make(*shape) for name, shape in shapes.items()}

    @staticmethod
    def update(tensors, axis):
        return tensors["delta"], tensors.get("bias")


class KasaDelta(HeadDelta):
    """KaSA (knowledge-aware singular-value adaptation, arXiv 2412.06071) inside each selected head, non-destructive.

    Per head unit (the ``u = head_dim`` consecutive channels of one head, or kv group, in one part; ``H`` units in
    the slice, ``n = H * u``), with the unit's base slice ``W_h`` (``[u, in]`` rows, ``[out, u]`` columns):

    ``D_h = dU_h diag(dsigma_h) dV_h^T - U_t diag(s_t) V_t^T``

    * ``dU`` ``[H, u, r]`` (rows) / ``[H, out, r]`` (columns), zero at init (PEFT's ``lora_B``); ``dV``
      ``[H, in, r]`` / ``[H, u, r]``, uniform in ``+-1/sqrt(fan_in)`` (PEFT's default ``lora_A``); ``dsigma``
      ``[H, r]``, standard normal (PEFT's ``lora_diag``): the trainable part is zero at init, as in PEFT;
    * the second term drops the ``r_t`` smallest singular components of the base slice ``W_h`` (the paper's
      knowledge-based truncation): it is a buffer pair ``trunc_U = U_t diag(s_t)`` ``[H, u|out, r_t]`` and
      ``trunc_V = V_t`` ``[H, in|u, r_t]`` computed by :meth:`prepare` from the base (float64 SVD on the CPU,
      stored as float32), never saved and never written into the base. ``U_t diag(s_t) V_t^T`` does not depend on
      the sign of the singular vectors; it is ambiguous only if ``s`` has a tie across the cut (then any base
      of the tied subspace is a valid truncation; the same base still gives the same term).

    Options (``HeadMaskConfig``): ``kasa_rank`` (r), ``kasa_truncate`` (r_t; 0, the default: no truncation;
    None: r, as the paper and PEFT); ``layout`` (for ``head_dim``). No bias update.
    """

    name = "kasa"
    tensors = ("dU", "dsigma", "dV")
    buffers = ("trunc_U", "trunc_V")

    def __init__(self, rank: Optional[int] = None, truncate: Optional[int] = None, unit: Optional[int] = None):
        self.rank, self.truncate, self.unit = rank, truncate, unit
        if truncate == 0:  # configured without truncation: no buffers (the registered instance names them)
            self.buffers = ()

    def configure(self, options):
        rank, truncate = options.get("kasa_rank", 8), options.get("kasa_truncate", 0)
        truncate = rank if truncate is None else truncate
        ok = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
        if not ok(rank, 1) or not ok(truncate, 0):
            raise ValueError(f"delta_kind='kasa' needs kasa_rank an int >= 1 and kasa_truncate None (= kasa_rank) "
                             f"or an int >= 0, got kasa_rank={rank!r}, kasa_truncate={truncate!r}.")
        layout = options.get("layout")
        unit = (layout.get("head_dim") if isinstance(layout, Mapping) else getattr(layout, "head_dim", None))
        if unit is not None and truncate >= unit:
            raise ValueError(f"kasa_truncate={truncate} would drop every singular component of a head slice (a head "
                             f"has {unit} channels): use kasa_truncate < {unit} (0 disables the truncation).")
        return KasaDelta(rank, truncate, unit)

    def _dims(self, n, axis, out_features, in_features):
        if self.rank is None or self.unit is None:
            raise ValueError("The kasa delta kind needs its options: use delta_kind_of(config) (a config with "
                             "kasa_rank and a layout).")
        if n % self.unit:
            raise ValueError(f"A kasa slice holds whole heads: {n} channels is not a multiple of head_dim "
                             f"{self.unit}.")
        heads = n // self.unit
        return (heads, self.unit, in_features) if axis == "out" else (heads, out_features, self.unit)

    def shapes(self, n, axis, out_features, in_features, bias):
        heads, rows, cols = self._dims(n, axis, out_features, in_features)
        return {"dU": (heads, rows, self.rank), "dsigma": (heads, self.rank), "dV": (heads, cols, self.rank)}

    @staticmethod
    def init(shapes, init_weights):
        dv = shapes["dV"]
        bound = 1 / math.sqrt(dv[1])  # PEFT's kaiming_uniform_(a=sqrt(5)) of lora_A [r, fan_in]
        values = {"dU": torch.zeros(shapes["dU"]), "dsigma": torch.randn(shapes["dsigma"]),
                  "dV": torch.empty(dv).uniform_(-bound, bound)}
        if not init_weights:  # tests: a non-zero trainable part
            values["dU"] = 0.1 * torch.randn(shapes["dU"])
        return values

    @staticmethod
    def blocks(base_slice: torch.Tensor, axis: str, unit: int) -> torch.Tensor:
        """The slice as its head units: ``[H, u, in]`` (rows) / ``[H, out, u]`` (columns); :meth:`join` inverts."""
        if axis == "out":
            return base_slice.reshape(-1, unit, base_slice.shape[1])
        return base_slice.reshape(base_slice.shape[0], -1, unit).transpose(0, 1)

    @staticmethod
    def join(blocks: torch.Tensor, axis: str) -> torch.Tensor:
        """``[H, rows, cols]`` head-unit blocks -> the slice ``[n, in]`` / ``[out, n]``."""
        if axis == "out":
            return blocks.reshape(-1, blocks.shape[-1])
        return blocks.transpose(0, 1).reshape(blocks.shape[1], -1)

    def prepare(self, base_slice, axis):
        if not self.truncate:
            return {}
        if base_slice.device.type == "meta" or not base_slice.is_floating_point():
            raise ValueError(f"KaSA's truncation is computed from the base weights, but the base slice is "
                             f"{base_slice.dtype} on {base_slice.device}: load real floating-point base weights "
                             f"first (or kasa_truncate=0).")
        blocks = self.blocks(base_slice.detach().to("cpu", torch.float64), axis, self.unit)
        u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
        k = s.shape[-1]
        if self.truncate >= k:
            raise ValueError(f"kasa_truncate={self.truncate} must be below the rank bound {k} of a head slice.")
        keep = k - self.truncate
        trunc_u = u[..., keep:] * s[:, None, keep:]
        trunc_v = vh[:, keep:, :].transpose(1, 2)
        return {"trunc_U": trunc_u.to(base_slice.device, torch.float32).contiguous(),
                "trunc_V": trunc_v.to(base_slice.device, torch.float32).contiguous()}

    @staticmethod
    def _pair(tensors):
        """``(P, Q)`` ``[H, rows, k]``, ``[H, cols, k]`` with ``D_h = P_h Q_h^T`` (``k = r + r_t``)."""
        p, q = tensors["dU"] * tensors["dsigma"][:, None, :], tensors["dV"]
        if "trunc_U" in tensors:
            p = torch.cat([p, -tensors["trunc_U"].to(p.dtype)], -1)
            q = torch.cat([q, tensors["trunc_V"].to(q.dtype)], -1)
        return p, q

    def update(self, tensors, axis):
        p, q = self._pair(tensors)
        return self.join(p @ q.transpose(1, 2), axis), None

    def factors(self, tensors, axis):
        p, q = self._pair(tensors)
        if axis == "out":  # block-diagonal left factor: head h's rows read only its own k columns
            return torch.block_diag(*p), torch.cat(list(q.transpose(1, 2)), 0)
        return torch.cat(list(p), 1), torch.block_diag(*q.transpose(1, 2))

    @staticmethod
    def regularization(tensors: Mapping[str, torch.Tensor], beta: float, gamma: float) -> torch.Tensor:
        """The paper's (and PEFT's ``_get_kasa_loss``) regulariser, per head unit, summed (float32):
        ``beta * ||dsigma||^2 + gamma * (||dU^T dU - I||_F + ||dV^T dV - I||_F)``."""
        s, du, dv = (tensors[t].float() for t in ("dsigma", "dU", "dV"))
        eye = torch.eye(s.shape[-1], device=s.device)
        ortho = torch.linalg.matrix_norm(du.transpose(1, 2) @ du - eye) + \
            torch.linalg.matrix_norm(dv.transpose(1, 2) @ dv - eye)
        return beta * (s ** 2).sum() + gamma * ortho.sum()


DELTA_KINDS: dict[str, HeadDelta] = {}


def register_delta_kind(kind: HeadDelta) -> HeadDelta:
    """Make ``kind`` available as ``HeadMaskConfig(delta_kind=kind.name)``; returns it."""
    if not isinstance(kind, HeadDelta) or not kind.name or not kind.tensors:
        raise TypeError(f"register_delta_kind takes a HeadDelta instance with a name and tensors, got {kind!r}.")
    DELTA_KINDS[kind.name] = kind
    return kind


def delta_kind(name: str) -> HeadDelta:
    """The registered kind called ``name``; ValueError listing the known ones otherwise."""
    if name not in DELTA_KINDS:
        raise ValueError(f"delta_kind must be one of {sorted(DELTA_KINDS)}, got {name!r}.")
    return DELTA_KINDS[name]


def delta_kind_of(config) -> HeadDelta:
    """The kind ``config`` chooses, configured by it: ``config`` is a ``HeadMaskConfig`` or an adapter config
    dict (``adapter_config.json``); a missing ``delta_kind`` is ``"dense"``."""
    options = config if isinstance(config, Mapping) else vars(config)
    return delta_kind(options.get("delta_kind") or "dense").configure(options)


register_delta_kind(DenseSlice())
register_delta_kind(KasaDelta())
