"""``HeadScores``: one score per attention head (higher = more task-relevant), as every scorer returns them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..io.files import atomic_write


@dataclass
class HeadScores:
    """Per-head scores, higher = more task-relevant: weight distances between a base and a task model
    (:func:`~peft_alps.scoring.weight_scores.score_heads`), or gradient importance
    (:func:`~peft_alps.scoring.gradient_scores.gradient_head_scores`).

    ``metric``/``representation``/``tau`` record how the scores were made (``representation="gradient"``
    and ``tau=None`` for gradient scores); ``layout`` is the ``HeadLayout.to_dict()`` the scores were made
    with (derived from the model config, or the ``layout=`` passed in); ``sources`` describes the inputs.
    Scores may be ``+inf`` (KL at small tau, see :func:`distance`): they rank first. NaN cannot be ranked.
    """

    scores: torch.Tensor  # float32 [num_layers, num_heads] (query heads)
    metric: str
    representation: str
    tau: Optional[float]
    layout: dict
    sources: dict = field(default_factory=dict)

    def __post_init__(self):
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32)
        if self.scores.dim() != 2:
            raise ValueError(f"scores must be [num_layers, num_heads], got shape {tuple(self.scores.shape)}.")

    def save(self, path) -> None:
        """Write JSON (scores as nested lists plus metadata) atomically."""
        path = Path(path)
        data = {"format": "peft_alps.HeadScores", "version": 1, "metric": self.metric,
                "representation": self.representation, "tau": self.tau, "layout": self.layout,
                "sources": self.sources, "scores": self.scores.tolist()}
        with atomic_write(path) as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path) -> "HeadScores":
        data = json.loads(Path(path).read_text())
        if data.get("format") != "peft_alps.HeadScores":
            raise ValueError(f"{path} is not a peft_alps HeadScores file.")
        return cls(scores=torch.tensor(data["scores"], dtype=torch.float32), metric=data["metric"],
                   representation=data["representation"], tau=data["tau"], layout=data["layout"],
                   sources=data.get("sources", {}))

    def top(self, k: int) -> list[tuple[int, int, float]]:
        """The ``k`` best heads as ``(layer, head, score)``, best first; ties go to the lower layer, then head.

        ``+inf`` scores come first (several ``+inf`` are ties); ValueError if any score is NaN.
        """
        if torch.isnan(self.scores).any():
            raise ValueError("HeadScores contain NaN; cannot rank heads.")
        num_heads = self.scores.shape[1]
        flat = self.scores.flatten().tolist()
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
        return [(i // num_heads, i % num_heads, flat[i]) for i in order]
