"""Streamed, file-to-file merge (``peft_alps.deploy.merge.merge_checkpoint``) against the in-memory route.

Model: SmolLM2-135M-Instruct as a local float32 checkpoint (``smollm2_checkpoint_dir()``, one
``model.safetensors`` of 538 MB, lm_head tied to the embeddings). Adapter: a seeded random 10% of the query
heads (``random_heads``), parts q, k, v, o, random deltas (``init_weights=False``), saved with
``save_pretrained``.

* streamed: ``merge_checkpoint(base, adapter, out)``;
* in-memory: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
  .merge_and_unload().save_pretrained(out)`` (plus copying the tokenizer files, which the streamed merge does).

Every run is a fresh process (after one untimed warm-up run of each, so both read a warm page cache), started
after ``os.sync()`` (without it, the previous run's 500 MB of dirty pages throttled the next run's writes and
timings varied 5x). A run
times the operation after the imports, and measures its peak RSS as peak minus the RSS after imports
(Linux: the peak mark is reset after imports via /proc/self/clear_refs; elsewhere ru_maxrss). The two
outputs are checked to be bitwise equal, tensor by tensor (one tensor at a time).

    python benchmarks/merge.py [--repeats 5]

Prints a markdown table and writes benchmarks/results/merge.json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf
from peft import get_peft_model
from safetensors import safe_open

from common import machine, write_json
from peft_alps import HeadMaskConfig
from peft_alps.pretrained import load_smollm2, smollm2_checkpoint_dir
from peft_alps.scoring.selection import random_heads

RATIO, SEED, PARTS = 0.1, 0, ["q", "k", "v", "o"]
VARIANTS = ("streamed", "in-memory")

_CHILD = """
import gc, json, resource, shutil, sys, time
from pathlib import Path

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

base, adapter, out = Path({base!r}), Path({adapter!r}), Path({out!r})
if {which!r} == "streamed":
    from peft_alps.deploy.merge import merge_checkpoint
    def run():
        merge_checkpoint(base, adapter, out)
else:
    import torch, transformers
    from peft import PeftModel
    import peft_alps
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    def run():
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (base / name).exists():
                shutil.copyfile(base / name, out / name)
gc.collect()
try:  # Linux: reset the peak-RSS mark, so the import-time peak does not hide the merge's peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, peak = status_kb("VmRSS"), lambda: status_kb("VmHWM")
except OSError:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
run()
seconds = time.perf_counter() - t0
print(json.dumps(dict(seconds=seconds, after_imports_kb=before, peak_kb=peak())))
"""


def run_child(which: str, base: Path, adapter: Path, out: Path) -> dict:
    """One merge in a fresh interpreter; ``out`` must not exist. Returns seconds and RSS numbers (MB)."""
    code = _CHILD.format(which=which, base=str(base), adapter=str(adapter), out=str(out))
    if hasattr(os, "sync"):
        os.sync()  # start without dirty pages: the previous run's writeback otherwise throttles this one's writes
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{which} failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return dict(seconds=r["seconds"], peak_mb=r["peak_kb"] / 1024, after_imports_mb=r["after_imports_kb"] / 1024,
                merge_mb=(r["peak_kb"] - r["after_imports_kb"]) / 1024)


def make_adapter(root: Path) -> tuple[Path, dict]:
    model, _ = load_smollm2()
    cfg = model.config
    heads = random_heads(cfg.num_hidden_layers, cfg.num_attention_heads, ratio=RATIO, seed=SEED)
    pm = get_peft_model(model, HeadMaskConfig(heads=heads, parts=PARTS, init_weights=False))
    pm.save_pretrained(root / "adapter")
    return root / "adapter", heads


def compare(a: Path, b: Path) -> dict:
    """Tensor-for-tensor bitwise comparison of two checkpoint folders (one tensor in memory at a time)."""
    def files(folder):
        return {p.name: p for p in sorted(folder.glob("*.safetensors"))}

    fa, fb = files(a), files(b)
    same_files = fa.keys() == fb.keys()
    where_b = {}
    for p in fb.values():
        with safe_open(p, "pt") as f:
            where_b.update({k: p for k in f.keys()})
    n, equal = 0, True
    for p in fa.values():
        with safe_open(p, "pt") as f:
            for key in f.keys():
                with safe_open(where_b[key], "pt") as g:
                    x, y = f.get_tensor(key), g.get_tensor(key)
                equal &= x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8),
                                                                                   y.view(torch.uint8))
                n += 1
    equal &= n == len(where_b)
    identical = same_files and all(filecmp.cmp(fa[k], fb[k], shallow=False) for k in fa)
    return dict(tensors=n, bitwise_equal=bool(equal), same_files=same_files, byte_identical_files=identical)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="measured runs per variant (medians reported)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "merge.json"),
                        help="JSON results file (default: %(default)s)")
    args = parser.parse_args()
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    t_start = time.perf_counter()
    base = smollm2_checkpoint_dir()
    base_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20

    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        root = Path(tmp)
        adapter, heads = make_adapter(root)
        n_heads = sum(map(len, heads.values()))
        adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
        runs = {v: [] for v in VARIANTS}
        for r in range(args.repeats + 1):  # run 0: warm-up (page cache), not reported
            for which in VARIANTS:
                out = root / f"{which}-{r}"
                res = run_child(which, base, adapter, out)
                if r:
                    runs[which].append(res)
                if r < args.repeats:  # keep the last outputs for the comparison
                    shutil.rmtree(out)
        check = compare(root / f"streamed-{args.repeats}", root / f"in-memory-{args.repeats}")
    total_s = time.perf_counter() - t_start

    rows = []
    for which, rs in runs.items():
        rows.append(dict(variant=which, median_s=statistics.median(r["seconds"] for r in rs),
                         min_s=min(r["seconds"] for r in rs), max_s=max(r["seconds"] for r in rs),
                         merge_mb=statistics.median(r["merge_mb"] for r in rs),
                         after_imports_mb=statistics.median(r["after_imports_mb"] for r in rs),
                         peak_mb=statistics.median(r["peak_mb"] for r in rs), runs=rs))
    ref = rows[1]
    print(f"SmolLM2-135M-Instruct, fp32 checkpoint of {base_mb:.0f} MB; adapter: {n_heads} random heads "
          f"(ratio {RATIO}, seed {SEED}), parts {','.join(PARTS)}, {adapter_mb:.1f} MB; {args.repeats} runs per "
          f"variant after a warm-up, each in a fresh process; {torch.get_num_threads()} torch threads")
    print("| variant | median s | min | max | speedup vs in-memory | peak RSS of the merge MB | RSS after imports MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | "
              f"{ref['median_s'] / r['median_s']:.1f}x | {r['merge_mb']:.0f} | {r['after_imports_mb']:.0f} |")
    print(f"\nOutputs: {check['tensors']} tensors, bitwise equal: {check['bitwise_equal']}, same safetensors files: "
          f"{check['same_files']}, byte-identical files: {check['byte_identical_files']}")
    print(f"Total benchmark time: {total_s:.0f} s")
    meta = dict(model="SmolLM2-135M-Instruct", checkpoint_mb=base_mb, ratio=RATIO, seed=SEED, heads=n_heads,
                parts=PARTS, adapter_mb=adapter_mb, repeats=args.repeats, total_s=total_s, **machine())
    write_json(args.out, dict(meta=meta, rows=rows, check=check))


if __name__ == "__main__":
    main()
