"""Perturbed forward passes that prove a layout: the machinery of :func:`peft_alps.heads.check.check_layout`.

:func:`prove` adds noise to one q, k or v row of layer 0 at a time and compares the input of layer 0's output
projection (every head's context vector) with the unperturbed one; :func:`peft_alps.heads.check.check_layout`
explains the rule. Raises LayoutError naming the field to fix (the one-field change that makes every probe pass,
when exactly one does).
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import HeadLayout, LayoutError, linear_frame
from .modules import base_layer, conv1d_names, projection_shapes


class _Captured(Exception):
    """Stops the forward pass once the output projection's input is captured (nothing after it is needed)."""


def prove(model: nn.Module, layout: HeadLayout, where: str) -> tuple[tuple[str, ...], int]:
    """``(coupled parts, perturbed forward passes run)`` of ``layout`` on ``model``; LayoutError if the layout's
    shapes or its head -> rows mapping do not match what ``model`` computes (``where`` names the model). Runs in
    eval mode (dropout would change every head), each module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return _prove(model, layout, where)
    finally:
        for module, training in modes:
            module.training = training


def _prove(model: nn.Module, layout: HeadLayout, where: str) -> tuple[tuple[str, ...], int]:
    probe = _Probe(model)
    config = getattr(model, "config", None)
    try:
        names = layout.check_model(probe.shapes, config, where=where)
    except LayoutError as e:
        raise LayoutError(_diagnosed(probe, layout, str(e))) from None
    problems, coupled, count = probe.run(layout, names)
    if problems:
        raise LayoutError(_diagnosed(probe, layout, f"The layout does not match what {where} computes: "
                                                   f"{'; '.join(problems[:3])}."))
    return tuple(coupled), count


class _Probe:
    """Forward passes of ``model`` up to layer 0's output projection, with one projection row perturbed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.shapes = projection_shapes(model)
        self.called = dict(model.named_modules())  # hooks go on what the forward calls (a PEFT wrapper, if any)
        self.modules = {name: base_layer(m) for name, m in self.called.items()}  # weights: the base layer's
        self.conv1d = conv1d_names(model)
        self.inputs = _inputs(model)
        self._generator = torch.Generator().manual_seed(0)

    def context(self, o_name: str) -> torch.Tensor:
        """The input of module ``o_name`` (every head's context vector) as ``[tokens, features]``."""
        captured = []

        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            captured.append(x.detach().float().reshape(-1, x.shape[-1]).cpu())
            raise _Captured

        handle = self.called[o_name].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(**self.inputs)
        except _Captured:
            pass
        except Exception as e:  # noqa: BLE001 - any model error: say which input we used
            raise LayoutError(f"check_layout could not run {type(self.model).__name__} on {sorted(self.inputs)} "
                              f"({type(e).__name__}: {e}); check the layout on a model that runs on token ids."
                              ) from None
        finally:
            handle.remove()
        if not captured:
            raise LayoutError(f"The forward pass never reached {o_name}, the layout's output projection of layer "
                              f"0: check layout.modules['o'] and layout.layers.")
        return captured[0]

    def changed(self, o_name: str, module: str, row: int, base: torch.Tensor) -> set[int]:
        """Columns of ``o_name``'s input that move when row ``row`` (``nn.Linear`` frame) of ``module`` does."""
        weight = self.modules[module].weight
        rows = linear_frame(weight.data, module in self.conv1d)
        saved = rows[row].clone()
        noise = torch.randn(saved.shape, generator=self._generator) * 4 * (saved.float().std().item() + 1e-2)
        with torch.no_grad():
            rows[row] += noise.to(rows.dtype).to(rows.device)
            try:
                ctx = self.context(o_name)
            finally:
                rows[row] = saved
        diff = (ctx - base).abs().amax(0)
        return set(torch.nonzero(diff > 1e-6 * base.abs().amax().clamp_min(1e-30)).flatten().tolist())

    def run(self, layout: HeadLayout, names: dict) -> tuple[list[str], list[str], int]:
        """``(problems, coupled parts, probes run)`` of ``layout`` (``names``: check_model's module names)."""
        o_name = names[(0, layout.modules["o"])]
        base = self.context(o_name)
        if base.shape[-1] != layout.num_heads * layout.head_dim:
            return [f"{o_name} reads {base.shape[-1]} features, the layout's heads {layout.num_heads} x "
                    f"{layout.head_dim}"], [], 1
        o_cols = {h: set(layout.part_channels("o", h)) for h in range(layout.num_heads)}
        group_size = layout.num_heads // layout.num_kv_heads
        every = set(range(base.shape[-1]))
        problems, coupled, count = [], [], 1
        for part in "qkv":
            module = names[(0, layout.modules[part])]
            units = range(layout.num_heads) if part == "q" else range(0, layout.num_heads, group_size)
            seen_all, seen_own = 0, 0
            for head in units:
                rows = layout.part_channels(part, head)
                readers = [head] if part == "q" else [h for h in range(layout.num_heads)
                                                      if layout.kv_group(h) == layout.kv_group(head)]
                for j in (0, len(rows) - 1):
                    expected = (set().union(*(o_cols[h] for h in readers)) if part != "v" else
                                {layout.part_channels("o", h)[j] for h in readers})
                    got = self.changed(o_name, module, rows[j], base)
                    count += 1
                    if got == expected:
                        seen_own += 1
                    elif got == every and expected < every:
                        seen_all += 1
                    else:
                        problems.append(_observation(layout, part, head, rows[j], readers, expected, got))
            if seen_all and not seen_own and not problems:
                coupled.append(part)
            elif seen_all:
                problems.append(f"some {part} rows change every head and others only their own")
        return problems, coupled, count


