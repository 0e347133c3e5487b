"""What does training with HeadMask cost, side by side with LoRA, the paper's recipe, full fine-tuning and a floor?

Every variant trains the same model on the same batch with AdamW (lr 1e-4, weight_decay 0.1):

* floor: the frozen model, forward + backward, with one trainable scalar multiplying the input embeddings
  (a forward hook on the embedding module). Every adapter pays at least this: a forward, and a backward through
  the activations down to its earliest adapted layer (the floor goes down to the embeddings), with no weight
  gradients and a one-number optimizer step.
* headmask 10% / 30%: a seeded random 10% / 30% of the query heads (``random_heads(..., seed=0)``), parts q,k,v;
  headmask 10% qkvo: the same 10% with the output projection's columns too.
* paper-recipe: the ALPS paper's description, with the same 10% heads: the full q/k/v weights of every layer
  trainable, gradient rows of the heads not selected zeroed by tensor hooks (``common.paper_recipe_hooks``).
* lora r16 / r64: stock PEFT LoRA on q_proj, k_proj, v_proj (default alpha, no dropout).
* kasa r4 / r8 / r16 10%: the same 10% heads, q/k/v, with the KaSA head delta (``delta_kind="kasa"``,
  ``kasa_rank`` 4 / 8 / 16, truncation r_t = r: ``kasa_truncate=None``, the costlier setting); lora+kasa r16: PEFT's own LoRA+KaSA
  (``LoraConfig(r=16, kasa_config=KasaConfig())``) on q/k/v. The KaSA regulariser is left out of the timed step
  for both (PEFT adds it only by hand; it is a few r x r Gram matrices).
* full: full fine-tuning.

Settings: Llama built from config with GQA (``common.SIZES`` small and large, vocab 4096) in fp32 and in bf16
(bf16 model weights; adapters in whatever dtype PEFT gives them by default: fp32 for both LoRA and HeadMask),
and SmolLM2-135M-Instruct (real weights, eager attention) in fp32.

Measured per setting:

* step time (forward, backward, AdamW step): all variants in one process, interleaved round-robin after warm-up
  rounds, medians over the timed rounds; ratios to lora r16, paper-recipe and floor.
* peak RSS of training: every variant in a fresh subprocess (build the model and the variant, gc, reset the
  peak mark via /proc/self/clear_refs, then ``--rss-steps`` training steps, read VmHWM). The child runs with
  MALLOC_MMAP_THRESHOLD_=131072: glibc then returns every freed large tensor to the OS at once, so RSS follows
  live memory; with glibc's default adaptive threshold, memory freed while building the model stays in the heap
  and is silently reused by the steps, so the peak would depend on the build's allocation history. Reported:
  the peak (absolute, model included), and the peak minus the RSS just before the first step.
* optimizer state bytes: every tensor in AdamW's state after the timed steps; the exp_avg + exp_avg_sq part
  is checked against 2 x trainable x bytes per parameter (4 for fp32).
* adapter file bytes (``save_pretrained``, adapter_model.safetensors) against the trained tensors' bytes; and
  PEFT's SHiRA (random sparse mask, q/k/v) at about headmask 10%'s parameter count, for comparison.
* merge time (``merge_and_unload`` on a fresh deep copy of the trained adapter, copy not timed; median of
  repeats, variants interleaved) and forward-only latency (eval, no_grad) of each unmerged adapter against the
  merged model, interleaved round-robin.

    python benchmarks/training_cost.py [--settings small-fp32 ...] [--variants ...] [--quick]

``--variants`` runs a subset (floor, headmask 10% and lora r16 are always added: the ratios and the forward
comparison need them); ratios to a variant that did not run are None.

Prints markdown tables (a "targets" table last) and writes benchmarks/results/training_cost.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers as tf
from peft import KasaConfig, LoraConfig, ShiraConfig, get_peft_model

from common import SIZES, llama, machine, paper_recipe_hooks, time_training_steps, write_json
from peft_alps import HeadMaskConfig
from peft_alps.scoring.selection import random_heads

warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)  # transformers 5 vs peft
tf.logging.disable_progress_bar()  # SmolLM2's loading bar

VARIANTS = ("floor", "headmask 10%", "headmask 30%", "headmask 10% qkvo", "paper-recipe", "lora r16", "lora r64",
            "full", "kasa r4 10%", "kasa r8 10%", "kasa r16 10%", "lora+kasa r16")
HEADMASK = ("headmask 10%", "headmask 30%", "headmask 10% qkvo")
KASA = ("kasa r4 10%", "kasa r8 10%", "kasa r16 10%")
ADAPTERS = HEADMASK + KASA + ("lora r16", "lora r64", "lora+kasa r16")  # saved, merged, timed unmerged vs merged
ALWAYS = ("floor", "headmask 10%", "lora r16")
QKV = ["q_proj", "k_proj", "v_proj"]
# setting -> (model, dtype, timed rounds by default)
SETTINGS = {
    "small-fp32": ("small", torch.float32, 20),
    "small-bf16": ("small", torch.bfloat16, 20),
    "large-fp32": ("large", torch.float32, 5),
    "large-bf16": ("large", torch.bfloat16, 8),
    "smollm2-fp32": ("smollm2", torch.float32, 5),
}
QUICK_SETTINGS = ("small-fp32", "small-bf16")
KIB = 1024
FILE_OVERHEAD_LIMIT = 64 * KIB


# ----- models and variants -----
def base_model(setting: str) -> torch.nn.Module:
    """The setting's model in its dtype, train mode (seeded random Llama, or SmolLM2's real weights)."""
    name, dtype, _ = SETTINGS[setting]
    if name == "smollm2":
        from peft_alps.pretrained import load_smollm2

        model = load_smollm2(dtype=dtype, attn_implementation="eager")[0]
    else:
        model = llama(name).to(dtype)
    return model.train()


def selections(config) -> dict:
    L, H = config.num_hidden_layers, config.num_attention_heads
    return {f: random_heads(L, H, f, seed=0) for f in (0.1, 0.3)}


def build(variant: str, model: torch.nn.Module, heads: dict):
    """Turn ``model`` (modified in place; pass a copy) into ``variant``: returns ``(model, AdamW)``."""
    if variant == "floor":
        model.requires_grad_(False)
        model.floor_scale = torch.nn.Parameter(torch.ones(()))  # registered: counted, saved, optimized
        model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out * model.floor_scale)
    elif variant in HEADMASK:
        parts = ["q", "k", "v", "o"] if variant.endswith("qkvo") else ["q", "k", "v"]
        model = get_peft_model(model, HeadMaskConfig(heads=heads[0.3 if "30%" in variant else 0.1], parts=parts))
    elif variant in KASA:
        model = get_peft_model(model, HeadMaskConfig(heads=heads[0.1], parts=["q", "k", "v"], delta_kind="kasa",
                                                     kasa_rank=int(variant.split()[1][1:]), kasa_truncate=None))
    elif variant == "paper-recipe":
        paper_recipe_hooks(model, heads[0.1], ["q", "k", "v"])
    elif variant == "lora+kasa r16":
        model = get_peft_model(model, LoraConfig(r=16, target_modules=QKV, kasa_config=KasaConfig()))
    elif variant.startswith("lora"):
        model = get_peft_model(model, LoraConfig(r=int(variant.split("r")[-1]), target_modules=QKV))
    elif variant == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(opt) -> tuple[int, int]:
    """``(all state tensors, exp_avg + exp_avg_sq only)`` in bytes."""
    total = moments = 0
    for state in opt.state.values():
        for key, t in state.items():
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
                moments += t.numel() * t.element_size() if key in ("exp_avg", "exp_avg_sq") else 0
    return total, moments


def input_ids(config, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))


# ----- peak RSS, one fresh process per variant -----
_CHILD = """
import json, sys
sys.path.insert(0, {bench_dir!r})
import training_cost as bench
print(json.dumps(bench.rss_of_training({setting!r}, {variant!r}, {batch}, {seq}, {steps})))
"""


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_of_training(setting: str, variant: str, batch: int, seq: int, steps: int) -> dict:
    """In a fresh process: build ``variant``, reset the peak-RSS mark, train ``steps`` steps; RSS in KiB."""
    after_imports = _status_kb("VmRSS")
    model = base_model(setting)
    ids = input_ids(model.config, batch, seq)
    model, opt = build(variant, model, selections(model.config))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # Linux: VmHWM := VmRSS
        f.write("5")
    before = _status_kb("VmRSS")
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return dict(after_imports_kb=after_imports, before_steps_kb=before, peak_kb=_status_kb("VmHWM"))


def peak_rss(setting: str, variant: str, batch: int, seq: int, steps: int) -> dict:
    code = _CHILD.format(bench_dir=str(Path(__file__).parent), setting=setting, variant=variant, batch=batch,
                         seq=seq, steps=steps)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"RSS child for {setting} / {variant} failed:\n{res.stderr[-3000:]}")
    kb = json.loads(res.stdout.strip().splitlines()[-1])
    return dict(peak_mb=kb["peak_kb"] / KIB, before_steps_mb=kb["before_steps_kb"] / KIB,
                after_imports_mb=kb["after_imports_kb"] / KIB, steps_mb=(kb["peak_kb"] - kb["before_steps_kb"]) / KIB)


# ----- adapter files, merge, forward -----
def file_bytes(model, root: Path, name: str) -> dict:
    out = root / name.replace(" ", "_").replace("%", "pct")
    model.save_pretrained(out)
    return dict(file_bytes=(out / "adapter_model.safetensors").stat().st_size,
                config_bytes=(out / "adapter_config.json").stat().st_size)


def shira_file(base, heads10_trainable: int, root: Path) -> dict:
    """PEFT's SHiRA (random sparse entries of q/k/v) with r chosen so it trains about as many entries."""
    per_r = sum(m.in_features + m.out_features for n, m in base.named_modules()
                if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in QKV)
    r = max(1, round(heads10_trainable / per_r))
    model = get_peft_model(copy.deepcopy(base), ShiraConfig(r=r, target_modules=QKV, random_seed=0))
    row = dict(r=r, trainable=trainable(model), delta_bytes=trainable_bytes(model), **file_bytes(model, root, "shira"))
    del model
    return row


