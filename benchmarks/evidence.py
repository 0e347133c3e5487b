"""The evidence study (issue 20): when does training a few attention heads beat the alternatives, at fair budgets?

Every run is one (task, method, learning rate, seed, split) cell, cached as its own JSON file under
``--out`` (default ``benchmarks/results/evidence/runs/``) the moment it finishes, so the study runs over several
sittings and several processes: start the same command in N processes (``torch`` threads split between them)
and each claims the next cell nobody has claimed (a lock file holding its pid; a dead pid's lock is taken over).

Design
------
* Model: SmolLM2-135M-Instruct (fp32, eager attention). Tasks (``TASKS``, kept after ``--stage pilot``; the
  reading in benchmarks/README.md says why): reasoning-gym families with short answers, generated with seed 0
  and split into disjoint train / validation / test questions. Format ``"Question: {q}\\nAnswer:"`` -> target
  ``" {answer}<|im_end|>"``; the loss is on the target tokens only (``alps_study.nll``).
* Headline metric: exact match of the greedy answer (first line, stripped, compared as a string) on the test
  split; beside it the test answer loss and forgetting (loss on ``pydoc_data.topics`` after minus before).
* Training: ``--steps`` AdamW steps (wd 0, lr linear to 0, clip 1.0: ``alps_study.train``), batch
  ``--batch-size``; the data order depends on the seed only, so every method of a seed sees the same batches.
* One probe per task (``probe_task_model`` on 10% of the training questions, ``--probe-steps``), from which every
  weight-based score is computed once and cached (``scores/<task>.json``): PAD (the paper's), KL, JS, cosine,
  Euclidean, the relative change ``||W_task - W_base|| / ||W_base||`` of each head's q rows and kv group's k/v
  rows, and the gradient x weight score on the same 10%.
* Methods (``METHODS``): heads (q/k/v slices) chosen by ALPS (PAD), by gradient x weight, at random with the same
  head count as ALPS (``random``, the paper's baseline) and with the same *trainable-parameter* count as ALPS
  (``random=params``: under GQA a random draw touches more kv groups), layer-consistent (``lc``), all heads
  (``all``); LoRA on q/k/v at the rank whose parameter count is closest to ALPS's; PEFT's SHiRA (same count) and
  Super-Tuning (same count); full fine-tuning; the KaSA head delta on the ALPS heads (rank 8); GMT
  (``grad_mask_ratio`` 0.5) on the ALPS heads. Ablations: the metrics (Table 5), ratios 5/30% for ALPS and
  param-matched random (Fig. 4; 10% is the main table, 100% is ``all``), ALPS heads from the other task of the
  same family (``alps@<task>``, Table 4), and this project's variants of the score: ``alps-layer`` (PAD divided
  by its layer's mean, so no layer dominates by scale) and ``alps-rel`` (the relative change alone).
* Learning rates: a grid per kind of update (``LR_GRID``), swept on the validation split of the first task with
  seed 0; the best by validation answer loss is used for every task and seed on the test split (not by exact
  match: on 64 validation questions it moves in steps of 0.016, and the sweep's first cells tied within 1-4
  questions across all three rates).
  Ablation variants of the head methods use ALPS's best rate.
* Statistics: per method mean +- sample std over seeds; differences between two methods are paired by (task,
  seed) and reported with a 95% t interval; a difference is called real when that interval excludes 0.

Budget (2 CPU cores; the pilot measured 1.8-3.8 s per step at batch 8 on one thread with three jobs on the
machine, by task: the prompts' lengths differ; ~20-25 s of evaluation per cell): sweep 12 methods x 3 rates = 36
cells; main 3 tasks x 12 methods x 3 seeds = 108; ablations 3 tasks x 10 variants x 3 seeds = 90, plus 9 transfer
cells: 243 cells of 100 steps, ~4 min each on one thread, so ~8 h with two processes, over several sittings.
``--stage`` runs a part; ``--plan`` prints what is left and its estimated minutes.

    python benchmarks/evidence.py --stage pilot      # which tasks a 135M model can learn
    python benchmarks/evidence.py --stage all        # sweep, main, ablations (resumes)
    python benchmarks/evidence.py --report           # tables, statistics, plots from the cached runs
    python benchmarks/evidence.py --tiny --out DIR   # a random 2-layer model, a few steps: the test's run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import alps_study as study  # noqa: E402  (nll, mean_nll, make_batches, general_batches, train, lora_rank)
from common import machine, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "evidence"
PARTS = ["q", "k", "v"]
PROMPT = "Question: {}\nAnswer:"

# name -> (reasoning-gym dataset, its options). Candidates for the pilot; TASKS are the ones kept.
CANDIDATES = {
    "basic_arithmetic": ("basic_arithmetic", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2,
                                                  operators=("+", "-"), allow_parentheses=False,
                                                  allow_negation=False)),
    "chain_sum": ("chain_sum", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)),
    "letter_counting": ("letter_counting", dict(min_words=3, max_words=5)),
    "spell_backward": ("spell_backward", dict(min_word_len=3, max_word_len=5)),
    "family_relationships": ("family_relationships", dict()),
    "count_bits": ("count_bits", dict(min_n=1, max_n=4095)),
    "gcd": ("gcd", dict(min_numbers=2, max_numbers=2, min_value=1, max_value=60)),
    "multiplication": ("basic_arithmetic", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=("*",),
                                                allow_parentheses=False, allow_negation=False)),
    "leg_counting": ("leg_counting", dict(min_animals=1, max_animals=2)),
    "number_sequence": ("number_sequence", dict()),
}
TASKS = ("basic_arithmetic", "number_sequence", "family_relationships")  # why: benchmarks/README.md (the pilot)
TRANSFER = {"basic_arithmetic": "chain_sum"}  # heads found on the key's data, used to train on the value's
METRICS = ("pad", "kl", "js", "cosine", "euclidean")

# method -> the kind of update (its learning-rate grid)
METHODS = {"alps": "heads", "grad": "heads", "random": "heads", "random=params": "heads", "lc": "heads",
           "all": "heads", "lora": "lora", "shira": "sparse", "supertuning": "sparse", "full": "full",
           "kasa": "lora", "gmt": "heads"}
LR_GRID = {"heads": (3e-4, 1e-3, 3e-3), "lora": (3e-4, 1e-3, 3e-3), "sparse": (1e-3, 3e-3, 1e-2),
           "full": (1e-5, 3e-5, 1e-4)}
ABLATIONS = ("kl", "js", "cosine", "euclidean", "alps 5%", "alps 30%", "random=params 5%", "random=params 30%",
             "alps-layer", "alps-rel")


# ----- data -----
def generate(task: str, n: int) -> list[tuple[str, str]]:
    """``n`` distinct (question, answer) pairs of ``task`` (reasoning-gym, seed 0)."""
    import reasoning_gym

    name, options = CANDIDATES[task]
    seen, pairs = set(), []
    for x in reasoning_gym.create_dataset(name, size=3 * n, seed=0, **options):
        if x["question"] not in seen:
            seen.add(x["question"])
            pairs.append((x["question"], str(x["answer"])))
        if len(pairs) == n:
            return pairs
    raise SystemExit(f"{task}: only {len(pairs)} distinct questions in {3 * n} generated; need {n}.")


def splits(task: str, tokenizer, sizes: dict) -> dict[str, list[dict]]:
    """``{"train", "val", "test"}``: disjoint lists of dicts (prompt ids, target ids, answer)."""
    pairs = generate(task, sum(sizes.values()))
    eos = tokenizer.eos_token_id
    rows = [dict(prompt=tokenizer(PROMPT.format(q), add_special_tokens=False).input_ids,
                 target=tokenizer(" " + a, add_special_tokens=False).input_ids + [eos], answer=a) for q, a in pairs]
    out, start = {}, 0
    for name in ("test", "val", "train"):  # test first: the same test questions whatever --train is
        out[name] = rows[start:start + sizes[name]]
        start += sizes[name]
    return out


@torch.no_grad()
def exact_match(model, tokenizer, examples, batch_size: int) -> float:
    """Share of ``examples`` whose greedy continuation's first line equals the answer (stripped strings)."""
    model.eval()
    pad, hits = tokenizer.pad_token_id, 0
    longest = max(len(e["target"]) for e in examples)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(len(e["prompt"]) for e in chunk)
        ids = torch.tensor([[pad] * (width - len(e["prompt"])) + e["prompt"] for e in chunk])
        mask = (torch.arange(width) >= torch.tensor([width - len(e["prompt"]) for e in chunk])[:, None]).long()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest + 2, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for e, text in zip(chunk, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)):
            hits += text.strip().split("\n")[0].strip() == e["answer"].strip()
    return hits / len(examples)


