"""Real fine-tunes: TRL's ``SFTTrainer`` (which calls ``get_peft_model`` itself) and transformers' ``Trainer`` with a
head-mask adapter, and mixed precision: bf16/fp16 bases with fp32 head slices, ``torch.autocast``, ``GradScaler``,
and merging fp32 slices into a low-precision base.

Independent references: which weight entries may change comes from conftest's ``expected_masks`` (tensor views, not
peft_alps' index arithmetic); losses are recomputed here with ``F.cross_entropy`` over tokens picked from our own
tokenization; gradients are compared with a plain merged copy of the model (no head-mask code in its backward) or a
float32 model.
"""

import copy
import string

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import expected_masks, linear_frame, make_inputs, make_model
from peft import PeftModel, get_peft_model
from peft.utils import PeftType

from peft_alps import HeadMaskConfig
from peft_alps.tuner.layer import HeadMaskLayer

HEADS = {0: [0, 1], 2: [3]}
PARTS = ["q", "k", "v", "o"]
STRATEGIES = ["merged", "output_add"]


# ----- helpers -----
def base_weights(model) -> dict:
    """Every non-adapter tensor of ``model`` (plain or wrapped), keyed by its name in the plain model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in base.state_dict().items()
            if "headmask_" not in k}


def adapter_tensors(pm) -> dict:
    return {n: p for n, p in pm.named_parameters() if "headmask_" in n}


def assert_only_head_slices_changed(pm, before: dict, arch: str = "llama", heads=HEADS, parts=PARTS):
    """(1) every non-adapter tensor is bit-identical to ``before``; (2) the effective weights (a merged copy) differ
    from ``before`` only at entries conftest's independent masks give to the selected heads (biases: only at rows
    wholly in the masks), and do differ in every projection; (3) every adapter tensor is non-zero (they start at
    zero)."""
    now = base_weights(pm)
    assert now.keys() == before.keys()
    for k in before:
        assert now[k].dtype == before[k].dtype and torch.equal(now[k], before[k]), k
    merged_model = copy.deepcopy(pm).merge_and_unload()
    merged = dict(merged_model.named_modules())
    masks = expected_masks(merged_model, arch, heads, parts)
    changed_modules = set()
    for name, module in merged.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or f"{name}.weight" not in before:
            continue
        diff = linear_frame(weight.detach() != before[f"{name}.weight"], module)
        key = next((k for k in masks if name.endswith(f".{k[0]}.{k[1]}")), None)
        bias = getattr(module, "bias", None)
        bias_diff = bias.detach() != before[f"{name}.bias"] if isinstance(bias, torch.Tensor) else None
        if key is None:
            assert not diff.any(), f"{name} changed but holds no selected head"
            assert bias_diff is None or not bias_diff.any(), f"{name}'s bias changed but holds no selected head"
        else:
            assert not (diff & ~masks[key]).any(), f"{name} changed outside the selected heads' slices"
            assert diff.any(), f"{name}: the selected slices did not change"
            if bias_diff is not None:  # only output channels (rows) wholly owned by selected heads have bias slices
                assert not (bias_diff & ~masks[key].all(dim=1)).any(), f"{name}'s bias changed outside the slices"
            changed_modules.add(key)
    assert changed_modules == set(masks)
    tensors = adapter_tensors(pm)
    assert tensors and all(t.detach().abs().sum() > 0 for t in tensors.values())


# ----- TRL SFTTrainer -----
CHARS = string.ascii_lowercase + string.digits + " .,:?=+"
PAIRS = [(1, 2), (3, 4), (10, 5), (7, 8), (20, 22), (9, 9), (5, 6), (13, 1)]


def char_tokenizer():
    """A character-level fast tokenizer built offline (no download): ``<pad>`` = 0, ``<eos>`` = 1, then one id per
    character (45 ids, within the tiny models' vocabulary of 128)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def prompt_completion_data():
    import datasets  # a test dependency (setup.cfg [test]): missing, the test fails rather than skips
    # long prompts, short completions: a loss over every token would be far from the completion-only one
    return datasets.Dataset.from_list([{"prompt": f"what is {a}+{b}? answer: ", "completion": f"{a + b}"}
                                       for a, b in PAIRS])


def sft_trainer(output_dir, **config):
    import trl
    args = trl.SFTConfig(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=len(PAIRS),
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                         dataloader_num_workers=0, disable_tqdm=True, **config)
    return trl.SFTTrainer(model=make_model("llama"), args=args, train_dataset=prompt_completion_data(),
                          processing_class=char_tokenizer(), peft_config=HeadMaskConfig(heads=HEADS, parts=PARTS))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """One SFTTrainer run with TRL's defaults (bf16=True: CPU autocast over the fp32 model; gradient checkpointing
    on), a few steps; the base weights are recorded from a fresh model of the same seed."""
    trainer = sft_trainer(tmp_path_factory.mktemp("sft"))
    assert trainer.args.bf16 and trainer.args.gradient_checkpointing  # TRL 1.16's defaults, exercised here
    trainer.train()
    return trainer, base_weights(make_model("llama"))


def test_sft_trainer_trains_only_the_head_slices(sft_run):
    trainer, before = sft_run
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert_only_head_slices_changed(trainer.model, before)
    assert all(t.dtype == torch.float32 for t in adapter_tensors(trainer.model).values())


def test_sft_trainer_model_is_a_headmask_peft_model(sft_run):
    trainer, _ = sft_run
    pm = trainer.model
    assert isinstance(pm, PeftModel) and pm.peft_type == PeftType.HEADMASK
    config = pm.peft_config["default"]
    assert isinstance(config, HeadMaskConfig) and config.heads == HEADS and config.parts == PARTS
    assert sum(isinstance(m, HeadMaskLayer) for m in pm.modules()) == len(HEADS) * len(PARTS)
    # trainable = optimized = exactly the selected heads' entries, counted from conftest's masks
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_tensors(pm).values()}
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == trainable
    n_entries = sum(int(m.sum()) for m in expected_masks(pm, "llama", HEADS, PARTS).values())
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == n_entries


