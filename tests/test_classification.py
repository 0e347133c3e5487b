"""Encoders and classifiers end to end: labels carried by the adapter and its model card, ``modules_to_save`` that
names nothing refused, ``localize --data`` on a sequence classifier and a masked LM, the probe's task head, and the
streamed merge of a classifier whose head the base checkpoint lacks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from conftest import make_inputs, make_model
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper

from peft_alps import HeadMaskConfig, cli
from peft_alps.data import classification_batches, label_maps, masked_lm_batches, read_labelled, read_texts
from peft_alps.deploy.merge import merge_checkpoint, merge_checkpoint_report
from peft_alps.scoring.gradient_scores import gradient_head_scores
from peft_alps.scoring.probe import probe_task_model
from peft_alps.scoring.scores import HeadScores
from peft_alps.scoring.weight_scores import score_heads
from peft_alps.tuner.layer import HeadMaskLayer

HEADS = {0: [1], 2: [0, 3]}
LABELS = {0: "business", 1: "politics", 2: "science", 3: "sports", 4: "weather"}
WORDS = {"sports": "team match goal coach", "business": "shares profit bank market",
         "science": "lab study cells telescope", "politics": "vote law minister senate",
         "weather": "rain storm snow wind"}


def bert_tokenizer(folder):
    """A word-level BERT tokenizer (with [MASK]) over the example words, written into ``folder``."""
    words = sorted({w for ws in WORDS.values() for w in ws.split()} | {"the", "a", "was", "today"})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = tf.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    return tok


def examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = list(WORDS)
    out = []
    for _ in range(n):
        label = names[torch.randint(len(names), (1,), generator=g).item()]
        words = WORDS[label].split()
        picked = [words[i] for i in torch.randint(len(words), (3,), generator=g).tolist()]
        out.append({"text": f"today the {' '.join(picked)}", "label": label})
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """An encoder checkpoint without a classifier (like all-MiniLM-L6-v2): tiny BertModel + tokenizer."""
    folder = tmp_path_factory.mktemp("encoder") / "bert"
    make_model("bert").save_pretrained(folder)
    bert_tokenizer(folder)
    return folder


def classifier_adapter(base_folder, out, task_type="SEQ_CLS"):
    """A 5-label classifier on ``base_folder`` with random head deltas and a changed (trained-looking) head,
    saved to ``out``; returns the PeftModel."""
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(
        base_folder, num_labels=5, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
        attn_implementation="eager")
    pm = get_peft_model(model, HeadMaskConfig(heads=HEADS, task_type=task_type, init_weights=False))
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, ModulesToSaveWrapper):
                for p in m.modules_to_save["default"].parameters():
                    p.add_(torch.randn_like(p))
    pm.save_pretrained(out)
    return pm.eval()


def card_snippet(folder, adapter):
    body = (folder / "README.md").read_text()
    return body.split("```python\n")[1].split("```")[0].replace("ADAPTER_REPO_OR_FOLDER", str(adapter))


@pytest.mark.parametrize("task", ["classifier", "causal_lm", pytest.param("minilm", marks=pytest.mark.real_model)])
def test_card_snippet_runs_as_written(task, encoder, tmp_path):
    inputs = make_inputs()
    if task in ("classifier", "minilm"):  # minilm: the real all-MiniLM-L6-v2 checkpoint, which has no classifier
        from peft_alps.pretrained import minilm_dir

        base, adapter = encoder if task == "classifier" else minilm_dir(), tmp_path / "adapter"
        pm = classifier_adapter(base, adapter)
    else:
        base, adapter = tmp_path / "llama", tmp_path / "adapter"
        make_model("llama").save_pretrained(base)
        model = tf.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
        pm = get_peft_model(model, HeadMaskConfig(heads=HEADS, init_weights=False)).eval()
        pm.save_pretrained(adapter)
    with torch.no_grad():
        expected = pm(**inputs).logits
    torch.save((inputs, expected), tmp_path / "io.pt")
    snippet = card_snippet(adapter, adapter)
    assert f'from_pretrained("{base}"' in snippet  # the card names the base it was made on
    assert ("num_labels=5" in snippet) == (task != "causal_lm")
    script = snippet + textwrap.dedent("""
        import sys, torch
        inputs, expected = torch.load(sys.argv[1])
        with torch.no_grad():  # the snippet merged the adapter (and transformers may pick sdpa): float rounding
            got = model(**inputs).logits
        assert got.shape == expected.shape, (got.shape, expected.shape)
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
        print("ok", model.config.num_labels, model.config.id2label)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "io.pt")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if task != "causal_lm":
        assert "ok 5 {0: 'business'" in run.stdout


