"""Streamed merge (``peft_alps.deploy.merge`` / ``peft-alps merge``): bitwise equal to ``merge_and_unload()``, reads
only the touched tensors, loads without peft_alps, and errors that write nothing."""

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import ARCH_NAMES, ARCHS, make_inputs, make_model, output_of
from peft import get_peft_model
from safetensors import safe_open

from peft_alps import HeadMaskConfig, cli
from peft_alps.deploy import merge as merge_mod
from peft_alps.deploy.merge import MergeError, merge_checkpoint, merge_checkpoint_report

HEADS = {0: [1], 2: [0, 3]}
PARTS = ["q", "k", "v", "o"]
SHARD = "60KB"  # the tiny models (~0.4-0.6 MB) become 6-11 shards


def tensors(folder) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def build(root: Path, arch: str, dtype=torch.float32, shard=SHARD, heads=HEADS):
    """Save a (sharded) base and an adapter with random deltas; return the adapter model."""
    make_model(arch, dtype=dtype).save_pretrained(root / "base", max_shard_size=shard)
    pm = get_peft_model(make_model(arch, dtype=dtype), HeadMaskConfig(heads=heads, parts=PARTS, init_weights=False))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # full-precision float32 values, as training gives (init_weights=False rounds them
        for name, p in pm.named_parameters():  # to a bf16 base's precision, which would hide dtype bugs)
            if "headmask_" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(root / "adapter")
    return pm