def time_merges(trained: dict, repeats: int) -> tuple[dict, dict]:
    """``merge_and_unload`` seconds per adapter (fresh deep copy per repeat, interleaved); and one merged model."""
    times, merged = {k: [] for k in trained}, {}
    for _ in range(repeats):
        for name, model in trained.items():
            fresh = copy.deepcopy(model)
            gc.collect()
            t0 = time.perf_counter()
            merged[name] = fresh.merge_and_unload()
            times[name].append(time.perf_counter() - t0)
            del fresh
    return times, merged


@torch.no_grad()
def time_forwards(models: dict, ids: torch.Tensor, rounds: int, warmup: int = 1) -> dict:
    """Forward-only seconds (eval, no_grad), interleaved round-robin."""
    times = {k: [] for k in models}
    for m in models.values():
        m.eval()
    for r in range(rounds + warmup):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(input_ids=ids)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


# ----- one setting -----
def run_setting(setting: str, args) -> dict:
    rounds = args.rounds or SETTINGS[setting][2]
    t0 = time.perf_counter()
    base = base_model(setting)
    cfg = base.config
    heads = selections(cfg)
    ids = input_ids(cfg, args.batch, args.seq)
    variants = {v: build(v, copy.deepcopy(base), heads) for v in args.variants}
    counts = {v: trainable(m) for v, (m, _) in variants.items()}
    steps, opt_steps = time_training_steps(variants, ids, rounds, warmup=args.warmup)
    t_steps = time.perf_counter() - t0

    rows = {}
    med = {v: statistics.median(ts) for v, ts in steps.items()}
    for v, ts in steps.items():
        model, opt = variants[v]
        param_bytes = {p.element_size() for p in model.parameters() if p.requires_grad}
        total, moments = optimizer_state_bytes(opt)
        expected = 2 * trainable_bytes(model)
        rows[v] = dict(trainable=counts[v], trainable_dtype_bytes=sorted(param_bytes), median_ms=1e3 * med[v],
                       min_ms=1e3 * min(ts), max_ms=1e3 * max(ts), opt_step_ms=1e3 * statistics.median(opt_steps[v]),
                       vs_lora_r16=med[v] / med["lora r16"],
                       vs_paper_recipe=med[v] / med["paper-recipe"] if "paper-recipe" in med else None,
                       vs_floor=med[v] / med["floor"], opt_state_bytes=total, opt_moment_bytes=moments,
                       opt_moments_expected=expected, opt_moments_ok=moments == expected)

    t1 = time.perf_counter()
    trained = {v: variants[v][0] for v in ADAPTERS if v in variants}
    variants.clear()  # drop the optimizers and the non-adapter models before copying adapters around
    gc.collect()
    adapters = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v, model in trained.items():
            delta = trainable_bytes(model)
            adapters[v] = dict(delta_bytes=delta, **file_bytes(model, Path(tmp), v))
            adapters[v]["overhead_bytes"] = adapters[v]["file_bytes"] - delta
        shira = shira_file(base, counts["headmask 10%"], Path(tmp)) if not args.no_shira else None
    if shira:
        shira["overhead_bytes"] = shira["file_bytes"] - shira["delta_bytes"]
    merge_times, merged = time_merges(trained, args.merge_repeats)
    merged_model = merged["headmask 10%"]
    for v in list(merged):
        if v != "headmask 10%":
            del merged[v]
    fwd = time_forwards({"merged": merged_model, **trained}, ids, args.forward_rounds)
    fwd_merged = statistics.median(fwd["merged"])
    for v in trained:
        adapters[v].update(merge_ms=1e3 * statistics.median(merge_times[v]), merge_min_ms=1e3 * min(merge_times[v]),
                           forward_ms=1e3 * statistics.median(fwd[v]),
                           forward_vs_merged=statistics.median(fwd[v]) / fwd_merged)
    del trained, merged, merged_model
    gc.collect()
    t2 = time.perf_counter()

    rss = {}
    if not args.no_rss:
        for v in args.variants:
            rss[v] = peak_rss(setting, v, args.batch, args.seq, args.rss_steps)
            rows[v].update(rss[v])
    t3 = time.perf_counter()
    del base
    gc.collect()
    describe = (f"{SETTINGS[setting][0]}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv heads, vocab {cfg.vocab_size}")
    return dict(setting=setting, model=describe, dtype=str(SETTINGS[setting][1]).replace("torch.", ""),
                rounds=rounds, heads_10=sum(map(len, heads[0.1].values())), heads_30=sum(map(len, heads[0.3].values())),
                rows=rows, adapters=adapters, shira=shira, forward_merged_ms=1e3 * fwd_merged,
                seconds=dict(steps=t_steps, adapters=t2 - t1, rss=t3 - t2, total=t3 - t0))


