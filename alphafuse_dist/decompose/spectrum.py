"""The spectrum plot of the decompose stage: which directions AlphaFuse keeps, and how much variance.

Left axis (log): the eigenvalues S_k of the covariance of ``scale * E``, with the kept range
[0, d) (split into semantic [0, d_s) and null [d_s, d) where the basis records d_n) and the
dropped tail [d, k) shaded. Right axis: the cumulative
explained variance (share of the covariance's trace in the first k directions).

Example::

    plot_spectrum(NullSpaceBasis.load(folder), folder / "spectrum.png")
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..stages import atomic_write_bytes
from .basis import NullSpaceBasis

SPECTRUM_PLOT = "spectrum.png"


def plot_spectrum(basis: NullSpaceBasis, path: Path) -> None:
    """Write the spectrum of ``basis`` as a PNG (matplotlib, Agg backend: no display needed)."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # the stage runs on headless cluster nodes
    import matplotlib.pyplot as plt

    values = basis.eigenvalues
    k = np.arange(len(values))
    d_s, d = basis.semantic_dims, basis.dim
    positive = values > 0  # a log axis cannot show round-off zeros or negatives
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.semilogy(k[positive], values[positive], color="black", lw=1.2, label="eigenvalue $S_k$")
    ax.axvspan(-0.5, d_s - 0.5, color="tab:blue", alpha=0.15, label=f"semantic [0, {d_s})")
    if d_s < d:
        ax.axvspan(d_s - 0.5, d - 0.5, color="tab:orange", alpha=0.25, label=f"null (ID) [{d_s}, {d})")
    if len(values) > d:
        ax.axvspan(d - 0.5, len(values) - 0.5, color="tab:gray", alpha=0.15,
                   label=f"dropped [{d}, {len(values)})")
    ax.set_xlabel("direction k (eigenvalues descending)")
    ax.set_ylabel("eigenvalue (covariance of scale * E)")
    ax.set_xlim(-0.5, len(values) - 0.5)
    right = ax.twinx()
    explained = basis.explained_variance()
    right.plot(k, explained, color="tab:green", lw=1.2, ls="--", label="cumulative explained variance")
    right.set_ylim(0, 1.02)
    right.set_ylabel("cumulative explained variance")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower center", fontsize=8)
    whiten = "whitened" if basis.whiten else "not whitened"
    ax.set_title(f"d_l={basis.d_l}, d={d}, d_n={basis.null_dims or 'model.id_dims'} ({whiten}); the d kept directions explain "
                 f"{explained[d - 1]:.1%}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