# ----- head selections and their sizes -----
def selection_params(layout, heads: dict) -> int:
    """Trainable numbers of q/k/v head slices ``heads`` (a kv group's k/v rows count once per layer)."""
    width = layout.hidden_size
    modules = dict.fromkeys(layout.modules[p] for p in PARTS)
    return sum(len(layout.channels(m, PARTS, hs)) * width for hs in heads.values() for m in modules)


def random_matched(layout, target: int, seed: int) -> dict[int, list[int]]:
    """Random heads whose :func:`selection_params` is as close to ``target`` as possible from below: heads in a
    seeded random order, each taken if it still fits (a head of an untouched kv group costs its q, k and v rows)."""
    order = [(layer, h) for layer in range(layout.num_layers) for h in range(layout.num_heads)]
    random.Random(seed).shuffle(order)
    chosen: dict[int, list[int]] = {}
    total = 0
    for layer, h in order:
        trial = {**chosen, layer: sorted(chosen.get(layer, []) + [h])}
        before = selection_params(layout, {layer: chosen.get(layer, [])})
        cost = selection_params(layout, {layer: trial[layer]}) - before
        if total + cost <= target:
            chosen, total = trial, total + cost
    return dict(sorted(chosen.items()))


def head_scores(scores: dict, name: str, layout):
    """A HeadScores from the cached ``scores[name]`` (a [layers][heads] list)."""
    from peft_alps import HeadScores

    return HeadScores(scores=torch.tensor(scores[name]), metric=name, representation="product", tau=1.0,
                      layout=layout.to_dict())


