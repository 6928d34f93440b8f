"""PNG figures drawn from plain arrays (matplotlib's Agg backend), returned as bytes for an atomic write."""
from __future__ import annotations

import io

import numpy as np


def spectrum_png(values: np.ndarray, explained: np.ndarray, *, semantic_dims: int, dim: int, null_dims: int | None,
                 title: str) -> bytes:
    """Eigenvalues (log axis, descending) with the semantic [0, semantic_dims), null (ID)
    [semantic_dims, dim) and dropped ranges shaded, and the cumulative explained variance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_s, d = semantic_dims, dim
    k, positive = np.arange(len(values)), values > 0  # a log axis cannot show round-off zeros
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.semilogy(k[positive], values[positive], color="black", lw=1.2, label="eigenvalue $S_k$")
    for lo, hi, color, label in [(0, d_s, "tab:blue", "semantic" if null_dims else "kept"),
                                 (d_s, d, "tab:orange", "null (ID)"), (d, len(values), "tab:gray", "dropped")]:
        if hi > lo:
            ax.axvspan(lo - 0.5, hi - 0.5, color=color, alpha=0.2, label=f"{label} [{lo}, {hi})")
    # the y axis shows the kept directions and one decade below: round-off eigenvalues of the dropped
    # range (down to 1e-19) would squeeze the useful curve into the top of the plot
    kept = values[:d][values[:d] > 0]
    bottom = max(kept.min() / 10, values[positive].min()) if kept.size else None
    ax.set(xlabel="direction k (eigenvalues descending)", ylabel="eigenvalue (covariance of scale * E)",
           xlim=(-0.5, len(values) - 0.5), ylim=(bottom, values.max() * 2) if bottom else None)
    right = ax.twinx()
    right.plot(k, explained, color="tab:green", lw=1.2, ls="--", label="cumulative explained variance")
    right.set(ylim=(0, 1.02), ylabel="cumulative explained variance")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0], fontsize=8)
    ax.set_title(f"{title}; the d kept directions explain {explained[d - 1]:.1%}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
