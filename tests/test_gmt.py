"""GMT (grad_mask_ratio): the smallest gradients of each head-slice tensor are zeroed once per optimizer step."""

import copy
import gc
import json
import math
import weakref

import pytest
import torch
import transformers as tf
from conftest import make_inputs, make_model
from peft import PeftModel, get_peft_model

from peft_alps import HeadMaskConfig
from peft_alps.tuner import gmt
from peft_alps.tuner.gmt import mask_small_gradients_
from peft_alps.tuner.layer import HeadMaskLayer

HEADS = {0: [1], 2: [0, 3]}
ALL_PARTS = ["q", "k", "v", "o"]


def gmt_model(arch="llama", ratio=0.5, **kw):
    return get_peft_model(make_model(arch), HeadMaskConfig(heads=HEADS, parts=ALL_PARTS, grad_mask_ratio=ratio, **kw))


def slice_params(model):
    """{name: param} of the trainable head-slice tensors (deltas and bias slices)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "headmask_" in n}


def backward(model, seed=1, batch=2):
    ids = make_inputs(seed, batch=batch)["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()


def capture_step_grads(opt, params):
    """Record ``{name: grad clone}`` right before ``opt`` applies them (instance pre-hooks run after global ones)."""
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append({n: p.grad.clone() for n, p in params.items()}))
    return seen


def grads(params):
    return {n: p.grad.clone() for n, p in params.items()}


def assert_masked(masked, unmasked, ratio):
    """``masked`` is ``unmasked`` with exactly floor(ratio * numel) smallest-|g| entries zeroed."""
    k = math.floor(ratio * unmasked.numel())
    assert (unmasked == 0).sum() < k  # otherwise counting zeros would prove nothing (exact zeros are smallest)
    zeroed = masked == 0
    assert zeroed.sum().item() == k
    assert torch.equal(masked[~zeroed], unmasked[~zeroed])  # kept entries untouched
    kth = unmasked.abs().flatten().sort().values[k - 1]  # independent: the k-th smallest |g|
    assert (unmasked.abs()[zeroed] <= kth).all() and (unmasked.abs()[~zeroed] >= kth).all()


# ----- the masking function -----

def test_mask_small_gradients_exact_count_with_ties_and_strides():
    g = torch.tensor([[3.0, -1.0, 2.0], [-0.5, 4.0, 0.1]])
    mask_small_gradients_(g, 0.5)
    assert torch.equal(g, torch.tensor([[3.0, 0.0, 2.0], [0.0, 4.0, 0.0]]))
    ties = torch.ones(10, 7)
    mask_small_gradients_(ties, 0.3)  # floor(0.3 * 70) = 21, all |g| equal
    assert (ties == 0).sum() == 21 and (ties == 1).sum() == 49
    base = torch.randn(64, 48)
    t = base.t()  # non-contiguous: masking must write through to the storage
    assert not t.is_contiguous()
    ref = t.clone()
    mask_small_gradients_(t, 0.75)
    assert_masked(t, ref, 0.75)
    assert (base == 0).sum() == math.floor(0.75 * base.numel())
    tiny = torch.randn(3)
    assert torch.equal(mask_small_gradients_(tiny.clone(), 0.3), tiny)  # floor(0.9) = 0: unchanged


# ----- inside a training step -----

@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "phi3"])  # bias slices (qwen2, gpt2), fused qkv (gpt2, phi3)
@pytest.mark.parametrize("ratio", [0.1, 0.37, 0.9])
def test_step_sees_exactly_the_smallest_gradients_zeroed(arch, ratio):
    pm = gmt_model(arch, ratio)
    params = slice_params(pm)
    if arch in ("qwen2", "gpt2"):
        assert any("headmask_bias" in n for n in params)
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    seen = capture_step_grads(opt, params)
    backward(pm)
    unmasked = grads(params)
    opt.step()
    assert len(seen) == 1
    for name, g in unmasked.items():
        assert_masked(seen[0][name], g, ratio)


def test_gradient_accumulation_masks_the_accumulated_gradient_once():
    ratio = 0.5
    acc, full = gmt_model(ratio=ratio), gmt_model(ratio=ratio)
    acc_params, full_params = slice_params(acc), slice_params(full)
    acc_opt = torch.optim.AdamW(acc_params.values(), lr=1e-2)
    full_opt = torch.optim.AdamW(full_params.values(), lr=1e-2)
    seen = capture_step_grads(acc_opt, acc_params)
    for step in range(2):
        ids = make_inputs(seed=10 + step, batch=4)["input_ids"]
        for half in (ids[:2], ids[2:]):
            (acc(input_ids=half, labels=half).loss / 2).backward()
            # the backward pass masks nothing: every accumulated gradient entry is still non-zero
            assert all((p.grad != 0).all() for p in acc_params.values())
        accumulated = grads(acc_params)
        acc_opt.step()
        acc_opt.zero_grad()
        full(input_ids=ids, labels=ids).loss.backward()
        full_opt.step()
        full_opt.zero_grad()
        for name, g in accumulated.items():
            assert_masked(seen[step][name], g, ratio)  # masked once, on the sum of both micro-batches
    for name, p in acc_params.items():
        torch.testing.assert_close(p, full_params[name], rtol=0, atol=1e-6)
        assert (p != 0).any()


def train_steps(model, steps=3):
    params = slice_params(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        backward(model, seed=step)
        opt.step()
        opt.zero_grad()
    return params


def test_ratio_zero_is_bit_identical_to_plain_training():
    masked = gmt_model(ratio=0.5)  # alive during the test: the global hook is installed and active
    plain = get_peft_model(make_model("llama"), HeadMaskConfig(heads=HEADS, parts=ALL_PARTS))
    zero = gmt_model(ratio=0.0)
    assert gmt._HOOK is not None
    layers = [m for m in zero.modules() if isinstance(m, HeadMaskLayer)]
    assert layers and not any(m in gmt._LAYERS for m in layers)  # r = 0: not tracked at all
    plain_p, zero_p, masked_p = train_steps(plain), train_steps(zero), train_steps(masked)
    assert all(torch.equal(zero_p[n], plain_p[n]) for n in plain_p)
    assert all(not torch.allclose(masked_p[n], plain_p[n]) for n in plain_p)  # the comparison can fail


def test_only_tensors_of_the_stepped_optimizer_are_masked():
    pm = gmt_model(ratio=0.5)
    params = slice_params(pm)
    names = sorted(params)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    opt1 = torch.optim.SGD([params[n] for n in first], lr=0.1)
    opt2 = torch.optim.SGD([params[n] for n in second], lr=0.1)
    backward(pm)
    unmasked = grads(params)
    opt1.step()
    for n in second:
        assert torch.equal(params[n].grad, unmasked[n])
    for n in first:
        assert_masked(params[n].grad, unmasked[n], 0.5)
    opt2.step()
    for n in second:
        assert_masked(params[n].grad, unmasked[n], 0.5)


def test_registry_is_weak_and_deep_copies_are_tracked():
    pm = gmt_model(ratio=0.5)
    clone = copy.deepcopy(pm)
    params = slice_params(clone)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    backward(clone)
    unmasked = grads(params)
    opt.step()
    for n, g in unmasked.items():
        assert_masked(params[n].grad, g, 0.5)
    refs = [weakref.ref(m) for m in pm.modules() if isinstance(m, HeadMaskLayer)]
    del pm
    gc.collect()
    assert refs and all(r() is None for r in refs)


def test_ratio_is_per_adapter():
    pm = gmt_model(ratio=0.5)
    pm.add_adapter("plain", HeadMaskConfig(heads=HEADS, parts=ALL_PARTS))
    for adapter, ratio in (("plain", 0.0), ("default", 0.5)):
        pm.set_adapter(adapter)
        params = slice_params(pm)
        assert all(f".{adapter}" in n for n in params)
        opt = torch.optim.SGD(params.values(), lr=0.1)
        backward(pm)
        unmasked = grads(params)
        opt.step()
        for n, g in unmasked.items():
            if ratio:
                assert_masked(params[n].grad, g, ratio)
            else:
                assert torch.equal(params[n].grad, g)
        opt.zero_grad(set_to_none=True)


# ----- transformers Trainer -----

class GradZeros(tf.TrainerCallback):
    """Counts zero gradient entries of the head slices after clipping, before ``optimizer.step``."""

    def __init__(self, params):
        self.params, self.zeros = params, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.zeros.append({n: (p.grad == 0).sum().item() for n, p in self.params.items()})


def test_trainer_with_gradient_accumulation_masks_each_step_and_lowers_loss(tmp_path):
    ratio = 0.5
    pm = gmt_model(ratio=ratio)
    pm.config.use_cache = False
    params = slice_params(pm)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(2, 128, (16,), generator=g) for _ in range(4)]
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in sequences * 16]
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=3e-2,
                                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    callback = GradZeros(params)
    trainer = tf.Trainer(model=pm, args=args, train_dataset=data, callbacks=[callback])
    trainer.create_optimizer()  # the Trainer's own optimizer, reused by train()
    at_step = []
    trainer.optimizer.register_step_pre_hook(
        lambda *_: at_step.append({n: (p.grad == 0).sum().item() for n, p in params.items()}))
    trainer.train()
    assert len(at_step) == len(callback.zeros) == 16
    expected = {n: math.floor(ratio * p.numel()) for n, p in params.items()}
    assert all(z == expected for z in at_step)  # masked right before every optimizer step ...
    assert all(not any(z.values()) for z in callback.zeros)  # ... and not before (clipping saw all)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, (first, last)


# ----- config -----

@pytest.mark.parametrize("ratio", [-0.1, 1.0, "x", float("nan"), True])
def test_invalid_ratio_raises_naming_the_field(ratio):
    with pytest.raises(ValueError, match=r"grad_mask_ratio must be a number in \[0, 1\)"):
        HeadMaskConfig(heads=HEADS, grad_mask_ratio=ratio)


def test_invalid_ratio_in_a_saved_adapter_raises_before_the_model_is_modified(tmp_path):
    gmt_model(ratio=0.5).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "grad_mask_ratio": 1.0}))
    model = make_model("llama")
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="grad_mask_ratio"):
        PeftModel.from_pretrained(model, tmp_path, is_trainable=True)
    assert not any(isinstance(m, HeadMaskLayer) for m in model.modules())
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_save_load_round_trip_keeps_the_ratio(tmp_path):
    gmt_model(ratio=0.25).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["grad_mask_ratio"] == 0.25
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].grad_mask_ratio == 0.25
    layers = [m for m in loaded.modules() if isinstance(m, HeadMaskLayer)]
    assert layers and all(m.headmask_grad_mask_ratio == {"default": 0.25} for m in layers)
    params = slice_params(loaded)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    backward(loaded)
    unmasked = grads(params)
    opt.step()
    for n, g in unmasked.items():
        assert_masked(params[n].grad, g, 0.25)


def test_adapter_saved_without_the_field_loads_with_ratio_zero(tmp_path):
    get_peft_model(make_model("llama"), HeadMaskConfig(heads=HEADS)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    del cfg["grad_mask_ratio"]  # as written before the field existed
    path.write_text(json.dumps(cfg))
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].grad_mask_ratio == 0.0
    assert not any(m in gmt._LAYERS for m in loaded.modules())
