"""Where does a training step's time go? torch.profiler over the same steps of two training_cost.py variants.

Builds the variants exactly as ``training_cost.py`` does (same model, batch, AdamW), runs warm-up steps, then
profiles ``--steps`` steps of each, interleaved, and prints per operator the self CPU time per step of each
variant and the difference, largest differences first, so a gap between two variants is attributed to ops.

    python benchmarks/profile_step.py --setting small-bf16 --variants floor "headmask 10%" [--steps 10]

Prints a markdown table and writes ``benchmarks/results/profile_<setting>.json``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import training_cost as tc
from common import machine, write_json


def self_times(model, opt, ids, steps: int) -> tuple[dict, float]:
    """``({op name: self CPU ms per step}, total ms per step)`` over ``steps`` profiled training steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    ops = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    return ops, sum(ops.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(tc.SETTINGS), default="small-bf16")
    parser.add_argument("--variants", nargs=2, default=["floor", "headmask 10%"], metavar="VARIANT",
                        help=f"two of {', '.join(tc.VARIANTS)}")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per variant (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved profiling rounds (default %(default)s)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--top", type=int, default=15, help="rows to print (default %(default)s)")
    args = parser.parse_args()

    base = tc.base_model(args.setting)
    heads = tc.selections(base.config)
    ids = tc.input_ids(base.config, args.batch, args.seq)
    built = {v: tc.build(v, copy.deepcopy(base), heads) for v in args.variants}
    for model, opt in built.values():  # warm-up
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    ops = {v: {} for v in args.variants}
    totals = {v: 0.0 for v in args.variants}
    for _ in range(args.rounds):  # interleaved, summed, then averaged per step
        for v, (model, opt) in built.items():
            got, total = self_times(model, opt, ids, args.steps)
            totals[v] += total / args.rounds
            for k, ms in got.items():
                ops[v][k] = ops[v].get(k, 0.0) + ms / args.rounds
    a, b = args.variants
    names = sorted(set(ops[a]) | set(ops[b]), key=lambda k: -abs(ops[b].get(k, 0) - ops[a].get(k, 0)))
    print(f"### {args.setting}, batch {args.batch} x seq {args.seq}: self CPU ms per training step "
          f"({args.rounds} x {args.steps} profiled steps each, interleaved)\n")
    print(f"| op | {a} | {b} | difference |")
    print("|---|---|---|---|")
    for k in names[:args.top]:
        print(f"| `{k}` | {ops[a].get(k, 0):.2f} | {ops[b].get(k, 0):.2f} | {ops[b].get(k, 0) - ops[a].get(k, 0):+.2f} |")
    print(f"| **all ops** | {totals[a]:.2f} | {totals[b]:.2f} | {totals[b] - totals[a]:+.2f} |")
    out = Path(__file__).parent / "results" / f"profile_{args.setting}.json"
    write_json(out, dict(setting=args.setting, variants=args.variants, steps=args.steps, rounds=args.rounds,
                         batch=args.batch, seq=args.seq, totals_ms=totals, ops_ms=ops, **machine()))


if __name__ == "__main__":
    main()
