"""Gradient head scores (GMT / Michel et al. 2019 head importance from calibration batches).

The reference is independent of peft_alps' layout code: a copy of the model with every parameter
requiring grad, a full backward per batch, and each head's entries sliced with conftest's ``head_mask``.
"""

import copy
import warnings

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

import peft_alps
from peft_alps import HeadMaskConfig, HeadScores, select_heads
from peft_alps.scoring.gradient_scores import KINDS, gradient_head_scores

from test_localize import BIOGPT_LAYOUT, make_biogpt, wrong_layouts

from conftest import block_module, head_mask, linear_frame, make_inputs, make_model

ENCODERS = ("bert", "roberta")
ALL = ("q", "k", "v", "o")
PART_SETS = [("q", "k", "v"), ALL, ("k", "o")]
LAYER, HEAD = 1, 3  # planted head; under GQA (4 heads, 2 kv groups) heads 2 and 3 share a kv group


def encoder_loss(model, batch):
    return model(**batch).last_hidden_state.pow(2).mean()


def make_batches(arch, n=3):
    batches = []
    for i in range(n):
        inputs = make_inputs(seed=10 + i)
        batches.append(inputs if arch in ENCODERS else {**inputs, "labels": inputs["input_ids"]})
    return batches


def loss_fn_for(arch):
    return encoder_loss if arch in ENCODERS else None


def reduce(kind, g, w):
    g, w = g.double(), w.double()
    return {"grad": g.abs(), "grad_x_weight": (g * w).abs(), "fisher": g * g}[kind].sum()


def reference_grads(model, arch, batches):
    """Per batch ``{(layer, part): (grad, weight)}`` in the nn.Linear frame, from a full backward of a copy."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(True)
    out = []
    for batch in batches:
        ref.zero_grad(set_to_none=True)
        loss = encoder_loss(ref, batch) if arch in ENCODERS else ref(**batch).loss
        loss.backward()
        grads = {}
        for layer in range(ref.config.num_hidden_layers):
            for part in ALL:
                mod = block_module(ref, arch, layer, part)
                grads[layer, part] = (linear_frame(mod.weight.grad, mod).clone(), linear_frame(mod.weight, mod).detach())
        out.append(grads)
    return out


def reference_scores(grads, arch, config, kind, parts):
    scores = torch.zeros(config.num_hidden_layers, config.num_attention_heads, dtype=torch.float64)
    for batch in grads:
        for (layer, part), (g, w) in batch.items():
            if part in parts:
                for head in range(config.num_attention_heads):
                    m = head_mask(arch, part, head, g.shape[0], g.shape[1], config)
                    scores[layer, head] += reduce(kind, g[m], w[m])
    return scores


def attention_weights(model, arch, parts=ALL):
    """``{name: weight}`` of the attention projections of ``parts`` (found with conftest, deduplicated)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for layer in range(model.config.num_hidden_layers):
        for part in parts:
            w = block_module(model, arch, layer, part).weight
            out[names[id(w)]] = w
    return out


# ----- 1. equals a direct computation -----
def test_scores_equal_direct_computation(arch):
    model = make_model(arch)
    batches = make_batches(arch)
    grads = reference_grads(model, arch, batches)
    for parts in PART_SETS:
        for kind in KINDS:
            got = gradient_head_scores(model, batches, kind, parts, loss_fn=loss_fn_for(arch))
            want = reference_scores(grads, arch, model.config, kind, parts)
            assert got.scores.dtype == torch.float32 and got.scores.shape == (3, 4)
            assert (want > 0).all()
            torch.testing.assert_close(got.scores.double(), want, rtol=1e-5, atol=0, msg=f"{kind} {parts}")
            assert (got.metric, got.representation, got.tau) == (kind, "gradient", None)
            assert got.sources == {"model": type(model).__name__, "batches": 3, "parts": list(parts)}
            assert got.layout == peft_alps.HeadLayout.from_model_config(model.config).to_dict()


def test_half_precision_model_matches_its_own_gradients():
    model = make_model("qwen2", dtype=torch.bfloat16)
    batches = make_batches("qwen2", 2)
    grads = reference_grads(model, "qwen2", batches)
    for kind in KINDS:
        got = gradient_head_scores(model, batches, kind, ALL).scores
        want = reference_scores(grads, "qwen2", model.config, kind, ALL)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