def touched_names(arch: str, names) -> set:
    """Base tensors the adapter must change, from conftest's own module table: the q/k/v/o weights of the
    selected layers and the q/k/v biases (o's bias has no head slice)."""
    _, _, modules, blocks, _ = ARCHS[arch]
    want = set()
    for layer in HEADS:
        for part in PARTS:
            suffixes = [".weight"] + ([".bias"] if part != "o" else [])
            want |= {n for n in names for s in suffixes if n.endswith(f"{blocks}.{layer}.{modules[part]}{s}")}
    return want


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Per architecture: base, adapter, streamed merge (decoded tensors counted), merge_and_unload reference,
    and the adapter model's outputs."""
    root = tmp_path_factory.mktemp("merge")
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    inputs = make_inputs()
    result = {}
    for arch in ARCH_NAMES:
        d = root / arch
        pm = build(d, arch)
        with torch.no_grad():
            expected = output_of(pm, inputs)
        decoded = []
        real = merge_mod._read_tensor

        def counting(src, shard, entry, decoded=decoded):
            decoded.append((entry.name, entry.nbytes))
            return real(src, shard, entry)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(merge_mod, "_read_tensor", counting)
            report = merge_checkpoint_report(d / "base", d / "adapter", d / "out")
        pm.merge_and_unload().save_pretrained(d / "ref", max_shard_size=SHARD)
        result[arch] = dict(dir=d, expected=expected, decoded=decoded, report=report)
    torch.save(inputs, root / "inputs.pt")
    return root, result


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_streamed_merge_equals_merge_and_unload_bitwise(arch, merged):
    d = merged[1][arch]["dir"]
    names = sorted(p.name for p in (d / "ref").iterdir())
    assert names == sorted(p.name for p in (d / "out").iterdir())
    assert len(list((d / "out").glob("model-*-of-*.safetensors"))) > 3  # sharded like the base
    index = json.loads((d / "out" / "model.safetensors.index.json").read_text())
    assert index == json.loads((d / "ref" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((d / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    got, want, base = tensors(d / "out"), tensors(d / "ref"), tensors(d / "base")
    assert got.keys() == want.keys() == base.keys()
    for name in want:
        assert bitwise_equal(got[name], want[name]), name
    for name in names:  # the files themselves too: same headers, same bytes, config copied verbatim
        assert filecmp.cmp(d / "out" / name, d / "ref" / name, shallow=False), name


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_only_touched_tensors_are_decoded(arch, merged):
    run = merged[1][arch]
    d, decoded, report = run["dir"], run["decoded"], run["report"]
    base, out = tensors(d / "base"), tensors(d / "out")
    touched = touched_names(arch, base)
    changed = {n for n in base if not torch.equal(base[n], out[n])}
    assert [n for n, _ in decoded] and len(decoded) == len({n for n, _ in decoded})  # each read once
    assert {n for n, _ in decoded} == touched == changed  # random deltas change every touched tensor
    assert sum(b for _, b in decoded) == sum(base[n].numel() * base[n].element_size() for n in touched)
    assert (report.tensors_changed, report.tensors_copied, report.tensors_cast) == (
        len(touched), len(base) - len(touched), 0)
    assert report.deltas == len(touched)


def test_merged_checkpoints_load_and_run_without_peft_alps(merged):
    root, runs = merged
    script = f"""
import sys, torch, transformers as tf
tf.logging.set_verbosity_error()
inputs = torch.load({str(root / 'inputs.pt')!r})
outs = {{}}
for arch in {ARCH_NAMES!r}:
    path = {str(root)!r} + "/" + arch + "/out"
    config = tf.AutoConfig.from_pretrained(path)
    model = getattr(tf, config.architectures[0]).from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**inputs)
    outs[arch] = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
assert "peft_alps" not in sys.modules and "peft" not in sys.modules, sorted(sys.modules)
torch.save(outs, {str(root / 'outs.pt')!r})
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    outs = torch.load(root / "outs.pt")
    for arch in ARCH_NAMES:
        torch.testing.assert_close(outs[arch], runs[arch]["expected"], atol=1e-5, rtol=0, msg=arch)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: transposed Conv1D weights and bias slices
def test_bf16_base_bitwise_equal_to_merge_and_unload(arch, tmp_path):
    pm = build(tmp_path, arch, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "headmask_" in n)  # PEFT autocast
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    want = pm.merge_and_unload().state_dict()
    got = tensors(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    for name, t in got.items():
        assert bitwise_equal(t, want[name]), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dtype_cast_single_file_base(tmp_path, capsys):
    pm = build(tmp_path, "qwen2", shard="50GB")  # one model.safetensors
    code = cli.main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "out"), "--dtype", "bfloat16"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json",
                                                                   "model.safetensors"]
    want = {k: v.to(torch.bfloat16) for k, v in pm.merge_and_unload().state_dict().items()}
    got = tensors(tmp_path / "out")
    assert got.keys() == want.keys()
    for name, t in got.items():
        assert bitwise_equal(t, want[name]), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert "14 tensors changed" in stdout and "cast to bfloat16" in stdout and "1 safetensors file" in stdout
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16


def test_dtype_cast_sharded_updates_index_total_size(tmp_path):
    build(tmp_path, "gpt2")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", dtype=torch.float16)
    base_index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] * 2 == base_index["metadata"]["total_size"]
    got = tensors(tmp_path / "out")
    assert sum(t.numel() * t.element_size() for t in got.values()) == index["metadata"]["total_size"]
    assert all(t.dtype == torch.float16 for t in got.values())


def test_modules_to_save_are_replaced(tmp_path):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    tf.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "base")
    base = tf.LlamaForSequenceClassification.from_pretrained(tmp_path / "base")
    pm = get_peft_model(base, HeadMaskConfig(heads=HEADS, init_weights=False, task_type="SEQ_CLS",
                                             modules_to_save=["score"]))
    with torch.no_grad():
        pm.base_model.model.score.modules_to_save["default"].weight.add_(1.0)
    pm.save_pretrained(tmp_path / "adapter")
    report = merge_checkpoint_report(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert report.deltas == 2 * 3 + 1  # q, k, v of two layers + the score head
    want, got = pm.merge_and_unload().state_dict(), tensors(tmp_path / "out")
    assert got.keys() == want.keys()
    assert all(bitwise_equal(t, want[name]) for name, t in got.items())


def test_cli_overwrite_replaces_the_folder(tmp_path, capsys):
    build(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "base" / "pytorch_model.bin").write_bytes(b"old weights")
    (tmp_path / "base" / "peft_alps_source.json").write_text("{}")  # the SmolLM2 cache marker: not the merge's
    argv = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    assert cli.main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0
    stdout = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert "stale.txt" not in names and "pytorch_model.bin" not in names and "tokenizer_config.json" in names
    assert "peft_alps_source.json" not in names
    assert "8 tensors changed" in stdout and "Not copied" in stdout and "pytorch_model.bin" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]  # no staging/trash folder


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    build(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    calls = []

    def failing(src, shard, entry):
        calls.append(entry.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(src, shard, entry)

    real = merge_mod._read_tensor
    monkeypatch.setattr(merge_mod, "_read_tensor", failing)
    with pytest.raises(OSError, match="No space"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_errors")
    build(root, "llama")
    make_model("gpt2").save_pretrained(root / "gpt2")
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=8, num_key_value_heads=2)
    tf.LlamaForCausalLM(config).save_pretrained(root / "llama8", max_shard_size=SHARD)
    return root


@pytest.mark.parametrize("case", ["other_arch", "shape", "truncated", "corrupted", "index", "nonempty",
                                  "missing_base", "missing_adapter", "not_headmask", "out_is_base", "dtype"])
def test_errors_are_one_line_and_write_nothing(case, ckpts, tmp_path, capsys):
    base, adapter, out, extra = tmp_path / "base", tmp_path / "adapter", tmp_path / "out", []
    shutil.copytree(ckpts / "base", base)
    shutil.copytree(ckpts / "adapter", adapter)
    last = sorted(base.glob("model-*.safetensors"))[-1]
    if case == "other_arch":
        base, match = ckpts / "gpt2", "was made for llama attention shaped"
    elif case == "shape":
        base, match = ckpts / "llama8", "'num_heads': 8"
    elif case == "truncated":
        last.write_bytes(last.read_bytes()[:-10])
        match = f"{last.name} is not a valid safetensors file: truncated"
    elif case == "corrupted":
        data = bytearray(last.read_bytes())
        data[8:16] = b"#garbage"
        last.write_bytes(bytes(data))
        match = "header is not JSON"
    elif case == "index":
        last.unlink()
        match = f"lists {last.name}, which is missing"
    elif case == "nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        match = "not empty"
    elif case == "missing_base":
        base, match = tmp_path / "nope", "base folder does not exist"
    elif case == "missing_adapter":
        adapter, match = tmp_path / "nope", "adapter folder does not exist"
    elif case == "not_headmask":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
        match = "is a LORA adapter"
    elif case == "out_is_base":
        out, extra, match = base, ["--overwrite"], "is (or contains) the base folder"
    else:
        extra, match = ["--dtype", "float64"], "invalid choice"
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code = cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *extra])
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout == ""
    assert err.startswith("peft-alps: error:") and err.count("\n") == 1 and match in err, err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written or left over


def test_api_errors_are_merge_errors(ckpts, tmp_path):
    with pytest.raises(MergeError, match="dtype must be one of"):
        merge_checkpoint(ckpts / "base", ckpts / "adapter", tmp_path / "out", dtype="int8")
    bad = tmp_path / "adapter"
    shutil.copytree(ckpts / "adapter", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "heads": {"0": [1], "1": [2], "2": [0, 3]}}))
    with pytest.raises(MergeError, match=r"has no tensor base_model.model.model.layers.1.self_attn.q_proj.headmask_delta although"):
        merge_checkpoint(ckpts / "base", bad, tmp_path / "out")
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "heads": {"0": [1]}}))
    with pytest.raises(MergeError, match="holds base_model.model.model.layers.2.self_attn.k_proj.headmask_delta .*which its adapter_config.json "
                                                "does not select"):
        merge_checkpoint(ckpts / "base", bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and issubclass(MergeError, ValueError)
