"""ELREA with head adapters: experts trained on clusters of gradient directions, mixed per input.

ELREA (Li et al., 2025, "Ensembles of Low-Rank Expert Adapters", arXiv 2502.00089): train one *base* adapter
on all the data; describe every training example by the direction of its loss gradient with respect to that
adapter; cluster the directions; train one *expert* adapter per cluster (starting from the base adapter); at
inference, describe the input the same way and weight the experts by the similarity of its direction to each
cluster's centroid. Head deltas suit it: experts add linearly (:func:`peft_alps.adapter_mixture` runs each
sample with its own weights), and routing costs one backward of the small base adapter per query.

Choices made here (the paper has no public code):

* **Gradient feature** (:func:`gradient_features`): for one example, the gradient of the causal-LM loss over its
  prompt tokens (``labels`` = the ``input_ids``, padding excluded: the same for training examples and queries,
  which have no answer yet) with respect to the base adapter's tensors, flattened ``[P]``, projected to
  ``dim`` numbers by a CountSketch (``feature[h(j)] += s(j) * g[j]`` with a seeded bucket ``h(j)`` and sign
  ``s(j) = +-1``: a random projection that preserves inner products in expectation, needs ``O(P)`` memory
  for the hash instead of a ``[P, dim]`` matrix, and costs ``O(P)`` per example), then L2-normalised.
  Examples run one at a time (a loop of forward + backward), so memory is one example's activations plus
  the adapter's gradient; ``benchmarks/ensemble.py`` measures the cost.
* **Clustering** (:func:`cluster_features`): spherical k-means (cosine similarity, unit centroids), k-means++
  seeding from a seeded generator, the best of ``restarts`` runs by total similarity. Deterministic under a seed.
* **Experts** (:func:`add_experts`): one dense head adapter per cluster, each a copy of the base adapter
  (``add_weighted_adapter([base], [1.0], name)``), trained on its cluster's examples with any trainer.
* **Routing** (:meth:`ExpertEnsemble.route`): ``weights = softmax(cos(feature, centroids) / temperature)``
  ``[batch, experts]``, then the mixture forward (:func:`peft_alps.adapter_mixture`); generation with
  :meth:`ExpertEnsemble.generate`.
* **One folder** (:meth:`ExpertEnsemble.save` / :func:`load_ensemble`): ``ensemble.json`` (expert names,
  temperature, sketch seed and dim), ``centroids.safetensors`` ``[experts, dim]``, one PEFT adapter folder
  per adapter (the base adapter and the experts) and a model card.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ENSEMBLE_FILE = "ensemble.json"
CENTROIDS_FILE = "centroids.safetensors"


# ----- gradient features -----
class CountSketch:
    """A seeded random projection of ``P``-dimensional vectors to ``dim`` numbers: ``out[h(j)] += s(j) * v[j]``.

    ``h`` (buckets, ``[P]`` int64) and ``s`` (signs, ``[P]``) come from ``torch.Generator().manual_seed(seed)``,
    so the same seed and sizes give the same projection on any machine. ``E[<Sv, Sw>] = <v, w>``."""

    def __init__(self, num_inputs: int, dim: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.bucket = torch.randint(0, dim, (num_inputs,), generator=g)
        self.sign = torch.randint(0, 2, (num_inputs,), generator=g).to(torch.float32) * 2 - 1
        self.dim = dim

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """``vector``: ``[P]`` -> ``[dim]`` (float32)."""
        out = torch.zeros(self.dim, dtype=torch.float32)
        return out.index_add_(0, self.bucket, vector.float().cpu() * self.sign)

    def matrix(self) -> torch.Tensor:
        """The projection as a dense ``[dim, P]`` matrix (for tests on small ``P``)."""
        m = torch.zeros(self.dim, len(self.bucket))
        m[self.bucket, torch.arange(len(self.bucket))] = self.sign
        return m


def _adapter_parameters(model, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of ``adapter``'s head tensors, in module order (the feature's coordinate order)."""
    from .tuner.layer import HeadMaskLayer

    params = []
    for module_name, module in model.named_modules():
        if isinstance(module, HeadMaskLayer) and adapter in module.headmask_kind:
            params += [(f"{module_name}.{t}", p) for t, p in module.adapter_tensors(adapter).items()]
    if not params:
        raise ValueError(f"The model holds no head-mask adapter named {adapter!r}.")
    return params


def _prompt_loss(model, sample: dict) -> torch.Tensor:
    labels = sample["input_ids"].masked_fill(sample.get("attention_mask", torch.ones_like(sample["input_ids"])) == 0,
                                             -100)
    return model(**{k: v for k, v in sample.items() if k != "labels"}, labels=labels).loss


