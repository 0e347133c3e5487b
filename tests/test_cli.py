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
    from peft_alps.probe import probe_task_model

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
