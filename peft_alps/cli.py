"""The ``peft-alps`` command line (also ``python -m peft_alps``).

    peft-alps localize BASE TASK --ratio 0.1 --out heads/

Subcommands are registered in ``build_parser``; each is a function
``(args) -> exit code``. Errors print one line ``peft-alps: error: ...`` to
stderr and return 2; nothing is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .fileio import umask
from .heatmap import plot_heatmap
from .localize import METRICS, REPRESENTATIONS, HeadScores, score_heads
from .selection import select_heads

PROG = "peft-alps"


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; main() prints it
        raise CLIError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Fine-tune only the attention heads that matter (ALPS).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "localize",
        help="score every attention head by how far a task model moved it from the base; select the top ones",
        description="Score every attention head by the distance between its weights in BASE and TASK "
        "(ALPS, Chen et al. 2025), select the top RATIO of heads, and write scores.json, heads.json "
        "and heatmap.png into --out. heads.json's \"heads\" is usable as HeadMaskConfig(heads=...).",
        epilog="example: peft-alps localize ./base ./task --ratio 0.1 --out heads/  then in Python: "
        "HeadMaskConfig(heads=json.load(open('heads/heads.json'))['heads'])",
    )
    p.add_argument("base", metavar="BASE", help="base model: a local checkpoint folder (config.json + safetensors)")
    p.add_argument("task", metavar="TASK", help="task model of the same architecture and shapes (local folder): "
                   "a fine-tune, a domain variant, or a short probe fine-tune of BASE")
    p.add_argument("--ratio", type=float, default=0.1,
                   help="fraction of heads to select, in (0, 1]; K = ceil(ratio * heads) (default: %(default)s)")
    p.add_argument("--metric", choices=METRICS, default="pad",
                   help="distance between a head's base and task distributions: pad = Wasserstein-1 on support "
                   "[0, 1] (the paper's PAD), wasserstein = W1 on integer support, kl = KL(base || task), "
                   "js = Jensen-Shannon, cosine = 1 - cos, euclidean = L2 (default: %(default)s)")
    p.add_argument("--representation", choices=REPRESENTATIONS, default="product",
                   help="head representation: product = W_q (W_k^T W_v) as in the paper, concat = flattened "
                   "q, k, v slices as in the authors' script (default: %(default)s)")
    p.add_argument("--tau", type=float, default=1.0,
                   help="softmax temperature turning a head's weights into a distribution, > 0 "
                   "(default: %(default)s)")
    p.add_argument("--per-layer", action="store_true",
                   help="select ceil(ratio * heads per layer) in every layer instead of ranking all heads globally")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="print the N best-scoring heads (0: none) (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder, created if missing; must be empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty --out; replaces scores.json, heads.json and heatmap.png, "
                   "leaves other files alone")
    p.add_argument("--no-heatmap", action="store_true",
                   help="do not draw heatmap.png (it needs matplotlib: pip install peft-alps[plot]; "
                   "without it the heatmap is skipped with a note)")
    p.set_defaults(func=localize)
    return parser


def main(argv=None) -> int:
    """Run the command line; return the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CLIError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


def localize(args) -> int:
    """``peft-alps localize``: validate everything, score, select, then write all outputs at once."""
    if not 0 < args.ratio <= 1:
        raise CLIError(f"--ratio must be in (0, 1], got {args.ratio:g}")
    if not args.tau > 0:
        raise CLIError(f"--tau must be > 0, got {args.tau:g}")
    if args.top < 0:
        raise CLIError(f"--top must be >= 0, got {args.top}")
    for name, p in (("BASE", args.base), ("TASK", args.task)):
        if not Path(p).exists():
            raise CLIError(f"{name} path does not exist: {p}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--out folder is not empty: {out} (pass --overwrite to replace its outputs)")
    heatmap = not args.no_heatmap
    if heatmap and not _have_matplotlib():
        print(f"{PROG}: note: matplotlib is not installed, skipping heatmap.png "
              "(pip install peft-alps[plot])", file=sys.stderr)
        heatmap = False

    try:
        scores = score_heads(args.base, args.task, metric=args.metric, representation=args.representation,
                             tau=args.tau, progress=sys.stderr.isatty())
        heads = select_heads(scores, ratio=args.ratio, per_layer=args.per_layer)
    except (ValueError, OSError) as e:  # mismatched/unsupported architectures, unreadable checkpoints, NaN
        raise CLIError(f"cannot score {args.base} against {args.task}: {e}") from None
    n_sel, n_total = sum(map(len, heads.values())), scores.scores.numel()
    written = _write_outputs(out, scores, heads, args, heatmap)

    _print_top(scores, heads, args.top)
    print(f"Selected {n_sel} of {n_total} heads ({args.metric}, {args.representation}, ratio {args.ratio:g}"
          f"{', per layer' if args.per_layer else ''}); wrote {', '.join(written)} to {out}")
    return 0


def _have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _heads_json(scores: HeadScores, heads: dict[int, list[int]], args) -> str:
    """heads.json: the selection (``HeadMaskConfig(heads=data["heads"])``) and how it was made."""
    record = {
        "heads": "HEADS",  # filled in below, one layer per line
        "num_selected": sum(map(len, heads.values())),
        "num_heads_total": scores.scores.numel(),
        "ratio": args.ratio,
        "per_layer": args.per_layer,
        "metric": scores.metric,
        "representation": scores.representation,
        "tau": scores.tau,
        "sources": scores.sources,
    }
    rows = ",\n".join(f'    "{layer}": {json.dumps(hs)}' for layer, hs in heads.items())
    return json.dumps(record, indent=2).replace('"HEADS"', "{\n" + rows + "\n  }") + "\n"


def _write_outputs(out: Path, scores: HeadScores, heads, args, heatmap: bool) -> list[str]:
    """Write every output into a staging folder next to ``out``, then move them in (all or nothing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        scores.save(stage / "scores.json")
        (stage / "heads.json").write_text(_heads_json(scores, heads, args))
        if heatmap:
            plot_heatmap(scores, heads, stage / "heatmap.png")
        names = sorted(p.name for p in stage.iterdir())
        mask = umask()
        os.chmod(stage, 0o777 & ~mask)  # mkdtemp/mkstemp create owner-only entries
        for name in names:
            os.chmod(stage / name, 0o666 & ~mask)
        if not out.exists():
            os.rename(stage, out)
            return names
        for name in names:
            os.replace(stage / name, out / name)
        if not heatmap and (out / "heatmap.png").exists():  # would not match the new scores
            (out / "heatmap.png").unlink()
        return names
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _print_top(scores: HeadScores, heads, k: int) -> None:
    if k <= 0:
        return
    selected = {(int(layer), h) for layer, hs in heads.items() for h in hs}
    print(f"{'rank':>4}  {'layer':>5}  {'head':>4}  {'score':>11}  selected")
    for rank, (layer, head, score) in enumerate(scores.top(k), 1):
        print(f"{rank:>4}  {layer:>5}  {head:>4}  {score:>11.4e}  {'yes' if (layer, head) in selected else ''}")