# ----- reporting -----
def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_setting(res: dict, args) -> None:
    print(f"\n### {res['setting']} ({res['model']}, {res['dtype']} weights)\n")
    print(f"batch {args.batch} x seq {args.seq}, AdamW lr 1e-4 wd 0.1, {res['rounds']} timed rounds after "
          f"{args.warmup} warm-up, interleaved; 10% = {res['heads_10']} heads, 30% = {res['heads_30']} heads; "
          f"peak RSS: fresh process per variant, {args.rss_steps} steps\n")
    print("| variant | trainable | median ms/step | min | max | vs lora r16 | vs paper-recipe | vs floor | "
          "peak RSS MB | steps MB (peak - before) | opt. state bytes | moments = 2 x trainable x bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v, r in res["rows"].items():
        rss = (f"{r['peak_mb']:.0f} | {r['steps_mb']:.0f}" if "peak_mb" in r else "- | -")
        print(f"| {v} | {r['trainable']:,} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} | "
              f"{fmt_ratio(r['vs_lora_r16'])} | {fmt_ratio(r['vs_paper_recipe'])} | {fmt_ratio(r['vs_floor'])} | "
              f"{rss} | {r['opt_state_bytes']:,} | {'yes' if r['opt_moments_ok'] else 'NO'} "
              f"({r['opt_moment_bytes']:,}) |")
    print()
    print(f"| adapter | trained bytes | adapter file bytes | file - trained | merge ms (median) | "
          f"forward ms unmerged | vs merged ({res['forward_merged_ms']:.1f} ms) |")
    print("|---|---|---|---|---|---|---|")
    for v, a in res["adapters"].items():
        print(f"| {v} | {a['delta_bytes']:,} | {a['file_bytes']:,} | {a['overhead_bytes']:,} | {a['merge_ms']:.2f} | "
              f"{a['forward_ms']:.1f} | {fmt_ratio(a['forward_vs_merged'])} |")
    s = res["shira"]
    if s:
        print(f"| shira r{s['r']} ({s['trainable']:,} entries, file only) | {s['delta_bytes']:,} | "
              f"{s['file_bytes']:,} | {s['overhead_bytes']:,} | - | - | - |")


def targets(results: list) -> list:
    """Each target per setting: ``(target, setting, measured, met)``; headmask 10% unless stated."""
    out = []
    for res in results:
        rows, ad, s = res["rows"], res["adapters"], res["setting"]
        headmask = [v for v in HEADMASK if v in rows]
        hm = rows["headmask 10%"]
        out.append(("headmask 10% step time <= 1.00x lora r16", s, f"{hm['vs_lora_r16']:.3f}x",
                    hm["vs_lora_r16"] <= 1.0))
        out.append(("headmask 10% step time <= 1.10x floor", s, f"{hm['vs_floor']:.3f}x", hm["vs_floor"] <= 1.10))
        lora = rows["lora r16"]
        for v in (v for v in KASA if v in rows):  # issue 16's goal for the KaSA head delta
            k = rows[v]
            out.append((f"{v}: trainable < lora r16", s, f"{k['trainable']:,} vs {lora['trainable']:,}",
                        k["trainable"] < lora["trainable"]))
            out.append((f"{v}: file < lora r16", s, f"{ad[v]['file_bytes']:,} vs {ad['lora r16']['file_bytes']:,}",
                        ad[v]["file_bytes"] < ad["lora r16"]["file_bytes"]))
            out.append((f"{v}: step time <= lora r16", s, f"{k['vs_lora_r16']:.3f}x", k["vs_lora_r16"] <= 1.0))
        if "peak_mb" in hm:
            lr = rows["lora r16"]
            out.append(("headmask 10% peak RSS <= lora r16", s, f"{hm['peak_mb']:.0f} vs {lr['peak_mb']:.0f} MB",
                        hm["peak_mb"] <= lr["peak_mb"]))
        ok = all(rows[v]["opt_moments_ok"] and rows[v]["trainable_dtype_bytes"] == [4] for v in headmask)
        out.append(("optimizer state == 2 x trainable x 4 bytes (all headmask)", s,
                    ", ".join(f"{rows[v]['opt_moment_bytes']:,} = 8 x {rows[v]['trainable']:,}"
                              if rows[v]["opt_moments_ok"] else f"{rows[v]['opt_moment_bytes']:,}" for v in headmask),
                    ok))
        worst = max(ad[v]["overhead_bytes"] for v in headmask)
        out.append(("adapter file == delta bytes + < 64 KiB (all headmask)", s, f"max overhead {worst:,} bytes",
                    all(0 <= ad[v]["overhead_bytes"] < FILE_OVERHEAD_LIMIT for v in headmask)))
        out.append(("headmask 10% merge time <= lora r16", s,
                    f"{ad['headmask 10%']['merge_ms']:.2f} vs {ad['lora r16']['merge_ms']:.2f} ms",
                    ad["headmask 10%"]["merge_ms"] <= ad["lora r16"]["merge_ms"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="which model/dtype settings (default: all)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="timed training rounds per variant (default per setting: "
                        + ", ".join(f"{k} {v[2]}" for k, v in SETTINGS.items()) + ")")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds (default %(default)s)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rss-steps", type=int, default=2, help="training steps in each peak-RSS child process")
    parser.add_argument("--merge-repeats", type=int, default=5)
    parser.add_argument("--forward-rounds", type=int, default=5)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--no-shira", action="store_true", help="skip the SHiRA adapter-file comparison")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to run (default: all; " + ", ".join(ALWAYS) + " always run)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: settings " + " and ".join(QUICK_SETTINGS) + ", batch 2 x seq 64, "
                        "3 rounds after 1 warm-up, 3 merge repeats and forward rounds")
    parser.add_argument("--out", default=None, help="JSON results file (default: benchmarks/results/"
                        "training_cost.json, with --quick training_cost_quick.json)")
    args = parser.parse_args()
    args.variants = [v for v in VARIANTS if v in set(args.variants) | set(ALWAYS)]
    results_dir = Path(__file__).parent / "results"
    args.out = args.out or str(results_dir / ("training_cost_quick.json" if args.quick else "training_cost.json"))
    if args.quick:
        args.settings = [s for s in args.settings if s in QUICK_SETTINGS] or list(QUICK_SETTINGS)
        args.batch, args.seq, args.rounds, args.warmup = 2, 64, 3, 1
        args.merge_repeats = args.forward_rounds = 3
    t0 = time.perf_counter()
    results = []
    for setting in args.settings:
        res = run_setting(setting, args)
        results.append(res)
        print_setting(res, args)
        sys.stdout.flush()
    total = time.perf_counter() - t0

    tg = targets(results)
    print("\n### Targets (reported, not enforced)\n")
    print("| target | setting | measured | met |")
    print("|---|---|---|---|")
    for name, setting, measured, met in tg:
        print(f"| {name} | {setting} | {measured} | {'yes' if met else 'no'} |")
    print(f"\nTotal benchmark time: {total:.0f} s ("
          + ", ".join(f"{r['setting']} {r['seconds']['total']:.0f} s" for r in results) + ")")
    meta = dict(settings=args.settings, batch=args.batch, seq=args.seq, warmup=args.warmup, rss_steps=args.rss_steps,
                merge_repeats=args.merge_repeats, forward_rounds=args.forward_rounds, quick=args.quick,
                sizes={k: SIZES[k] for k in ("small", "large")}, total_s=total, **machine())
    write_json(args.out, dict(meta=meta, results=results,
                              targets=[dict(target=n, setting=s, measured=m, met=ok) for n, s, m, ok in tg]))


if __name__ == "__main__":
    main()