def test_sft_trainer_save_then_from_pretrained_gives_identical_outputs(sft_run, tmp_path):
    trainer, _ = sft_run
    trainer.save_model(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(make_model("llama"), str(tmp_path)).eval()
    inputs = make_inputs(batch=3, seq=14)
    trained = trainer.model.eval()
    with torch.no_grad():
        # after a bf16=True run, accelerate leaves trainer.model's forward wrapped in CPU autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = reloaded(**inputs).logits.float()
        assert torch.equal(trained(**inputs).logits, want)
        # and without the wrapper (in place), in float32
        trained = trainer.accelerator.unwrap_model(trained, keep_fp32_wrapper=False)
        assert torch.equal(trained(**inputs).logits, reloaded(**inputs).logits)


def reference_losses(model, tokenizer) -> tuple[float, float]:
    """(completion-only, every-token) mean next-token cross-entropy over the whole data set, each sample run alone
    (no padding), from our own tokenization: prompt ids, then completion ids plus eos."""
    nll_completion, n_completion, nll_all, n_all = 0.0, 0, 0.0, 0
    for a, b in PAIRS:
        prompt = tokenizer(f"what is {a}+{b}? answer: ")["input_ids"]
        completion = tokenizer(f"{a + b}")["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")  # nll[t] predicts token t + 1
        nll_completion += nll[len(prompt) - 1:].sum().item()
        n_completion += len(completion)
        nll_all += nll.sum().item()
        n_all += nll.numel()
    return nll_completion / n_completion, nll_all / n_all


def test_sft_completion_only_loss_leaves_the_prompt_out(tmp_path):
    """TRL's loss (the logged one of step 1, and ``compute_loss`` on a batch after training) equals the cross-entropy
    over the completion tokens only, computed here; float32 (bf16=False) so that the comparison is tight."""
    trainer = sft_trainer(tmp_path, bf16=False, completion_only_loss=True)
    tokenizer = trainer.processing_class
    first = trainer.train_dataset[0]
    assert first["labels"].count(-100) == len(tokenizer(first["prompt"])["input_ids"])  # the prompt is masked
    trainer.train()
    # step 1's logged loss: the whole data set at the initial state (zero deltas: the base model)
    logged = next(h["loss"] for h in trainer.state.log_history if h.get("step") == 1 and "loss" in h)
    completion_only, every_token = reference_losses(make_model("llama"), tokenizer)
    assert abs(every_token - completion_only) > 1e-2  # the check below can tell them apart
    assert logged == pytest.approx(completion_only, abs=1e-5)
    # after training (non-zero deltas): TRL's compute_loss on a collated, padded batch vs our per-sample loss
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))  # CPU tensors, as the model wants them
    assert batch["input_ids"].shape[0] == len(PAIRS)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch).item()
    completion_only, every_token = reference_losses(model, tokenizer)
    assert abs(every_token - completion_only) > 1e-1  # training lowered the completion loss only
    assert trl_loss == pytest.approx(completion_only, abs=1e-5)


