"""What does GMT (grad_mask_ratio > 0) cost per training step?

The same Llama-architecture model (built from config, GQA) trains the same 10%
of heads with grad_mask_ratio 0 (no masking, no hook work), 0.5 and 0.9. A step
is forward, backward, masking (inside optimizer.step, by peft_alps' global
pre-hook) and AdamW; steps are interleaved round-robin so machine noise hits
every ratio alike; medians over rounds. "opt.step" is the optimizer call alone,
masking included.

    python benchmarks/gmt.py [--rounds 15] [--quick]

Prints a markdown table and writes benchmarks/results/gmt.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import SIZES, headmask_trainers, llama, machine, time_training_steps, write_json
from peft_alps.scoring.selection import random_heads

RATIOS = (0.0, 0.5, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per ratio (after 2 warm-up)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--head-fraction", type=float, default=0.1, help="fraction of heads trained")
    parser.add_argument("--quick", action="store_true", help="5 rounds, batch 2 x seq 64 (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gmt.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch, args.seq = 5, 2, 64

    base = llama(args.size)
    config = base.config
    heads = random_heads(config.num_hidden_layers, config.num_attention_heads, args.head_fraction, seed=0)
    variants = headmask_trainers(base, {r: dict(heads=heads, grad_mask_ratio=r) for r in RATIOS})
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    times, opt_times = time_training_steps(variants, ids, args.rounds)

    ref = statistics.median(times[0.0])
    rows = []
    for ratio, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(grad_mask_ratio=ratio, median_ms=1e3 * med, min_ms=1e3 * min(ts), max_ms=1e3 * max(ts),
                         opt_step_ms=1e3 * statistics.median(opt_times[ratio]), vs_ratio_0=med / ref))
    trainable = variants[0.0][0].get_nb_trainable_parameters()[0]
    print(f"Llama {args.size} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads), {args.head_fraction:.0%} heads, "
          f"parts q,k,v, batch {args.batch} x seq {args.seq}, fp32, AdamW, {args.rounds} interleaved rounds, "
          f"{trainable:,} trainable params")
    print("| grad_mask_ratio | median ms/step | min | max | opt.step ms (incl. masking) | vs ratio 0 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['grad_mask_ratio']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['max_ms']:.1f} | "
              f"{row['opt_step_ms']:.2f} | {row['vs_ratio_0']:.3f} |")
    meta = dict(size=args.size, batch=args.batch, seq=args.seq, rounds=args.rounds, head_fraction=args.head_fraction,
                trainable_params=trainable, **machine())
    write_json(args.out, dict(meta=meta, rows=rows))


if __name__ == "__main__":
    main()
