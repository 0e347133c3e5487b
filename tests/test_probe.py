"""Probe fine-tunes (a cheap stand-in task model) and the text-data helpers."""

import copy
import json

import pytest
import torch
from peft import get_peft_model

from peft_alps import HeadMaskConfig, score_heads
from peft_alps.data import read_texts, text_batches
from peft_alps.scoring.probe import probe_task_model

from conftest import ARCHS, block_module, make_inputs, make_model


def lm_batches(n=3):
    batches = []
    for i in range(n):
        inputs = make_inputs(seed=i)
        batches.append({**inputs, "labels": inputs["input_ids"]})
    return batches


def manual_probe(model, batches, steps, lr, arch):
    """Independent reference: AdamW on the q/k/v/o projections (found via conftest), batches cycled."""
    params = []
    for layer in range(model.config.num_hidden_layers):
        for part in "qkvo":
            mod = block_module(model, arch, layer, part)
            params += [p for p in (mod.weight, mod.bias) if p is not None and all(p is not q for q in params)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_probe_matches_manual_training_and_restores_the_model(arch):
    model = make_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.lm_head.weight.requires_grad_(False) if arch == "llama" else None
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = lm_batches()
    torch.manual_seed(0)  # GPT-2 has dropout: same seed, same masks in the reference
    probe = probe_task_model(model, batches, steps=4, lr=1e-2)

    # the model is back as it was: weights bit for bit, requires_grad flags, eval mode, no grads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training and all(p.grad is None for p in model.parameters())

    torch.manual_seed(0)
    reference = manual_probe(copy.deepcopy(model), batches, 4, 1e-2, arch)
    _, _, modules, _, _ = ARCHS[arch]
    expected = {n: p for n, p in reference.named_parameters()
                if n.endswith(".weight") and any(f".{modules[q]}." in n for q in "qkv")}
    assert set(probe.tensors) == set(expected)
    for name, tensor in probe.tensors.items():
        torch.testing.assert_close(tensor, expected[name].detach(), rtol=1e-5, atol=1e-7)
        assert not torch.equal(tensor, before[name])  # it did train
    assert len(probe.losses) == 4 and probe.seconds > 0
    # scoring against the probe equals scoring against the trained model
    assert torch.equal(score_heads(model, probe).scores, score_heads(model, reference).scores)


def test_saved_probe_is_a_checkpoint(tmp_path):
    model = make_model("qwen2")
    probe = probe_task_model(model, lm_batches(), steps=2, lr=1e-2)
    folder = probe.save(tmp_path / "probe")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    from_disk = score_heads(model, folder)
    assert torch.equal(from_disk.scores, score_heads(model, probe).scores)
    assert (from_disk.scores > 0).all()  # every head moved: attention trained everywhere


def test_attention_only_false_trains_everything_and_restores(monkeypatch):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    real_adamw = torch.optim.AdamW

    def spy(params, **kw):
        seen["n"] = len(list(params))
        return real_adamw([p for p in model.parameters() if p.requires_grad], **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    probe_task_model(model, lm_batches(1), steps=1, attention_only=False)
    assert seen["n"] == len(list(model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_error_mid_training_restores_the_model():
    model = make_model("llama").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return m(**batch).loss

    with pytest.raises(RuntimeError, match="boom"):
        probe_task_model(model, lm_batches(), steps=5, lr=1e-2, loss_fn=loss_fn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("case", ["steps", "empty", "peft", "no_loss", "arch"])
def test_bad_input(case):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = dict(model=model, data=lm_batches(1), steps=2)
    if case == "steps":
        args["steps"], match, err = 0, "steps", ValueError
    elif case == "empty":
        args["data"], match, err = [], "data is empty", ValueError
    elif case == "peft":
        args["model"] = get_peft_model(copy.deepcopy(model), HeadMaskConfig(heads={0: [0]}))
        match, err = "PeftModel", TypeError
    elif case == "no_loss":
        args["data"], match, err = [make_inputs()], "no loss", ValueError
    else:
        args["model"] = torch.nn.Linear(2, 2)
        args["model"].config = type("Config", (), {"model_type": "mamba"})()
        match, err = "mamba", Exception
    with pytest.raises(err, match=match):
        probe_task_model(**args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----- data helpers -----
def test_read_texts_formats(tmp_path):
    rows = [{"text": "a b"}, {"question": "1+1?", "answer": "2"}, {"prompt": "p", "completion": "c", "x": 1}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_texts(tmp_path / "d.jsonl") == ["a b", "1+1?\n2", "p\nc"]
    assert read_texts(tmp_path / "d.jsonl", limit=1) == ["a b"]
    (tmp_path / "d.txt").write_text("first line\n\n  second line \n")
    assert read_texts(tmp_path / "d.txt") == ["first line", "second line"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"line 2 has keys \['body'\]"):
        read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_texts(tmp_path / "broken.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        read_texts(tmp_path / "empty.txt")


class CharTokenizer:
    """A stand-in tokenizer: one id per character, right padding with id 0."""

    pad_token, eos_token = None, "</s>"

    def __call__(self, texts, return_tensors, padding, truncation, max_length):
        ids = [[ord(c) % 100 + 1 for c in t][:max_length] for t in texts]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}


def test_text_batches_mask_padding_in_labels():
    batches = text_batches(CharTokenizer(), ["abcd", "ab", "abcdefgh"], batch_size=2, max_length=6)
    assert [b["input_ids"].shape for b in batches] == [(2, 4), (1, 6)]
    first = batches[0]
    assert first["labels"][1].tolist() == [first["input_ids"][1, 0].item(), first["input_ids"][1, 1].item(),
                                           -100, -100]
    assert torch.equal(first["labels"][0], first["input_ids"][0])