# ----- 2. planted signal -----
def planted_llama():
    """Tiny GQA llama whose attention output is zero except head HEAD of layer LAYER (o_proj columns)."""
    model = make_model("llama")
    with torch.no_grad():
        for layer in range(3):
            w = block_module(model, "llama", layer, "o").weight
            for head in range(4):
                if (layer, head) != (LAYER, HEAD):
                    w[head_mask("llama", "o", head, w.shape[0], w.shape[1], model.config)] = 0
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_planted_head_ranks_first(kind):
    model = planted_llama()
    batches = make_batches("llama", 2)
    s = gradient_head_scores(model, batches, kind).scores
    assert HeadScores(s, kind, "gradient", None, {}).top(1)[0][:2] == (LAYER, HEAD)
    assert (s[[0, 2]] == 0).all()  # layers whose heads cannot reach the loss
    mate = 2  # HEAD's kv-group mate: non-zero only through the shared k/v rows
    assert s[LAYER, 0] == 0 and s[LAYER, 1] == 0
    assert 0 < s[LAYER, mate] < s[LAYER, HEAD]
    # k/v only: the group's query heads get exactly the same amount
    kv = gradient_head_scores(model, batches, kind, ("k", "v")).scores
    assert kv[LAYER, mate] == kv[LAYER, HEAD] > 0
    assert (kv[[0, 2]] == 0).all() and kv[LAYER, 0] == kv[LAYER, 1] == 0
    # o only: the gradient w.r.t. zeroed o columns is not zero (their head's context is), their weight is
    o = gradient_head_scores(model, batches, kind, ("o",)).scores
    assert ((o == 0).sum() == 11) if kind == "grad_x_weight" else (o > 0).all()


# ----- 3. memory and restoration -----
def test_one_gradient_at_a_time_and_model_restored():
    arch = "gpt2"  # Conv1D weights, fused c_attn, dropout 0.1 (scores must be computed in eval mode)
    model = make_model(arch)
    batches = make_batches(arch)
    want = reference_scores(reference_grads(model, arch, batches), arch, model.config, "fisher", ALL)

    model.train()
    model.transformer.h[0].eval()  # mixed modes must come back per module
    modes = {n: m.training for n, m in model.named_modules()}
    model.transformer.wte.weight.requires_grad_(False)
    frozen_attn = block_module(model, arch, 2, "o").weight
    frozen_attn.requires_grad_(False)  # frozen attention weights are scored all the same
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attn = attention_weights(model, arch)
    pre_attn_name = next(n for n in attn if ".1.attn.c_attn" in n)
    pre_attn = torch.full_like(attn[pre_attn_name], 7.0)
    attn[pre_attn_name].grad = pre_attn
    other_name = "transformer.h.0.mlp.c_fc.weight"
    other = dict(model.named_parameters())[other_name]
    pre_other = torch.full_like(other, 3.0)
    other.grad = pre_other

    seen, states = [], []

    def check(param):  # registered before gradient_head_scores' hooks, so it runs first
        alive = {n for n, p in model.named_parameters() if p.grad is not None} - {other_name}
        seen.append((next(n for n, w in attn.items() if w is param), alive))

    def during_forward(module, args):
        states.append(({n for n, p in model.named_parameters() if p.requires_grad},
                       any(m.training for m in model.modules()), torch.is_grad_enabled()))

    handles = [w.register_post_accumulate_grad_hook(check) for w in attn.values() if w.requires_grad]
    handles.append(model.register_forward_pre_hook(during_forward))
    try:
        with torch.no_grad():  # the scorer turns gradients on itself
            got = gradient_head_scores(model, batches, "fisher", ALL).scores
    finally:
        for h in handles:
            h.remove()

    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)  # dropout was off
    # every attention weight's gradient was seen alone: the previous one had been freed
    assert len(seen) == len(batches) * (len(attn) - 1)
    assert all(alive == {name} for name, alive in seen), seen[:3]
    assert states == [(set(attn), False, True)] * len(batches)  # only attention weights, eval mode
    # restored: flags, modes, pre-existing gradients (same tensors, same values), nothing else has a grad
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert attn[pre_attn_name].grad is pre_attn and (pre_attn == 7).all()
    assert other.grad is pre_other and (pre_other == 3).all()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in (pre_attn_name, other_name))
    # no hook left behind: a normal backward keeps its gradients
    model.zero_grad(set_to_none=True)
    model(**batches[0]).loss.backward()
    assert all(w.grad is not None for w in attn.values() if w.requires_grad)