def gradient_features(model, batches, adapter: str = "default", dim: int = 256, seed: int = 0) -> torch.Tensor:
    """Unit gradient directions ``[examples, dim]`` of every example of ``batches`` (module docstring).

    ``model``: a ``PeftModel`` holding head adapter ``adapter`` (the base adapter; set active for the pass);
    ``batches``: dicts with ``input_ids`` ``[b, seq]`` (and ``attention_mask``), e.g. from
    :func:`peft_alps.data.text_batches`; their ``labels`` are ignored (the prompt-token loss is used). Runs in eval
    mode; the adapter's ``requires_grad`` flags, existing ``.grad`` values, the active adapter and train/eval
    mode are restored afterwards."""
    params = _adapter_parameters(model, adapter)
    sketch = CountSketch(sum(p.numel() for _, p in params), dim, seed)
    tensors = [p for _, p in params]
    was_training, flags = model.training, [p.requires_grad for p in tensors]
    active = list(model.base_model.active_adapters)
    features = []
    try:
        model.eval()
        model.base_model.set_adapter(adapter)
        for p in tensors:
            p.requires_grad_(True)
        for batch in batches:
            for i in range(len(batch["input_ids"])):
                sample = {k: v[i : i + 1] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                if "attention_mask" in sample:  # drop the padding columns of this sample
                    keep = sample["attention_mask"][0].bool()
                    sample = {k: v[:, keep] for k, v in sample.items()}
                with torch.enable_grad():  # also inside a caller's torch.no_grad()
                    grads = torch.autograd.grad(_prompt_loss(model, sample), tensors, allow_unused=True)
                flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                  for g, p in zip(grads, tensors)])
                feature = sketch(flat)
                features.append(feature / feature.norm().clamp_min(1e-12))
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        model.base_model.set_adapter(active if len(active) > 1 else active[0])
        model.train(was_training)
    return torch.stack(features)


# ----- clustering -----
def cluster_features(features: torch.Tensor, k: int, seed: int = 0, iterations: int = 50,
                     restarts: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means: ``(labels [N] long, centroids [k, dim] unit rows)`` of unit ``features`` ``[N, dim]``.

    Each example goes to the centroid of highest cosine similarity; a centroid is its members' normalised mean (an
    emptied cluster takes the example farthest from its centroid). k-means++ seeding (``torch.Generator`` seeded
    with ``seed``), ``restarts`` runs, the one with the highest total similarity kept."""
    features = torch.as_tensor(features, dtype=torch.float32)
    if features.ndim != 2 or not 1 <= k <= len(features):
        raise ValueError(f"Need features [N, dim] with N >= k >= 1; got shape {tuple(features.shape)} and k={k}.")
    g = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        centroids = features[torch.randint(0, len(features), (1,), generator=g)]
        while len(centroids) < k:  # k-means++: the next centroid drawn with probability ~ (1 - best cosine)
            distance = (1 - (features @ centroids.T).max(1).values).clamp_min(0)
            weights = distance if distance.sum() > 0 else torch.ones_like(distance)
            centroids = torch.cat([centroids, features[torch.multinomial(weights, 1, generator=g)]])
        for _ in range(iterations):
            labels = (features @ centroids.T).argmax(1)
            new = torch.zeros_like(centroids).index_add_(0, labels, features)
            for empty in (new.norm(dim=1) == 0).nonzero().flatten().tolist():
                far = (features * centroids[labels]).sum(1).argmin()
                new[empty], labels[far] = features[far], empty
            new = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if torch.equal(new, centroids):
                break
            centroids = new
        labels = (features @ centroids.T).argmax(1)
        score = (features @ centroids.T).max(1).values.sum().item()
        if best is None or score > best[0]:
            best = (score, labels, centroids)
    return best[1], best[2]


def routing_weights(features: torch.Tensor, centroids: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(features @ centroids^T / temperature)`` ``[N, k]``: unit features and centroids, so the logits
    are cosine similarities."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    return torch.softmax(features.float() @ centroids.float().T / temperature, dim=-1)


def add_experts(model, k: int, base: str = "default", prefix: str = "expert_") -> list[str]:
    """Add ``k`` expert adapters ``<prefix>0 .. <prefix>{k-1}`` to ``model``, each an exact copy of the base
    adapter's slices (dense); returns their names. Train expert ``i`` with ``model.set_adapter(name)`` on
    cluster ``i``'s examples."""
    names = [f"{prefix}{i}" for i in range(k)]
    for name in names:
        model.base_model.add_weighted_adapter([base], [1.0], name)
    return names


