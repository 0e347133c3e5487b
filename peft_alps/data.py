"""Task text for probes and calibration: reading examples from files and turning them into batches.

A batch is a dict of tensors ready for ``model(**batch).loss``:

* causal LM (:func:`text_batches`): ``input_ids``, ``attention_mask``, ``labels`` = ``input_ids`` with padding
  set to -100, all ``[batch, seq]``;
* sequence classification (:func:`classification_batches`): ``input_ids``, ``attention_mask`` ``[batch, seq]``
  and ``labels`` ``[batch]`` (class indices, as ``AutoModelForSequenceClassification`` takes them);
* masked LM (:func:`masked_lm_batches`): ``labels`` ``[batch, seq]`` hold the original token at masked
  positions and -100 elsewhere (BERT's 80/10/10 recipe, seeded).

Labelled examples are JSONL lines ``{"text": "...", "label": "sports"}`` (:func:`read_labelled`; a label is a
string or an integer, the label set is sorted, see :func:`label_maps`).
"""

from __future__ import annotations

import json
from pathlib import Path

# (fields joined with a newline) tried in order on each JSON line
JSONL_FIELDS = (("text",), ("question", "answer"), ("prompt", "completion"), ("instruction", "output"),
                ("instruction", "response"), ("input", "output"))


def read_texts(path, limit: int | None = None) -> list[str]:
    """Training texts from ``path``: ``.jsonl`` (one JSON object per line, fields as in ``JSONL_FIELDS``,
    e.g. ``{"text": ...}`` or ``{"question": ..., "answer": ...}``) or any other text file (one example per
    non-empty line). Raises ValueError naming the file and line when an example cannot be read."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        texts = [line.strip() for line in lines]
    else:
        texts = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not JSON ({e.msg}).") from None
            fields = next((f for f in JSONL_FIELDS if isinstance(record, dict) and all(k in record for k in f)), None)
            if fields is None:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}: line {number} has keys {keys}; expected one of "
                                 f"{[' + '.join(f) for f in JSONL_FIELDS]}.")
            texts.append("\n".join(str(record[k]) for k in fields))
    if not texts:
        raise ValueError(f"{path} holds no examples.")
    return texts[:limit]


def _encoded(tokenizer, texts: list[str], batch_size: int, max_length: int, **kwargs):
    """``(start, encoding)`` of each run of ``batch_size`` texts, padded and truncated to ``max_length`` tokens
    (a tokenizer without a pad token pads with its EOS token)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(texts), batch_size):
        yield start, tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                               max_length=max_length, **kwargs)


def text_batches(tokenizer, texts: list[str], batch_size: int = 4, max_length: int = 128) -> list[dict]:
    """Tokenize ``texts`` (truncated to ``max_length`` tokens) into padded causal-LM batches, in order."""
    batches = []
    for _, enc in _encoded(tokenizer, texts, batch_size, max_length):
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def read_labelled(path, limit: int | None = None) -> tuple[list[str], list]:
    """``(texts, labels)`` from a JSONL file of ``{"text": str, "label": str | int}`` lines (other keys are
    ignored). Raises ValueError naming the file and line when a line is not such an object."""
    path = Path(path)
    texts, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not JSON ({e.msg}).") from None
        ok = (isinstance(record, dict) and isinstance(record.get("text"), str)
              and isinstance(record.get("label"), (str, int)) and not isinstance(record.get("label"), bool))
        if not ok:
            raise ValueError(f"{path}: line {number} is not a labelled example; expected "
                             f'{{"text": "...", "label": "name" or 0}}, got {line.strip()[:80]}')
        texts.append(record["text"])
        labels.append(record["label"])
    if not texts:
        raise ValueError(f"{path} holds no examples.")
    return texts[:limit], labels[:limit]


