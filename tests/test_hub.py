"""Hub readiness: the model card save_pretrained writes, loading by repo id from an offline Hugging Face cache,
and ``peft-alps inspect``."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import make_inputs, make_model, output_of
from peft import LoraConfig, get_peft_model

from peft_alps import HeadMaskConfig, cli

HEADS = {0: [1], 2: [0, 3]}
SELECTION = {"method": "ALPS", "metric": "pad", "ratio": 0.25}


def front_matter(path) -> tuple[dict, str]:
    text = path.read_text()
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


@pytest.fixture
def saved(tmp_path):
    """A llama adapter with random deltas on a base saved to ``tmp_path/base`` (so base_model is recorded)."""
    make_model("llama").save_pretrained(tmp_path / "base")
    base = make_model("llama")
    base.name_or_path = str(tmp_path / "base")
    pm = get_peft_model(base, HeadMaskConfig(heads=HEADS, parts=["q", "k", "v", "o"], init_weights=False,
                                             selection=SELECTION))
    pm.save_pretrained(tmp_path / "adapter")
    return pm, tmp_path / "adapter"


def test_model_card_metadata_and_summary(saved):
    pm, folder = saved
    meta, body = front_matter(folder / "README.md")
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == pm.peft_config["default"].base_model_name_or_path == str(folder.parent / "base")
    assert {"peft-alps", "head-mask", f"base_model:adapter:{folder.parent / 'base'}"} <= set(meta["tags"])
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    delta_bytes = sum(p.numel() * p.element_size() for p in pm.parameters() if p.requires_grad)
    file_bytes = (folder / "adapter_model.safetensors").stat().st_size
    assert f"| trainable parameters | {trainable:,} in 8 projections |" in body  # q,k,v,o x layers 0 and 2
    assert f"{delta_bytes:,} bytes" in body and f"adapter_model.safetensors: {file_bytes:,} bytes" in body
    assert "| selected heads | 3 of 12 (25.0%)" in body
    assert "| parts | q, k, v, o |" in body and "| selection | method: ALPS, metric: pad, ratio: 0.25 |" in body
    assert "| 0 | 1 |" in body and "| 2 | 0, 3 |" in body
    assert "import peft_alps" in body and "from transformers import LlamaForCausalLM" in body


def test_saving_again_replaces_only_our_section(saved):
    pm, folder = saved
    card = folder / "README.md"
    card.write_text(card.read_text() + "\nMy own notes stay.\n")
    with torch.no_grad():
        next(p for p in pm.parameters() if p.requires_grad).zero_()  # no effect on the counts
    pm.save_pretrained(folder)
    meta, body = front_matter(card)
    assert body.count("## peft-alps head-mask adapter") == 1 and "My own notes stay." in body
    assert meta["tags"].count("peft-alps") == 1


def test_unnamed_base_model_gets_no_empty_base_model_metadata(tmp_path):
    pm = get_peft_model(make_model("gpt2"), HeadMaskConfig(heads={1: [2]}))
    pm.save_pretrained(tmp_path)
    meta, body = front_matter(tmp_path / "README.md")
    assert "base_model" not in meta and "base_model:adapter:" not in meta["tags"]
    assert "| base model | not recorded |" in body


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out_hub_cache(cache, repo_id: str, folder) -> None:
    """Store ``folder``'s files as huggingface_hub stores a download: content-addressed blobs (sha256 for LFS
    files such as safetensors, git blob sha1 for the rest), a snapshot of relative symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else _git_blob_sha1(data)
        (repo / "blobs" / etag).write_bytes(data)
        os.symlink(f"../../blobs/{etag}", snapshot / f.name)


def test_loads_by_repo_id_from_the_offline_hub_cache(saved, tmp_path):
    pm, folder = saved
    inputs = make_inputs()
    with torch.no_grad():
        expected = output_of(pm, inputs)
        with pm.disable_adapter():
            base_out = output_of(pm, inputs)
    torch.save((inputs, expected, base_out), tmp_path / "io.pt")
    lay_out_hub_cache(tmp_path / "hub", "user/heads", folder)
    # run the card's own load snippet, with this repo id, in a process that has only the cache
    _, body = front_matter(folder / "README.md")
    snippet = body.split("```python\n")[1].split("```")[0].replace("ADAPTER_REPO_OR_FOLDER", "user/heads")
    script = snippet + textwrap.dedent("""
        import sys, torch
        inputs, expected, base_out = torch.load(sys.argv[1])
        with torch.no_grad():  # the snippet merged the adapter (and transformers picked sdpa): float rounding
            got = model(**inputs).logits
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
        assert not torch.allclose(got, base_out, atol=1e-3, rtol=0)  # the adapter changed something
        try:  # the same call for a repo that is not in the cache must fail: nothing came from the network
            PeftModel.from_pretrained(model, "user/not-cached")
        except Exception as e:
            print("missing repo:", type(e).__name__)
        else:
            raise SystemExit("user/not-cached loaded")
        print("loaded user/heads from the cache")
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "io.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loaded user/heads from the cache" in run.stdout and "missing repo:" in run.stdout


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_prints_the_summary(saved, capsys, tmp_path):
    pm, folder = saved
    code, out, err = run_cli(capsys, "inspect", folder, "--json")
    assert code == 0, err
    info = json.loads(out)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert (info["peft_type"], info["selected"], info["total"], info["delta_params"]) == (
        "HEADMASK", 3, 12, trainable)
    assert info["delta_bytes"] == 4 * trainable and info["heads"] == {"0": [1], "2": [0, 3]}
    assert info["file_bytes"] == (folder / "adapter_model.safetensors").stat().st_size
    assert info["kv_groups"] == 3 and info["parts"] == ["q", "k", "v", "o"]  # (0, g0), (2, g0), (2, g1)

    pytest.importorskip("matplotlib")
    code, out, err = run_cli(capsys, "inspect", folder, "--heatmap", tmp_path / "h.png")
    assert code == 0, err
    assert f"| trainable parameters | {trainable:,} in 8 projections |" in out
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_errors(tmp_path, capsys):
    lora = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    (tmp_path / "empty").mkdir()
    for folder, says in ((tmp_path / "lora", "not a peft-alps head-mask"), (tmp_path / "empty", "no adapter_config"),
                         (tmp_path / "missing", "not a folder")):
        code, out, err = run_cli(capsys, "inspect", folder)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_inspect_reports_a_truncated_weights_file(saved, capsys):
    _, folder = saved
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, out, err = run_cli(capsys, "inspect", folder)
    assert code == 2 and "truncated" in err
