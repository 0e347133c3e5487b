"""ELREA with head adapters on three reasoning-gym task families: the routed ensemble vs one adapter vs LoRA.

Design (defaults; the run saves the values it used):

* Base: SmolLM2-135M-Instruct (fp32, eager attention). Data: three reasoning-gym families with short answers,
  generated with seed 0: ``basic_arithmetic`` (two terms of 1-2 digits, + and -), ``letter_counting`` (3-5
  words), ``spell_backward`` (words of 3-6 letters). Format: prompt ``"Question: {q}\\nAnswer:"``, target
  ``" {answer}<|im_end|>"``. ``--train`` examples per family for training, ``--heldout`` others for evaluation.
* Loss: next-token cross-entropy on the target tokens only, in training and in the held-out answer loss.
* Methods, the same total number of optimizer steps ``--steps`` (batch ``--batch-size``, AdamW lr ``--lr``,
  constant, weight decay 0), the same data shuffling per seed:
  ``single``: one head adapter (random 10% of heads, q/k/v, ``random_heads(seed=s)``) trained on all the data;
  ``lora``: PEFT LoRA r16 on q/k/v/o (lora_alpha 32) on all the data;
  ``elrea``: the same heads; a base adapter for ``steps // 2`` steps on all the data, then per-example gradient
  features of the training examples' prompts (``gradient_features``, dim ``--dim``), spherical k-means with
  k = 3, one expert per cluster (a copy of the base adapter) trained on its cluster for a share of the other
  half of the steps proportional to the cluster's size; routed per held-out prompt (temperature ``--temp``).
  ``elrea_base``: the base adapter alone (half the steps), to see what the experts add.
* Metrics per family: held-out answer loss, exact match (greedy, at most ``--max-new-tokens`` tokens, the
  first line stripped, compared as a string), and for ELREA: routing accuracy (the share of held-out prompts
  whose largest expert weight is the cluster that holds most of their family's training examples), the
  cluster purity of the training clusters, and routing cost per query (seconds, median, and the peak RSS of the
  process around one routing call, in MB).
* Seeds ``--seeds`` (default 0 1); every (seed, method) result is cached in ``--out`` as soon as it is done and
  skipped on a re-run, so the study resumes after an interruption.
* Budget on 2 idle CPU cores with the defaults: ~1 s per step -> 4 methods x <= 96 steps x 2 seeds ~ 12 min,
  plus gradient features (144 training and 48 held-out prompts, ~0.3 s each) and decoding: ~30 min.

Usage: ``python benchmarks/ensemble.py [--quick]`` (``--quick``: a few steps and examples, to check it runs).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

FAMILIES = {
    "basic_arithmetic": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=("+", "-"),
                             allow_parentheses=False, allow_negation=False),
    "letter_counting": dict(min_words=3, max_words=5),
    "spell_backward": dict(min_word_len=3, max_word_len=6),
}


def family_data(n: int) -> dict[str, list[tuple[str, str]]]:
    import reasoning_gym

    return {name: [(f"Question: {x['question']}\nAnswer:", f" {x['answer']}")
                   for x in reasoning_gym.create_dataset(name, size=n, seed=0, **kw)] for name, kw in FAMILIES.items()}


def encode(tokenizer, pairs, with_target=True):
    """Left-padded batch of prompts (+ targets + EOS); labels on target tokens only."""
    rows, labels = [], []
    for prompt, target in pairs:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        t = tokenizer(target + tokenizer.eos_token, add_special_tokens=False).input_ids if with_target else []
        rows.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    lab = torch.tensor([[-100] * (width - len(r)) + lab for r, lab in zip(rows, labels)])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def train(model, tokenizer, pairs, steps, args, seed):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    model.train()
    for step in range(steps):
        start = (step * args.batch_size) % len(order)
        batch = [pairs[order[(start + j) % len(order)]] for j in range(args.batch_size)]
        loss = model(**encode(tokenizer, batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()


@torch.no_grad()
def evaluate(run, tokenizer, heldout, args) -> dict:
    """``run(batch) -> logits`` and ``generate(batch) -> ids``: per family loss and exact match."""
    forward, generate = run
    out = {}
    for family, pairs in heldout.items():
        nll, count, hits = 0.0, 0, 0
        for start in range(0, len(pairs), args.batch_size):
            chunk = pairs[start:start + args.batch_size]
            batch = encode(tokenizer, chunk)
            logits = forward(batch)
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            target = batch["labels"][:, 1:]
            keep = target != -100
            nll -= lp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep].sum().item()
            count += int(keep.sum())
            prompts = encode(tokenizer, chunk, with_target=False)
            ids = generate(prompts)[:, prompts["input_ids"].shape[1]:]
            for row, (_, answer) in zip(tokenizer.batch_decode(ids, skip_special_tokens=True), chunk):
                hits += row.strip().split("\n")[0].strip() == answer.strip()
        out[family] = {"loss": nll / count, "exact_match": hits / len(pairs)}
    return out


def gen_kwargs(tokenizer, args):
    return dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id)


def run_method(method, seed, args, data, heldout):
    from peft import LoraConfig, get_peft_model

    from peft_alps import HeadLayout, HeadMaskConfig, random_heads
    from peft_alps.ensemble import ExpertEnsemble, add_experts, cluster_features, gradient_features
    from peft_alps.pretrained import load_smollm2

    base, tokenizer = load_smollm2(attn_implementation="eager")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    layout = HeadLayout.from_model_config(base.config)
    heads = random_heads(layout.num_layers, layout.num_heads, ratio=0.1, seed=seed)
    pairs = [(p, t, fam) for fam, rows in data.items() for p, t in rows]
    kw = gen_kwargs(tokenizer, args)
    t0 = time.time()
    result = {"method": method, "seed": seed}
    if method == "lora":
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"]))
    else:
        model = get_peft_model(base, HeadMaskConfig(heads=heads))
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plain = [(p, t) for p, t, _ in pairs]
    if method in ("single", "lora"):
        train(model, tokenizer, plain, args.steps, args, seed)
        run = (lambda b: model(**b).logits, lambda b: model.generate(**b, **kw))
    else:
        train(model, tokenizer, plain, args.steps // 2, args, seed)
        if method == "elrea_base":
            run = (lambda b: model(**b).logits, lambda b: model.generate(**b, **kw))
        else:
            prompts = [encode(tokenizer, [(p, t)], with_target=False) for p, t, _ in pairs]
            t1 = time.time()
            features = gradient_features(model, prompts, dim=args.dim, seed=seed)
            result["feature_seconds_per_example"] = (time.time() - t1) / len(pairs)
            labels, centroids = cluster_features(features, k=len(FAMILIES), seed=seed)
            families = list(FAMILIES)
            counts = torch.zeros(len(families), len(FAMILIES), dtype=torch.long)
            for (_, _, fam), c in zip(pairs, labels.tolist()):
                counts[families.index(fam), c] += 1
            result["cluster_counts"] = counts.tolist()  # [family, cluster]
            result["cluster_purity"] = counts.max(0).values.sum().item() / len(pairs)
            experts = add_experts(model, len(FAMILIES))
            remaining = args.steps - args.steps // 2
            sizes = torch.bincount(labels, minlength=len(FAMILIES)).tolist()
            shares = [round(remaining * s / len(pairs)) for s in sizes]
            shares[-1] = remaining - sum(shares[:-1])
            for i, name in enumerate(experts):
                member = [(p, t) for (p, t, _), c in zip(pairs, labels.tolist()) if c == i]
                model.set_adapter(name)
                if member and shares[i] > 0:
                    train(model, tokenizer, member, shares[i], args, seed)
            result["expert_steps"] = shares
            ensemble = ExpertEnsemble(base="default", experts=experts, centroids=centroids, dim=args.dim, seed=seed,
                                      temperature=args.temp)
            own = counts.argmax(1).tolist()  # family -> the cluster holding most of its training examples
            route_hits, route_seconds = {}, []
            for fam, rows in heldout.items():
                hits = 0
                for p, _ in rows:
                    b = encode(tokenizer, [(p, "")], with_target=False)
                    t2 = time.perf_counter()
                    w = ensemble.route(model, [b])
                    route_seconds.append(time.perf_counter() - t2)
                    hits += int(w[0].argmax()) == own[families.index(fam)]
                route_hits[fam] = hits / len(rows)
            result["routing_accuracy"] = route_hits
            result["routing_seconds_median"] = statistics.median(route_seconds)
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            ensemble.route(model, [encode(tokenizer, [(heldout[families[0]][0][0], "")], with_target=False)])
            result["routing_peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024

            def forward(b):
                return ensemble.forward(model, b).logits

            def generate(b):
                return ensemble.generate(model, **b, **kw)

            run = (forward, generate)
    result["train_seconds"] = time.time() - t0
    result["eval"] = evaluate(run, tokenizer, heldout, args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def summarize(results: list[dict]) -> str:
    methods = ["single", "lora", "elrea_base", "elrea"]
    lines = ["| method | " + " | ".join(f"{f} EM | {f} loss" for f in FAMILIES) + " | seeds |",
             "|---" * (2 * len(FAMILIES) + 2) + "|"]
    for m in methods:
        rows = [r for r in results if r["method"] == m]
        if not rows:
            continue
        cells = []
        for f in FAMILIES:
            for key in ("exact_match", "loss"):
                vals = [r["eval"][f][key] for r in rows]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {len(rows)} |")
    el = [r for r in results if r["method"] == "elrea"]
    if el:
        lines.append("")
        for r in el:
            lines.append(f"seed {r['seed']}: cluster purity {r['cluster_purity']:.2f}, routing accuracy "
                         f"{ {k: round(v, 2) for k, v in r['routing_accuracy'].items()} }, routing "
                         f"{r['routing_seconds_median']:.2f} s/query, features "
                         f"{r['feature_seconds_per_example']:.2f} s/example, expert steps {r['expert_steps']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=48, help="training examples per family")
    ap.add_argument("--heldout", type=int, default=16, help="held-out examples per family")
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--temp", type=float, default=0.1)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=["single", "lora", "elrea_base", "elrea"])
    ap.add_argument("--quick", action="store_true", help="a few steps and examples (checks the script runs)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ensemble.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.heldout, args.steps, args.batch_size, args.seeds = 4, 2, 4, 2, args.seeds[:1]
        args.dim, args.max_new_tokens = 32, 3
    out = Path(args.out)
    cached = json.loads(out.read_text()) if out.is_file() else {"results": []}
    config = {k: v for k, v in vars(args).items() if k != "out"}
    if cached.get("config", config) != config:
        raise SystemExit(f"{out} holds results of another configuration; pass another --out.")
    data_all = family_data(args.train + args.heldout)
    data = {f: rows[:args.train] for f, rows in data_all.items()}
    heldout = {f: rows[args.train:] for f, rows in data_all.items()}
    results = cached["results"]
    for seed in args.seeds:
        for method in args.methods:
            if any(r["method"] == method and r["seed"] == seed for r in results):
                continue
            print(f"seed {seed} {method} ...", flush=True)
            results.append(run_method(method, seed, args, data, heldout))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"config": config, "results": results}, indent=1) + "\n")
    table = summarize(results)
    print(table)
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
