"""``peft-alps localize``: outputs, printed summary, and errors that write nothing."""

import copy
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import make_model

from peft_alps import HeadMaskConfig, cli
from peft_alps.scoring.weight_scores import HeadScores

LAYER, HEAD = 1, 2  # the head the task checkpoint moves
N_HEADS = 3 * 4  # tiny llama: 3 layers x 4 query heads


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Folders: base, task (base with one query head perturbed), gpt2, llama with 8 heads."""
    root = tmp_path_factory.mktemp("ckpts")
    base = make_model("llama")
    task = copy.deepcopy(base)
    d = base.config.hidden_size // base.config.num_attention_heads
    with torch.no_grad():
        task.model.layers[LAYER].self_attn.q_proj.weight[HEAD * d:(HEAD + 1) * d] += 0.5
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=8, num_key_value_heads=2)
    models = {"base": base, "task": task, "gpt2": make_model("gpt2"), "llama8": tf.LlamaForCausalLM(config)}
    for name, model in models.items():
        model.save_pretrained(root / name)
    char_tokenizer().save_pretrained(root / "base")
    lines = [json.dumps({"question": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)}) for i in range(12)]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return {**{name: str(root / name) for name in models}, "data": str(root / "data.jsonl")}


def char_tokenizer():
    """A character-level tokenizer built offline (ids 2..96 < the tiny models' vocab of 128)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_localize_writes_scores_heads_heatmap(ckpts, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "localize", ckpts["base"], ckpts["task"], "--ratio", "0.1", "--top", "3",
                            "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["heads.json", "heatmap.png", "scores.json"]
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    record = json.loads((out / "heads.json").read_text())
    k = math.ceil(0.1 * N_HEADS)
    assert record["num_selected"] == k == sum(map(len, record["heads"].values()))
    assert HEAD in record["heads"][str(LAYER)]
    assert (record["ratio"], record["metric"], record["representation"]) == (0.1, "pad", "product")
    assert HeadMaskConfig(heads=record["heads"]).num_selected_heads == k

    scores = HeadScores.load(out / "scores.json")
    assert scores.scores.shape == (3, 4) and scores.top(1)[0][:2] == (LAYER, HEAD)

    lines = stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["rank", "layer", "head", "score"]
    assert lines[1].split()[:3] == ["1", str(LAYER), str(HEAD)]
    assert len(lines) == 1 + 3 + 1
    assert f"{k} of {N_HEADS} heads" in lines[-1] and str(out) in lines[-1]
    assert not [p for p in tmp_path.iterdir() if p.name != "run"]  # no staging folder left


def test_per_layer_overwrite_and_no_heatmap(ckpts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run(capsys, "localize", ckpts["base"], ckpts["task"], "--out", out)[0] == 0
    code, _, err = run(capsys, "localize", ckpts["base"], ckpts["task"], "--out", out, "--per-layer",
                       "--metric", "js", "--representation", "concat", "--no-heatmap", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["heads.json", "scores.json"]  # stale heatmap removed
    record = json.loads((out / "heads.json").read_text())
    assert {layer: len(hs) for layer, hs in record["heads"].items()} == {"0": 1, "1": 1, "2": 1}
    assert (record["metric"], record["representation"], record["per_layer"]) == ("js", "concat", True)

    monkeypatch.setattr(cli, "_have_matplotlib", lambda: False)
    code, _, err = run(capsys, "localize", ckpts["base"], ckpts["task"], "--out", tmp_path / "nompl")
    assert code == 0 and "matplotlib is not installed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nompl" / "heatmap.png").exists()


def test_localize_from_data_with_a_probe_equals_the_python_api(ckpts, tmp_path, capsys):
    from peft_alps import score_heads
    from peft_alps.data import read_texts, text_batches
    from peft_alps.scoring.probe import probe_task_model

    out = tmp_path / "run"
    code, stdout, err = run(capsys, "localize", ckpts["base"], "--data", ckpts["data"], "--steps", "3",
                            "--lr", "1e-2", "--examples", "8", "--batch-size", "4", "--ratio", "0.25", "--out", out)
    assert code == 0, err
    got = HeadScores.load(out / "scores.json")
    assert got.sources["scorer"] == "probe" and got.sources["examples"] == 8 and got.sources["steps"] == 3

    model = tf.AutoModelForCausalLM.from_pretrained(ckpts["base"], attn_implementation="eager")
    batches = text_batches(tf.AutoTokenizer.from_pretrained(ckpts["base"]), read_texts(ckpts["data"], 8), 4, 256)
    want = score_heads(ckpts["base"], probe_task_model(model, batches, steps=3, lr=1e-2))
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=0)
    assert (got.scores > 0).all()
    assert json.loads((out / "heads.json").read_text())["num_selected"] == 3


def test_localize_from_data_with_gradients_equals_the_python_api(ckpts, tmp_path, capsys):
    from peft_alps import gradient_head_scores
    from peft_alps.data import read_texts, text_batches

    out = tmp_path / "run"
    code, _, err = run(capsys, "localize", ckpts["base"], "--data", ckpts["data"], "--scorer", "gradient",
                       "--kind", "fisher", "--examples", "6", "--batch-size", "3", "--out", out, "--no-heatmap")
    assert code == 0, err
    got = HeadScores.load(out / "scores.json")
    assert (got.metric, got.representation, got.tau) == ("fisher", "gradient", None)
    model = tf.AutoModelForCausalLM.from_pretrained(ckpts["base"], attn_implementation="eager")
    batches = text_batches(tf.AutoTokenizer.from_pretrained(ckpts["base"]), read_texts(ckpts["data"], 6), 3, 256)
    torch.testing.assert_close(got.scores, gradient_head_scores(model, batches, kind="fisher").scores)


@pytest.mark.parametrize("case", ["missing", "ratio0", "ratio1.5", "arch", "shape", "nonempty", "both", "neither",
                                  "nodata", "baddata", "steps0", "encoder"])
def test_errors_write_nothing(case, ckpts, tmp_path, capsys):
    out = tmp_path / "run"
    base, task, extra, match = ckpts["base"], ckpts["task"], [], None
    if case == "both":
        extra, match = ["--data", ckpts["data"]], "not both"
    elif case == "neither":
        task, match = None, "not neither"
    elif case == "nodata":
        task, extra, match = None, ["--data", tmp_path / "nope.jsonl"], "--data path does not exist"
    elif case == "baddata":
        (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
        task, extra, match = None, ["--data", tmp_path / "bad.jsonl"], "line 1 has keys ['body']"
    elif case == "steps0":
        task, extra, match = None, ["--data", ckpts["data"], "--steps", "0"], "--steps must be >= 1"
    elif case == "encoder":
        bert = tmp_path / "bert"
        make_model("bert").save_pretrained(bert)
        char_tokenizer().save_pretrained(bert)
        base, task, extra, match = bert, None, ["--data", ckpts["data"]], "cannot score"
    elif case == "missing":
        task, match = str(tmp_path / "nope"), str(tmp_path / "nope")
    elif case.startswith("ratio"):
        extra, match = ["--ratio", case[5:]], "--ratio must be in (0, 1]"
    elif case == "arch":
        task, match = ckpts["gpt2"], "cannot score"
    elif case == "shape":
        task, match = ckpts["llama8"], "cannot score"
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        match = "not empty"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()  # drop the set-up's output
    code, stdout, err = run(capsys, "localize", base, *([task] if task else []), "--out", out, *extra)
    assert code != 0 and stdout == ""
    assert err.startswith("peft-alps: error:") and err.count("\n") == 1 and match in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_bad_choice_is_one_line_and_help_lists_options(capsys):
    code, _, err = run(capsys, "localize", "a", "b", "--out", "c", "--metric", "l2")
    assert code == 2 and err.startswith("peft-alps: error:") and err.count("\n") == 1 and "l2" in err
    assert run(capsys, "localize", "--help")[0] == 0


def test_console_script_help():
    exe = Path(sys.executable).parent / "peft-alps"
    top = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and "localize" in top.stdout
    sub = subprocess.run([sys.executable, "-m", "peft_alps", "localize", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert sub.returncode == 0
    for option in ("--ratio", "--metric", "--representation", "--tau", "--per-layer", "--top", "--out",
                   "--overwrite", "--no-heatmap", "matplotlib", "pad", "wasserstein", "concat"):
        assert option in sub.stdout, option


# ----- answering --help and usage errors without loading torch -----
HEAVY = ("torch", "transformers", "peft", "safetensors")


def run_traced(*argv):
    """Run ``python -X importtime ARGV`` (the real entry point); return (exit code, stdout, stderr without the
    import-time lines, the heavy top-level packages it imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *map(str, argv)], capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.splitlines(keepends=True)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    err = "".join(line for line in lines if not line.startswith("import time:"))
    assert "peft_alps" in imported  # the trace works
    return proc.returncode, proc.stdout, err, sorted(imported.intersection(HEAVY))


CONSOLE_SCRIPT = Path(sys.executable).parent / "peft-alps"  # runs `from peft_alps.cli import main`, as installed


@pytest.mark.parametrize("entry", ["module", "console script"])
def test_help_loads_no_torch(entry):
    start = ["-m", "peft_alps"] if entry == "module" else [CONSOLE_SCRIPT]
    for argv, says in ((["--help"], "export-lora"), (["merge", "--help"], "--adapter"),
                       (["localize", "--help"], "--representation")):
        code, out, err, heavy = run_traced(*start, *argv)
        assert (code, err, heavy) == (0, "", []) and says in out, (argv, code, err, heavy)


@pytest.mark.parametrize("argv, says", [
    (["localize"], "the following arguments are required: BASE, --out"),
    (["merge", "--base", "b"], "the following arguments are required: --adapter, --out"),
    (["localize", "a", "b", "--out", "c", "--metric", "l2"], "invalid choice: 'l2'"),
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line_exit_2_and_load_no_torch(argv, says):
    for start in (["-m", "peft_alps"], [CONSOLE_SCRIPT]):
        code, out, err, heavy = run_traced(*start, *argv)
        assert (code, out, heavy) == (2, "", []), (start, argv, code, out, err, heavy)
        assert err.startswith("peft-alps: error: ") and err.count("\n") == 1 and says in err, err


def test_cli_choices_are_the_library_ones():
    from peft_alps.scoring import weight_scores as localize

    assert (cli.METRICS, cli.REPRESENTATIONS) == (localize.METRICS, localize.REPRESENTATIONS)


# ``import peft_alps`` loads no torch and registers HEADMASK when PEFT loads; each case runs in a fresh process
REGISTERED = """
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
import peft_alps.tuner.config, peft_alps.tuner.model
assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HEADMASK] is peft_alps.tuner.config.HeadMaskConfig is peft_alps.HeadMaskConfig
assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HEADMASK] is peft_alps.tuner.model.HeadMaskModel
assert not [f for f in sys.meta_path if type(f).__module__ == "peft_alps"]  # the finder has removed itself
for name, module in list(sys.modules.items()):  # every module keeps its own loader
    if name == "peft" or name.startswith("peft_alps"):
        assert type(module.__spec__.loader).__module__ != "peft_alps" and module.__loader__ is module.__spec__.loader
print("registered")
"""
FIRST_USE = {
    # the model card's snippet: nothing of peft_alps is touched after the import
    "PeftModel.from_pretrained": """
import peft_alps
assert not {"torch", "transformers", "peft"} & set(sys.modules), sorted(sys.modules)
import transformers
from peft import PeftModel
model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(ROOT / "base"), ROOT / "hm")
assert type(model.peft_config["default"]).__name__ == "HeadMaskConfig"
""",
    # a submodule that the registration itself imports (run once, not twice)
    "from peft_alps.tuner.model import": "from peft_alps.tuner.model import HeadMaskModel\nimport peft_alps.tuner.model as m\n"
                                   "assert m.HeadMaskModel is HeadMaskModel\n",
    # a submodule that imports peft_alps.tuner.config (which imports peft) before PEFT is loaded
    "import peft_alps.deploy.merge": "import peft_alps.deploy.merge\n",
    "get_peft_model": """
import peft_alps
from peft import get_peft_model
sys.path.insert(0, TESTS)
from conftest import make_model
model = get_peft_model(make_model("llama"), peft_alps.HeadMaskConfig(heads={1: [2]}))
assert type(model.base_model).__name__ == "HeadMaskModel"
""",
}


@pytest.mark.parametrize("first", list(FIRST_USE))
def test_import_peft_alps_registers_when_peft_loads(first, adapter):
    script = (f"import sys\nfrom pathlib import Path\nROOT = Path({str(adapter)!r})\n"
              f"TESTS = {str(Path(__file__).parent)!r}\n" + FIRST_USE[first] + REGISTERED)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "registered" in proc.stdout, proc.stderr[-3000:]


# ----- a bad layout in adapter_config.json: one line, exit 2, for every command that reads it -----
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A saved head-mask adapter of the tiny llama, and that llama as a base checkpoint (for merge)."""
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("adapter")
    base = make_model("llama")
    base.save_pretrained(root / "base")
    get_peft_model(base, HeadMaskConfig(heads={0: [1], 2: [0, 3]}, init_weights=False)).save_pretrained(root / "hm")
    return root


BAD_LAYOUTS = {  # case -> (change to the recorded layout, regular expression the error must match)
    "unknown": (lambda lay: lay.update(bogus_key=1), r"unknown key.*'bogus_key'"),
    "missing": (lambda lay: lay.pop("head_dim"), r"no \['head_dim'\]"),
    "ill-typed": (lambda lay: lay.update(num_heads="four"), r"num_heads.*four"),
}


@pytest.mark.parametrize("command", ["inspect", "export-lora", "merge"])
@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_a_bad_layout_is_one_line_and_exit_2(command, case, adapter, tmp_path, capsys):
    folder = tmp_path / "hm"
    shutil.copytree(adapter / "hm", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    change, pattern = BAD_LAYOUTS[case]
    change(config["layout"])
    (folder / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    argv = {"inspect": ["inspect", folder], "export-lora": ["export-lora", folder, out],
            "merge": ["merge", "--base", adapter / "base", "--adapter", folder, "--out", out]}[command]
    code, stdout, err = run(capsys, *argv)
    assert code == 2 and stdout == "", (code, stdout, err)
    assert err.startswith("peft-alps: error:") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hm"]  # nothing written
