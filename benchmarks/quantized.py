"""Training memory and step time on a quantized SmolLM2-135M: head-mask (10% of heads) vs LoRA r=16.

    python benchmarks/quantized.py [--repeats 3] [--steps 3] [--warmup 1] [--batch 1] [--seq 128] [--threads 1]

Bases: SmolLM2-135M-Instruct (``peft_alps.pretrained``) in fp32 and bf16 (references, unquantized), torchao int8
weight-only (``TorchAoConfig(Int8WeightOnlyConfig())``) and bitsandbytes int8 (``BitsAndBytesConfig(load_in_8bit=
True)``, its CPU backend), all computing in fp32 but the bf16 base. Adapters, both on q/k/v/o: head-mask on 10% of
the heads (``random_heads(..., ratio=0.1, seed=0)``; ``forward_strategy`` left unset: "merged" on the float bases,
"output_add" on the quantized ones) and LoRA r=16, alpha 32.

Every (base, adapter) runs in its own fresh subprocess, so its memory is its own; the runs are interleaved
round-robin (all eight, then again) over ``--repeats``. A run loads the base, wraps it, returns freed heap to the OS
(``malloc_trim``: the loaders leave much of it with the allocator), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), then trains ``--warmup`` + ``--steps`` AdamW steps on one fixed batch
(``--batch`` x ``--seq`` random tokens, labels = inputs; ``--threads`` torch threads) and reports: the peak RSS
during training (``VmHWM`` after the reset: the model, activations, gradients and optimizer state, without the
loading transient), the peak RSS of the whole
process (``ru_maxrss``, loading included), the RSS before training, the median step time and the first and last
loss. Summary per base: medians over repeats, and the head-mask / LoRA ratios of each repeat's pair (median).
Results are written after every run and the script resumes from them. Timings are ratios within one machine and
run (2 shared CPU cores here), not absolute speeds.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quantized.json"
BASES = ("fp32", "bf16", "torchao_int8", "bnb_int8")
ADAPTERS = ("headmask10", "lora16")
PARTS = ["q", "k", "v", "o"]


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def load_base(base: str):
    """SmolLM2-135M-Instruct as ``base`` names it (module docstring)."""
    import torch
    import transformers as tf

    from peft_alps.pretrained import load_smollm2

    if base in ("fp32", "bf16"):
        return load_smollm2(dtype=torch.float32 if base == "fp32" else torch.bfloat16)[0]
    if base == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig

        qc = tf.TorchAoConfig(Int8WeightOnlyConfig())
    else:
        qc = tf.BitsAndBytesConfig(load_in_8bit=True)
    return load_smollm2(quantization_config=qc)[0]


def worker(base: str, adapter: str, steps: int, warmup: int, batch: int, seq: int, threads: int) -> dict:
    import ctypes
    import gc
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    import peft_alps
    from peft_alps import HeadMaskConfig

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_base(base)
    load_s = time.perf_counter() - t0
    if adapter == "headmask10":
        layout = peft_alps.HeadLayout.from_model_config(model.config)
        heads = peft_alps.random_heads(layout.num_layers, layout.num_heads, ratio=0.1, seed=0)
        model = get_peft_model(model, HeadMaskConfig(heads=heads, parts=PARTS))
    else:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[f"{p}_proj" for p in PARTS]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    gc.collect()
    untrimmed = _status_mb("VmRSS")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return the heap the loader freed to the OS: RSS = what is in use
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark restarts here
    times, losses = [], []
    for step in range(warmup + steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return dict(base=base, adapter=adapter, trainable=sum(p.numel() for p in params), load_s=load_s,
                rss_untrimmed_mb=untrimmed, rss_before_train_mb=before, peak_rss_train_mb=_status_mb("VmHWM"),
                peak_rss_process_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                step_s=statistics.median(times), first_loss=losses[0], last_loss=losses[-1])


def summarize(runs: list) -> dict:
    by = {}
    for r in runs:
        by.setdefault((r["base"], r["adapter"]), []).append(r)
    out = {}
    for base in BASES:
        row = {}
        for adapter in ADAPTERS:
            rs = by.get((base, adapter), [])
            if rs:
                row[adapter] = {k: statistics.median(r[k] for r in rs) for k in
                                ("peak_rss_train_mb", "peak_rss_process_mb", "rss_before_train_mb", "step_s",
                                 "load_s") if k in rs[0]}
                if "rss_untrimmed_mb" in rs[0]:
                    row[adapter]["rss_untrimmed_mb"] = statistics.median(r["rss_untrimmed_mb"] for r in rs)
                row[adapter].update(trainable=rs[0]["trainable"], repeats=len(rs))
        pairs = [(h, lo) for h in by.get((base, "headmask10"), []) for lo in by.get((base, "lora16"), [])
                 if h["repeat"] == lo["repeat"]]
        if pairs:
            for key in ("peak_rss_train_mb", "peak_rss_process_mb", "step_s"):
                ratios = [h[key] / lo[key] for h, lo in pairs]
                row[f"ratio_{key}"] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
        out[base] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", nargs=2, metavar=("BASE", "ADAPTER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.batch, args.seq, args.threads)))
        return

    sys.path.insert(0, str(HERE))
    from common import machine, write_json

    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs = data.get("runs", [])
    done = {(r["repeat"], r["base"], r["adapter"]) for r in runs}
    for repeat in range(args.repeats):
        for base in BASES:
            for adapter in ADAPTERS:
                if (repeat, base, adapter) in done:
                    continue
                proc = subprocess.run([sys.executable, __file__, "--worker", base, adapter, "--steps",
                                       str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                                       "--seq", str(args.seq), "--threads", str(args.threads)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{base}/{adapter} failed:\n{proc.stderr[-3000:]}")
                run = dict(json.loads(proc.stdout.strip().splitlines()[-1]), repeat=repeat)
                runs.append(run)
                print(f"repeat {repeat} {base:13s} {adapter:10s} train peak {run['peak_rss_train_mb']:7.0f} MB  "
                      f"process peak {run['peak_rss_process_mb']:7.0f} MB  step {run['step_s']:.2f} s  loss "
                      f"{run['first_loss']:.3f} -> {run['last_loss']:.3f}", flush=True)
                write_json(args.out, dict(machine=machine(), steps=args.steps, warmup=args.warmup, parts=PARTS,
                                          batch=[args.batch, args.seq], threads=args.threads, runs=runs,
                                          summary=summarize(runs)))
    summary = summarize(runs)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
