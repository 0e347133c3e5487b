"""How fast is ``peft_alps.scoring.weight_scores.score_heads`` against the authors' algorithm?

The reference re-implements the released ALPS head-selection script
(github.com/VoiceBeer/ALPS, ALPS/alps.py, "wasserstein_normalized"): load both
models whole (``AutoModel.from_pretrained``), loop over heads in Python, build
each head as the flattened q, k, v weight slices concatenated (K/V sliced with
the *query* index, as the script does: right here because the model has no
GQA), float32 softmax, then ``scipy.stats.wasserstein_distance`` on the support
``linspace(0, 1, N)``. The score columns compare against that float32
reference and against the same algorithm with a float64 softmax (untimed): ours
computes distributions in float64, so it should match the latter closely. Ours with ``representation="concat", metric="pad"`` is
the apples-to-apples comparison (the table checks that the scores and top-K
agree); ``product`` (the paper's representation) is timed too. Each variant is
timed from checkpoint paths and from already loaded models.

Model: Llama architecture built from config without GQA (12 layers, hidden 768,
12 heads); task = base + a perturbation on 8 heads' q/k/v + small noise on all
weights (so K - 8 of the top-K heads are decided by the noise); both saved as
safetensors in a temp dir. Every timing and memory measurement runs in a fresh
process (so neither implementation inherits the other's allocator state). Peak RSS of scoring the two checkpoints from disk is
measured in a fresh subprocess per implementation: peak minus the RSS after
imports (Linux: the peak mark is reset after imports via /proc/self/clear_refs;
elsewhere ru_maxrss, whose import-time peak can hide a smaller scoring peak).

    python benchmarks/localize.py [--repeats 5] [--quick]

Prints a markdown table and writes benchmarks/results/localize.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers as tf
from scipy.stats import wasserstein_distance

from common import machine, write_json
from peft_alps.scoring.weight_scores import score_heads
from peft_alps.scoring.selection import select_heads

SIZES = {
    "full": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
    "quick": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8),
}
RATIO = 0.1
tf.logging.set_verbosity_error()  # no load reports (the reference loads LlamaModel from a CausalLM checkpoint)
tf.logging.disable_progress_bar()


# ----- the reference: the authors' algorithm, written plainly -----
def reference_heads(model) -> dict[tuple[int, int], torch.Tensor]:
    """{(layer, head): concat(q, k, v slices flattened)}; K/V use the query index, as the released script."""
    n = model.config.num_attention_heads
    heads = {}
    for layer, block in enumerate(model.layers):
        q, k, v = (getattr(block.self_attn, f"{p}_proj").weight.data for p in "qkv")
        d = q.shape[0] // n
        for h in range(n):
            s = slice(h * d, (h + 1) * d)
            heads[layer, h] = torch.cat([q[s].flatten(), k[s].flatten(), v[s].flatten()])
    return heads


def reference_from_models(base, task, dtype=torch.float32) -> np.ndarray:
    """Per-head W1 on unit support via scipy, one head at a time. Returns [layers, heads] float64.

    ``dtype``: of the softmax; float32 as the released script (timed), float64 for an accuracy check."""
    cfg = base.config
    scores = np.zeros((cfg.num_hidden_layers, cfg.num_attention_heads))
    base_heads, task_heads = reference_heads(base), reference_heads(task)
    for (layer, h), wb in base_heads.items():
        pb = F.softmax(wb.to(dtype), dim=0).numpy()
        pt = F.softmax(task_heads[layer, h].to(dtype), dim=0).numpy()
        x = np.linspace(0, 1, len(pb))
        scores[layer, h] = wasserstein_distance(x, x, pb, pt)
    return scores


def reference_from_paths(base_path, task_path) -> np.ndarray:
    base = tf.AutoModel.from_pretrained(base_path, dtype=torch.float32)
    task = tf.AutoModel.from_pretrained(task_path, dtype=torch.float32)
    return reference_from_models(base, task)


OURS = {"ours concat+pad": dict(metric="pad", representation="concat"),
        "ours product+pad": dict(metric="pad", representation="product")}


def score(which: str, base, task):
    """Run ``"reference"`` or a key of ``OURS`` on two checkpoint paths or two loaded causal-LM models."""
    if which != "reference":
        return score_heads(base, task, **OURS[which])
    if isinstance(base, (str, Path)):
        return reference_from_paths(base, task)
    return reference_from_models(base.model, task.model)  # what AutoModel loads: the decoder, no lm_head


def top_k(scores: np.ndarray, k: int) -> set[tuple[int, int]]:
    n = scores.shape[1]
    return {(int(i) // n, int(i) % n) for i in np.argsort(-scores.ravel(), kind="stable")[:k]}


# ----- setup -----
def make_checkpoints(root: Path, size: str, perturbed: int = 8, seed: int = 0):
    """Save base and task checkpoints; return (base model, task model, perturbed heads)."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(**SIZES[size])
    base = tf.LlamaForCausalLM(config).eval()
    task = tf.LlamaForCausalLM(config).eval()
    task.load_state_dict(base.state_dict())
    L, H = config.num_hidden_layers, config.num_attention_heads
    d = config.hidden_size // H
    g = torch.Generator().manual_seed(seed + 1)
    chosen = [divmod(int(i), H) for i in torch.randperm(L * H, generator=g)[:perturbed]]
    with torch.no_grad():
        for p in task.parameters():
            p.add_(1e-4 * torch.randn(p.shape, generator=g))
        for rank, (layer, h) in enumerate(chosen):  # distinct magnitudes: a well-defined ranking
            for part in "qkv":
                w = getattr(task.model.layers[layer].self_attn, f"{part}_proj").weight
                w[h * d:(h + 1) * d] += (0.02 + 0.005 * rank) * torch.randn(d, w.shape[1], generator=g)
    base.save_pretrained(root / "base")
    task.save_pretrained(root / "task")
    return base, task, chosen


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def load_inputs(kind: str, base_path: Path, task_path: Path):
    """The two inputs of a run: checkpoint paths, or the causal-LM models loaded from them (fp32)."""
    if kind == "paths":
        return base_path, task_path
    return tuple(tf.LlamaForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (base_path, task_path))