# ----- transformers Trainer -----
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_trainer_trains_only_the_head_slices(arch, bf16, tmp_path):
    model = make_model(arch)
    before = base_weights(model)
    pm = get_peft_model(model, HeadMaskConfig(heads=HEADS, parts=PARTS))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in (torch.randint(2, 128, (16,), generator=g)
                                                                   for _ in range(8))]
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                                use_cpu=True, bf16=bf16, dataloader_num_workers=0, disable_tqdm=True)
    trainer = tf.Trainer(model=pm, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert_only_head_slices_changed(pm, before, arch)
    assert all(t.dtype == torch.float32 for t in adapter_tensors(pm).values())


# ----- mixed precision -----
def lm_loss(model, inputs, autocast_dtype=None):
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model(**inputs, labels=inputs["input_ids"]).loss


def slice_grads(pm) -> dict:
    return {n: p.grad.detach().clone() for n, p in adapter_tensors(pm).items()}


def test_low_precision_base_gets_fp32_slices_also_when_loaded(tmp_path):
    """PEFT's ``autocast_adapter_dtype=True`` (default) upcasts every float tensor in a tuner layer's
    ParameterDicts, so the head slices are fp32 on a bf16/fp16 base; with False they take the base's dtype. The
    channel indices stay int64. ``add_adapter`` and ``PeftModel.from_pretrained`` cast the same way."""
    for dtype in (torch.bfloat16, torch.float16):
        pm = get_peft_model(make_model("llama", dtype=dtype), HeadMaskConfig(heads=HEADS, parts=PARTS))
        assert {t.dtype for t in adapter_tensors(pm).values()} == {torch.float32}
        assert {v.dtype for k, v in base_weights(pm).items()} == {dtype}
        assert {b.dtype for n, b in pm.named_buffers() if "headmask_index" in n} == {torch.int64}
        low = get_peft_model(make_model("llama", dtype=dtype), HeadMaskConfig(heads=HEADS, parts=PARTS),
                             autocast_adapter_dtype=False)
        assert {t.dtype for t in adapter_tensors(low).values()} == {dtype}
    pm.add_adapter("second", HeadMaskConfig(heads={1: [2]}, parts=PARTS))  # PeftModel.add_adapter casts too
    assert {t.dtype for n, t in adapter_tensors(pm).items() if n.endswith(".second")} == {torch.float32}
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("llama", dtype=torch.bfloat16), tmp_path)
    assert {t.dtype for t in adapter_tensors(loaded).values()} == {torch.float32}