def test_model_restored_when_the_loss_raises():
    model = make_model("llama")
    model.train()
    model.get_output_embeddings().weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = []

    def failing_loss(m, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return m(**batch).loss

    with pytest.raises(RuntimeError, match="boom"):
        gradient_head_scores(model, make_batches("llama"), loss_fn=failing_loss)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    model(**make_batches("llama", 1)[0]).loss.backward()  # hooks were removed
    assert block_module(model, "llama", 0, "q").weight.grad is not None


# ----- 4. errors -----
def test_errors():
    model = make_model("llama")
    batches = make_batches("llama", 1)
    for kwargs, match in [({"kind": "abs"}, "kind must be one of"), ({"parts": ()}, "parts is empty"),
                          ({"parts": ("q", "x")}, r"Unknown part\(s\) \['x'\]"), ({"parts": "qkv"}, "string")]:
        with pytest.raises(ValueError, match=match):
            gradient_head_scores(model, batches, **kwargs)
    with pytest.raises(ValueError, match="batches is empty"):
        gradient_head_scores(model, [])
    with pytest.raises(ValueError, match="returned no loss"):
        gradient_head_scores(model, [make_inputs()])  # no labels
    with pytest.raises(ValueError, match="returned no loss"):
        gradient_head_scores(make_model("bert"), [make_inputs()])  # encoder output has no loss field
    with pytest.raises(ValueError, match="scalar"):
        gradient_head_scores(model, batches, loss_fn=lambda m, b: m(**b).logits)
    with pytest.raises(ValueError, match="does not depend"):
        gradient_head_scores(model, batches, loss_fn=lambda m, b: m(**b).loss.detach())
    with pytest.raises(peft_alps.LayoutError):
        gradient_head_scores(_NoLayout(), batches)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


class _NoLayout(torch.nn.Module):
    class config:  # noqa: N801
        model_type = "unknown"


def test_layers_without_gradient_warn_and_score_zero():
    model = make_model("llama")

    def early(m, batch):  # hidden_states[1] is layer 0's output: layers 1 and 2 get no gradient
        return m(**batch, output_hidden_states=True).hidden_states[1].pow(2).mean()

    with pytest.warns(UserWarning, match="received no gradient"):
        s = gradient_head_scores(model, make_batches("llama", 1), loss_fn=early).scores
    assert (s[0] > 0).all() and (s[1:] == 0).all()


# ----- PEFT models -----
def test_peft_models():
    base = make_model("llama")
    batches = make_batches("llama", 2)
    want = gradient_head_scores(base, batches, "grad_x_weight", ALL).scores
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.testing.assert_close(gradient_head_scores(lora, batches, "grad_x_weight", ALL).scores, want,
                               rtol=1e-5, atol=0)
    assert [n for n, p in lora.named_parameters() if p.requires_grad] and all(
        ("lora_" in n) == p.requires_grad for n, p in lora.named_parameters())  # flags restored
    add = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads={LAYER: [HEAD]}, forward_strategy="output_add"))
    torch.testing.assert_close(gradient_head_scores(add, batches, "grad_x_weight", ALL).scores, want,
                               rtol=1e-5, atol=0)
    merged = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads={LAYER: [HEAD]}))
    with pytest.raises(RuntimeError, match="no gradient reached the base weights of PEFT layers"):
        gradient_head_scores(merged, batches)