def test_adapter_records_labels_and_loaders_need_them(encoder, tmp_path):
    pm = classifier_adapter(encoder, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {int(k): v for k, v in config["id2label"].items()} == LABELS
    inputs = make_inputs()
    with torch.no_grad():
        expected = pm(**inputs).logits
    kwargs = dict(num_labels=5, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                  attn_implementation="eager")
    auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter", **kwargs).eval()
    with torch.no_grad():
        assert torch.equal(auto(**inputs).logits, expected)
    # without the label count the base gets 2 labels: refused with the call that fixes it, before any change
    with pytest.raises(ValueError, match="num_labels=5"):
        AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter", attn_implementation="eager")
    two = tf.AutoModelForSequenceClassification.from_pretrained(encoder)
    with pytest.raises(ValueError, match="has 5 labels, but the base model was loaded with 2"):
        PeftModel.from_pretrained(two, tmp_path / "adapter")
    assert not any(isinstance(m, (HeadMaskLayer, ModulesToSaveWrapper)) for m in two.modules())


@pytest.mark.parametrize("arch,head,wrong", [("bert", "classifier", "score"), ("llama", "score", "classifier")])
def test_modules_to_save_naming_nothing_is_refused(arch, head, wrong, tmp_path):
    folder = tmp_path / arch
    make_model(arch).save_pretrained(folder)
    model = tf.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3, pad_token_id=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"modules_to_save names \['{wrong}'\].*head is '{head}'.*SEQ_CLS"):
        get_peft_model(model, HeadMaskConfig(heads=HEADS, modules_to_save=[wrong]))
    assert not any(isinstance(m, (HeadMaskLayer, ModulesToSaveWrapper)) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # task_type SEQ_CLS (with or without the wrong name) trains and saves the real head
    for extra in ([], [wrong]):
        pm = get_peft_model(tf.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3,
                                                                                  pad_token_id=0),
                            HeadMaskConfig(heads=HEADS, task_type="SEQ_CLS", modules_to_save=extra or None))
        wrapper = getattr(pm.base_model.model, head)
        assert isinstance(wrapper, ModulesToSaveWrapper)
        assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())


def test_probe_trains_the_task_head_and_restores_everything(encoder):
    texts, labels = zip(*((e["text"], e["label"]) for e in examples(16)))
    tok = tf.AutoTokenizer.from_pretrained(encoder)
    batches = classification_batches(tok, list(texts), list(labels), batch_size=8)
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(  # no dropout: the probe runs in train mode
        encoder, num_labels=5, attn_implementation="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = probe_task_model(model, batches, steps=4, lr=1e-2)  # the default: attention only, head frozen
    trained = probe_task_model(model, batches, steps=4, lr=1e-2, train_head="auto")  # the classifier trains too
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    # the same first step (the head's gradient does not change the attention step), then the heads diverge
    assert frozen.losses[0] == trained.losses[0] and frozen.losses[-1] != trained.losses[-1]
    assert any(not torch.equal(frozen.tensors[k], trained.tensors[k]) for k in frozen.tensors)
    with pytest.raises(ValueError, match="does not have; its top-level modules are"):
        probe_task_model(model, batches, steps=1, train_head=["head"])


def test_label_maps_and_labelled_files(tmp_path):
    id2label, label2id = label_maps(["b", "a", "b"])
    assert id2label == {0: "a", 1: "b"} and label2id == {"a": 0, "b": 1}
    assert label_maps([2, 0, 1])[0] == {0: "0", 1: "1", 2: "2"}
    (tmp_path / "d.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y"}\n')
    with pytest.raises(ValueError, match="line 2 is not a labelled example"):
        read_labelled(tmp_path / "d.jsonl")


def test_masked_lm_batches(encoder):
    tok = tf.AutoTokenizer.from_pretrained(encoder)
    texts = [e["text"] for e in examples(12)] + ["rain"]
    batches = masked_lm_batches(tok, texts, batch_size=5, probability=0.3, seed=3)
    again = masked_lm_batches(tok, texts, batch_size=5, probability=0.3, seed=3)
    for batch, same, start in zip(batches, again, range(0, len(texts), 5)):
        assert all(torch.equal(batch[k], same[k]) for k in batch)
        plain = tok(texts[start:start + 5], return_tensors="pt", padding=True)["input_ids"]
        chosen = batch["labels"] != -100
        assert torch.equal(batch["labels"][chosen], plain[chosen])  # labels: the original tokens
        assert torch.equal(batch["input_ids"][~chosen], plain[~chosen])  # the rest unchanged
        special = (plain == tok.pad_token_id) | (plain == tok.cls_token_id) | (plain == tok.sep_token_id)
        assert not (chosen & special).any() and chosen.any(dim=1).all()  # real tokens only, one per text at least
    masked = torch.cat([(b["input_ids"] == tok.mask_token_id)[b["labels"] != -100] for b in batches])
    assert 0.5 < masked.float().mean() < 1  # mostly [MASK] (80% expected), not always


def write_labelled(path, n=24):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples(n)))
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_localize_data_on_an_encoder_classifier(encoder, tmp_path, capsys):
    data = write_labelled(tmp_path / "train.jsonl")
    out = tmp_path / "heads"
    code, stdout, err = run(capsys, "localize", encoder, "--data", data, "--steps", "3", "--lr", "1e-2",
                            "--batch-size", "8", "--ratio", "0.25", "--out", out, "--no-heatmap", "--seed", "5")
    assert code == 0, err
    record = json.loads((out / "heads.json").read_text())
    assert record["num_selected"] == 3 and record["sources"]["task"] == "sequence classification"
    assert record["sources"]["labels"] == sorted(WORDS)
    # the same probe, built by hand: a 5-label classifier seeded alike, its heads scored against the checkpoint
    texts, labels = read_labelled(data)
    id2label, label2id = label_maps(labels)
    torch.manual_seed(5)
    model = tf.AutoModelForSequenceClassification.from_pretrained(
        encoder, num_labels=5, id2label=id2label, label2id=label2id, attn_implementation="eager")
    batches = classification_batches(tf.AutoTokenizer.from_pretrained(encoder), texts, labels, label2id, 8, 256)
    probe = probe_task_model(model, batches, steps=3, lr=1e-2)
    torch.testing.assert_close(HeadScores.load(out / "scores.json").scores, score_heads(encoder, probe).scores)
    # the heads go straight into a classifier adapter
    heads = {int(k): v for k, v in record["heads"].items()}
    get_peft_model(model, HeadMaskConfig(heads=heads, task_type="SEQ_CLS"))


