"""Heatmap of per-head scores (layers x heads) with the selected heads outlined.

Needs matplotlib (``pip install peft-alps[plot]``); it is imported only when a
plot is drawn, with the non-interactive Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

from pathlib import Path

from .io.files import atomic_write


def _ticks(n: int, max_labels: int = 32) -> list[int]:
    """Tick positions 0..n-1, thinned so at most about ``max_labels`` are labelled."""
    step = max(1, -(-n // max_labels))
    return list(range(0, n, step))


def plot_heatmap(scores, heads: dict[int, list[int]] | None, path, title: str | None = None,
                 label: str | None = None) -> Path:
    """Draw ``scores`` (a ``HeadScores``) as a layers x heads heatmap and write a PNG to ``path``.

    Heads in ``heads`` (``{layer: [heads]}``, e.g. from ``select_heads``) are outlined. ``label`` names the
    colour bar (default: "<metric> distance").
    The file is written atomically (temp file next to ``path``, then ``os.replace``).
    Returns ``path`` as a ``Path``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    path = Path(path)
    data = scores.scores.detach().float().cpu().numpy()
    num_layers, num_heads = data.shape
    fig = Figure(figsize=(min(20, max(5, 2.5 + 0.3 * num_heads)), min(20, max(3.5, 1.5 + 0.25 * num_layers))),
                 dpi=120)
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, label=label or f"{scores.metric} distance")
    for layer, hs in (heads or {}).items():
        for h in hs:
            ax.add_patch(Rectangle((h - 0.5, int(layer) - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.8))
    ax.set_xticks(_ticks(num_heads))
    ax.set_yticks(_ticks(num_layers))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    if title is None:
        n_sel = sum(len(hs) for hs in (heads or {}).values())
        title = f"head scores: {scores.metric}, {scores.representation}"
        if scores.tau is not None:
            title += f", tau={scores.tau:g}"
        if heads:
            title += f" (red: {n_sel} of {data.size} selected)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return path