# ----- 5. plugs into selection, config, save / load -----
def test_selection_config_and_round_trip(tmp_path, capsys):
    model = planted_llama()
    s = gradient_head_scores(model, make_batches("llama", 2), "grad_x_weight", progress=True)
    assert "Gradient head scores" in capsys.readouterr().err
    heads = select_heads(s, 0.1)  # ceil(0.1 * 12) = 2 heads: the planted head and its kv-group mate
    assert heads == {LAYER: [2, HEAD]}
    assert select_heads(s, 0.25, per_layer=True)[LAYER] == [HEAD]
    peft = get_peft_model(copy.deepcopy(model), HeadMaskConfig(heads=heads))
    assert sum(p.numel() for p in peft.parameters() if p.requires_grad) > 0
    s.save(tmp_path / "scores.json")
    t = HeadScores.load(tmp_path / "scores.json")
    assert torch.equal(t.scores, s.scores)
    assert (t.metric, t.representation, t.tau, t.layout, t.sources) == (
        "grad_x_weight", "gradient", None, s.layout, {"model": "LlamaForCausalLM", "batches": 2,
                                                      "parts": ["q", "k", "v"]})
    assert select_heads(t, 0.1) == heads


def test_sources_count_generator_batches():
    model = make_model("gpt_neox")
    batches = make_batches("gpt_neox", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = gradient_head_scores(model, (b for b in batches))
    assert s.sources["batches"] == 2
    assert torch.equal(s.scores, gradient_head_scores(model, batches).scores)


# ----- 6. custom layout (an architecture peft_alps has no built-in layout for) -----
def biogpt_batches(n=2):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": ids, "labels": ids} for ids in (torch.randint(2, 128, (2, 12), generator=g)
                                                          for _ in range(n))]


def test_custom_layout_scores_an_unknown_architecture():
    model = make_biogpt()
    assert isinstance(model.config, tf.BioGptConfig)
    batches = biogpt_batches()
    with pytest.warns(UserWarning, match="inferred"):
        inferred = gradient_head_scores(model, batches, "grad")
    # independent reference: plain autograd on a copy, sum of |grad| over each head's q/k/v rows, per batch
    ref = copy.deepcopy(model).eval()
    want = torch.zeros(2, 4, dtype=torch.float64)
    for batch in batches:
        ref.zero_grad(set_to_none=True)
        ref(**batch).loss.backward()
        for layer in range(2):
            attn = ref.biogpt.layers[layer].self_attn
            for head in range(4):
                want[layer, head] += sum(m.weight.grad[head * 16:(head + 1) * 16].double().abs().sum()
                                         for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    for layout in (BIOGPT_LAYOUT, peft_alps.HeadLayout.from_dict(BIOGPT_LAYOUT)):
        got = gradient_head_scores(model, batches, "grad", layout=layout)
        torch.testing.assert_close(got.scores.double(), want, rtol=1e-5, atol=0)
        assert got.layout == peft_alps.HeadLayout.from_dict(BIOGPT_LAYOUT).to_dict()
    assert torch.equal(inferred.scores, got.scores) and inferred.layout == got.layout
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_wrong_custom_layout_raises_before_touching_the_model():
    model = make_biogpt()
    model.get_output_embeddings().weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for layout, match in wrong_layouts():
        with pytest.raises(peft_alps.LayoutError, match=match):
            gradient_head_scores(model, biogpt_batches(1), layout=layout)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_layout_given_for_a_known_architecture_must_agree():
    model = make_model("llama")
    batches = make_batches("llama", 1)
    derived = peft_alps.HeadLayout.from_model_config(model.config)
    assert torch.equal(gradient_head_scores(model, batches, layout=derived).scores,
                       gradient_head_scores(model, batches).scores)
    with pytest.raises(peft_alps.LayoutError, match="does not match.*num_heads"):
        gradient_head_scores(model, batches, layout={**derived.to_dict(), "num_heads": 8, "head_dim": 8})
    # PEFT-wrapped model of an unknown architecture: the layout finds the base layers
    lora = get_peft_model(make_biogpt(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    got = gradient_head_scores(lora, biogpt_batches(), layout=BIOGPT_LAYOUT)
    torch.testing.assert_close(got.scores, gradient_head_scores(make_biogpt(), biogpt_batches(), layout=BIOGPT_LAYOUT).scores,
                               rtol=1e-5, atol=0)