def test_localize_data_masked_lm_and_encoder_without_mlm_head(encoder, tmp_path, capsys):
    mlm = tmp_path / "mlm"
    torch.manual_seed(0)
    tf.BertForMaskedLM(make_model("bert").config).save_pretrained(mlm)
    bert_tokenizer(mlm)
    data = tmp_path / "text.txt"
    data.write_text("\n".join(e["text"] for e in examples(12)) + "\n")
    out = tmp_path / "heads"
    code, _, err = run(capsys, "localize", mlm, "--data", data, "--scorer", "gradient", "--batch-size", "4",
                       "--out", out, "--no-heatmap")
    assert code == 0, err
    assert json.loads((out / "heads.json").read_text())["sources"]["task"] == "masked LM"
    model = tf.AutoModelForMaskedLM.from_pretrained(mlm, attn_implementation="eager")
    batches = masked_lm_batches(tf.AutoTokenizer.from_pretrained(mlm), read_texts(data), 4, 256, seed=0)
    torch.testing.assert_close(HeadScores.load(out / "scores.json").scores,
                               gradient_head_scores(model, batches).scores)
    # a sentence-embedding encoder has no MLM head: unlabelled text is refused, naming the fix
    code, stdout, err = run(capsys, "localize", encoder, "--data", data, "--out", tmp_path / "x")
    assert code == 2 and "masked-LM head" in err and '"label"' in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("shard,dtype", [(None, None), ("60KB", None), ("60KB", "bfloat16")])
def test_streamed_merge_adds_the_new_classifier(shard, dtype, encoder, tmp_path, capsys):
    base = encoder
    if shard:
        base = tmp_path / "sharded"
        tf.AutoModel.from_pretrained(encoder).save_pretrained(base, max_shard_size=shard)
        bert_tokenizer(base)
    pm = classifier_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    report = merge_checkpoint_report(base, tmp_path / "adapter", out, dtype=dtype)
    assert report.tensors_added == 2  # classifier.weight and .bias
    # plain transformers, no peft_alps: the trained head, its labels, the adapter's logits
    merged, info = tf.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager",
                                                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert merged.config.num_labels == 5 and merged.config.id2label == LABELS
    inputs = make_inputs()
    reference = pm.merge_and_unload().eval()
    with torch.no_grad():
        if dtype is None:
            assert torch.equal(merged.eval()(**inputs).logits, reference(**inputs).logits)
        else:
            assert merged.classifier.weight.dtype == torch.bfloat16
            assert torch.equal(merged.classifier.weight, reference.classifier.weight.to(torch.bfloat16))
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert "classifier.weight" in index["weight_map"]


def test_merge_cli_reports_added_tensors(encoder, tmp_path, capsys):
    classifier_adapter(encoder, tmp_path / "adapter")
    code, stdout, err = run(capsys, "merge", "--base", encoder, "--adapter", tmp_path / "adapter", "--out",
                           tmp_path / "merged")
    assert code == 0, err
    assert "2 added (modules_to_save the base lacks)" in stdout
    merge_checkpoint(encoder, tmp_path / "adapter", tmp_path / "again")