# bf16 has an 8-bit significand (unit roundoff 2**-9 ~ 2e-3); the gradient of the slices passes through a few dozen
# bf16-rounded ops (3 layers of matmuls, softmax, norms), so its relative error is ~1e-2: measured 0.011-0.015 per
# tensor over 5 batches and both strategies (0.007 over all slices, cosine > 0.99997). 4e-2 (~10 bf16 epsilons)
# leaves margin; a wrong gradient (e.g. another batch's, or a missing term) is off by O(1).
BF16_GRAD_RTOL = 4e-2


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32], ids=["bf16_base", "fp32_base"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_autocast_gradient_matches_fp32_reference(strategy, base_dtype):
    """One step's gradient of the fp32 slices under ``torch.autocast(bf16)`` vs the same model in float32 without
    autocast (same bf16-representable base weights, same deltas)."""
    def build(dtype):
        base = make_model("llama", dtype=torch.bfloat16).to(dtype)
        return get_peft_model(base, HeadMaskConfig(heads=HEADS, parts=PARTS, forward_strategy=strategy))

    amp, ref = build(base_dtype), build(torch.float32)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # the same non-zero fp32 deltas in both
        for (_, a), (_, r) in zip(adapter_tensors(amp).items(), adapter_tensors(ref).items()):
            r.copy_(0.02 * torch.randn(r.shape, generator=g))
            a.copy_(r)
    inputs = make_inputs(batch=4, seq=16)
    lm_loss(amp, inputs, torch.bfloat16).backward()
    lm_loss(ref, inputs).backward()
    got, want = slice_grads(amp), slice_grads(ref)
    assert {t.dtype for t in got.values()} == {torch.float32}
    for name in want:
        err = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert err < BF16_GRAD_RTOL, (name, err)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["backward_after", "backward_inside"])
def test_fp32_base_under_autocast_gradient_equals_merged_model(amp_dtype, backward_in_autocast):
    """An fp32 base under autocast (what ``Trainer(bf16=True)`` and TRL's default do on CPU): the "merged" strategy's
    custom backward gives the slices exactly the gradient autograd gives the same entries of a plain merged copy
    under the same autocast (its matmuls run in the autocast dtype, as autograd's do)."""
    pm = get_peft_model(make_model("llama"), HeadMaskConfig(heads=HEADS, parts=PARTS, init_weights=False))
    ref = copy.deepcopy(pm).merge_and_unload()
    ref.requires_grad_(True)
    inputs = make_inputs(batch=4, seq=16)
    for model in (pm, ref):
        with torch.autocast("cpu", dtype=amp_dtype):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            if backward_in_autocast:
                loss.backward()
        if not backward_in_autocast:
            loss.backward()
    plain = dict(ref.named_modules())
    layers = {n: m for n, m in pm.get_base_model().named_modules() if isinstance(m, HeadMaskLayer)}
    assert len(layers) == len(HEADS) * len(PARTS)
    for name, layer in layers.items():
        axis, idx = layer.headmask_axis["default"], layer.headmask_index["default"]
        want = plain[name].weight.grad.index_select(0 if axis == "out" else 1, idx)
        got = layer.headmask_delta["default"].grad
        assert got.dtype == torch.float32 and torch.equal(got, want), name