def _observation(layout, part, head, row, readers, expected, got) -> str:
    d = layout.head_dim
    heads_hit = sorted({c // d for c in got})
    whose = f"query head {head}" if part == "q" else f"kv group {layout.kv_group(head)} (query heads {readers})"
    return (f"{part} row {row}, which the layout gives to {whose}, changed {len(got)} context columns of heads "
            f"{heads_hit[:8]} (the layout expects {len(expected)} columns of heads "
            f"{sorted({c // d for c in expected})})")


def _inputs(model: nn.Module) -> dict:
    """Two sequences of 8 token ids (no padding id); decoder ids too for an encoder-decoder model."""
    config = model.config
    vocab = int(getattr(config, "vocab_size", None) or 64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (2, 8), generator=g)
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int):
        ids[ids == pad] = (pad + 1) % vocab
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    inputs = {"input_ids": ids.to(device)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.flip(1).to(device)
    return inputs


# ----- naming the wrong field -----
def _variants(layout: HeadLayout, shapes: dict):
    """``(field, value, layout)`` for each one-field change of ``layout`` that fits the model's shapes."""
    fields = layout.to_dict()
    out_in = [s for n, s in shapes.items() if layout.locate(n, "o")]
    choices = {"fused": [f for f in ("blocks", "interleaved") if layout.fused and f != layout.fused],
               "num_kv_heads": [k for k in range(1, layout.num_heads + 1) if layout.num_heads % k == 0],
               "num_heads": [], "head_dim": [], "hidden_size": []}
    for out, inp in out_in[:1]:
        choices["hidden_size"].append(out)
        choices["head_dim"] += [inp // layout.num_heads] if inp % layout.num_heads == 0 else []
        choices["num_heads"] += [inp // layout.head_dim] if inp % layout.head_dim == 0 else []
    for key, values in choices.items():
        for value in dict.fromkeys(values):
            if value == fields[key]:
                continue
            try:
                candidate = HeadLayout.from_dict({**fields, key: value})
                candidate.check_model(shapes)
            except LayoutError:
                continue
            yield key, value, candidate


def _diagnosed(probe: _Probe, layout: HeadLayout, message: str) -> str:
    """``message`` plus the one field whose change makes the layout pass, when exactly one does."""
    fixes = []
    for key, value, candidate in _variants(layout, probe.shapes):
        try:
            names = candidate.check_model(probe.shapes)
            problems, _, _ = probe.run(candidate, names)
        except LayoutError:
            continue
        if not problems:
            fixes.append((key, value))
    if len(fixes) == 1:
        key, value = fixes[0]
        return (f"layout {key}={getattr(layout, key)!r} is wrong: the model computes with {key}={value!r} (with it "
                f"every perturbed row changes exactly its own head). {message}")
    return message