# Each measurement runs in a fresh process: the allocator state one implementation leaves behind
# (glibc's adaptive mmap threshold) changed the other's speed by up to 2x when they shared a process.
_CHILD = """
import gc, json, resource, sys, time
sys.path.insert(0, {bench_dir!r})
import localize as bench

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

inputs = bench.load_inputs({kind!r}, {base!r}, {task!r})
if {repeats}:  # timing: one warm-up, then the timed repeats
    bench.score({which!r}, *inputs)
    times = []
    for _ in range({repeats}):
        t0 = time.perf_counter()
        bench.score({which!r}, *inputs)
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(times=times)))
    sys.exit()
gc.collect()
try:  # Linux: reset the peak-RSS mark, so the import-time peak does not hide the scoring peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, peak = status_kb("VmRSS"), lambda: status_kb("VmHWM")
except OSError:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
bench.score({which!r}, *inputs)
print(json.dumps(dict(after_imports_kb=before, peak_kb=peak())))
"""


def in_subprocess(which: str, kind: str, base: Path, task: Path, repeats: int = 0) -> dict:
    """Run ``_CHILD`` in a fresh interpreter: ``repeats`` timings, or (``repeats=0``) one peak-RSS run."""
    code = _CHILD.format(bench_dir=str(Path(__file__).parent), which=which, kind=kind, base=str(base),
                         task=str(task), repeats=repeats)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def peak_rss_mb(which: str, base: Path, task: Path) -> dict:
    """Peak RSS (MB) of scoring the checkpoints in a fresh process, minus its RSS after imports."""
    kb = in_subprocess(which, "paths", base, task)
    return dict(after_imports_mb=kb["after_imports_kb"] / 1024, peak_mb=kb["peak_kb"] / 1024,
                scoring_mb=(kb["peak_kb"] - kb["after_imports_kb"]) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (medians reported)")
    parser.add_argument("--quick", action="store_true", help="small model (4 layers, hidden 256), 2 repeats")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "localize.json"),
                        help="JSON results file (default: %(default)s)")
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    repeats = 2 if args.quick else args.repeats
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, task, perturbed = make_checkpoints(root, size)
        bp, tp = root / "base", root / "task"
        cfg = base.config
        n_heads = cfg.num_hidden_layers * cfg.num_attention_heads
        k = math.ceil(RATIO * n_heads)
        variants = [(which, kind) for which in ("reference", *OURS) for kind in ("paths", "modules")]
        results = {(w, kind): score(w, *load_inputs(kind, bp, tp)) for w, kind in variants}
        times = {(w, kind): in_subprocess(w, kind, bp, tp, repeats)["times"] for w, kind in variants}

        ref = results["reference", "paths"]
        ref_top = top_k(ref, k)
        ref64 = reference_from_models(base.model, task.model, torch.float64)  # untimed accuracy check
        rows = []
        for (which, kind), ts in times.items():
            res = results[which, kind]
            scores = res if isinstance(res, np.ndarray) else res.scores.double().numpy()
            top = top_k(scores, k) if isinstance(res, np.ndarray) else {
                (layer, h) for layer, hs in select_heads(res, ratio=RATIO).items() for h in hs}
            rows.append(dict(
                variant=which, input=kind, median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts),
                speedup=statistics.median(times["reference", kind]) / statistics.median(ts),
                topk_same=top == ref_top, topk_overlap=len(top & ref_top),
                max_rel_diff=None if "product" in which else float((np.abs(scores - ref) / np.abs(ref)).max()),
                max_rel_diff_fp64=None if "product" in which else float((np.abs(scores - ref64) / ref64).max()),
                perturbed_in_topk=sum(tuple(p) in top for p in perturbed),
            ))
        rss = {which: peak_rss_mb(which, bp, tp) for which in ("reference", *OURS)}
        ckpt_mb = (checkpoint_bytes(bp) + checkpoint_bytes(tp)) / 2**20
    total_s = time.perf_counter() - t_start

    print(f"Llama {size} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
          f"no GQA, vocab {cfg.vocab_size}), fp32, K = {k} of {n_heads} heads, {len(perturbed)} heads perturbed, "
          f"{repeats} repeats after a warm-up, each variant in a fresh process, {torch.get_num_threads()} torch threads")
    print("| variant | input | median s | min | max | speedup vs reference | top-K = reference | overlap | "
          "max rel. score diff | same, vs fp64 reference | perturbed in top-K |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff, diff64 = ("-" if r[c] is None else f"{r[c]:.1e}" for c in ("max_rel_diff", "max_rel_diff_fp64"))
        print(f"| {r['variant']} | {r['input']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
              f"{r['speedup']:.1f}x | {'yes' if r['topk_same'] else 'no'} | {r['topk_overlap']}/{k} | {diff} | {diff64} | "
              f"{r['perturbed_in_topk']}/{len(perturbed)} |")
    print()
    print(f"Peak RSS scoring both checkpoints from disk (fresh process, minus RSS after imports); "
          f"checkpoints: {ckpt_mb:.0f} MB together")
    print("| implementation | scoring MB | after imports MB | peak MB | scoring / checkpoints |")
    print("|---|---|---|---|---|")
    for which, r in rss.items():
        print(f"| {which} | {r['scoring_mb']:.0f} | {r['after_imports_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['scoring_mb'] / ckpt_mb:.2f} |")
    print(f"\nTotal benchmark time: {total_s:.0f} s")

    meta = dict(size=size, model=SIZES[size], ratio=RATIO, k=k, perturbed_heads=perturbed, repeats=repeats,
                checkpoints_mb=ckpt_mb, total_s=total_s, **machine())
    write_json(args.out, dict(meta=meta, rows=rows, peak_rss=rss))


if __name__ == "__main__":
    main()
