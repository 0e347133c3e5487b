"""Exact export of head-mask adapters to stock PEFT LoRA adapters (``peft_alps.deploy.export``, ``peft-alps export-lora``).

The main check loads every exported adapter with stock PEFT in a subprocess that cannot import peft_alps,
onto a base model read back from a saved folder, and compares its outputs and merged weights with the
head-mask model's.
"""

import copy
import json
import subprocess
import sys
import warnings

import pytest
import peft
import torch
import transformers as tf
from conftest import ARCH_NAMES, make_inputs, make_model, output_of
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import peft_alps  # noqa: F401  (registers the method)
from peft_alps import HeadMaskConfig, cli
from peft_alps.deploy import export
from peft_alps.deploy.export import ExportError, export_lora

HEADS = {0: [1], 2: [0, 3]}
ALL = ["q", "k", "v", "o"]
ATOL = 1e-5  # forward: x @ W'^T vs x @ W^T + x @ (B @ A)^T, fp32
MERGE_ATOL = 1e-6  # merged weights: W + B @ A with one-hot factors is exactly the head-mask merge


def headmask(arch="llama", heads=HEADS, parts=ALL, **kw):
    return get_peft_model(make_model(arch), HeadMaskConfig(heads=heads, parts=parts, init_weights=False, **kw))