def is_labelled(path) -> bool:
    """Whether the first non-empty line of ``path`` is a JSON object with a ``label`` key (a ``.jsonl`` file)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return False
    with open(path, encoding="utf-8") as f:
        line = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "label" in record


def label_maps(labels) -> tuple[dict[int, str], dict[str, int]]:
    """``(id2label, label2id)`` of the sorted label set (integers first, numerically: labels 0..n-1 keep their
    value as id), names as strings; what ``from_pretrained(..., num_labels=len(id2label), id2label=...,
    label2id=...)`` takes."""
    names = sorted(set(labels), key=lambda x: (isinstance(x, str), x))
    id2label = {i: str(name) for i, name in enumerate(names)}
    return id2label, {name: i for i, name in id2label.items()}


def classification_batches(tokenizer, texts: list[str], labels: list, label2id: dict | None = None,
                           batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Padded sequence-classification batches in order: ``labels`` mapped through ``label2id`` (default:
    :func:`label_maps` of ``labels``; keys are the labels as strings)."""
    import torch

    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels.")
    label2id = label2id or label_maps(labels)[1]
    unknown = sorted({str(x) for x in labels} - set(label2id))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in label2id {sorted(label2id)}.")
    batches = []
    for start, enc in _encoded(tokenizer, texts, batch_size, max_length):
        ids = torch.tensor([label2id[str(x)] for x in labels[start:start + batch_size]])
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": ids})
    return batches


def masked_lm_batches(tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 128,
                      probability: float = 0.15, seed: int = 0) -> list[dict]:
    """Padded masked-LM batches in order: ``probability`` of the real, non-special tokens are chosen (at least
    one per text), of which 80% become the mask token, 10% a random token and 10% stay; ``labels`` hold the
    chosen tokens' ids and -100 elsewhere. Seeded by ``seed``: the same texts give the same batches."""
    import torch

    if tokenizer.mask_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no mask token: masked-LM batches need an encoder's "
                         f"tokenizer (e.g. BERT's [MASK]).")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _, enc in _encoded(tokenizer, texts, batch_size, max_length, return_special_tokens_mask=True):
        ids = enc["input_ids"]
        candidates = (enc["attention_mask"] == 1) & (enc["special_tokens_mask"] == 0)
        draw = torch.rand(ids.shape, generator=generator)
        chosen = candidates & (draw < probability)
        first = (draw.masked_fill(~candidates, 2.0)).argmin(dim=1)  # the lowest draw: at least one per text
        chosen[torch.arange(len(ids)), first] |= candidates[torch.arange(len(ids)), first]
        labels = ids.masked_fill(~chosen, -100)
        how = torch.rand(ids.shape, generator=generator)
        masked = ids.masked_fill(chosen & (how < 0.8), tokenizer.mask_token_id)
        randoms = torch.randint(len(tokenizer), ids.shape, generator=generator)
        masked = torch.where(chosen & (how >= 0.8) & (how < 0.9), randoms, masked)
        batches.append({"input_ids": masked, "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def gsm_symbolic_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` grade-school math problems with worked solutions from reasoning-gym's ``gsm_symbolic``
    (``pip install reasoning-gym``): question, a newline, the step-by-step answer."""
    import reasoning_gym

    data = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [f"{x['question']}\n{x['metadata']['answer_cot']}" for x in data]


def stdlib_docstrings(modules: list[str]) -> list[str]:
    """General English text with no download: the module docstring and the public functions' and classes'
    docstrings of the given standard-library ``modules`` (e.g. ``["json", "csv"]``), one string each, stripped,
    empty ones dropped, in module then name order."""
    import importlib
    import warnings

    docs = []
    for name in modules:
        mod = importlib.import_module(name)
        docs.append(mod.__doc__ or "")
        with warnings.catch_warnings():  # some attributes are deprecated aliases
            warnings.simplefilter("ignore")
            objs = [obj for attr, obj in sorted(vars(mod).items()) if not attr.startswith("_") and callable(obj)
                    and getattr(obj, "__module__", None) == name]
            docs += [obj.__doc__ for obj in objs if isinstance(obj.__doc__, str)]
    return [d.strip() for d in docs if d and d.strip()]


def recovery_texts(model, tokenizer, texts: list[str], budget=0.1, reference=None, **options) -> list[str]:
    """A recovery set: the ``budget`` of general ``texts`` on which the adapted ``model`` drifted most from its
    base (PASER's setting), chosen by :func:`peft_alps.data_selection.select_data`.

    ``model``: a PeftModel (compared with its own disabled adapter) or any causal LM with ``reference`` (the
    base). ``budget``: an int (texts) or a fraction in (0, 1]. ``options``: passed to ``select_data``
    (``clusters``, ``seed``, ``embed``, ``batch_size``, ``max_length``, ``progress``, ...). Returns the chosen
    texts, most drifted cluster first."""
    if reference is None and not (hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")):
        raise ValueError("recovery_texts measures drift from the base: pass a PeftModel, or reference=<base model>.")
    from .data_selection import select_data

    return select_data(texts, model, tokenizer, reference, budget=budget, **options).texts(texts)
