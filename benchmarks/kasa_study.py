"""Quality of the KaSA head delta: dense head slices vs KaSA head deltas vs PEFT's LoRA+KaSA vs LoRA (issue 16).

The machinery, task, format, loss, optimizer, evaluation and merge check are benchmarks/alps_study.py's (imported,
not copied): SmolLM2-135M-Instruct fp32 on reasoning-gym gsm_symbolic, answer-only loss, ``--steps`` AdamW steps
(wd 0, lr linear to 0, clip 1.0), held-out answer loss, exact match of the final number, forgetting on
pydoc_data.topics. The same budget for every method: same steps, batch, lr, data order per seed.

Methods (q/k/v everywhere):

* ``dense 10%``: ``HeadMaskConfig(heads=random_heads(ratio 0.1, seed=s))``, every entry of the slices trainable;
* ``kasa r16 10%``: the same heads, ``delta_kind="kasa"``, ``kasa_rank`` ``--kasa-rank`` (truncation r_t = r),
  loss + ``model.kasa_loss()`` (beta 1e-4, gamma 1e-3, the paper's / PEFT's defaults);
* ``lora+kasa r16``: PEFT's ``LoraConfig(r, lora_alpha=2r, kasa_config=KasaConfig())``, loss +
  ``model._get_kasa_loss()``;
* ``lora r16``: stock LoRA ``r, lora_alpha=2r`` (alps_study's convention).

Head methods pass alps_study's merge check (only the selected heads' rows changed, bitwise). Seeds ``--seeds``
(default 0 1); mean +- sample std. Results: ``benchmarks/results/kasa_study.json`` (every run, written after each
one) and ``.md``.

    python benchmarks/kasa_study.py [--seeds 0 1] [--steps 30]
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import random
import statistics
import sys
import time

import torch
import transformers as tf
from peft import KasaConfig, LoraConfig, get_peft_model

import alps_study as study
from common import machine, write_json
from peft_alps import HeadMaskConfig, random_heads
from peft_alps.pretrained import load_smollm2

METHODS = ("dense 10%", "kasa 10%", "kasa 10% r_t=0", "lora+kasa", "lora")


def config_for(method: str, heads: dict, args):
    r = args.rank
    if method == "dense 10%":
        return HeadMaskConfig(heads=heads, parts=study.PARTS)
    if method.startswith("kasa 10%"):
        return HeadMaskConfig(heads=heads, parts=study.PARTS, delta_kind="kasa", kasa_rank=args.kasa_rank,
                              kasa_truncate=0 if method.endswith("r_t=0") else None)
    kasa = {"kasa_config": KasaConfig()} if method == "lora+kasa" else {}
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", target_modules=["q_proj", "k_proj",
                      "v_proj"], task_type="CAUSAL_LM", **kasa)


def run(base, method, seed, heads, batches, evals, args) -> dict:
    torch.manual_seed(seed)
    config = config_for(method, heads, args)
    model = get_peft_model(copy.deepcopy(base), config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method.startswith("kasa 10%"):
        regulariser = model.kasa_loss
    elif method == "lora+kasa":
        regulariser = model.base_model._get_kasa_loss
    else:
        regulariser = lambda: 0.0  # noqa: E731
    losses, seconds = study.train(model, batches, args.steps, args.lr, regulariser)
    final_reg = float(regulariser()) if "kasa" in method else None
    model = model.merge_and_unload()
    checked = study.check_heads_only(base, model, heads) if isinstance(config, HeadMaskConfig) else 0
    t = time.perf_counter()
    heldout_loss = study.mean_nll(model, evals["heldout"])
    general_loss = study.mean_nll(model, evals["general"])
    em, outputs = (study.exact_match(model, evals["tokenizer"], evals["em"], args.max_new_tokens, args.eval_batch)
                   if args.em_examples else (None, []))
    del model
    gc.collect()
    return dict(method=method, seed=seed, trainable=trainable, train_s=seconds, eval_s=time.perf_counter() - t,
                step_s=seconds / len(losses), first_loss=losses[0], last_loss=statistics.mean(losses[-5:]),
                final_regulariser=final_reg, heldout_loss=heldout_loss, exact_match=em, general_loss=general_loss,
                checked_tensors=checked, heads={str(k): v for k, v in heads.items()}, sample_outputs=outputs[:2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--examples", type=int, default=400)
    add("--heldout", type=int, default=32)
    add("--em-examples", type=int, default=16)
    add("--max-length", type=int, default=256)
    add("--steps", type=int, default=30)
    add("--batch-size", type=int, default=4)
    add("--lr", type=float, default=2e-4)
    add("--rank", type=int, default=16, help="LoRA and LoRA+KaSA rank (default %(default)s)")
    add("--kasa-rank", type=int, default=16, help="KaSA head delta rank (default %(default)s)")
    add("--seeds", type=int, nargs="+", default=[0, 1])
    add("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    add("--max-new-tokens", type=int, default=128)
    add("--eval-batch", type=int, default=8)
    add("--general-chunks", type=int, default=8)
    add("--out", default=str(study.RESULTS / "kasa_study.json"))
    add("--no-base-eval", action="store_true", help="skip the base model's held-out loss and exact match (another "
        "process of the same settings computes them; the general-text loss for forgetting is still computed)")
    add("--combine", nargs="+", metavar="JSON", help="only render the table of these results files")
    add("--truncation", type=int, nargs="+", metavar="R_T", help="only measure, without training, what the KaSA "
        "head delta's truncation of R_T components per head does to the held-out and general-text loss at init "
        "(seed 0's heads; results/kasa_truncation.json)")
    args = parser.parse_args()
    if args.combine:
        print(render(args.combine))
        return
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    t0 = time.perf_counter()
    base, tokenizer = load_smollm2(attn_implementation="eager")
    base.requires_grad_(False)
    cfg = base.config
    train_set, heldout_set, dropped = study.load_task(tokenizer, args.examples, args.heldout, args.max_length)
    pad = tokenizer.pad_token_id
    evals = dict(tokenizer=tokenizer, em=heldout_set[:args.em_examples],
                 heldout=study.make_batches(heldout_set, args.eval_batch, pad),
                 general=study.general_batches(tokenizer, args.general_chunks, args.max_length,
                                               max(1, args.eval_batch // 2)))
    settings = dict(vars(args), command="python " + " ".join(["benchmarks/kasa_study.py"] + sys.argv[1:]),
                    train_examples=len(train_set), heldout_examples=len(heldout_set), dropped_long=dropped,
                    general_tokens=args.general_chunks * args.max_length, parts=study.PARTS,
                    kasa=dict(beta=1e-4, gamma=1e-3, truncate="= rank"))
    base_general = study.mean_nll(base, evals["general"])
    base_heldout = None if args.no_base_eval else study.mean_nll(base, evals["heldout"])
    base_em = None if args.no_base_eval or not args.em_examples else \
        study.exact_match(base, tokenizer, evals["em"], args.max_new_tokens, args.eval_batch)[0]
    settings.update(base_heldout_loss=base_heldout, base_general_loss=base_general, base_exact_match=base_em)
    print(f"base: held-out {base_heldout} EM {base_em} general {base_general:.4f}", flush=True)
    if args.truncation:
        truncation_at_init(base, evals, args, settings)
        return
    runs = []
    for seed in args.seeds:
        batches = study.make_batches(random.Random(seed).sample(train_set, len(train_set)), args.batch_size, pad)
        heads = random_heads(cfg.num_hidden_layers, cfg.num_attention_heads, 0.1, seed)
        for method in args.methods:
            r = run(base, method, seed, heads, batches, evals, args)
            runs.append(r)
            print(f"seed {seed} {method:10s} trainable {r['trainable']:>9,} {r['step_s']:.2f} s/step loss "
                  f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} held-out {r['heldout_loss']:.4f} EM "
                  f"{r['exact_match']} forgetting {r['general_loss'] - base_general:+.4f} "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
            write_json(args.out, dict(settings=settings, partial=True, runs=runs))
    settings.update(wall_s=time.perf_counter() - t0)
    write_json(args.out, dict(settings=settings, machine=dict(machine(), platform=platform.platform()), runs=runs))
    print(render([args.out]))


def truncation_at_init(base, evals, args, settings) -> None:
    """Held-out and general-text loss of the untrained KaSA head delta (rank ``--kasa-rank``) for each truncation
    r_t: at init the model is the base with r_t singular components removed from each selected head slice."""
    heads = random_heads(base.config.num_hidden_layers, base.config.num_attention_heads, 0.1, 0)
    rows = []
    for r_t in args.truncation:
        model = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads=heads, parts=study.PARTS, delta_kind="kasa",
                                                                   kasa_rank=args.kasa_rank, kasa_truncate=r_t))
        row = dict(truncate=r_t, heldout_loss=study.mean_nll(model, evals["heldout"]),
                   general_loss=study.mean_nll(model, evals["general"]))
        rows.append(row)
        held = row["heldout_loss"] - settings["base_heldout_loss"]
        general = row["general_loss"] - settings["base_general_loss"]
        print(f"r_t {r_t:3d}: held-out {row['heldout_loss']:.4f} ({held:+.4f}) general {row['general_loss']:.4f} "
              f"({general:+.4f})", flush=True)
        write_json(study.RESULTS / "kasa_truncation.json", dict(settings=settings, heads=len(sum(heads.values(), [])),
                                                                 rows=rows))


def spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{sd} ({min(values):.4f}..{max(values):.4f})"


def render(paths) -> str:
    """The markdown table of the runs in the results JSON ``paths`` (one study split over processes), written to
    benchmarks/results/kasa_study.md."""
    import json

    data = [json.loads(open(p).read()) for p in paths]
    runs = [r for d in data for r in d["runs"]]
    base = data[0]["settings"]
    lines = ["| method | seeds | trainable params | held-out answer loss (mean ± std, min..max) | exact match | "
             "forgetting (general loss Δ) | s/step |", "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        lines.append(f"| {method} | {sorted(r['seed'] for r in rs)} | {rs[0]['trainable']:,} | "
                     f"{spread([r['heldout_loss'] for r in rs])} | {spread([r['exact_match'] for r in rs])} | "
                     f"{spread([r['general_loss'] - base['base_general_loss'] for r in rs])} | "
                     f"{statistics.mean(r['step_s'] for r in rs):.1f} |")
    commands = sorted({d["settings"]["command"] for d in data})
    lines += ["", f"base: held-out {base.get('base_heldout_loss')}, general {base['base_general_loss']:.4f}. "
              f"Commands: {'; '.join(f'`{c}`' for c in commands)}."]
    text = "\n".join(lines) + "\n"
    study.write_text(study.RESULTS / "kasa_study.md", text)
    return text


if __name__ == "__main__":
    main()