# ----- the ensemble -----
@dataclass
class ExpertEnsemble:
    """The routing side of an ELREA ensemble: which adapters, and the cluster centroids of their data.

    ``base``: the adapter gradients are taken against; ``experts``: adapter names, one per centroid row;
    ``centroids``: ``[len(experts), dim]`` unit rows; ``dim``/``seed``: the CountSketch of the features;
    ``temperature``: of the routing softmax."""

    base: str
    experts: list[str]
    centroids: torch.Tensor
    dim: int
    seed: int
    temperature: float = 0.1

    def __post_init__(self):
        self.centroids = torch.as_tensor(self.centroids, dtype=torch.float32)
        if self.centroids.shape != (len(self.experts), self.dim):
            raise ValueError(f"centroids must be [experts, dim] = [{len(self.experts)}, {self.dim}], got "
                             f"{tuple(self.centroids.shape)}.")
        routing_weights(self.centroids[:1], self.centroids, self.temperature)  # checks the temperature

    def route(self, model, batches) -> torch.Tensor:
        """Expert weights ``[examples, experts]`` of the examples of ``batches`` (one gradient pass each)."""
        features = gradient_features(model, batches, self.base, self.dim, self.seed)
        return routing_weights(features, self.centroids, self.temperature)

    def forward(self, model, batch: dict, weights: torch.Tensor | None = None):
        """``model(**batch)`` with each sample routed to its own mixture of the experts (``weights``: precomputed
        ``[batch, experts]``, else :meth:`route`)."""
        from .tuner.mixture import adapter_mixture

        weights = self.route(model, [batch]) if weights is None else weights
        with adapter_mixture(model, self.experts, weights):
            return model(**batch)

    def generate(self, model, input_ids, attention_mask=None, **kwargs):
        """``model.generate`` with each prompt routed to its own mixture of the experts (left-padded prompts)."""
        from .tuner.mixture import adapter_mixture

        batch = {"input_ids": input_ids, **({"attention_mask": attention_mask} if attention_mask is not None
                                            else {})}
        weights = self.route(model, [batch])
        with adapter_mixture(model, self.experts, weights):
            return model.generate(**batch, **kwargs)

    def save(self, model, folder) -> Path:
        """Write the ensemble to ``folder``: ``ensemble.json``, ``centroids.safetensors``, one PEFT adapter folder
        per adapter (``<folder>/<name>/``) and a model card (``README.md``). Written to a staging folder and
        moved into place, so a failure leaves no half-written ensemble."""
        from safetensors.torch import save_file

        from .io.files import staged_folder

        folder = Path(folder)
        with staged_folder(folder, whole=True) as stage:
            for name in [self.base, *self.experts]:
                model.save_pretrained(stage / "adapters", selected_adapters=[name])
            record = {k: v for k, v in asdict(self).items() if k != "centroids"}
            (stage / ENSEMBLE_FILE).write_text(json.dumps({"method": "ELREA (peft_alps.ensemble)", **record},
                                                          indent=2) + "\n")
            save_file({"centroids": self.centroids.contiguous()}, str(stage / CENTROIDS_FILE))
            (stage / "README.md").write_text(_card(self))
        return folder


def _adapter_folder(root: Path, name: str) -> Path:
    """Where ``model.save_pretrained(root, selected_adapters=[name])`` puts ``name`` (PEFT: the root for
    ``"default"``, a subfolder otherwise)."""
    return root if name == "default" else root / name


def load_ensemble(base_model, folder, is_trainable: bool = False):
    """``(PeftModel holding the base adapter and the experts, ExpertEnsemble)`` from a folder written by
    :meth:`ExpertEnsemble.save`. ``base_model``: the model the adapters were trained on (a fresh copy; it is
    wrapped). Raises naming the missing file before the model is wrapped."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    record_file, centroid_file = folder / ENSEMBLE_FILE, folder / CENTROIDS_FILE
    for f in (record_file, centroid_file):
        if not f.is_file():
            raise FileNotFoundError(f"{folder} is not an ensemble folder: {f.name} is missing (write one with "
                                    f"ExpertEnsemble.save).")
    record = json.loads(record_file.read_text())
    record.pop("method", None)
    ensemble = ExpertEnsemble(**record, centroids=load_file(str(centroid_file))["centroids"])
    adapters = folder / "adapters"
    missing = [n for n in [ensemble.base, *ensemble.experts] if not (_adapter_folder(adapters, n)
                                                                      / "adapter_config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: the adapter folder(s) of {missing} are missing.")
    model = PeftModel.from_pretrained(base_model, _adapter_folder(adapters, ensemble.base),
                                      adapter_name=ensemble.base, is_trainable=is_trainable)
    for name in ensemble.experts:
        model.load_adapter(_adapter_folder(adapters, name), adapter_name=name, is_trainable=is_trainable)
    model.set_adapter(ensemble.base)
    return model, ensemble


def _card(ensemble: ExpertEnsemble) -> str:
    return f"""---
library_name: peft
tags: [peft-alps, headmask, elrea, ensemble]
---
# ELREA ensemble of head adapters

{len(ensemble.experts)} expert head adapters ({', '.join(ensemble.experts)}) and the base adapter
`{ensemble.base}` they started from, all trained with peft-alps on one base model. Each input is routed by the
direction of its loss gradient with respect to the base adapter (CountSketch to {ensemble.dim} numbers, seed
{ensemble.seed}): expert weights are the softmax of its cosine similarity to the experts' cluster centroids
over temperature {ensemble.temperature}, and the experts' head updates are mixed with those weights.

```python
import peft_alps
from peft_alps.ensemble import load_ensemble
model, ensemble = load_ensemble(base_model, "THIS_FOLDER")   # base_model: the model the adapters were made for
out = ensemble.generate(model, input_ids, attention_mask=attention_mask, max_new_tokens=32)
```
"""
