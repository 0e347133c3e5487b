"""Which head-slice forward is faster: "merged" (custom autograd over a merged
weight) or "output_add" (base output + x @ delta^T into the selected channels)?

Both strategies train the same Llama-architecture model (built from config,
GQA) with the same 10% of heads; training steps (forward, backward, AdamW) are
interleaved round-robin so machine noise hits both alike; medians over rounds.

    python benchmarks/forward_strategy.py [--rounds 15] [--quick]

Prints a markdown table and writes benchmarks/results/forward_strategy.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import SIZES, headmask_trainers, llama, machine, time_training_steps, write_json
from peft_alps.scoring.selection import random_heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per strategy (after 2 warm-up)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="5 rounds, batch 2 x seq 64 (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "forward_strategy.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch, args.seq = 5, 2, 64

    base = llama(args.size)
    config = base.config
    heads = random_heads(config.num_hidden_layers, config.num_attention_heads, 0.1, seed=0)
    variants = headmask_trainers(base, {s: dict(heads=heads, forward_strategy=s) for s in ("merged", "output_add")})
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    times, _ = time_training_steps(variants, ids, args.rounds)

    ref = statistics.median(times["output_add"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(strategy=name, median_ms=1e3 * med, min_ms=1e3 * min(ts), max_ms=1e3 * max(ts),
                         vs_output_add=med / ref))
    trainable = variants["merged"][0].get_nb_trainable_parameters()[0]
    print(f"Llama {args.size} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads), 10% heads, parts q,k,v, "
          f"batch {args.batch} x seq {args.seq}, fp32, AdamW, {args.rounds} interleaved rounds, "
          f"{trainable:,} trainable params")
    print("| strategy | median ms/step | min | max | vs output_add |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['strategy']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['max_ms']:.1f} | "
              f"{row['vs_output_add']:.3f} |")
    meta = dict(size=args.size, batch=args.batch, seq=args.seq, rounds=args.rounds, **machine())
    write_json(args.out, dict(meta=meta, rows=rows))


if __name__ == "__main__":
    main()