def train_steps(pm, steps, autocast_dtype=None, scaler=None, lr=1e-2):
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        loss = lm_loss(pm, make_inputs(seed=10 + step, batch=4, seq=16), autocast_dtype)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_training_then_merge_into_bf16_base_and_unmerge_bitwise(strategy):
    """A few AdamW steps under bf16 autocast on a bf16 base: finite losses, only the fp32 slices change. Merging the
    fp32 slices into the bf16 weights: the weights stay bf16, the merged model's outputs equal the adapter's
    (bitwise with "merged", whose forward rounds the merged weight as merge does; within bf16 rounding with
    "output_add"), and unmerging gives the bf16 base back bit for bit."""
    base = make_model("llama", dtype=torch.bfloat16)
    before = base_weights(base)
    pm = get_peft_model(base, HeadMaskConfig(heads=HEADS, parts=PARTS, forward_strategy=strategy))
    losses = train_steps(pm, 4, torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_only_head_slices_changed(pm, before)
    assert {t.dtype for t in adapter_tensors(pm).values()} == {torch.float32}
    inputs = make_inputs(batch=3, seq=14)
    with torch.no_grad():
        adapter_out = pm(**inputs).logits
        pm.merge_adapter()
        assert {v.dtype for v in base_weights(pm).values()} == {torch.bfloat16}
        merged_out = pm(**inputs).logits
        if strategy == "merged":
            assert torch.equal(merged_out, adapter_out)
        else:  # logits ~1: bf16 spacing 2**-7 there; measured max difference 1 spacing
            torch.testing.assert_close(merged_out, adapter_out, atol=2 * 2**-7, rtol=2**-7)
        assert not torch.equal(merged_out, make_model("llama", dtype=torch.bfloat16)(**inputs).logits)
    pm.unmerge_adapter()
    now = base_weights(pm)
    for k in before:
        assert now[k].dtype == torch.bfloat16 and torch.equal(now[k], before[k]), k


# fp16: 11-bit significand (unit roundoff 2**-11 ~ 5e-4). The unscaled gradient of the slices is within 0.14-0.19%
# of the float32 model's (measured, 3 batches, both strategies; without the scaler 0.21-0.26%, from underflow);
# 1e-2 (~10 fp16 epsilons) leaves margin, and gradients left scaled (x 65536) or wrong are off by far more.
FP16_GRAD_RTOL = 1e-2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp16_grad_scaler_trains_and_merge_and_unload_matches(strategy):
    """fp16 base, fp32 slices, fp16 autocast and ``torch.amp.GradScaler("cpu")``: the scaled-then-unscaled gradients
    of the slices are fp32 and match a float32 model's, an overflowing scale skips the step without touching the
    slices, a few steps stay finite and change only the slices, and ``merge_and_unload`` gives the adapter's outputs
    (bitwise with "merged", within fp16 rounding with "output_add")."""
    def build(dtype):
        base = make_model("llama", dtype=torch.float16).to(dtype)
        return get_peft_model(base, HeadMaskConfig(heads=HEADS, parts=PARTS, forward_strategy=strategy,
                                                   init_weights=False))

    pm, ref = build(torch.float16), build(torch.float32)
    before = base_weights(pm)
    params = list(adapter_tensors(pm).values())
    with torch.no_grad():
        for p, r in zip(params, adapter_tensors(ref).values()):
            r.copy_(p)
    opt = torch.optim.AdamW(params, lr=1e-2)
    inputs = make_inputs(batch=4, seq=16)
    lm_loss(ref, inputs).backward()
    want = slice_grads(ref)
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    scaler.scale(lm_loss(pm, inputs, torch.float16)).backward()
    scaler.unscale_(opt)
    got = slice_grads(pm)
    for name in want:
        assert got[name].dtype == torch.float32
        err = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert err < FP16_GRAD_RTOL, (name, err)
    opt.zero_grad()
    # an overflowing scale: inf in the slices' gradients, the step is skipped and the scale backed off
    overflow = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    snapshot = [p.detach().clone() for p in params]
    overflow.scale(lm_loss(pm, inputs, torch.float16)).backward()
    overflow.step(opt)
    overflow.update()
    opt.zero_grad()
    assert overflow.get_scale() == 2.0**59
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot))
    # a few real steps
    start = [p.detach().clone() for p in params]
    losses = train_steps(pm, 4, torch.float16, scaler=torch.amp.GradScaler("cpu"))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(p, s) and torch.isfinite(p).all() for p, s in zip(params, start))
    now = base_weights(pm)
    assert all(torch.equal(now[k], before[k]) for k in before)
    # merge_and_unload vs the unmerged adapter model, both in plain fp16
    with torch.no_grad():
        adapter_out = pm(**inputs).logits
        merged = copy.deepcopy(pm).merge_and_unload()
        assert {p.dtype for p in merged.parameters()} == {torch.float16}
        merged_out = merged(**inputs).logits
    if strategy == "merged":
        assert torch.equal(merged_out, adapter_out)
    else:  # logits ~1: fp16 spacing 2**-10 there; measured max difference 1 spacing
        torch.testing.assert_close(merged_out, adapter_out, atol=2 * 2**-10, rtol=2**-10)
