"""Head localization without a task model, on a real model and real task data.

SmolLM2-135M-Instruct (30 layers x 9 query heads, 3 kv heads) and grade-school math word problems with
worked solutions (reasoning-gym ``gsm_symbolic``). Three ways to pick K = ceil(0.1 * 270) = 27 heads:

* probe + PAD: ``probe_task_model`` (attention-only AdamW fine-tune) then ``score_heads`` (the paper's
  probe, Appendix C), run twice on disjoint halves of the data to see how stable the choice is;
* gradient scores: ``gradient_head_scores`` on the same batches (no optimizer steps);
* for scale: the expected overlap of two random 27-head draws is 27 * 27 / 270 = 2.7 heads.

    pip install reasoning-gym    # the data; SmolLM2 comes with `bash .ci/setup`
    python benchmarks/probe_localize.py [--examples 300] [--steps 50] [--quick]

Prints a table and writes benchmarks/results/probe_localize.json.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import transformers as tf

from common import machine, write_json
from peft_alps import score_heads, select_heads
from peft_alps.data import gsm_symbolic_texts, text_batches
from peft_alps.scoring.gradient_scores import gradient_head_scores
from peft_alps.pretrained import load_smollm2
from peft_alps.scoring.probe import probe_task_model

RATIO = 0.1


def selected(scores) -> set[tuple[int, int]]:
    return {(layer, h) for layer, hs in select_heads(scores, RATIO).items() for h in hs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="gsm_symbolic examples (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="probe steps per half (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="probe learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--grad-batches", type=int, default=16, help="batches for gradient scores")
    parser.add_argument("--quick", action="store_true", help="40 examples, 4 steps, 2 gradient batches")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_localize.json"))
    args = parser.parse_args()
    if args.quick:
        args.examples, args.steps, args.grad_batches = 40, 4, 2
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(attn_implementation="eager")
    texts = gsm_symbolic_texts(args.examples, seed=0)
    batches = text_batches(tokenizer, texts, args.batch_size, args.max_length)
    half = len(batches) // 2
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"SmolLM2-135M-Instruct, {len(texts)} gsm_symbolic examples ({tokens} tokens, {len(batches)} batches of "
          f"{args.batch_size}), set-up {time.perf_counter() - t0:.0f} s")

    runs, scores = [], {}
    for name, data in (("probe A (first half)", batches[:half]), ("probe B (second half)", batches[half:])):
        probe = probe_task_model(model, data, steps=args.steps, lr=args.lr)
        t = time.perf_counter()
        scores[name] = score_heads(model, probe)  # PAD, product
        runs.append(dict(method=name, seconds=probe.seconds + time.perf_counter() - t,
                         detail=f"{args.steps} steps, loss {probe.losses[0]:.3f} -> {probe.losses[-1]:.3f}, "
                                f"PAD scoring {time.perf_counter() - t:.2f} s"))
    for kind in ("grad", "grad_x_weight"):
        t = time.perf_counter()
        scores[f"gradient {kind}"] = gradient_head_scores(model, batches[:args.grad_batches], kind=kind)
        runs.append(dict(method=f"gradient {kind}", seconds=time.perf_counter() - t,
                         detail=f"{args.grad_batches} batches"))

    k = math.ceil(RATIO * scores["probe A (first half)"].scores.numel())
    reference = selected(scores["probe A (first half)"])
    for run in runs:
        chosen = selected(scores[run["method"]])
        run.update(overlap_with_probe_a=len(chosen & reference),
                   top5=[(layer, h) for layer, h, _ in scores[run["method"]].top(5)],
                   layers=sorted({layer for layer, _ in chosen}))
    print(f"K = {k} heads; expected overlap of two random selections: {k * k / 270:.1f}")
    print("| method | seconds | top-K overlap with probe A | top 5 (layer, head) | details |")
    print("|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['method']} | {r['seconds']:.1f} | {r['overlap_with_probe_a']}/{k} | {r['top5']} | {r['detail']} |")
    print(f"probe A selection by layer: {select_heads(scores['probe A (first half)'], RATIO)}")

    meta = dict(examples=len(texts), tokens=tokens, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                max_length=args.max_length, grad_batches=args.grad_batches, k=k, total_s=time.perf_counter() - t0,
                **machine())
    write_json(args.out, dict(meta=meta, runs=runs, scores={name: s.scores.tolist() for name, s in scores.items()}))


if __name__ == "__main__":
    main()
