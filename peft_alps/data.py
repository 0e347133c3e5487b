"""Task text for probes and calibration: reading examples from files and turning them into LM batches.

A batch is a dict ``{"input_ids", "attention_mask", "labels"}`` of ``[batch, seq]`` LongTensors, ready
for ``model(**batch).loss`` of a causal LM (``labels`` = ``input_ids`` with padding set to -100).
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


def text_batches(tokenizer, texts: list[str], batch_size: int = 4, max_length: int = 128) -> list[dict]:
    """Tokenize ``texts`` (truncated to ``max_length`` tokens) into padded causal-LM batches, in order."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
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
