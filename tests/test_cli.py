"""``peft-alps localize``: outputs, printed summary, and errors that write nothing."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import make_model

from peft_alps import HeadMaskConfig, cli
from peft_alps.localize import HeadScores

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
    return {name: str(root / name) for name in models}


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


@pytest.mark.parametrize("case", ["missing", "ratio0", "ratio1.5", "arch", "shape", "nonempty"])
def test_errors_write_nothing(case, ckpts, tmp_path, capsys):
    out = tmp_path / "run"
    base, task, extra, match = ckpts["base"], ckpts["task"], [], None
    if case == "missing":
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
    code, stdout, err = run(capsys, "localize", base, task, "--out", out, *extra)
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
