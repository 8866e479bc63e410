"""The rollout timeline picture: batch size, draft length K and step time over a run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def plot_timeline(series: Mapping[str, Sequence[Sequence[float]]], path: str, title: str,
                  markers: Sequence[tuple[float, str]] = (), xlabel: str = "seconds since the start") -> None:
    """`series[label]` is a list of (t, batch, k, step seconds) rows; `markers` are (t, text)
    vertical lines (e.g. "version 1 loaded")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    for label, rows in series.items():
        if not len(rows):
            continue
        tr = np.asarray(rows, dtype=float)
        axes[0].step(tr[:, 0], tr[:, 1], where="post", label=label)
        axes[1].step(tr[:, 0], tr[:, 2], where="post", label=label)
        axes[2].plot(tr[:, 0], tr[:, 3] * 1e3, ".", ms=2, label=label)
    for t, text in markers:
        for ax in axes:
            ax.axvline(t, color="grey", ls="--", lw=0.8)
        axes[0].annotate(text, (t, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=8)
    axes[0].set_ylabel("batch size")
    axes[1].set_ylabel("draft length K")
    axes[2].set_ylabel("step time (ms)")
    axes[2].set_xlabel(xlabel)
    axes[0].legend()
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
