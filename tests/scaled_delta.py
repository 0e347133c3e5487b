"""A second delta kind, for tests only: the dense slice scaled per selected channel.

``D = delta * scale`` (``scale`` ``[n]`` broadcast along the head axis) and ``bias update = bias * scale``.
It exists to prove the seam: it is this module plus the one ``register_delta_kind`` call below, and the shared
contract tests in test_delta_kinds.py run it exactly like the built-in dense kind.
"""

import torch

from peft_alps import HeadDelta, register_delta_kind


class ScaledSlice(HeadDelta):
    name = "scaled_test"
    tensors = ("delta", "scale", "bias")

    @staticmethod
    def shapes(n, axis, out_features, in_features, bias):
        delta = (n, in_features) if axis == "out" else (out_features, n)
        return {"delta": delta, "scale": (n,), **({"bias": (n,)} if bias else {})}

    @staticmethod
    def init(shapes, init_weights):
        def make(name, shape):
            if name == "scale":
                return torch.ones(shape) if init_weights else 1 + 0.5 * torch.randn(shape)
            return torch.zeros(shape) if init_weights else 0.02 * torch.randn(shape)

        return {name: make(name, shape) for name, shape in shapes.items()}

    @staticmethod
    def update(tensors, axis):
        scale = tensors["scale"]
        delta = tensors["delta"] * (scale[:, None] if axis == "out" else scale[None, :])
        bias = tensors.get("bias")
        return delta, None if bias is None else bias * scale


register_delta_kind(ScaledSlice())
