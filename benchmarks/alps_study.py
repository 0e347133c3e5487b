"""A miniature ALPS experiment: which attention heads to fine-tune, on a real model and real task data.

Design (every number below is a default; the run prints and saves the values it used):

* Base: SmolLM2-135M-Instruct (``peft_alps.pretrained.load_smollm2``, fp32, eager attention; 30 layers x 9
  query heads, 3 kv heads). Untouched base = the "base" row.
* Task: reasoning-gym ``gsm_symbolic`` math word problems (``pip install "reasoning-gym>=0.1.20"``), generated
  with seed 0. Format, the same for training and evaluation: prompt ``"Question: {question}\\nAnswer:"``,
  target ``" {answer_cot}<|im_end|>"`` (worked solution ending in ``#### N``, then EOS). Prompt and target are
  tokenized separately and concatenated. Problems longer than ``--max-length`` tokens are dropped; of the rest,
  the first ``--heldout`` are the held-out set (never used for training or probing), the others the training set.
* Loss: next-token cross-entropy on the target tokens only (prompt and padding labelled -100), in training and
  in the held-out answer loss (token-weighted mean NLL over all held-out target tokens, EOS included).
* Training, the same for every method: ``--steps`` AdamW steps (weight decay 0), batch ``--batch-size``,
  lr ``--lr`` decaying linearly to 0 (no warm-up), gradient-norm clip 1.0. Each seed shuffles the training set
  (data order); all methods of one seed see the same batches. Attention-only regime: q/k/v projections.
* Methods (K = ceil(ratio * 270) heads, ratio 0.1 -> 27 heads):
  ``alps``: PAD (product representation, tau 1) between the base and a probe fine-tune
  (``probe_task_model``, attention only, ``--probe-steps`` steps at constant lr ``--probe-lr``) on a 10% subset
  of the training set; the subset is re-drawn per seed, so the ALPS head choice can differ per seed (its
  stability is reported). ``grad``: ``gradient_head_scores(kind="grad_x_weight")`` on the same probe subset.
  ``random``: ``random_heads(seed=s)``. ``lc``: ``layer_consistent_heads(seed=s)``. ``all``: every head of every
  layer (full attention q/k/v). These five are ``HeadMaskConfig(heads=..., parts=[q, k, v])``.
  ``lora``: stock PEFT LoRA on q_proj, k_proj, v_proj with rank r chosen so its trainable count is closest
  to the first seed's ALPS count (fixed for all seeds; lora_alpha = 2r, dropout 0). ``base``: no training.
  The probe and the gradient scores use the same answer-only loss as training.
  ``--ratios 0.1 0.3`` adds 30% variants of alps and random.
* Check (head-mask methods): after training, ``merge_and_unload()``; every weight outside the selected heads'
  q/k/v rows (``HeadLayout.channels``) must be bitwise equal to the base model's (``torch.equal``), and every
  selected head's q rows and its kv group's k and v rows must have changed. A failure stops the study.
* Metrics on the merged model: held-out answer loss; exact match of the final number (greedy decoding, batched
  with left padding, at most ``--max-new-tokens``, a row stops at EOS or once a ``#### N`` line is complete;
  the number after ``####``, else the last number in the text, is
  compared numerically with the reference ``answer``) on the first ``--em-examples`` held-out problems;
  forgetting = general-text loss after training minus the base model's. General text: ``--general-chunks``
  chunks of ``--max-length`` tokens of Python's own documentation (``pydoc_data.topics``, standard library,
  present in every CPython install; not in the training data, though likely in SmolLM2's pre-training corpus).
* Seeds ``--seeds`` (default 0 1 2) for every trained method; tables give mean +- sample std (min..max in the
  JSON with every per-seed value and every selection).
* Budget: the defaults (18 training runs of 30 steps at ~2-3 s/step, ~1 min of evaluation each) take about
  45 minutes on 2 CPU cores.

Outputs: a markdown table (printed and ``benchmarks/results/alps_study.md``), JSON
(``benchmarks/results/alps_study.json``) and the seed-0 PAD heatmap (``alps_study_heatmap.png``);
with ``--quick`` (one tiny configuration, a subset of methods, < 3 minutes on 2 CPU cores): ``alps_study_quick.*``.

    python benchmarks/alps_study.py [--quick] [--steps N] [--seeds 0 1 2] [--methods ...]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf
from peft import LoraConfig, get_peft_model

from common import machine, write_json
from peft_alps import (HeadLayout, HeadMaskConfig, gradient_head_scores, layer_consistent_heads, probe_task_model,
                       random_heads, score_heads, select_heads)
from peft_alps.heatmap import plot_heatmap
from peft_alps.pretrained import load_smollm2

RESULTS = Path(__file__).parent / "results"
METHODS = ("base", "alps", "grad", "random", "lc", "all", "lora")
PARTS = ["q", "k", "v"]
PROMPT = "Question: {}\nAnswer:"
FINAL = re.compile(r"####\s*\$?\s*-?[\d,]*\.?\d+\s*\n")  # a complete final answer line


def load_task(tokenizer, n: int, heldout: int, max_length: int):
    """``(train, heldout, dropped)``: gsm_symbolic problems as dicts of prompt/target token ids and the answer."""
    import reasoning_gym

    examples, seen, dropped = [], set(), 0
    for x in reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=0):
        prompt = tokenizer(PROMPT.format(x["question"])).input_ids
        target = tokenizer(" " + x["metadata"]["answer_cot"]).input_ids + [tokenizer.eos_token_id]
        if len(prompt) + len(target) > max_length or x["question"] in seen:
            dropped += 1
            continue
        seen.add(x["question"])
        examples.append(dict(prompt=prompt, target=target, answer=x["answer"]))
    if len(examples) <= heldout:
        raise SystemExit(f"only {len(examples)} problems fit in {max_length} tokens; need more than {heldout}.")
    return examples[heldout:], examples[:heldout], dropped


def make_batches(examples, batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded causal-LM batches; labels are the target tokens only (-100 on prompt and padding)."""
    batches = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(len(e["prompt"]) + len(e["target"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, e in enumerate(chunk):
            seq, n_p = e["prompt"] + e["target"], len(e["prompt"])
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            labels[row, n_p:len(seq)] = torch.tensor(e["target"])
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return batches


def general_batches(tokenizer, chunks: int, length: int, batch_size: int) -> list[dict]:
    """``chunks`` consecutive ``length``-token pieces of ``pydoc_data.topics`` (sorted topics), every token scored."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics[k] for k in sorted(topics))).input_ids[:chunks * length]
    data = torch.tensor(ids).view(chunks, length)
    return [dict(input_ids=b, attention_mask=torch.ones_like(b), labels=b.clone()) for b in data.split(batch_size)]


def nll(model, batch, reduction: str = "mean") -> torch.Tensor:
    """Next-token NLL of the labelled tokens, as ``model(**batch).loss`` but with the LM head applied only at
    those positions (the prompt needs no logits). ``model``: a Llama causal LM or a PeftModel around one."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return F.cross_entropy(lm.lm_head(hidden[:, :-1][keep]).float(), labels[keep], reduction=reduction)


@torch.no_grad()
def mean_nll(model, batches) -> float:
    """Token-weighted mean next-token NLL over all labelled tokens of ``batches``."""
    model.eval()
    total = sum(nll(model, b, "sum").item() for b in batches)
    return total / sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def parse_number(text: str):
    """The number after ``####``, else the last number in ``text`` (commas and ``$`` ignored); None if none."""
    text = text.split("\nQuestion:")[0].replace(",", "")
    found = re.findall(r"####\s*\$?\s*(-?\d+(?:\.\d+)?)", text) or re.findall(r"-?\d+(?:\.\d+)?", text)
    return float(found[-1]) if found else None


class AnswerDone(tf.StoppingCriteria):
    """Per row: stop once the generated text has ``#### N`` and a line break after it (the answer is complete)."""

    def __init__(self, tokenizer, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([bool(FINAL.search(t)) or "\nQuestion:" in t for t in texts], device=input_ids.device)


@torch.no_grad()
def exact_match(model, tokenizer, examples, max_new_tokens: int, batch_size: int) -> tuple[float, list[str]]:
    """Fraction of ``examples`` whose greedy answer's final number equals the reference; plus the generations."""
    model.eval()
    pad, hits, outputs = tokenizer.pad_token_id, 0, []
    config = tf.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(len(e["prompt"]) for e in chunk)
        ids = torch.tensor([[pad] * (width - len(e["prompt"])) + e["prompt"] for e in chunk])
        mask = torch.tensor([[0] * (width - len(e["prompt"])) + [1] * len(e["prompt"]) for e in chunk])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             stopping_criteria=tf.StoppingCriteriaList([AnswerDone(tokenizer, width)]))
        for e, row in zip(chunk, out[:, width:]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(text)
            hits += parse_number(text) == float(e["answer"])
    return hits / len(examples), outputs


def train(model, batches, steps: int, lr: float, regulariser=None) -> tuple[list[float], float]:
    """``steps`` AdamW steps over ``batches`` (cycled), lr linear to 0, clip 1.0. Returns (losses, seconds).
    ``regulariser()`` (a scalar), if given, is added to each step's loss; the losses returned are the task loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        loss = nll(model, batches[step % len(batches)])
        (loss if regulariser is None else loss + regulariser()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, time.perf_counter() - start


def check_heads_only(base, merged, heads: dict) -> int:
    """Assert ``merged`` equals ``base`` bitwise outside the selected heads' q/k/v rows, and that every
    selected head's q rows and its kv group's k/v rows changed. Returns the number of tensors compared."""
    layout = HeadLayout.from_model_config(base.config)
    ref, new = base.state_dict(), merged.state_dict()
    assert ref.keys() == new.keys(), "merged model has different tensors"
    for name, w in new.items():
        found = layout.locate(name.removesuffix(".weight"), PARTS) if name.endswith(".weight") else None
        if found is None:
            assert torch.equal(w, ref[name]), f"{name} changed but holds no selected head"
            continue
        layer, path = found
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[layout.channels(path, PARTS, heads.get(layer, []))] = False
        assert torch.equal(w[keep], ref[name][keep]), f"{name}: a non-selected row changed"
        for h in heads.get(layer, []):
            for part in PARTS:
                if layout.modules[part] == path:
                    rows = list(layout.part_channels(part, h))
                    assert not torch.equal(w[rows], ref[name][rows]), f"{name}: head {h} ({part}) did not change"
    return len(new)


def all_heads_params(config) -> int:
    """Trainable count of training every head's q/k/v rows (the ``all`` method)."""
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    return config.num_hidden_layers * config.hidden_size * (config.hidden_size + 2 * kv)


def lora_rank(target: float, config) -> int:
    """LoRA rank on q/k/v whose trainable count is closest to ``target``."""
    d, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_rank = config.num_hidden_layers * ((d + d) + 2 * (d + kv))
    return max(1, round(target / per_rank))


def run(base, method: str, seed: int, peft_config, batches, evals, args) -> dict:
    """Train a fresh copy of ``base`` with ``peft_config`` (None = no training), merge, check, evaluate."""
    torch.manual_seed(seed)
    model, losses, seconds, trainable = copy.deepcopy(base), [], 0.0, 0
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        losses, seconds = train(model, batches, args.steps, args.lr)
        model = model.merge_and_unload()
    checked = 0
    heads = getattr(peft_config, "heads", None)
    if heads is not None:
        checked = check_heads_only(base, model, heads)
    t = time.perf_counter()
    heldout_loss = mean_nll(model, evals["heldout"])
    general_loss = mean_nll(model, evals["general"])
    em, outputs = exact_match(model, evals["tokenizer"], evals["em"], args.max_new_tokens, args.eval_batch)
    del model
    gc.collect()
    return dict(method=method, seed=seed, trainable=trainable, train_s=seconds, eval_s=time.perf_counter() - t,
                step_s=seconds / max(1, len(losses)), first_loss=losses[0] if losses else None,
                last_loss=statistics.mean(losses[-5:]) if losses else None, heldout_loss=heldout_loss,
                exact_match=em, general_loss=general_loss, checked_tensors=checked,
                heads={str(k): v for k, v in heads.items()} if heads is not None else None,
                sample_outputs=outputs[:3])


def spread(values) -> dict:
    values = [v for v in values if v is not None]
    return dict(mean=statistics.mean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), n=len(values))


def summarize(runs: list[dict], base_general: float) -> list[dict]:
    """One row per method: mean/std/min/max of every metric over seeds."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        rows.append(dict(method=method, seeds=[r["seed"] for r in rs], trainable=spread([r["trainable"] for r in rs]),
                         heldout_loss=spread([r["heldout_loss"] for r in rs]),
                         exact_match=spread([r["exact_match"] for r in rs]),
                         forgetting=spread([r["general_loss"] - base_general for r in rs]),
                         train_s=spread([r["train_s"] for r in rs])))
    return rows


def markdown(rows: list[dict], settings: dict, machine_info: dict) -> str:
    """The results table plus the settings, selection-stability, LoRA and machine lines."""
    def pm(s, fmt="{:.4f}", scale=1.0):
        std = fmt.replace("+", "").format(s["std"] * scale)
        return fmt.format(s["mean"] * scale) + (f" ± {std}" if s["n"] > 1 else "")

    def count(s):
        return f"{s['mean']:,.0f}" + (f" ({s['min']:,.0f}–{s['max']:,.0f})" if s["min"] != s["max"] else "")

    lines = ["| method | seeds | trainable params | held-out answer loss | exact match % | forgetting (general-text "
             "loss Δ) | train s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {len(r['seeds'])} | {count(r['trainable'])} | {pm(r['heldout_loss'])} | "
                     f"{pm(r['exact_match'], '{:.1f}', 100)} | {pm(r['forgetting'], '{:+.4f}')} | "
                     f"{pm(r['train_s'], '{:.0f}')} |")
    s = settings
    lines += ["", f"mean ± sample std over seeds. SmolLM2-135M-Instruct fp32, gsm_symbolic: {s['train_examples']} train / "
              f"{s['heldout_examples']} held-out problems (exact match on the first {s['em_examples']}), "
              f"{s['steps']} steps x batch {s['batch_size']}, AdamW lr {s['lr']:g} linear to 0, max {s['max_length']} "
              f"tokens; forgetting = loss on {s['general_tokens']} tokens of pydoc_data.topics after minus before "
              f"(base {s['base_general_loss']:.4f}). Command: `{s['command']}`.", ""]
    if s.get("alps_pairwise_overlap"):
        k = s["alps_k"]
        lines.append(f"ALPS selections across seeds (different 10% probe subsets): pairwise overlap "
                     f"{s['alps_pairwise_overlap']} of {k} heads (two random draws: {k * k / 270:.1f} expected).")
    if s.get("lora_r"):
        lines.append(f"LoRA: r = {s['lora_r']}, alpha = {s['lora_alpha']}, on q_proj/k_proj/v_proj.")
    lines.append(f"Wall time {s['wall_s'] / 60:.1f} min; {machine_info}. Head-mask runs passed the merge check "
                 f"(only selected heads' q/k/v rows changed, bitwise).")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--examples", type=int, default=600, help="gsm_symbolic problems generated, seed 0 (default: %(default)s)")
    add("--heldout", type=int, default=64, help="held-out problems for the answer loss (default: %(default)s)")
    add("--em-examples", type=int, default=32, help="held-out problems for exact match (default: %(default)s)")
    add("--max-length", type=int, default=256, help="max tokens of prompt + target (default: %(default)s)")
    add("--steps", type=int, default=30, help="training steps per run (default: %(default)s)")
    add("--batch-size", type=int, default=4, help="training batch (default: %(default)s)")
    add("--lr", type=float, default=2e-4, help="peak lr, linear decay to 0 (default: %(default)s)")
    add("--probe-steps", type=int, default=12, help="probe fine-tune steps (default: %(default)s)")
    add("--probe-lr", type=float, default=1e-4, help="probe lr, constant (default: %(default)s)")
    add("--ratios", type=float, nargs="+", default=[0.1], help="head ratios for alps/random (default: 0.1)")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    add("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods (default: all)")
    add("--max-new-tokens", type=int, default=160, help="generation length for exact match (default: %(default)s)")
    add("--eval-batch", type=int, default=8, help="batch for evaluation (default: %(default)s)")
    add("--general-chunks", type=int, default=16, help="general-text chunks of --max-length tokens (default: %(default)s)")
    add("--quick", action="store_true", help="tiny run: 4 steps, 1 seed, base/alps/random/lora, few examples")
    add("--render", metavar="JSON", help="only rewrite the .md next to a saved results JSON (no model, no training)")
    args = parser.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        table = markdown(data["summary"], data["settings"], data["machine"])
        write_text(Path(args.render).with_suffix(".md"), table)
        print(table)
        return
    if args.quick:
        args.examples, args.heldout, args.em_examples, args.steps, args.probe_steps = 80, 16, 8, 4, 2
        args.seeds, args.max_new_tokens, args.general_chunks = args.seeds[:1], 48, 4
        if "--methods" not in sys.argv:
            args.methods = ["base", "alps", "random", "lora"]
    stem = "alps_study_quick" if args.quick else "alps_study"
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    t0 = time.perf_counter()

    base, tokenizer = load_smollm2(attn_implementation="eager")
    base.requires_grad_(False)
    cfg = base.config
    train_set, heldout_set, dropped = load_task(tokenizer, args.examples, args.heldout, args.max_length)
    pad = tokenizer.pad_token_id
    evals = dict(tokenizer=tokenizer, em=heldout_set[:args.em_examples],
                 heldout=make_batches(heldout_set, args.eval_batch, pad),
                 general=general_batches(tokenizer, args.general_chunks, args.max_length, max(1, args.eval_batch // 2)))
    n_probe = max(args.batch_size, round(0.1 * len(train_set)))
    print(f"SmolLM2-135M-Instruct: {cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads "
          f"({cfg.num_key_value_heads} kv), {torch.get_num_threads()} threads; gsm_symbolic {len(train_set)} train / "
          f"{len(heldout_set)} held-out ({dropped} of {args.examples} over {args.max_length} tokens dropped); probe on "
          f"{n_probe} train problems; {args.steps} steps x batch {args.batch_size}, lr {args.lr:g} linear to 0; "
          f"seeds {args.seeds}; methods {args.methods}; ratios {args.ratios}", flush=True)

    settings = dict(vars(args), command="python " + " ".join(["benchmarks/alps_study.py"] + sys.argv[1:]),
                    train_examples=len(train_set), heldout_examples=len(heldout_set), dropped_long=dropped,
                    probe_examples=n_probe, general_tokens=args.general_chunks * args.max_length,
                    general_text="pydoc_data.topics (sorted topics, joined)", prompt_format=PROMPT,
                    optimizer="AdamW wd 0, linear decay to 0, no warm-up, grad clip 1.0", parts=PARTS)
    runs, selections, scores0 = [], {}, None
    base_run = run(base, "base", 0, None, None, evals, args)
    settings["base_general_loss"] = base_general = base_run["general_loss"]
    if "base" in args.methods:
        runs.append(base_run)
    print(f"base: held-out loss {base_run['heldout_loss']:.4f}, EM {base_run['exact_match']:.3f}, general "
          f"{base_general:.4f} ({base_run['eval_s']:.0f} s eval)", flush=True)
    lora_r, n_layers, n_heads = None, cfg.num_hidden_layers, cfg.num_attention_heads

    for seed in args.seeds:
        rng = random.Random(seed)
        batches = make_batches(rng.sample(train_set, len(train_set)), args.batch_size, pad)
        probe_batches = make_batches(random.Random(1000 + seed).sample(train_set, n_probe), args.batch_size, pad)
        configs = {}
        if "alps" in args.methods:  # one probe per seed, on that seed's 10% subset
            probe = probe_task_model(base, probe_batches, steps=args.probe_steps, lr=args.probe_lr,
                                     loss_fn=nll)
            scores = score_heads(base, probe)  # PAD, product representation, tau 1
            scores0 = scores if scores0 is None else scores0
            selections[f"alps seed {seed}"] = dict(probe_s=probe.seconds, probe_losses=probe.losses,
                                                   scores=scores.scores.tolist())
        if "grad" in args.methods:
            grads = gradient_head_scores(base, probe_batches, kind="grad_x_weight", loss_fn=nll)
            selections[f"grad seed {seed}"] = dict(scores=grads.scores.tolist())
        for ratio in args.ratios:
            tag = "" if ratio == 0.1 else f" {ratio:.0%}"
            if "alps" in args.methods:
                configs["alps" + tag] = select_heads(scores, ratio=ratio)
            if "grad" in args.methods and ratio == 0.1:
                configs["grad"] = select_heads(grads, ratio=ratio)
            if "random" in args.methods:
                configs["random" + tag] = random_heads(n_layers, n_heads, ratio, seed)
            if "lc" in args.methods and ratio == 0.1:
                configs["lc"] = layer_consistent_heads(n_layers, n_heads, ratio, seed)
        if "all" in args.methods:
            configs["all"] = {layer: list(range(n_heads)) for layer in range(n_layers)}
        names = [n for m in ("alps", "grad", "random", "lc", "all") for n in configs if n.split()[0] == m]
        for name in names + (["lora"] if "lora" in args.methods else []):
            if name == "lora":
                if lora_r is None:  # fixed once, from the first seed's 10% head-mask runs (ALPS if present)
                    ref = [r["trainable"] for r in runs if r["method"] in ("alps", "random", "grad", "lc")]
                    lora_r = lora_rank(ref[0] if ref else 0.1 * all_heads_params(cfg), cfg)
                peft_config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, bias="none",
                                         target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM")
            else:
                peft_config = HeadMaskConfig(heads=configs[name], parts=PARTS)
            r = run(base, name, seed, peft_config, batches, evals, args)
            runs.append(r)
            print(f"seed {seed} {name:10s} trainable {r['trainable']:>10,}  train {r['train_s']:5.0f} s "
                  f"({r['step_s']:.2f} s/step, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f})  held-out "
                  f"{r['heldout_loss']:.4f}  EM {r['exact_match']:.3f}  forgetting "
                  f"{r['general_loss'] - base_general:+.4f}  eval {r['eval_s']:.0f} s"
                  f"{'  check ok' if r['checked_tensors'] else ''}  [{time.perf_counter() - t0:.0f} s]", flush=True)
            write_json(RESULTS / f"{stem}.json", dict(settings=settings, partial=True, runs=runs))

    alps_sets = [{(int(l), h) for l, hs in r["heads"].items() for h in hs} for r in runs if r["method"] == "alps"]
    rows = summarize(runs, base_general)
    settings.update(lora_r=lora_r, lora_alpha=2 * lora_r if lora_r else None, wall_s=time.perf_counter() - t0,
                    alps_k=len(alps_sets[0]) if alps_sets else None,
                    alps_pairwise_overlap=[len(a & b) for i, a in enumerate(alps_sets) for b in alps_sets[i + 1:]])
    info = dict(machine(), platform=platform.platform())
    table = markdown(rows, settings, info)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / f"{stem}.md", table)
    write_json(RESULTS / f"{stem}.json", dict(settings=settings, machine=info, summary=rows, runs=runs,
                                              selections=selections))
    if scores0 is not None:
        heads0 = next(r["heads"] for r in runs if r["method"] == "alps")
        plot_heatmap(scores0, {int(k): v for k, v in heads0.items()}, RESULTS / f"{stem}_heatmap.png",
                     title=f"PAD vs probe, seed {args.seeds[0]} (red: ALPS 10% selection)")
    print(f"wrote {RESULTS / stem}.md/.json ({settings['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
