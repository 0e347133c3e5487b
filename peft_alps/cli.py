"""The ``peft-alps`` command line (also ``python -m peft_alps``).

    peft-alps localize BASE TASK --ratio 0.1 --out heads/
    peft-alps localize BASE --data train.jsonl --ratio 0.1 --out heads/
    peft-alps localize ENCODER --data labelled.jsonl --out heads/     # {"text": ..., "label": ...} lines
    peft-alps check-layout MODEL_DIR_OR_CONFIG

Subcommands are registered in ``build_parser``; each is a function
``(args) -> exit code``. Errors print one line ``peft-alps: error: ...`` to
stderr and return 2; nothing is written.

This module imports only the standard library: ``--help``, ``COMMAND --help`` and usage errors are answered
without loading torch, transformers or peft (``import peft_alps`` is light too, see ``peft_alps/__init__.py``).
Each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the command line loads torch when a command runs
    from .scoring.scores import HeadScores

PROG = "peft-alps"
# the choices of peft_alps.scoring.weight_scores.METRICS / REPRESENTATIONS (tests/test_cli.py checks they are
# equal), written out here because peft_alps.scoring.weight_scores imports torch
METRICS = ("pad", "wasserstein", "kl", "js", "cosine", "euclidean")
REPRESENTATIONS = ("product", "concat")


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
        "and heatmap.png into --out. heads.json's \"heads\" is usable as HeadMaskConfig(heads=...). "
        "Without a task model, pass --data: the default --scorer probe fine-tunes BASE's attention briefly "
        "on the data and scores against that (the paper's probe, Appendix C); --scorer gradient scores "
        "heads by accumulated gradients on the data instead (cheaper: no optimizer steps, but not the "
        "paper's method).",
        epilog="examples: peft-alps localize ./base ./task --ratio 0.1 --out heads/ ; "
        "peft-alps localize ./base --data train.jsonl --out heads/ ; then in Python: "
        "HeadMaskConfig(heads=json.load(open('heads/heads.json'))['heads'])",
    )
    p.add_argument("base", metavar="BASE", help="base model: a local checkpoint folder (config.json + safetensors; "
                   "with --data also a tokenizer)")
    p.add_argument("task", metavar="TASK", nargs="?", help="task model of the same architecture and shapes (local "
                   "folder): a fine-tune, a domain variant, or a probe fine-tune of BASE; omit it with --data")
    d = p.add_argument_group("without a task model (--data)")
    d.add_argument("--data", metavar="FILE", help="task examples: .jsonl (fields text, question+answer, "
                   "prompt+completion, instruction+output, ...) or a text file with one example per line: a "
                   "causal LM (a decoder) or a masked LM (an encoder with its MLM head) learns the text; .jsonl "
                   "lines {\"text\": ..., \"label\": ...} (label a name or an integer): BASE becomes a sequence "
                   "classifier with one output per label (a new, seeded head on an encoder checkpoint; the probe "
                   "trains attention only)")
    d.add_argument("--scorer", choices=("probe", "gradient"), default="probe",
                   help="probe: fine-tune BASE's attention for --steps and score with --metric (default); "
                   "gradient: sum of |g| (or --kind) over each head's q/k/v weights on the data")
    d.add_argument("--examples", type=int, default=256, metavar="N",
                   help="use the first N examples of --data (default: %(default)s)")
    d.add_argument("--steps", type=int, default=50, help="probe optimizer steps (default: %(default)s)")
    d.add_argument("--lr", type=float, default=1e-4, help="probe AdamW learning rate (default: %(default)s)")
    d.add_argument("--batch-size", type=int, default=4, help="examples per batch (default: %(default)s)")
    d.add_argument("--max-length", type=int, default=256, help="tokens per example (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="seeds a new classifier head's initialisation and the "
                   "masked-LM masking, so a run is repeatable (default: %(default)s)")
    d.add_argument("--kind", choices=("grad", "grad_x_weight", "fisher"), default="grad",
                   help="gradient scorer: sum |g|, sum |g * w| or sum g^2 (default: %(default)s)")
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

    p = sub.add_parser(
        "export-lora",
        help="convert a head-mask adapter into an exactly equivalent stock PEFT LoRA adapter",
        description="Write the head-mask adapter in ADAPTER_DIR as a standard PEFT LoRA adapter into OUT_DIR "
        "(loadable with PeftModel.from_pretrained without peft_alps; same outputs to float rounding, same merged "
        "weights). Each module's LoRA rank is its number of selected channels; bias deltas use lora_bias=True. "
        "The base model is not needed.",
        epilog="example: peft-alps export-lora ./heads-adapter ./heads-lora",
    )
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="saved head-mask adapter folder "
                   "(adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", metavar="OUT_DIR", help="output folder, created if missing; must be empty unless "
                   "--overwrite")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty OUT_DIR; replaces its "
                   "adapter_config.json and adapter_model.safetensors, leaves other files alone")
    p.add_argument("--force", action="store_true", help="export even if the adapter weights fail the checksum "
                   "written when they were saved (modified or corrupted file)")
    p.set_defaults(func=export_lora_command)

    m = sub.add_parser(
        "merge",
        help="merge a HEADMASK adapter into its base checkpoint, file to file (the model is never loaded)",
        description="Write BASE with ADAPTER's head slices merged in as a standard transformers checkpoint "
        "(same safetensors shards and index, config, tokenizer and generation files) that loads without "
        "peft_alps. Bitwise equal to PeftModel.from_pretrained(...).merge_and_unload(). Streams shard by "
        "shard: untouched tensors are copied as raw bytes, only the touched projections are read.",
        epilog="example: peft-alps merge --base ./base --adapter ./adapter --out ./merged --dtype bfloat16",
    )
    m.add_argument("--base", required=True, metavar="BASE_DIR",
                   help="base checkpoint folder (config.json + model.safetensors or a sharded index)")
    m.add_argument("--adapter", required=True, metavar="ADAPTER_DIR",
                   help="folder written by save_pretrained of a HEADMASK adapter")
    m.add_argument("--out", required=True, metavar="OUT_DIR",
                   help="output folder, created if missing; must be empty unless --overwrite")
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="cast the floating tensors on output, after merging (default: keep the base's dtypes)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (swapped in only once the new checkpoint is complete)")
    m.add_argument("--force", action="store_true", help="merge even if the adapter weights fail their checksum or "
                   "the base's head slices differ from the base fingerprint recorded with the adapter")
    m.set_defaults(func=merge_command)

    i = sub.add_parser(
        "inspect",
        help="what a saved head-mask adapter holds: heads per layer, parts, parameters, bytes, base model",
        description="Print what the HEADMASK adapter in ADAPTER_DIR holds, from its adapter_config.json and the "
        "header of adapter_model.safetensors (the tensors are not read): base model, peft_type, architecture, "
        "selected heads per layer, parts, trainable parameters and bytes.",
        epilog="example: peft-alps inspect ./heads-adapter --heatmap heads.png",
    )
    i.add_argument("adapter", metavar="ADAPTER_DIR", help="folder written by save_pretrained of a HEADMASK adapter")
    i.add_argument("--heatmap", metavar="PNG", help="also draw the selected heads as a layers x heads map "
                   "(needs matplotlib: pip install peft-alps[plot])")
    i.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    i.set_defaults(func=inspect_command)

    c = sub.add_parser(
        "check-layout",
        help="prove an attention layout head by head on a one-layer random model of a config",
        description="Build a one-layer random model from the config in MODEL_DIR_OR_CONFIG (a model folder or its "
        "config.json; no weights are read), perturb each head's q, k and v rows of layer 0 and check that only "
        "that head (for k and v: its kv group) changes at the attention output. Uses the built-in layout of the "
        "architecture, the inferred one for any other, or --layout. Prints the layout (JSON you can pass as "
        "layout=) and which parts couple heads; exit code 1 if the layout is wrong, with the field to fix.",
        epilog="example: peft-alps check-layout ./SmolLM2-135M",
    )
    c.add_argument("model", metavar="MODEL_DIR_OR_CONFIG", help="model folder or config.json")
    c.add_argument("--stack", help="attention stack of a model with several (T5: encoder, decoder, cross)")
    c.add_argument("--layout", metavar="JSON", help="a layout file to check instead (HeadLayout keys)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=check_layout_command)
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
    if (args.task is None) == (args.data is None):
        raise CLIError("give either TASK (a task model folder) or --data FILE (task examples), not "
                       + ("both" if args.task else "neither"))
    for name, value in (("--examples", args.examples), ("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--max-length", args.max_length)):
        if value < 1:
            raise CLIError(f"{name} must be >= 1, got {value}")
    for name, p in (("BASE", args.base), ("TASK", args.task), ("--data", args.data)):
        if p is not None and not Path(p).exists():
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

    against = args.task or f"--data {args.data}"
    try:
        from .scoring.selection import select_heads

        scores = _score(args)
        heads = select_heads(scores, ratio=args.ratio, per_layer=args.per_layer)
    except (ValueError, OSError, TypeError) as e:  # mismatched/unsupported models, unreadable files, NaN
        raise CLIError(f"cannot score {args.base} against {against}: {e}") from None
    n_sel, n_total = sum(map(len, heads.values())), scores.scores.numel()
    written = _write_outputs(out, scores, heads, args, heatmap)

    _print_top(scores, heads, args.top)
    how = f"{scores.metric}, {scores.representation}"
    print(f"Selected {n_sel} of {n_total} heads ({how}, ratio {args.ratio:g}"
          f"{', per layer' if args.per_layer else ''}); wrote {', '.join(written)} to {out}")
    return 0


def _score(args) -> HeadScores:
    """Scores of BASE against TASK, or against a probe / gradients on --data."""
    from .scoring.weight_scores import score_heads
    from .scoring.probe import probe_task_model

    progress = sys.stderr.isatty()
    if args.task is not None:
        return score_heads(args.base, args.task, metric=args.metric, representation=args.representation,
                           tau=args.tau, progress=progress)
    model, batches, made = _data_model(args)
    if args.scorer == "gradient":
        from .scoring.gradient_scores import gradient_head_scores

        scores = gradient_head_scores(model, batches, kind=args.kind, progress=progress)
    else:
        probe = probe_task_model(model, batches, steps=args.steps, lr=args.lr, progress=progress)
        scores = score_heads(args.base, probe, metric=args.metric, representation=args.representation,
                             tau=args.tau, progress=progress)
        made.update(steps=args.steps, lr=args.lr, probe_loss_first=probe.losses[0], probe_loss_last=probe.losses[-1])
    scores.sources.update(made)
    return scores


def _data_model(args):
    """``(model, batches, record)`` for ``--data``: the model class follows the data and BASE (see --data's help):
    labelled JSONL -> a sequence classifier; text -> a masked LM for an encoder (a model type transformers has a
    masked-LM class for), else a causal LM. ``record`` goes into heads.json's ``sources``."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from . import data

    transformers.logging.set_verbosity_error()  # our own one-line errors and summary only
    transformers.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    sizes = dict(batch_size=args.batch_size, max_length=args.max_length)
    load = dict(dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    if data.is_labelled(args.data):
        from transformers import AutoModelForSequenceClassification

        texts, labels = data.read_labelled(args.data, limit=args.examples)
        id2label, label2id = data.label_maps(labels)
        if len(id2label) < 2:
            raise ValueError(f"{args.data} has one label ({id2label[0]!r}) in its first {len(texts)} examples; a "
                             f"classifier needs at least two")
        torch.manual_seed(args.seed)  # the new head's init
        model, _ = AutoModelForSequenceClassification.from_pretrained(
            args.base, num_labels=len(id2label), id2label=id2label, label2id=label2id, **load)
        if model.config.pad_token_id is None:  # decoders classify at the last non-padding token
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
        batches = data.classification_batches(tokenizer, texts, labels, label2id, **sizes)
        task = {"task": "sequence classification", "labels": list(id2label.values()), "seed": args.seed}
    else:
        texts = data.read_texts(args.data, limit=args.examples)
        encoder = AutoConfig.from_pretrained(args.base).model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        model, info = (AutoModelForMaskedLM if encoder else AutoModelForCausalLM).from_pretrained(args.base, **load)
        if info["missing_keys"]:  # e.g. a sentence-embedding encoder saved without its MLM head
            raise ValueError(f"--data with unlabelled text needs BASE's {'masked' if encoder else 'causal'}-LM head, "
                             f"but BASE has no weights for {sorted(info['missing_keys'])[:3]}; give labelled "
                             f'examples ({{"text": ..., "label": ...}} JSONL lines) or a TASK model instead')
        if encoder:
            batches = data.masked_lm_batches(tokenizer, texts, **sizes, seed=args.seed)
            task = {"task": "masked LM", "seed": args.seed}
        else:
            batches = data.text_batches(tokenizer, texts, **sizes)
            task = {"task": "causal LM"}
    return model, batches, {"data": str(args.data), "examples": len(texts), "scorer": args.scorer, **task}


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
    from .io.files import staged_folder
    from .heatmap import plot_heatmap

    with staged_folder(out, stale=() if heatmap else ("heatmap.png",)) as stage:  # a stale heatmap would mislead
        scores.save(stage / "scores.json")
        (stage / "heads.json").write_text(_heads_json(scores, heads, args))
        if heatmap:
            plot_heatmap(scores, heads, stage / "heatmap.png")
        names = sorted(p.name for p in stage.iterdir())
    return names


def _print_top(scores: HeadScores, heads, k: int) -> None:
    if k <= 0:
        return
    selected = {(int(layer), h) for layer, hs in heads.items() for h in hs}
    print(f"{'rank':>4}  {'layer':>5}  {'head':>4}  {'score':>11}  selected")
    for rank, (layer, head, score) in enumerate(scores.top(k), 1):
        print(f"{rank:>4}  {layer:>5}  {head:>4}  {score:>11.4e}  {'yes' if (layer, head) in selected else ''}")


def export_lora_command(args) -> int:
    """``peft-alps export-lora``: head-mask adapter folder -> stock PEFT LoRA adapter folder."""
    if not Path(args.adapter).exists():
        raise CLIError(f"ADAPTER_DIR does not exist: {args.adapter}")
    import warnings

    from .deploy.export import describe, export_lora  # loads torch and peft: after the checks that need neither

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's config warnings; errors are ours
            export_lora(args.adapter, args.out, overwrite=args.overwrite, force=args.force)
    except (ValueError, OSError) as e:
        raise CLIError(f"cannot export {args.adapter}: {e}") from None
    info = describe(args.out)
    counts = {r: list(info["ranks"].values()).count(r) for r in sorted(set(info["ranks"].values()))}
    rank_text = ", ".join(f"{n} of rank {r}" for r, n in counts.items())
    src = Path(args.adapter) / "adapter_model.safetensors"
    src_text = f" (head-mask adapter: {src.stat().st_size:,} bytes)" if src.exists() else ""
    print(f"Exported {info['modules']} modules as LoRA ({rank_text}{'; lora_bias' if info['lora_bias'] else ''})"
          f" to {args.out}: adapter_model.safetensors {info['bytes']:,} bytes{src_text}")
    return 0


def merge_command(args) -> int:
    """``peft-alps merge``: streamed, validated-first merge of an adapter into its base checkpoint."""
    from .deploy.merge import merge_checkpoint_report

    try:
        report = merge_checkpoint_report(args.base, args.adapter, args.out, dtype=args.dtype,
                                         overwrite=args.overwrite, force=args.force)
    except (ValueError, OSError) as e:  # MergeError (a ValueError) and I/O errors; nothing was written
        raise CLIError(f"cannot merge {args.adapter} into {args.base}: {e}") from None
    cast = f", {report.tensors_cast} cast to {args.dtype}" if args.dtype else ""
    cast += f", {report.tensors_added} added (modules_to_save the base lacks)" if report.tensors_added else ""
    print(f"Merged {args.adapter} into {args.base}: {report.tensors_changed} tensors changed "
          f"({report.deltas} adapter tensors), {report.tensors_copied} copied unchanged{cast}; "
          f"{len(report.shards)} safetensors file(s), {report.weight_bytes / 2**20:.1f} MB, "
          f"+ {', '.join(report.files_copied) or 'no other files'}; {report.seconds:.2f} s -> {report.out}")
    if report.skipped:
        print(f"Not copied from {args.base}: {', '.join(report.skipped)}")
    return 0


def inspect_command(args) -> int:
    """``peft-alps inspect``: summary of a saved head-mask adapter (and a heatmap of its selection)."""
    if not Path(args.adapter).is_dir():
        raise CLIError(f"ADAPTER_DIR is not a folder: {args.adapter}")
    if args.heatmap and not _have_matplotlib():
        raise CLIError("--heatmap needs matplotlib: pip install 'peft-alps[plot]'")
    from .io.adapter import AdapterError
    from .io.card import summarize, summary_lines  # loads torch and peft: after the checks

    try:
        info = summarize(args.adapter)
    except AdapterError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{args.adapter}: peft_type {info['peft_type']}")
        print("\n".join(summary_lines(info)))
    if args.heatmap:
        import torch

        from .heatmap import plot_heatmap
        from .scoring.scores import HeadScores

        grid = torch.zeros(info["num_layers"], info["num_heads"])
        for layer, hs in info["heads"].items():
            grid[layer, hs] = 1
        selection = HeadScores(scores=grid, metric="selected", representation="adapter", tau=None, layout={})
        plot_heatmap(selection, info["heads"], args.heatmap, label="selected (1) / not (0)",
                     title=f"{info['selected']} of {info['total']} heads selected ({info['ratio']:.1%})")
        print(f"heatmap: {args.heatmap}")
    return 0


def check_layout_command(args) -> int:
    """``peft-alps check-layout``: prove a layout on a one-layer random model of a config."""
    path = Path(args.model)
    if not (path / "config.json").is_file() and not (path.is_file() and path.name == "config.json"):
        raise CLIError(f"MODEL_DIR_OR_CONFIG must be a model folder with a config.json, or a config.json: {path}")
    layout = None
    if args.layout is not None:
        try:
            layout = json.loads(Path(args.layout).read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"--layout {args.layout}: cannot read a JSON layout ({e})") from None
    from .heads.check import check_layout
    from .heads.layout import LayoutError

    try:
        result = check_layout(path, layout, stack=args.stack)
    except LayoutError as e:
        print(f"{PROG}: layout check failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"layout": result.layout.to_dict(), "coupled": list(result.coupled),
                          "probes": result.probes}, indent=2))
    else:
        print(result.summary())
        print(json.dumps(result.layout.to_dict()))
    return 0
