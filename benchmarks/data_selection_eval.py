"""PASER data selection on real data: SmolLM2-135M-Instruct, gsm_symbolic and standard-library docstrings.

Part 1, probe data (which 10% of the task data should the localizing probe see?): heads localized by an
attention-only probe fine-tune (``probe_task_model`` + PAD, top 10% = 27 heads) on all the data, on a PASER-10%
selection (model's own loss, as no modified model exists yet) and on a random 10%, the same number of probe
steps each. Reported: top-K overlap with the all-data probe's heads, seconds (selection + probe).

Part 2, recovery (after head training, which general texts should a short recovery pass use?): the all-data
heads are trained on gsm_symbolic; then PASER (the adapted model against its disabled adapter, per-sample JSD)
or a random draw picks 10% of a pool of docstrings, and the same heads are trained on them for a few steps.
Reported: mean loss on held-out docstrings (other modules) and held-out gsm_symbolic problems, for the base,
after head training and after each recovery pass (forgetting = general loss minus the base's).

    python benchmarks/data_selection_eval.py [--seeds 0 1] [--quick]

Resumable: results are written to benchmarks/results/data_selection_eval.json after every step, and steps
already there are skipped (the trained adapter is kept under --work).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import transformers as tf

from common import machine, write_json
from peft import PeftModel, get_peft_model
from peft_alps import HeadMaskConfig, score_heads, select_heads
from peft_alps.data import gsm_symbolic_texts, stdlib_docstrings, text_batches
from peft_alps.data_selection import select_data
from peft_alps.data_selection.degradation import sample_degradation
from peft_alps.data_selection.embed import embed_texts
from peft_alps.demo import HELD_OUT_MODULES, TRAIN_MODULES
from peft_alps.pretrained import load_smollm2
from peft_alps.scoring.probe import probe_task_model

RATIO = 0.1


def heads_set(scores):
    return {(layer, h) for layer, hs in select_heads(scores, RATIO).items() for h in hs}


@torch.no_grad()
def mean_loss(model, batches) -> float:
    model.eval()
    total = tokens = 0
    for b in batches:
        n = int((b["labels"][:, 1:] != -100).sum())
        total += model(**b).loss.item() * n
        tokens += n
    return total / tokens


def train(model, batches, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--examples", type=int, default=80, help="gsm_symbolic pool (default: %(default)s)")
    parser.add_argument("--general", type=int, default=80, help="docstring pool (default: %(default)s)")
    parser.add_argument("--held", type=int, default=16, help="held-out texts of each kind (default: %(default)s)")
    parser.add_argument("--probe-steps", type=int, default=6)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--recovery-steps", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_selection_eval.json"))
    parser.add_argument("--work", default="/tmp/peft_alps_data_selection_eval")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.probe_steps, args.train_steps, args.recovery_steps = 40, 2, 2, 2
        args.out = args.out.replace(".json", "_quick.json")
        args.work += "_quick"
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res.setdefault("probe", {})
    res.setdefault("recovery", {})
    res["meta"] = dict(vars(args), **machine())

    def save():
        write_json(out, res)

    t0 = time.perf_counter()
    base, tok = load_smollm2()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kw = dict(batch_size=args.batch_size, max_length=args.max_length)
    task = gsm_symbolic_texts(args.examples + args.held, seed=0)
    task, task_held = task[:args.examples], task[args.examples:]
    general = stdlib_docstrings(TRAIN_MODULES)[::2][:args.general]  # every other one: all 16 modules
    general_held = stdlib_docstrings(HELD_OUT_MODULES)[:args.held]
    if args.quick:
        general, general_held, task_held = general[:40], general_held[:8], task_held[:8]
    k = max(1, round(RATIO * len(task)))

    # ---- part 1: probe data
    all_batches = text_batches(tok, task, **kw)
    if "all" not in res["probe"]:
        probe = probe_task_model(base, all_batches, steps=args.probe_steps)
        scores = score_heads(base, probe)
        res["probe"]["all"] = dict(heads=sorted(heads_set(scores)), seconds=probe.seconds,
                                   loss=[probe.losses[0], probe.losses[-1]], top=scores.top(5))
        save()
    reference_heads = {tuple(h) for h in res["probe"]["all"]["heads"]}
    K = len(reference_heads)
    if "paser_scores" not in res["probe"]:
        t = time.perf_counter()
        emb = embed_texts(task, progress=False)
        t_embed = time.perf_counter() - t
        t = time.perf_counter()
        deg, lengths = sample_degradation(base, tok, task, progress=False, **kw)
        res["probe"]["paser_scores"] = dict(degradation=deg.tolist(), lengths=lengths.tolist(), embed_s=t_embed,
                                            degradation_s=time.perf_counter() - t)
        torch.save(torch.from_numpy(emb), Path(args.work + "_emb.pt"))
        save()
    ps = res["probe"]["paser_scores"]
    emb = torch.load(Path(args.work + "_emb.pt")).numpy()
    for seed in args.seeds:
        for method in ("paser", "random"):
            key = f"{method}/seed{seed}"
            if key in res["probe"]:
                continue
            t = time.perf_counter()
            if method == "paser":
                sel = select_data(task, embeddings=emb, degradation=ps["degradation"], lengths=ps["lengths"],
                                  budget=k, seed=seed)
                chosen, extra = sel.indices, ps["embed_s"] + ps["degradation_s"]
                info = dict(rejected=sum(c.rejected for c in sel.clusters), clusters=sel.to_dict()["clusters"])
            else:
                chosen, extra, info = random.Random(seed).sample(range(len(task)), k), 0.0, {}
            select_s = time.perf_counter() - t + extra
            torch.manual_seed(seed)
            probe = probe_task_model(base, text_batches(tok, [task[i] for i in chosen], **kw), steps=args.probe_steps)
            heads = heads_set(score_heads(base, probe))
            res["probe"][key] = dict(overlap=len(heads & reference_heads), k=K, select_s=select_s,
                                     probe_s=probe.seconds, indices=list(chosen), **info)
            save()
            print(f"probe {key}: overlap {len(heads & reference_heads)}/{K}, select {select_s:.0f} s, "
                  f"probe {probe.seconds:.0f} s", flush=True)

    # ---- part 2: recovery after head training
    heads = {}
    for layer, h in sorted(reference_heads):
        heads.setdefault(layer, []).append(h)
    g_held = text_batches(tok, general_held, **kw)
    t_held = text_batches(tok, task_held, **kw)
    adapter = Path(args.work) / "trained"
    rec = res["recovery"]
    if "base" not in rec:
        rec["base"] = dict(general=mean_loss(base, g_held), task=mean_loss(base, t_held))
        save()
    if not (adapter / "adapter_model.safetensors").exists() or "trained" not in rec:
        torch.manual_seed(0)
        model = get_peft_model(base, HeadMaskConfig(heads=heads, parts=["q", "k", "v"]))
        losses = train(model, all_batches, args.train_steps, lr=2e-3)
        rec["trained"] = dict(general=mean_loss(model, g_held), task=mean_loss(model, t_held),
                              train_loss=[losses[0], losses[-1]])
        model.save_pretrained(adapter)
        base = model.unload()
        save()
    print(f"recovery: base {rec['base']}, trained {rec['trained']}", flush=True)
    kg = max(1, round(RATIO * len(general)))
    if "paser_scores" not in rec:
        model = PeftModel.from_pretrained(base, adapter)
        t = time.perf_counter()
        gemb = embed_texts(general, progress=False)
        t_embed = time.perf_counter() - t
        t = time.perf_counter()
        deg, lengths = sample_degradation(model, tok, general, progress=False, **kw)  # JSD vs disabled adapter
        rec["paser_scores"] = dict(degradation=deg.tolist(), lengths=lengths.tolist(), embed_s=t_embed,
                                   degradation_s=time.perf_counter() - t)
        torch.save(torch.from_numpy(gemb), Path(args.work + "_gemb.pt"))
        base = model.unload()
        save()
    gs = rec["paser_scores"]
    gemb = torch.load(Path(args.work + "_gemb.pt")).numpy()
    for seed in args.seeds:
        for method in ("paser", "random"):
            key = f"{method}/seed{seed}"
            if key in rec:
                continue
            if method == "paser":
                sel = select_data(general, embeddings=gemb, degradation=gs["degradation"], lengths=gs["lengths"],
                                  budget=kg, seed=seed)
                chosen = sel.indices
            else:
                chosen = random.Random(seed).sample(range(len(general)), kg)
            model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
            torch.manual_seed(seed)
            losses = train(model, text_batches(tok, [general[i] for i in chosen], **kw), args.recovery_steps,
                           lr=1e-3)
            rec[key] = dict(general=mean_loss(model, g_held), task=mean_loss(model, t_held),
                            mean_jsd_selected=sum(gs["degradation"][i] for i in chosen) / len(chosen),
                            train_loss=[losses[0], losses[-1]], indices=list(chosen))
            base = model.unload()
            save()
            print(f"recovery {key}: general {rec[key]['general']:.4f} task {rec[key]['task']:.4f}", flush=True)
    res["meta"]["total_s"] = time.perf_counter() - t0
    save()
    summarize(res)


def summarize(res):
    import statistics as st

    p = res["probe"]
    print(f"probe localization: K = {p['all'] and len(p['all']['heads'])}; random expectation "
          f"{len(p['all']['heads']) ** 2 / 270:.1f}")
    for method in ("paser", "random"):
        runs = [v for key, v in p.items() if key.startswith(method + "/")]
        if runs:
            ov = [r["overlap"] for r in runs]
            print(f"| {method}-10% | overlap {st.mean(ov):.1f} (runs {ov}) | select s "
                  f"{st.mean(r['select_s'] for r in runs):.0f} | probe s {st.mean(r['probe_s'] for r in runs):.0f} |")
    print(f"| all data | - | probe s {p['all']['seconds']:.0f} |")
    r = res["recovery"]
    print(f"recovery: base {r['base']}, after head training {r.get('trained')}")
    for method in ("paser", "random"):
        runs = [v for key, v in r.items() if key.startswith(method + "/")]
        if runs:
            g = [x["general"] for x in runs]
            t = [x["task"] for x in runs]
            print(f"| {method} | general {st.mean(g):.4f} {g} | task {st.mean(t):.4f} {t} |")


if __name__ == "__main__":
    main()