def selection(method: str, scores: dict, layout, seed: int) -> dict[int, list[int]]:
    """The heads of a head method (``"alps"``, ``"alps 30%"``, ``"random=params 5%"``, ``"kl"``, ...)."""
    from peft_alps import layer_consistent_heads, random_heads, select_heads

    name, _, pct = method.partition(" ")
    ratio = float(pct.rstrip("%")) / 100 if pct else 0.1
    n_layers, n_heads = layout.num_layers, layout.num_heads
    if name in ("alps", "kasa", "gmt"):
        return select_heads(head_scores(scores, "pad", layout), ratio)
    if name in METRICS or name in ("grad", "alps-rel"):
        return select_heads(head_scores(scores, {"alps-rel": "relative", "grad": "grad_x_weight"}.get(name, name),
                                        layout), ratio)
    if name == "alps-layer":
        pad = torch.tensor(scores["pad"])
        return select_heads(head_scores({"x": (pad / pad.mean(1, keepdim=True)).tolist()}, "x", layout), ratio)
    if name == "random":
        return random_heads(n_layers, n_heads, ratio, seed)
    if name == "random=params":
        return random_matched(layout, selection_params(layout, selection(f"alps {pct or '10%'}", scores, layout, 0)),
                              seed)
    if name == "lc":
        return layer_consistent_heads(n_layers, n_heads, ratio, seed)
    if name == "all":
        return {layer: list(range(n_heads)) for layer in range(n_layers)}
    raise ValueError(f"not a head method: {method!r}")


def peft_config(method: str, scores: dict, layout, config, seed: int):
    """The PEFT config of ``method`` (None for full fine-tuning). Budgets are matched to ALPS 10%'s count."""
    from peft import LoraConfig, ShiraConfig, SupertuningConfig

    from peft_alps import HeadMaskConfig

    if method == "full":
        return None
    qkv = ["q_proj", "k_proj", "v_proj"]
    if method in ("lora", "shira", "supertuning"):
        target = selection_params(layout, selection("alps", scores, layout, 0))
    if method == "lora":
        r = study.lora_rank(target, config)
        return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=qkv, task_type="CAUSAL_LM")
    if method == "shira":
        return ShiraConfig(r=study.lora_rank(target, config), target_modules=qkv, random_seed=seed)
    if method == "supertuning":
        return SupertuningConfig(target_modules=qkv, sparsity=1 - target / study.all_heads_params(config))
    heads = selection(method.split("@")[0], scores if "@" not in method else scores["transfer"], layout, seed)
    extra = {"kasa": dict(delta_kind="kasa", kasa_rank=8), "gmt": dict(grad_mask_ratio=0.5)}.get(method, {})
    return HeadMaskConfig(heads=heads, parts=PARTS, **extra)


# ----- the cells -----
def cell_key(task, method, lr, seed, split) -> str:
    return f"{task}__{method.replace(' ', '').replace('%', 'pct').replace('@', 'from-')}__lr{lr:g}__s{seed}__{split}"


