"""Classification with an encoder and learning rates: what the probe should train, and which lr to use.

Three small studies, each result written to the JSON as soon as it exists (a rerun skips what is there):

* ``probe``: all-MiniLM-L6-v2 as ``BertForSequenceClassification`` (5 labels, new random classifier) on a
  templated 5-topic task whose label is the topic of the FIRST clause, half the sentences carrying a second clause
  of another topic (so word order matters). Heads (10%, ALPS-PAD) are localized with ``probe_task_model`` with the
  classifier frozen (``train_head=False``) or trained (``"auto"``), at two probe learning rates; then a head-mask
  adapter on those heads (``task_type="SEQ_CLS"``: the classifier is trained too) is trained and its held-out
  accuracy measured. A random 10% of heads for scale.
* ``lr_encoder``: the same task: head-mask 10% (heads from the default probe) and LoRA r8 (query, value) at
  several learning rates, held-out accuracy.
* ``lr_decoder``: SmolLM2-135M-Instruct on gsm_symbolic problems (causal LM): head-mask 10% (gradient scores) and
  LoRA r8 (q_proj, v_proj) at several learning rates, held-out mean token loss.

    python benchmarks/classify.py [--studies probe lr_encoder lr_decoder] [--seeds 0 1] [--quick]

Defaults are small on purpose (2 shared CPU cores): 30 adapter steps of 16 sentences, 20 probe steps, 15 LM steps.

Writes benchmarks/results/classify.json (one record per run) and prints a table per study.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

from common import machine, write_json
from peft_alps import HeadMaskConfig, score_heads, select_heads
from peft_alps.data import classification_batches, gsm_symbolic_texts, label_maps, text_batches
from peft_alps.pretrained import load_smollm2, minilm_dir
from peft_alps.scoring.gradient_scores import gradient_head_scores
from peft_alps.scoring.probe import probe_task_model
from peft_alps.scoring.selection import random_heads

RATIO = 0.1
TOPICS = {
    "sports": ["the striker scored twice in the final", "the home team won the match", "the coach praised the "
               "defence", "the runner broke the record", "fans filled the stadium"],
    "business": ["the company raised its profit forecast", "shares fell after the earnings report", "the bank "
                 "cut interest rates", "investors bought more bonds", "the firm hired a new chief executive"],
    "science": ["researchers found a new species of frog", "the telescope observed a distant galaxy", "the lab "
                "sequenced the virus genome", "physicists measured the particle mass", "the probe landed on mars"],
    "politics": ["parliament passed the budget bill", "the minister resigned over the scandal", "voters went to "
                 "the polls", "the senator proposed a new law", "the president met foreign leaders"],
    "weather": ["heavy rain flooded the valley", "a storm closed the coastal roads", "temperatures dropped below "
                "freezing", "the heatwave lasted a week", "snow covered the mountain passes"],
}
JOINS = ["{a}, while {b}", "{a} as {b}", "{a}; meanwhile {b}", "{a} even though {b}", "{a} and {b}"]
PREFIX = ["", "today ", "yesterday ", "on monday ", "this week "]


def topic_examples(n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` sentences and labels: the label is the topic of the first clause; half carry a second clause from
    another topic."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    texts, labels = [], []
    for _ in range(n):
        label = rng.choice(names)
        a = rng.choice(PREFIX) + rng.choice(TOPICS[label])
        if rng.random() < 0.5:
            other = rng.choice([t for t in names if t != label])
            a = rng.choice(JOINS).format(a=a, b=rng.choice(TOPICS[other]))
        texts.append(a + ".")
        labels.append(label)
    return texts, labels


def load_classifier(seed: int, id2label: dict, label2id: dict):
    torch.manual_seed(seed)  # the new classifier's init
    return tf.AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=len(id2label), id2label=id2label, label2id=label2id, local_files_only=True)


def train(model, batches, steps: int, lr: float, seed: int) -> list[float]:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    order = random.Random(seed)
    for _ in range(steps):
        batch = order.choice(batches)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, batches) -> dict:
    """Held-out accuracy and mean cross-entropy (the loss separates runs that all classify almost everything right)."""
    model.eval()
    right = total = 0
    loss = 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        right += (logits.argmax(-1) == b["labels"]).sum().item()
        loss += torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum").item()
        total += len(b["labels"])
    return dict(accuracy=right / total, heldout_loss=loss / total)


@torch.no_grad()
def mean_loss(model, batches) -> float:
    model.eval()
    return statistics.fmean(model(**b).loss.item() for b in batches)


class Results:
    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
        self.data.update(settings=settings, machine=machine())

    def has(self, key: str) -> bool:
        return key in self.data["runs"]

    def add(self, key: str, record: dict) -> None:
        self.data["runs"][key] = record
        write_json(self.path, self.data)
        print(key, {k: v for k, v in record.items() if k not in ("heads", "losses")}, flush=True)


def encoder_task(args):
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    train_texts, train_labels = topic_examples(args.train_examples, seed=100)
    test_texts, test_labels = topic_examples(args.test_examples, seed=200)
    id2label, label2id = label_maps(train_labels)
    train_b = classification_batches(tokenizer, train_texts, train_labels, label2id, args.batch_size, 48)
    test_b = classification_batches(tokenizer, test_texts, test_labels, label2id, 64, 48)
    return id2label, label2id, train_b, test_b


def probe_heads(seed, id2label, label2id, batches, steps, lr, train_head):
    model = load_classifier(seed, id2label, label2id)
    probe = probe_task_model(model, batches, steps=steps, lr=lr, train_head=train_head)
    heads = select_heads(score_heads(model, probe), ratio=RATIO)
    return heads, probe


def headmask_accuracy(seed, id2label, label2id, heads, train_b, test_b, steps, lr):
    model = get_peft_model(load_classifier(seed, id2label, label2id),
                           HeadMaskConfig(heads=heads, task_type="SEQ_CLS"))
    t0 = time.perf_counter()
    losses = train(model, train_b, steps, lr, seed)
    return dict(**evaluate(model, test_b), loss_last10=statistics.fmean(losses[-10:]),
                train_seconds=time.perf_counter() - t0)


def study_probe(args, results: Results):
    id2label, label2id, train_b, test_b = encoder_task(args)
    for seed in args.seeds:
        for probe_lr in args.probe_lrs:
            for train_head in (False, "auto"):
                key = f"probe/seed{seed}/probe_lr{probe_lr:g}/train_head={train_head}"
                if results.has(key):
                    continue
                heads, probe = probe_heads(seed, id2label, label2id, train_b, args.probe_steps, probe_lr, train_head)
                rec = headmask_accuracy(seed, id2label, label2id, heads, train_b, test_b, args.steps, args.train_lr)
                rec.update(heads={str(k): v for k, v in heads.items()}, probe_loss_first=probe.losses[0],
                           probe_loss_last=probe.losses[-1], probe_seconds=probe.seconds)
                results.add(key, rec)
        key = f"probe/seed{seed}/random"
        if not results.has(key) and not args.no_random:
            config = load_classifier(seed, id2label, label2id).config
            heads = random_heads(config.num_hidden_layers, config.num_attention_heads, ratio=RATIO, seed=seed)
            rec = headmask_accuracy(seed, id2label, label2id, heads, train_b, test_b, args.steps, args.train_lr)
            results.add(key, dict(rec, heads={str(k): v for k, v in heads.items()}))


def study_lr_encoder(args, results: Results):
    id2label, label2id, train_b, test_b = encoder_task(args)
    for seed in args.seeds:
        heads = None
        for lr in args.encoder_lrs:
            for method in ("headmask", "lora"):
                key = f"lr_encoder/seed{seed}/{method}/lr{lr:g}"
                if results.has(key):
                    continue
                if method == "headmask":
                    if heads is None:
                        heads, _ = probe_heads(seed, id2label, label2id, train_b, args.probe_steps, args.probe_lrs[0],
                                               "auto")
                    config = HeadMaskConfig(heads=heads, task_type="SEQ_CLS")
                else:
                    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
                model = get_peft_model(load_classifier(seed, id2label, label2id), config)
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                t0 = time.perf_counter()
                losses = train(model, train_b, args.steps, lr, seed)
                results.add(key, dict(**evaluate(model, test_b), loss_last10=statistics.fmean(losses[-10:]),
                                      trainable=trainable, train_seconds=time.perf_counter() - t0))


def study_lr_decoder(args, results: Results):
    base, tokenizer = load_smollm2(attn_implementation="eager")
    texts = gsm_symbolic_texts(args.lm_train + args.lm_test, seed=0)
    train_b = text_batches(tokenizer, texts[:args.lm_train], 4, args.lm_max_length)
    test_b = text_batches(tokenizer, texts[args.lm_train:], 4, args.lm_max_length)
    base_loss = mean_loss(base, test_b)
    heads = select_heads(gradient_head_scores(base, train_b[:8]), ratio=RATIO)
    for seed in args.seeds:
        for method, lrs in (("headmask", args.decoder_lrs), ("lora", args.decoder_lrs)):
            for lr in lrs:
                key = f"lr_decoder/seed{seed}/{method}/lr{lr:g}"
                if results.has(key):
                    continue
                if method == "headmask":
                    config = HeadMaskConfig(heads=heads)
                else:
                    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
                torch.manual_seed(seed)
                model = get_peft_model(copy.deepcopy(base), config)
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                t0 = time.perf_counter()
                losses = train(model, train_b, args.lm_steps, lr, seed)
                results.add(key, dict(heldout_loss=mean_loss(model, test_b), base_heldout_loss=base_loss,
                                      loss_last10=statistics.fmean(losses[-10:]), trainable=trainable,
                                      train_seconds=time.perf_counter() - t0))
                del model


def tables(data: dict) -> str:
    runs = data["runs"]
    out = []

    def group(prefix, value):
        rows = {}
        for key, rec in runs.items():
            if key.startswith(prefix + "/"):
                _, seed, *rest = key.split("/")
                rows.setdefault("/".join(rest), []).append(rec[value])
        return rows

    for study, value in (("probe", "accuracy"), ("probe", "heldout_loss"), ("lr_encoder", "accuracy"),
                         ("lr_encoder", "heldout_loss"), ("lr_decoder", "heldout_loss")):
        rows = group(study, value)
        if not rows:
            continue
        out += [f"\n{study}: {value} (mean +- sd over seeds; per seed)", "", f"| variant | {value} | per seed |",
                "|---|---|---|"]
        for name, vals in sorted(rows.items()):
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out.append(f"| {name} | {statistics.fmean(vals):.4f} +- {sd:.4f} | "
                       f"{', '.join(f'{v:.4f}' for v in vals)} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="+", default=["probe", "lr_encoder", "lr_decoder"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train-examples", type=int, default=400)
    parser.add_argument("--test-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="adapter training steps (encoder)")
    parser.add_argument("--train-lr", type=float, default=1e-3, help="adapter lr in the probe study")
    parser.add_argument("--probe-steps", type=int, default=20)
    parser.add_argument("--probe-lrs", nargs="+", type=float, default=[1e-4])
    parser.add_argument("--encoder-lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--decoder-lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--lm-train", type=int, default=80)
    parser.add_argument("--lm-test", type=int, default=32)
    parser.add_argument("--lm-steps", type=int, default=15)
    parser.add_argument("--lm-max-length", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on 2 shared cores two "
                        "threads made a MiniLM step 10x slower)")
    parser.add_argument("--no-random", action="store_true", help="probe study: skip the random-heads reference")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "classify.json"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.probe_steps, args.lm_steps = [0], 3, 2, 2
        args.train_examples, args.test_examples, args.lm_train, args.lm_test = 32, 32, 8, 4
        args.probe_lrs, args.encoder_lrs, args.decoder_lrs = [1e-4], [1e-3], [1e-3]
    torch.set_num_threads(args.threads)
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "studies")}
    results = Results(Path(args.out), settings)
    for study in args.studies:
        globals()[f"study_{study}"](args, results)
    print(tables(results.data))


if __name__ == "__main__":
    main()