def quiet_export(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_lora(*args, **kw)


def merged_targets(pm, adapter_name="default"):
    """{module: {"weight": [out, in] nn.Linear frame, "bias": ...}} after the head-mask merge."""
    targets = pm.peft_config[adapter_name].target_modules
    merged = copy.deepcopy(pm).merge_and_unload(adapter_names=[adapter_name])
    mods = dict(merged.named_modules())
    out = {}
    for name in targets:
        m = mods[name]
        w = m.weight.detach().clone()
        out[name] = {"weight": w.t().contiguous() if type(m).__name__ == "Conv1D" else w,
                     "bias": None if m.bias is None else m.bias.detach().clone()}
    return out


# Runs under the same interpreter, with peft_alps made unimportable: stock transformers + peft only.
STOCK_CHECK = r"""
import json, sys, warnings
sys.modules["peft_alps"] = None  # any import of peft_alps now fails
import torch, transformers
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

spec = json.load(open(sys.argv[1]))
inputs = {"input_ids": torch.load(spec["inputs"])}
report = {}

def output_of(model):
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

for case in spec["cases"]:
    r = report[case["name"]] = {}
    cls = getattr(transformers, case["cls"])
    base = cls.from_pretrained(case["base"], attn_implementation="eager", dtype=torch.float32).eval()
    cfg = LoraConfig.from_pretrained(case["export"])
    r["config"] = [cfg.peft_type.value if hasattr(cfg.peft_type, "value") else str(cfg.peft_type),
                   cfg.lora_dropout, cfg.use_rslora, bool(cfg.fan_in_fan_out), bool(getattr(cfg, "lora_bias", False))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, case["export"]).eval()
    r["load_warnings"] = [str(w.message)[:200] for w in caught
                          if any(s in str(w.message).lower() for s in ("missing", "unexpected"))]
    # every tensor of the file landed in the model under PEFT's own key names
    state = model.state_dict()
    saved = load_file(case["export"] + "/adapter_model.safetensors")
    r["unloaded_keys"] = []
    for key, t in saved.items():
        live = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        if live == key:  # modules_to_save: base_model.model.score.weight -> ...score.modules_to_save.default.weight
            head, _, leaf = key.rpartition(".")
            live = head + ".modules_to_save.default." + leaf
        if live not in state or not torch.equal(state[live], t):
            r["unloaded_keys"].append(key)
    lora_layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")
                   and "default" in m.lora_A}
    r["scalings"] = sorted({float(m.scaling["default"]) for m in lora_layers.values()})
    r["ranks"] = {n: int(m.r["default"]) for n, m in lora_layers.items()}
    expected = torch.load(case["expected"])
    with torch.no_grad():
        got = output_of(model)
        r["max_diff"] = (got - expected["output"]).abs().max().item()
        if case["merge"]:
            merged = model.merge_and_unload()
            r["merged_output_diff"] = (output_of(merged) - expected["output"]).abs().max().item()
            mods = dict(merged.named_modules())
            diffs = []
            for name, ref in expected["merged"].items():
                m = mods[name]
                w = m.weight.t() if type(m).__name__ == "Conv1D" else m.weight
                diffs.append((w - ref["weight"]).abs().max().item())
                if ref["bias"] is not None:
                    diffs.append((m.bias - ref["bias"]).abs().max().item())
            r["merged_weight_diff"] = max(diffs)
            r["merged_modules"] = len(expected["merged"])
report["__peft_alps_imported__"] = "peft_alps" in sys.modules and sys.modules["peft_alps"] is not None
print(json.dumps(report))
"""


def _case(tmp_path, name, pm, base_model, inputs, adapter_name="default", merge=True, via_folder=True):
    """Save base, expected outputs/merged weights and the LoRA export of ``pm``'s adapter for the subprocess."""
    root = tmp_path / name
    base_model.save_pretrained(root / "base")
    pm.set_adapter(adapter_name)
    pm.eval()
    with torch.no_grad():
        expected = {"output": output_of(pm, inputs), "merged": merged_targets(pm, adapter_name) if merge else {}}
        base_diff = (expected["output"] - output_of(base_model, inputs)).abs().max().item()
    torch.save(expected, root / "expected.pt")
    if via_folder:
        pm.save_pretrained(root / "headmask", selected_adapters=[adapter_name])
        src = root / "headmask" if adapter_name == "default" else root / "headmask" / adapter_name
        quiet_export(src, root / "lora")
    else:
        quiet_export(pm, root / "lora", adapter_name=adapter_name)
    ranks = {n: int(m.headmask_index[adapter_name].numel()) for n, m in pm.base_model.model.named_modules()
             if hasattr(m, "headmask_index") and adapter_name in m.headmask_index}
    return {"name": name, "cls": type(base_model).__name__, "base": str(root / "base"), "export": str(root / "lora"),
            "expected": str(root / "expected.pt"), "merge": merge, "ranks": ranks, "base_diff": base_diff,
            "conv1d": name.startswith("gpt2"), "has_bias": any(m.bias is not None for m in
                                                                _targets(pm, adapter_name))}


def _targets(pm, adapter_name):
    return [m.get_base_layer() for m in pm.base_model.model.modules()
            if hasattr(m, "headmask_axis") and adapter_name in m.headmask_axis and m.headmask_axis[adapter_name] == "out"]


def _trained_two_adapters():
    """llama with adapters 'default' and 'second'; 'second' trained for a few AdamW steps."""
    pm = headmask("llama", heads={1: [2]}, parts=["q", "v"])
    pm.add_adapter("second", HeadMaskConfig(heads={0: [0, 1], 2: [3]}, parts=["q", "k", "o"]))
    pm.set_adapter("second")
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    inputs = make_inputs(seed=5)
    for _ in range(3):
        out = pm(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    return pm


@pytest.fixture(scope="module")
def stock_report(tmp_path_factory):
    """Export many adapters, then check them all in one stock-PEFT subprocess; return (cases, report)."""
    tmp_path = tmp_path_factory.mktemp("export")
    inputs = make_inputs()
    torch.save(inputs["input_ids"], tmp_path / "inputs.pt")
    cases = []
    for arch in ARCH_NAMES:  # every part incl. o; q/k/v biases for qwen2, gpt2, gpt_neox, bert, roberta
        # stock PEFT cannot merge lora_bias into qwen2's bias-less o_proj: forward only (see the warning test)
        cases.append(_case(tmp_path, arch, headmask(arch), make_model(arch), inputs, merge=arch != "qwen2"))
    cases.append(_case(tmp_path, "qwen2_qkv", headmask("qwen2", parts=["q", "k", "v"]), make_model("qwen2"), inputs,
                       via_folder=False))
    cases.append(_case(tmp_path, "gpt2_from_model", headmask("gpt2", forward_strategy="output_add"),
                       make_model("gpt2"), inputs, via_folder=False))
    trained = _trained_two_adapters()
    cases.append(_case(tmp_path, "llama_second_adapter", trained, make_model("llama"), inputs,
                       adapter_name="second", via_folder=False))
    cases.append(_case(tmp_path, "llama_second_adapter_folder", _trained_two_adapters(), make_model("llama"), inputs,
                       adapter_name="second"))
    # sequence classification with a fully trained head (modules_to_save)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    config._attn_implementation = "eager"
    base = tf.LlamaForSequenceClassification(config).eval()
    pm = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads=HEADS, parts=ALL, init_weights=False,
                                                            task_type="SEQ_CLS", modules_to_save=["score"]))
    with torch.no_grad():
        pm.base_model.model.score.modules_to_save["default"].weight.add_(0.5)
    cases.append(_case(tmp_path, "llama_seq_cls", pm, base, inputs))

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"inputs": str(tmp_path / "inputs.pt"), "cases": cases}))
    proc = subprocess.run([sys.executable, "-c", STOCK_CHECK, str(spec)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, json.loads(proc.stdout.strip().splitlines()[-1])


def test_stock_peft_never_imported_peft_alps(stock_report):
    _, report = stock_report
    assert report.pop("__peft_alps_imported__") is False


@pytest.mark.parametrize("name", ARCH_NAMES + ["qwen2_qkv", "gpt2_from_model", "llama_second_adapter",
                                               "llama_second_adapter_folder", "llama_seq_cls"])
def test_stock_lora_reproduces_headmask_outputs(stock_report, name):
    cases, report = stock_report
    case, r = next(c for c in cases if c["name"] == name), report[name]
    assert case["base_diff"] > 100 * ATOL  # the adapter really changes the outputs
    assert r["max_diff"] < ATOL, r
    assert r["load_warnings"] == [] and r["unloaded_keys"] == []
    assert r["config"] == ["LORA", 0.0, False, case["conv1d"], case["has_bias"]]
    assert r["scalings"] == [1.0]
    assert r["ranks"] == case["ranks"]  # rank = number of selected channels, per module
    if case["merge"]:
        assert r["merged_modules"] == len(case["ranks"])
        assert r["merged_weight_diff"] <= MERGE_ATOL, r
        assert r["merged_output_diff"] < ATOL, r


def test_ranks_are_channel_counts_and_config_parses(tmp_path):
    pm = headmask("llama")  # 4 heads, 2 kv groups of head_dim 16
    pm.save_pretrained(tmp_path / "hm")
    out = export_lora(tmp_path / "hm", tmp_path / "lora")
    assert out == tmp_path / "lora"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = LoraConfig.from_pretrained(out)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["lora_dropout"] == 0 and raw["use_rslora"] is False
    assert raw["target_modules"] == sorted(pm.peft_config["default"].target_modules)
    assert raw["base_model_name_or_path"] == pm.peft_config["default"].base_model_name_or_path
    ranks = {m: cfg.rank_pattern.get(m, cfg.r) for m in raw["target_modules"]}
    alphas = {m: cfg.alpha_pattern.get(m, cfg.lora_alpha) for m in raw["target_modules"]}
    assert ranks == alphas  # scaling alpha / r = 1 everywhere
    # layer 0 head 1: q 16 rows, k/v group 0 16 rows, o 16 columns; layer 2 heads 0, 3: q 32, k/v groups 0+1: 32
    assert ranks == {f"model.layers.{li}.self_attn.{p}_proj": 16 if li == 0 else 32 for li in HEADS for p in "qkvo"}
    tensors = load_file(out / "adapter_model.safetensors")
    q2 = "base_model.model.model.layers.2.self_attn.q_proj"
    o2 = "base_model.model.model.layers.2.self_attn.o_proj"
    assert tensors[f"{q2}.lora_A.weight"].shape == (32, 64) and tensors[f"{q2}.lora_B.weight"].shape == (64, 32)
    assert tensors[f"{o2}.lora_A.weight"].shape == (32, 64) and tensors[f"{o2}.lora_B.weight"].shape == (64, 32)
    layer = pm.base_model.model.model.layers[2].self_attn
    # row slice: A = delta, B = one-hot; column slice: A = one-hot, B = delta
    assert torch.equal(tensors[f"{q2}.lora_A.weight"], layer.q_proj.headmask_delta["default"].detach())
    assert torch.equal(tensors[f"{o2}.lora_B.weight"], layer.o_proj.headmask_delta["default"].detach())
    for one_hot in (tensors[f"{q2}.lora_B.weight"], tensors[f"{o2}.lora_A.weight"].t()):
        assert one_hot.sum(0).eq(1).all() and set(one_hot.unique().tolist()) == {0.0, 1.0}
    for key, mod, dim in ((q2, layer.q_proj, 0), (o2, layer.o_proj, 1)):
        dense = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
        placed = torch.zeros(64, 64).index_copy(dim, mod.headmask_index["default"],
                                                mod.headmask_delta["default"].detach())
        assert torch.equal(dense, placed)  # B @ A is the delta at its channels, without rounding
        # get_delta_weight is (W + D) - W: D up to the rounding of W + D
        torch.testing.assert_close(dense, mod.get_delta_weight("default"), atol=1e-7, rtol=0)
    assert not any(k.endswith(".bias") for k in tensors)  # llama has no biases: no lora_bias
    assert raw.get("lora_bias") is False


def test_folder_and_model_exports_are_identical(tmp_path):
    pm = headmask("gpt2")
    pm.save_pretrained(tmp_path / "hm")
    export_lora(tmp_path / "hm", tmp_path / "a")
    export_lora(pm, tmp_path / "b")
    assert (tmp_path / "a/adapter_config.json").read_text() == (tmp_path / "b/adapter_config.json").read_text()
    a, b = load_file(tmp_path / "a/adapter_model.safetensors"), load_file(tmp_path / "b/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["lora_bias"] is True
    c_attn = "base_model.model.transformer.h.2.attn.c_attn"
    bias = a[f"{c_attn}.lora_B.bias"]
    layer = pm.base_model.model.transformer.h[2].attn.c_attn
    idx = layer.headmask_index["default"]
    assert torch.equal(bias[idx], layer.headmask_bias["default"].detach())
    rest = torch.ones_like(bias, dtype=torch.bool)
    rest[idx] = False
    assert bias[rest].eq(0).all() and bias.shape == (3 * 64,)


def test_zero_bias_deltas_need_no_lora_bias(tmp_path):
    pm = get_peft_model(make_model("qwen2"), HeadMaskConfig(heads=HEADS, parts=ALL))  # zero init
    export_lora(pm, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora/adapter_config.json").read_text())
    assert cfg["lora_bias"] is False
    assert not any(k.endswith(".bias") for k in load_file(tmp_path / "lora/adapter_model.safetensors"))


def test_bias_deltas_with_a_bias_less_target_warn_about_merging(tmp_path):
    pm = headmask("qwen2")  # q/k/v have biases, o_proj has none
    with pytest.warns(UserWarning, match="cannot merge.*Leave out the 'o' part"):
        export_lora(pm, tmp_path / "lora")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_lora(headmask("qwen2", parts=["q", "k", "v"]), tmp_path / "lora2")
    assert not [w for w in caught if "merge" in str(w.message)]


# ----- errors: clear message, nothing written -----
def _no_leftovers(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_not_a_headmask_adapter(tmp_path):
    lora = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ExportError, match="is a LORA adapter, not a peft-alps head-mask"):
        export_lora(tmp_path / "lora", tmp_path / "out")
    with pytest.raises(ExportError, match="is a LORA adapter"):
        export_lora(lora, tmp_path / "out")
    with pytest.raises(ExportError, match="no adapter_config.json"):
        export_lora(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_lora(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ExportError, match="PeftModel"):
        export_lora(make_model("llama"), tmp_path / "out")
    with pytest.raises(ExportError, match="no adapter named 'other'.*'default'"):
        export_lora(headmask(), tmp_path / "out", adapter_name="other")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_output_folder_not_empty_needs_overwrite(tmp_path):
    pm = headmask()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        export_lora(pm, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    export_lora(pm, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        export_lora(pm, tmp_path / "file")
    pm.save_pretrained(tmp_path / "hm")
    with pytest.raises(ExportError, match="adapter folder itself"):
        export_lora(tmp_path / "hm", tmp_path / "hm", overwrite=True)
    assert _no_leftovers(tmp_path)


def test_unsupported_lora_bias_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_lora_supports_bias", lambda: False)
    with pytest.raises(ExportError, match="non-zero bias deltas.*lora_bias=True.*upgrade peft"):
        export_lora(headmask("bert"), tmp_path / "out")
    export_lora(headmask("llama"), tmp_path / "llama")  # no biases: still fine
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_inconsistent_or_broken_adapters(tmp_path):
    pm = headmask()
    pm.save_pretrained(tmp_path / "hm")
    cfg = json.loads((tmp_path / "hm/adapter_config.json").read_text())
    cfg["heads"] = {"0": [1, 2], "2": [0, 3]}  # the weights hold 1 head for layer 0
    (tmp_path / "hm/adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="do not belong together"):
        export_lora(tmp_path / "hm", tmp_path / "out")
    weights = tmp_path / "hm/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ExportError, match="not a valid safetensors file: truncated"):
        export_lora(tmp_path / "hm", tmp_path / "out")
    with torch.no_grad():
        pm.base_model.model.model.layers[2].self_attn.q_proj.headmask_delta["default"][0, 0] = float("nan")
    with pytest.raises(ExportError, match="NaN or inf"):
        export_lora(pm, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_a_pickle_bin_adapter_is_refused_unread(tmp_path, monkeypatch, capsys):
    """peft-alps reads only safetensors: an adapter_model.bin (pickle) is refused, never loaded."""
    headmask().save_pretrained(tmp_path / "hm", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "hm").glob("adapter_model.*")) == ["adapter_model.bin"]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(torch.serialization, "load", no_unpickling)
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError, match=r"adapter_model\.bin.*reads only safetensors.*"
                                          r"save_pretrained\(.*safe_serialization=True\)"):
        export_lora(tmp_path / "hm", tmp_path / "out")
    code, out, err = run(capsys, "export-lora", tmp_path / "hm", tmp_path / "out")
    assert code == 2 and out == "" and err.startswith("peft-alps: error: ") and err.count("\n") == 1, err
    assert "reads only safetensors" in err
    assert list((tmp_path / "out").iterdir()) == [] and _no_leftovers(tmp_path)


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_lora(headmask(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ----- CLI -----
def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_lora(tmp_path, capsys):
    headmask("qwen2", parts=["q", "k", "v"]).save_pretrained(tmp_path / "hm")
    code, out, err = run(capsys, "export-lora", tmp_path / "hm", tmp_path / "lora")
    assert code == 0, err
    size = (tmp_path / "lora/adapter_model.safetensors").stat().st_size
    assert "Exported 6 modules as LoRA (3 of rank 16, 3 of rank 32; lora_bias)" in out
    assert f"{size:,} bytes" in out and "head-mask adapter:" in out
    assert LoraConfig.from_pretrained(tmp_path / "lora").peft_type == "LORA"
    before = (tmp_path / "lora/adapter_model.safetensors").read_bytes()
    code, out, err = run(capsys, "export-lora", tmp_path / "hm", tmp_path / "lora")  # not empty
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "not empty" in err and "--overwrite" in err
    assert (tmp_path / "lora/adapter_model.safetensors").read_bytes() == before
    code, out, err = run(capsys, "export-lora", tmp_path / "hm", tmp_path / "lora", "--overwrite")
    assert code == 0, err


def test_cli_export_lora_errors_write_nothing(tmp_path, capsys):
    get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    for argv, message in [((tmp_path / "lora", tmp_path / "out"), "is a LORA adapter"),
                          ((tmp_path / "missing", tmp_path / "out"), "ADAPTER_DIR does not exist"),
                          ((tmp_path / "lora",), "required: OUT_DIR")]:
        code, out, err = run(capsys, "export-lora", *argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("peft-alps: error: ") and message in err
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_peft_convert_to_lora_reproduces_the_adapter_where_it_can():
    """PEFT's own SVD conversion (peft.convert_to_lora) works on head-mask layers it can represent (nn.Linear, no
    bias update) and refuses the others instead of dropping their bias updates."""
    convert_to_lora = getattr(peft, "convert_to_lora", None)
    if convert_to_lora is None:
        pytest.skip(f"peft {peft.__version__} has no convert_to_lora")
    from peft import set_peft_model_state_dict

    pm = get_peft_model(make_model("llama"), HeadMaskConfig(heads={0: [1], 2: [0, 3]}, parts=["q", "k", "v", "o"],
                                                          init_weights=False))
    rank = max(int(m.headmask_index["default"].numel()) for m in pm.modules() if hasattr(m, "headmask_index"))
    lora_config, state = convert_to_lora(pm, rank)
    assert isinstance(lora_config, LoraConfig)
    lora = get_peft_model(make_model("llama"), lora_config)
    set_peft_model_state_dict(lora, state)
    inputs = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(output_of(lora, inputs), output_of(pm, inputs), atol=1e-5, rtol=1e-5)
    for arch in ("qwen2", "gpt2"):  # bias updates; Conv1D
        biased = get_peft_model(make_model(arch), HeadMaskConfig(heads={0: [1]}, init_weights=False))
        with pytest.raises(TypeError, match="do not support LoRA conversion"):
            convert_to_lora(biased, 8)