class Claims:
    """Lock files so that several processes share the cells: ``claim`` creates ``<key>.lock`` (O_EXCL) with our
    pid; a lock whose pid no longer runs is taken over."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def done(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def claim(self, key: str) -> bool:
        lock = self.folder / f"{key}.lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    os.kill(int(lock.read_text() or 0), 0)
                    return False  # a live process holds it
                except (ProcessLookupError, ValueError):
                    lock.unlink(missing_ok=True)  # stale: its process died
                    continue
                except FileNotFoundError:
                    continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            if self.done(key) is not None:  # finished by someone between our check and the claim
                lock.unlink()
                return False
            return True
        return False

    def release(self, key: str) -> None:
        (self.folder / f"{key}.lock").unlink(missing_ok=True)


class Study:
    """Loads the model, the data and the cached scores lazily; runs cells."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.claims = Claims(self.out / "runs")
        self._base = self._tokenizer = None
        self._data, self._scores = {}, {}

    # model, data, scores
    @property
    def base(self):
        if self._base is None:
            self._base, self._tokenizer = load_model(self.args.tiny)
            self._base.requires_grad_(False)
        return self._base

    @property
    def tokenizer(self):
        self.base  # loads both
        return self._tokenizer

    @property
    def layout(self):
        from peft_alps import HeadLayout

        return HeadLayout.from_model_config(self.base.config)

    def data(self, task: str) -> dict:
        if task not in self._data:
            a = self.args
            d = splits(task, self.tokenizer, dict(train=a.train, val=a.val, test=a.test))
            pad = self.tokenizer.pad_token_id
            d["batches"] = {s: study.make_batches(random.Random(s).sample(d["train"], len(d["train"])),
                                                  a.batch_size, pad) for s in range(max(a.seeds) + 1)}
            d["eval"] = {split: study.make_batches(d[split], a.eval_batch, pad) for split in ("val", "test")}
            self._data[task] = d
        return self._data[task]

    def general(self):
        if "general" not in self._data:
            self._data["general"] = study.general_batches(self.tokenizer, self.args.general_chunks, 128, 4)
            self._data["base_general"] = study.mean_nll(self.base, self._data["general"])
        return self._data["general"], self._data["base_general"]

    def scores(self, task: str) -> dict:
        """The cached scores of ``task`` (computed once, under a lock, by whichever process needs them first)."""
        path = self.out / "scores" / f"{task}.json"
        while task not in self._scores:
            if path.exists():
                self._scores[task] = json.loads(path.read_text())
            elif self.claims.claim(f"scores_{task}"):
                try:
                    write_json(path, compute_scores(self, task))
                finally:
                    self.claims.release(f"scores_{task}")
            else:
                time.sleep(5)
        return self._scores[task]

    # cells
    def run(self, task, method, lr, seed, split) -> dict:
        """Train ``method`` on ``task``'s training split and evaluate on ``split``; the cell's JSON."""
        from peft import get_peft_model

        a, data, layout = self.args, self.data(task), self.layout
        if method == "base":  # the reference: the model as it is, no training
            return self.evaluate(self.base, dict(task=task, method=method, lr=0.0, seed=seed, split=split, steps=0,
                                                 trainable=0, heads=None, first_loss=None, last_loss=None,
                                                 train_s=0.0))
        scores = {} if method in ("random", "lc", "all", "full") else dict(self.scores(task))  # no probe needed
        if "@" in method:
            scores["transfer"] = self.scores(method.split("@")[1])
        torch.manual_seed(seed)
        config = peft_config(method, scores, layout, self.base.config, seed)
        model = copy.deepcopy(self.base)
        if config is None:
            model.requires_grad_(True)
        else:
            model = get_peft_model(model, config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        heads = getattr(config, "heads", None)
        reg = model.kasa_loss if method == "kasa" else None
        losses, seconds = study.train(model, data["batches"][seed], a.steps, lr, regulariser=reg)
        if config is not None:
            model = model.merge_and_unload()
        return self.evaluate(model, dict(task=task, method=method, lr=lr, seed=seed, split=split, steps=a.steps,
                                         trainable=trainable,
                                         heads={str(k): v for k, v in heads.items()} if heads is not None else None,
                                         first_loss=losses[0], last_loss=statistics.mean(losses[-10:]),
                                         train_s=seconds))

    def evaluate(self, model, row: dict) -> dict:
        """``row`` plus the answer loss and exact match on its split and the forgetting (general-text loss after
        minus before)."""
        t, data = time.perf_counter(), self.data(row["task"])
        general, base_general = self.general()
        row.update(loss=study.mean_nll(model, data["eval"][row["split"]]),
                   exact_match=exact_match(model, self.tokenizer, data[row["split"]], self.args.eval_batch),
                   forgetting=study.mean_nll(model, general) - base_general, eval_s=time.perf_counter() - t)
        return row

    def cell(self, task, method, lr, seed, split, wait=False) -> dict | None:
        """The cached result, or run it if nobody else is (``wait``: block until another process finishes it)."""
        key = cell_key(task, method, lr, seed, split)
        while True:
            done = self.claims.done(key)
            if done is not None:
                return done
            if self.claims.claim(key):
                try:
                    row = self.run(task, method, lr, seed, split)
                    write_json(self.claims.folder / f"{key}.json", row)
                    print(f"[{time.strftime('%H:%M:%S')}] {key}: EM {row['exact_match']:.3f} loss {row['loss']:.4f} "
                          f"forgetting {row['forgetting']:+.4f} trainable {row['trainable']:,} "
                          f"({row['train_s']:.0f}+{row['eval_s']:.0f} s)", flush=True)
                    return row
                finally:
                    self.claims.release(key)
            if not wait:
                return None
            time.sleep(10)

    # stages
    def best_lr(self, method: str) -> float:
        """The sweep's best rate for ``method`` (ablation variants of the head selection use ALPS's)."""
        method = method if method in METHODS else "alps"
        kind = METHODS[method]
        task = self.args.sweep_task
        rows = [self.cell(task, method, lr, 0, "val", wait=True) for lr in LR_GRID[kind]]
        return min(rows, key=lambda r: r["loss"])["lr"]

    def sweep_cells(self):
        task = self.args.sweep_task
        return [(task, m, lr, 0, "val") for m in self.args.methods for lr in LR_GRID[METHODS[m]]]

    def main_cells(self):
        return [(t, "base", 0.0, 0, "test") for t in self.args.tasks] + \
            [(t, m, None, s, "test") for s in self.args.seeds for t in self.args.tasks for m in self.args.methods]

    def ablation_cells(self):
        cells = [(t, m, None, s, "test") for s in self.args.seeds for t in self.args.tasks for m in self.args.ablations]
        for source, target in TRANSFER.items():
            if source in self.args.tasks:
                cells += [(target, m, None, s, "test") for s in self.args.seeds
                          for m in ("alps", f"alps@{source}", "random=params")]
        return cells

    def cells(self, stage: str):
        return {"sweep": self.sweep_cells, "main": self.main_cells, "ablations": self.ablation_cells}[stage]()


def load_model(tiny: bool):
    """SmolLM2-135M-Instruct (eager), or with ``tiny`` a random 2-layer Llama with SmolLM2's tokenizer."""
    import transformers as tf

    from peft_alps.pretrained import load_smollm2, smollm2_checkpoint_dir

    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    if not tiny:
        model, tokenizer = load_smollm2(attn_implementation="eager")
    else:
        tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_checkpoint_dir())
        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=True)
        config._attn_implementation = "eager"
        model = tf.LlamaForCausalLM(config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def compute_scores(s: Study, task: str) -> dict:
    """One probe on 10% of ``task``'s training questions; every score of the study from it (lists [layer][head])."""
    from peft_alps import gradient_head_scores, probe_task_model, score_heads

    a, data, layout = s.args, s.data(task), s.layout
    n = max(a.batch_size, len(data["train"]) // 10)
    probe_batches = study.make_batches(random.Random(1000).sample(data["train"], n), a.batch_size,
                                       s.tokenizer.pad_token_id)
    probe = probe_task_model(s.base, probe_batches, steps=a.probe_steps, lr=a.probe_lr, loss_fn=study.nll)
    out = {m: score_heads(s.base, probe, metric=m).scores.tolist() for m in METRICS}
    out["grad_x_weight"] = gradient_head_scores(s.base, probe_batches, kind="grad_x_weight",
                                                loss_fn=study.nll).scores.tolist()
    base_w = dict(s.base.named_parameters())
    rel, norm = [], []
    for layer in range(layout.num_layers):
        d2, w2 = torch.zeros(layout.num_heads), torch.zeros(layout.num_heads)
        for part in PARTS:
            name = f"model.{layout.module_name(layer, layout.modules[part])}.weight"
            w, t = base_w[name].detach(), probe.tensors[name]
            for h in range(layout.num_heads):
                rows = list(layout.part_channels(part, h))
                d2[h] += (t[rows] - w[rows]).pow(2).sum()
                w2[h] += w[rows].pow(2).sum()
        rel.append((d2.sqrt() / w2.sqrt()).tolist())
        norm.append(w2.sqrt().tolist())
    out.update(relative=rel, weight_norm=norm, probe_losses=probe.losses, probe_s=probe.seconds, probe_examples=n)
    return out


# ----- report -----
def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of ``diffs`` and its two-sided 95% Student-t interval (``nan`` width for one value)."""
    from scipy import stats

    m = statistics.mean(diffs)
    if len(diffs) < 2:
        return m, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def paired(rows: list[dict], a: str, b: str, metric: str = "exact_match", tasks=None) -> dict | None:
    """``a`` minus ``b`` on ``metric``, paired by (task, seed) over the test cells both have."""
    by = {(r["method"], r["task"], r["seed"]): r[metric] for r in rows if r["split"] == "test"}
    pairs = [(by[(a, t, s)], by[(b, t, s)]) for (m, t, s) in by if m == a and (b, t, s) in by
             and (tasks is None or t in tasks)]
    if not pairs:
        return None
    mean, low, high = t_interval([x - y for x, y in pairs])
    return dict(a=a, b=b, metric=metric, n=len(pairs), mean=mean, low=low, high=high,
                real=bool(low > 0 or high < 0) if not math.isnan(low) else False)


def summary(rows: list[dict]) -> list[dict]:
    """Per (task, method) on the test split: mean, std and n of exact match, loss, forgetting, trainable."""
    out = []
    test = [r for r in rows if r["split"] == "test"]
    for key in dict.fromkeys((r["task"], r["method"]) for r in test):
        rs = [r for r in test if (r["task"], r["method"]) == key]
        cell = dict(task=key[0], method=key[1], n=len(rs), lr=rs[0]["lr"], trainable=rs[0]["trainable"])
        for m in ("exact_match", "loss", "forgetting"):
            vals = [r[m] for r in rs]
            cell[m] = statistics.mean(vals)
            cell[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(cell)
    return out


CLAIMS = {
    "table1": ("ALPS vs random / LC / all attention / LoRA (paper Table 1)",
               [("alps", "random"), ("alps", "random=params"), ("alps", "lc"), ("alps", "all"), ("alps", "lora"),
                ("alps", "grad"), ("alps", "full"), ("alps", "shira"), ("alps", "supertuning"), ("kasa", "lora"),
                ("gmt", "alps")]),
    "table5": ("PAD vs KL / JS / cosine / Euclidean selections (paper Table 5)",
               [("alps", m) for m in ("kl", "js", "cosine", "euclidean")]),
    "fig4": ("ratio 5 / 10 / 30 / 100% (paper Fig. 4)",
             [("alps 5%", "random=params 5%"), ("alps", "random=params"), ("alps 30%", "random=params 30%"),
              ("alps", "alps 5%"), ("alps 30%", "alps"), ("all", "alps 30%")]),
    "table4": ("heads found on one data set reused on another of the same family (paper Table 4)",
               [(f"alps@{s}", "alps") for s in TRANSFER] + [(f"alps@{s}", "random=params") for s in TRANSFER]),
    "table3": ("forgetting on general text (paper Table 3; lower is better)",
               [("alps", m) for m in ("random=params", "lora", "all", "full")]),
    "variants": ("this project's score variants against the paper's PAD",
                 [("alps-layer", "alps"), ("alps-rel", "alps")]),
}


def current(rows) -> list[dict]:
    """The sweep cells and the test cells run at the rate the sweep now picks (the lowest validation loss of the
    method, ALPS's for a head-selection variant): a grid extended later leaves cells at an old rate behind."""
    rows = list(rows)
    best = {}
    for r in rows:
        if r["split"] == "val" and r["loss"] < best.get(r["method"], (math.inf, None))[0]:
            best[r["method"]] = (r["loss"], r["lr"])

    def keep(r):
        if r["split"] == "val" or r["method"] == "base":
            return True
        method = r["method"].split("@")[0]
        method = method if method in METHODS else "alps"
        return method not in best or best[method][1] == r["lr"]

    return [r for r in rows if keep(r)]


def report(out: Path) -> dict:
    """Read every cached cell; write ``summary.json``, ``evidence.md`` and one plot per claim into ``out``."""
    rows = current(json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json")))
    table = summary(rows)
    tests = {}
    for claim, (title, pairs) in CLAIMS.items():
        metric = "forgetting" if claim == "table3" else "exact_match"
        found = [p for a, b in pairs if (p := paired(rows, a, b, metric)) is not None]
        found += [p for a, b in pairs if (p := paired(rows, a, b, "loss")) is not None] if claim != "table3" else []
        tests[claim] = dict(title=title, tests=found)
    analysis = selection_analysis(out)
    pilot = json.loads((out / "pilot.json").read_text()) if (out / "pilot.json").exists() else {}
    result = dict(summary=table, claims=tests, selection_analysis=analysis, cells=len(rows),
                  sweep=[r for r in rows if r["split"] == "val"],
                  majority_baseline={t: p["majority_exact_match"] for t, p in pilot.items()
                                     if "majority_exact_match" in p})
    write_json(out / "summary.json", result)
    (out / "evidence.md").write_text(markdown(result))
    plots(rows, table, analysis, out)
    return result


def selection_analysis(out: Path) -> dict:
    """Per task: where ALPS's 10% heads sit by layer, and how PAD relates to weight scale and relative change."""
    from scipy import stats

    def top10(values) -> set[int]:
        flat = torch.tensor(values).flatten()
        return set(flat.argsort(descending=True)[:math.ceil(0.1 * flat.numel())].tolist())

    res, alps_heads = {}, {}
    for path in sorted((out / "scores").glob("*.json")):
        sc = json.loads(path.read_text())
        n_layers, n_heads = torch.tensor(sc["pad"]).shape
        alps_heads[path.stem] = top = top10(sc["pad"])
        k = len(top)
        per_layer = torch.bincount(torch.tensor(sorted(top)) // n_heads, minlength=n_layers).tolist()
        flat = {n: torch.tensor(sc[n]).flatten().tolist() for n in ("pad", "relative", "weight_norm", "grad_x_weight")}
        res[path.stem] = dict(
            alps_heads_per_layer=per_layer, random_expected_per_layer=k / n_layers,
            share_in_first_quarter=sum(per_layer[:max(1, n_layers // 4)]) / k,
            spearman_pad_vs_weight_norm=stats.spearmanr(flat["pad"], flat["weight_norm"])[0],
            spearman_pad_vs_relative=stats.spearmanr(flat["pad"], flat["relative"])[0],
            spearman_pad_vs_grad=stats.spearmanr(flat["pad"], flat["grad_x_weight"])[0],
            overlap_pad_relative_top10=len(top & top10(sc["relative"])) / k,
            overlap_pad_grad_top10=len(top & top10(sc["grad_x_weight"])) / k)
    for task, heads in alps_heads.items():  # the same heads on another task? (chance: 10%)
        res[task]["overlap_alps_heads_with"] = {other: len(heads & h) / len(heads)
                                                for other, h in alps_heads.items() if other != task}
    return res


def markdown(result: dict) -> str:
    lines = ["| task | method | lr | trainable | exact match | answer loss | forgetting | n |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["summary"]:
        lines.append(f"| {c['task']} | {c['method']} | {c['lr']:g} | {c['trainable']:,} | {c['exact_match']:.3f} ± "
                     f"{c['exact_match_std']:.3f} | {c['loss']:.4f} ± {c['loss_std']:.4f} | {c['forgetting']:+.4f} | "
                     f"{c['n']} |")
    for claim, c in result["claims"].items():
        lines += ["", f"**{claim}: {c['title']}** (paired by task and seed; 95% t interval; * = excludes 0)", "",
                  "| a − b | metric | n | mean | 95% interval |", "|---|---|---|---|---|"]
        for t in c["tests"]:
            lines.append(f"| {t['a']} − {t['b']} | {t['metric']} | {t['n']} | {t['mean']:+.4f} | "
                         f"[{t['low']:+.4f}, {t['high']:+.4f}]{' *' if t['real'] else ''} |")
    if result["majority_baseline"]:
        lines += ["", "Always answering the most common training answer (validation split, from the pilot): " +
                  ", ".join(f"{t} {v:.3f}" for t, v in result["majority_baseline"].items()) + "."]
    lines += ["", "**Where ALPS's heads sit** (10% by PAD, from the one probe per task)", ""]
    for task, a in result["selection_analysis"].items():
        lines.append(f"- {task}: heads per layer {a['alps_heads_per_layer']} (uniform: "
                     f"{a['random_expected_per_layer']:.1f}); first quarter of the layers holds "
                     f"{a['share_in_first_quarter']:.0%}; Spearman PAD vs ||W_h|| "
                     f"{a['spearman_pad_vs_weight_norm']:+.2f}, "
                     f"vs relative change {a['spearman_pad_vs_relative']:+.2f}, vs grad x weight "
                     f"{a['spearman_pad_vs_grad']:+.2f}; top-10% overlap PAD/relative "
                     f"{a['overlap_pad_relative_top10']:.0%}, PAD/grad x weight {a['overlap_pad_grad_top10']:.0%}; "
                     "ALPS heads shared with " + ", ".join(f"{o} {v:.0%}" for o, v in
                                                           a["overlap_alps_heads_with"].items()) + " (chance 10%)")
    return "\n".join(lines) + "\n"


def plots(rows, table, analysis, out: Path) -> None:
    """One picture per claim (``claim_<name>.png``) plus ``selection_layers.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c["task"] for c in table))
    for claim, (title, pairs) in CLAIMS.items():
        methods = list(dict.fromkeys(m for p in pairs for m in p))
        metric = "forgetting" if claim == "table3" else "exact_match"
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods) * max(1, len(tasks))), 3.5))
        width = 0.8 / max(1, len(tasks))
        for i, task in enumerate(tasks):
            cells = {c["method"]: c for c in table if c["task"] == task}
            xs = [j + i * width for j, m in enumerate(methods) if m in cells]
            ax.bar(xs, [cells[m][metric] for m in methods if m in cells], width,
                   yerr=[cells[m][metric + "_std"] for m in methods if m in cells], label=task, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=30, ha="right")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(title, fontsize=9)
        if tasks:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"claim_{claim}.png", dpi=110)
        plt.close(fig)
    if analysis:
        fig, ax = plt.subplots(figsize=(7, 3))
        for task, a in analysis.items():
            ax.plot(a["alps_heads_per_layer"], marker="o", label=task)
        ax.axhline(next(iter(analysis.values()))["random_expected_per_layer"], color="grey", ls="--", label="uniform")
        ax.set_xlabel("layer")
        ax.set_ylabel("ALPS 10% heads")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "selection_layers.png", dpi=110)
        plt.close(fig)


# ----- pilot -----
def pilot(s: Study) -> None:
    """Per candidate task: base exact match on validation, then all-heads training for ``--steps`` at lr 1e-3; and
    the exact match of always answering the most common training answer (a task whose trained exact match is near
    it has learned the answer distribution, not the task)."""
    path = s.out / "pilot.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for task in s.args.candidates:
        if task in done:
            continue
        data = s.data(task)
        answers = [e["answer"] for e in data["train"]]
        majority = max(set(answers), key=answers.count)
        row = dict(majority_answer=majority, majority_exact_match=sum(e["answer"] == majority for e in data["val"]) /
                   len(data["val"]), base_exact_match=exact_match(s.base, s.tokenizer, data["val"], s.args.eval_batch),
                   base_loss=study.mean_nll(s.base, data["eval"]["val"]))
        trained = s.run(task, "all", 1e-3, 0, "val")
        row.update(trained_exact_match=trained["exact_match"], trained_loss=trained["loss"], steps=s.args.steps,
                   train_s=trained["train_s"], step_s=trained["train_s"] / s.args.steps, eval_s=trained["eval_s"],
                   sample=[(e["answer"]) for e in data["val"][:3]])
        done[task] = row
        write_json(path, done)
        print(f"pilot {task}: EM {row['base_exact_match']:.3f} -> {row['trained_exact_match']:.3f} (always the most "
              f"common training answer: {row['majority_exact_match']:.3f}), loss "
              f"{row['base_loss']:.3f} -> {row['trained_loss']:.3f} ({row['step_s']:.2f} s/step)", flush=True)


def plan(s: Study) -> None:
    """Cells per stage, how many are cached, and the minutes the rest should take on one thread (2.2 s/step, the
    pilot's median, + 25 s of evaluation)."""
    per_run = s.args.steps * 2.2 + 25
    for stage in s.args.stage_list:
        cells = s.cells(stage)
        # a cell whose rate the sweep picks (lr None) counts as cached at any rate
        done = [c for c in cells
                if any(s.claims.folder.glob(cell_key(*c[:2], 0, *c[3:]).replace("lr0", "lr*") + ".json")
                       if c[2] is None else [s.claims.done(cell_key(*c))])]
        print(f"{stage}: {len(cells)} cells, {len(done)} cached, ~{(len(cells) - len(done)) * per_run / 60:.0f} "
              f"min left")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--stage", default="all", help="pilot, sweep, main, ablations (with the transfer cells) or all (= the "
                                       "last three), or a comma-separated list")
    add("--tasks", nargs="+", default=list(TASKS), choices=list(CANDIDATES))
    add("--sweep-task", default=TASKS[0], choices=list(CANDIDATES),
        help="the task whose validation split picks every method's rate (so a run on other --tasks reuses it)")
    add("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES), help="pilot tasks")
    add("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--steps", type=int, default=100)
    add("--batch-size", type=int, default=8)
    add("--train", type=int, default=600)
    add("--val", type=int, default=64)
    add("--test", type=int, default=128)
    add("--eval-batch", type=int, default=32)
    add("--probe-steps", type=int, default=30)
    add("--probe-lr", type=float, default=1e-4)
    add("--general-chunks", type=int, default=8, help="128-token chunks of pydoc_data.topics for forgetting")
    add("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add("--out", default=str(RESULTS))
    add("--report", action="store_true", help="only write the tables and plots from the cached cells")
    add("--plan", action="store_true", help="print the cells per stage and the estimated minutes")
    add("--tiny", action="store_true", help="a random 2-layer model and a few examples and steps (for the test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.train, args.val, args.test, args.steps, args.probe_steps = 16, 4, 4, 2, 2
        args.batch_size, args.eval_batch, args.general_chunks, args.seeds = 4, 4, 1, args.seeds[:2]
    args.stage_list = ["sweep", "main", "ablations"] if args.stage == "all" else args.stage.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Study(args)
    if args.report:
        report(Path(args.out))
        return
    if args.plan:
        plan(s)
        return
    command = " ".join(["benchmarks/evidence.py"] + (argv if argv is not None else sys.argv[1:]))
    write_json(Path(args.out) / f"settings_{args.stage.replace(',', '+')}.json",
               dict(vars(args), machine=machine(), command=command))
    if "pilot" in args.stage_list:
        pilot(s)
    lrs = {}
    for stage in ("sweep", "main", "ablations"):
        if stage not in args.stage_list:
            continue
        for cell in s.cells(stage):
            task, method, lr, seed, split = cell
            if lr is None:
                base_method = method.split("@")[0]
                lrs.setdefault(base_method, s.best_lr(base_method))
                lr = lrs[base_method]
            s.cell(task, method, lr, seed, split)
    if any(st in args.stage_list for st in ("sweep", "main", "ablations")):
        # cells other processes were still running: wait for them, then report
        for stage in ("sweep", "main", "ablations"):
            if stage in args.stage_list:
                for task, method, lr, seed, split in s.cells(stage):
                    s.cell(task, method, lr if lr is not None else lrs[method.split("@")[0]], seed, split, wait=True)
        report(Path(args.out))


if __name__ == "__main__":
    main()
