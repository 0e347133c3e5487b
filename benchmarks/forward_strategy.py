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
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers as tf
from peft import get_peft_model

import peft_alps
from peft_alps import HeadMaskConfig
from peft_alps.selection import random_heads

SIZES = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2),
    "large": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=12, num_attention_heads=16,
                  num_key_value_heads=4),
}


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

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=4096, **SIZES[args.size])
    config._attn_implementation = "eager"
    base = tf.LlamaForCausalLM(config)
    heads = random_heads(config.num_hidden_layers, config.num_attention_heads, 0.1, seed=0)
    variants = {}
    for strategy in ("merged", "output_add"):
        model = get_peft_model(copy.deepcopy(base), HeadMaskConfig(heads=heads, forward_strategy=strategy))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
        variants[strategy] = (model, opt)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))

    def step(model, opt):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {k: [] for k in variants}
    for r in range(args.rounds + 2):
        for name, (model, opt) in variants.items():
            t = step(model, opt)
            if r >= 2:
                times[name].append(t)

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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(size=args.size, batch=args.batch, seq=args.seq, rounds=args.rounds, torch=torch.__version__,
                peft_alps=peft_alps.__version__, cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads())
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
