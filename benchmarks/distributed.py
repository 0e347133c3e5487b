"""Two-process training cost: head-mask (10% of heads, q/k/v) vs LoRA r=16 (q/k/v/o), under DDP and FSDP2.

    python benchmarks/distributed.py [--size small] [--steps 6] [--rounds 2]

Each (strategy, adapter) runs in its own ``torchrun --standalone --nproc_per_node 2`` launch (gloo, CPU), so each
process's peak RSS is that variant's alone; the launches are interleaved round-robin over ``--rounds``. A launch
builds the ``common.llama(size)`` model, wraps it (DDP, or ``fully_shard`` per decoder layer + root), trains
``--warmup`` + ``--steps`` AdamW steps on batch 2 x seq 128 per rank, and reports per rank the median step time and
the peak RSS (``ru_maxrss``) and RSS after the model was built. On CPU this shows overhead and memory, not GPU speed.
Prints a table; saves ``benchmarks/results/distributed.json``.

``plan()`` (printed too) works out what an 8B and a 70B Llama fine-tune need per GPU from the model's numbers:
weights, trainable slices, gradients and AdamW state, under DDP, FSDP / ZeRO-3 over 8 GPUs, head-mask vs LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "distributed.json"
STRATEGIES, ADAPTERS = ("ddp", "fsdp2"), ("headmask10", "lora16")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(strategy: str, adapter: str, size: str, steps: int, warmup: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(HERE))
    import peft_alps
    from common import llama
    from peft_alps import HeadMaskConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = llama(size)
    built = rss_mb()
    if adapter == "headmask10":
        layout = peft_alps.HeadLayout.from_model_config(base.config)
        heads = peft_alps.random_heads(layout.num_layers, layout.num_heads, ratio=0.1, seed=0)
        model = get_peft_model(base, HeadMaskConfig(heads=heads, parts=["q", "k", "v"]))
    else:
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"]))
    if strategy == "ddp":
        step_model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        step_model = model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, base.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(rank))
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        step_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {"rank": rank, "step_s": statistics.median(times), "peak_rss_mb": rss_mb(), "built_rss_mb": built,
              "trainable": trainable}
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


def launch(strategy, adapter, args, out: Path) -> list[dict]:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", strategy, adapter, "--size", args.size, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in out.read_text().splitlines()]


def plan() -> list[dict]:
    """Bytes per GPU of an 8B / 70B Llama fine-tune (bf16 weights, fp32 trainable slices, fp32 grads, AdamW's two
    fp32 moments; activations excluded: they are the same for both adapters at the same batch) over 8 GPUs.

    Head-mask 10% of the query heads, q/k/v: per selected head ``head_dim * hidden`` q weights and (at most) one
    kv group's k and v rows each (``2 * head_dim * hidden``, an upper bound: heads of one group share them).
    LoRA r=16 on q/k/v/o: ``r * (in + out)`` per projection."""
    models = {"Llama-3-8B": dict(layers=32, hidden=4096, heads=32, kv=8, head_dim=128, params=8.03e9),
              "Llama-3-70B": dict(layers=80, hidden=8192, heads=64, kv=8, head_dim=128, params=70.6e9)}
    rows, gpus = [], 8
    for name, m in models.items():
        q_out, kv_out = m["heads"] * m["head_dim"], m["kv"] * m["head_dim"]
        selected = round(0.1 * m["layers"] * m["heads"])
        trainable = {"headmask10": selected * 3 * m["head_dim"] * m["hidden"],
                     "lora16": m["layers"] * 16 * ((m["hidden"] + q_out) * 2 + (m["hidden"] + kv_out) * 2)}
        for adapter, n in trainable.items():
            per_trainable = 4 + 4 + 8  # fp32 slice, fp32 grad, AdamW m and v
            for strategy, shard in (("DDP", 1), ("FSDP / ZeRO-3", gpus)):
                weights = 2 * m["params"] / shard
                rows.append({"model": name, "adapter": adapter, "strategy": strategy, "trainable": n,
                             "weights_gb": weights / 1e9, "adapter_state_gb": per_trainable * n / shard / 1e9,
                             "total_gb": (weights + per_trainable * n / shard) / 1e9})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("STRATEGY", "ADAPTER"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.size, args.steps, args.warmup, Path(args.out))
        return
    runs = {(s, a): [] for s in STRATEGIES for a in ADAPTERS}
    for _ in range(args.rounds):  # interleaved: every variant once per round
        for key in runs:
            runs[key].append(launch(*key, args, RESULTS.with_suffix(f".{key[0]}.{key[1]}.jsonl")))
    table = []
    for (strategy, adapter), launches in runs.items():
        ranks = [r for launch_ in launches for r in launch_]
        table.append({"strategy": strategy, "adapter": adapter, "trainable": ranks[0]["trainable"],
                      "step_s_median": statistics.median(r["step_s"] for r in ranks),
                      "peak_rss_mb_max": max(r["peak_rss_mb"] for r in ranks),
                      "peak_over_built_mb": statistics.median(r["peak_rss_mb"] - r["built_rss_mb"] for r in ranks)})
    print(f"2 processes (gloo, CPU), model {args.size}, batch 2 x seq 128 per rank, {args.steps} timed steps after "
          f"{args.warmup} warm-up, {args.rounds} interleaved launches per variant; medians over ranks and launches")
    print("| strategy | adapter | trainable | step (s) | step / LoRA | peak RSS per rank (MB) | peak - after build (MB) |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        lora = next(r for r in table if r["strategy"] == row["strategy"] and r["adapter"] == "lora16")
        print(f"| {row['strategy']} | {row['adapter']} | {row['trainable']:,} | {row['step_s_median']:.3f} | "
              f"{row['step_s_median'] / lora['step_s_median']:.2f} | {row['peak_rss_mb_max']:.0f} | "
              f"{row['peak_over_built_mb']:.0f} |")
    rows = plan()
    print("\nPer-GPU memory plan (8 GPUs; weights bf16; slices, grads and AdamW state fp32; activations excluded)")
    print("| model | adapter | strategy | trainable | weights (GB) | adapter state (GB) | total (GB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['adapter']} | {r['strategy']} | {r['trainable'] / 1e6:.1f} M | "
              f"{r['weights_gb']:.1f} | {r['adapter_state_gb']:.3f} | {r['total_gb']:.1f} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "table": table, "plan": rows}, indent=2))
    for key in runs:
        RESULTS.with_suffix(f".{key[0]}.{key[1]}.jsonl").unlink(missing_ok=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
