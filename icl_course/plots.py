"""Figure helpers shared by the chapters. Each returns a matplotlib ``Figure``.

Figures have an opaque white background so they stay readable in the book's dark mode, and they
close themselves from pyplot's registry (the notebook shows them by displaying the return value),
so a figure is never drawn twice.
"""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import torch

__all__ = ["figure", "loss_curve", "curves", "matrices", "step_size", "panels", "bars"]

STYLE = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
}


def figure(ncols: int = 1, width: float = 5.0, height: float = 3.4, nrows: int = 1):
    """A figure with ``ncols`` axes in the course's style: ``(fig, axes)``. With ``nrows`` > 1 it is a
    grid of ``nrows x ncols`` panels (``width`` and ``height`` per panel), ``axes`` listed row by row."""
    with matplotlib.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                                 layout="constrained")
    plt.close(fig)  # shown by displaying the returned figure, never twice
    return fig, [ax for row in axes for ax in row]


def loss_curve(history, references: dict[str, float] | None = None, title: str = "training loss"):
    """Training loss against step (log scale), with horizontal reference lines."""
    fig, (ax,) = figure()
    ax.plot([s + 1 for s in history.steps], history.losses, label="training loss")
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, ls="--", color=f"C{i + 1}", label=f"{name} ({value:.4f})")
    ax.set(xlabel="step", ylabel="0.5·MSE", yscale="log", title=title)
    ax.legend()
    return fig


def curves(x, ys: dict[str, list[float]], xlabel: str = "", ylabel: str = "", title: str = "", logx=False, logy=False):
    """Several named curves over a shared x axis."""
    fig, (ax,) = figure()
    for name, y in ys.items():
        ax.plot(x, y, marker="o", ms=3, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.legend()
    return fig


def matrices(named: dict[str, torch.Tensor], symmetric: bool = True, ncols: int | None = None):
    """Heatmaps, each with its own colour scale centred on 0: side by side, or ``ncols`` to a row."""
    ncols = ncols or len(named)
    nrows = -(-len(named) // ncols)  # ceil
    with matplotlib.rc_context(STYLE):
        fig, grid = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.0 * nrows), squeeze=False, layout="constrained")
    plt.close(fig)  # shown by displaying the returned figure, never twice
    axes = list(grid.flat)
    for ax in axes[len(named):]:
        ax.set_visible(False)
    for ax, (name, m) in zip(axes, named.items()):
        m = torch.as_tensor(m).detach().cpu().float().numpy()
        vmax = float(abs(m).max()) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax if symmetric else None, vmax=vmax)
        ax.set_title(name)
        ax.grid(False)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def recolour(fig, colours: dict[str, str]):
    """Give every line (and its legend entry) whose label starts with a key of ``colours`` that colour."""
    for ax in fig.axes:
        legend = ax.get_legend()
        pairs = [(line, line.get_label()) for line in ax.lines]
        if legend is not None:
            pairs += [(h, t.get_text()) for h, t in zip(legend.legend_handles, legend.get_texts())]
        for artist, label in pairs:
            colour = next((c for key, c in colours.items() if label.startswith(key)), None)
            if colour is not None and hasattr(artist, "set_color"):
                artist.set_color(colour)
    return fig


def token_matrix(Z: torch.Tensor, after: torch.Tensor | None = None):
    """One sequence's token matrix ``Z`` (``(n+1, d+1)``: a row per token, the query last, the y-slots in
    the last column) as a table of numbers; with ``after``, the same tokens after a layer beside it."""
    named = {"Z (tokens in)": Z} if after is None else {"Z (tokens in)": Z, "after one layer": after}
    fig, axes = figure(ncols=len(named), width=3.4, height=3.2)
    for ax, (name, m) in zip(axes, named.items()):
        m = torch.as_tensor(m).detach().cpu().float()
        n1, d1 = m.shape
        vmax = float(m.abs().max()) or 1.0
        ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for i in range(n1):
            for j in range(d1):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.add_patch(plt.Rectangle((d1 - 1.5, -0.5), 1, n1, fill=False, lw=2, ec="k"))  # the y-slots
        ax.set_xticks(range(d1), [f"$x^{{({j + 1})}}$" for j in range(d1 - 1)] + ["$y$"])
        ax.set_yticks(range(n1), [f"$e_{{{i + 1}}}$" for i in range(n1 - 1)] + ["query"])
        ax.grid(False)
        ax.set_title(name)
    return fig


def step_size(eta_grid, gd_losses, eta_star: float, model_loss: float | None = None, eta: float | None = None):
    """Held-out loss of one GD step against its step size, the best step, and the trained model."""
    fig, (ax,) = figure()
    ax.plot(eta_grid, gd_losses, label="one GD step")
    ax.axvline(eta_star, color="C1", ls=":", label=f"best eta = {eta_star:.2f}")
    if model_loss is not None:
        ax.axhline(model_loss, color="C2", ls="--", label=f"trained LSA ({model_loss:.4f})")
    if eta is not None:
        i = min(range(len(eta_grid)), key=lambda k: abs(eta_grid[k] - eta))
        ax.plot([eta_grid[i]], [gd_losses[i]], "o", color="C3", ms=8, label=f"eta = {eta:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="step size eta", ylabel="0.5·MSE", title="one step of GD")
    ax.legend()
    return fig


def panels(
    named: dict[str, dict[str, list[float]]], x, xlabel: str = "", logy: tuple[str, ...] = (), logx: bool = False,
    width: float = 3.6, marker: str | None = None, styles: dict[str, dict] | None = None,
):
    """Side-by-side panels of named curves: ``{panel title: {curve name: ys}}``.

    ``x`` is one shared list of x values, or ``{panel title: xs}`` for panels with their own axis;
    panels whose title is in ``logy`` get a log-scale y axis; ``logx`` puts every x axis on a log scale
    (with plain numbers as tick labels); ``marker`` marks the data points; ``styles`` maps a curve
    name to extra ``Axes.plot`` keywords (``{"estimate": {"ls": "--", "color": "C0"}}``).
    """
    fig, axes = figure(ncols=len(named), width=width)
    for ax, (title, ys) in zip(axes, named.items()):
        xs = x[title] if isinstance(x, dict) else x
        for name, y in ys.items():
            ax.plot(xs, y, **{"marker": marker, "ms": 3, "label": name, **(styles or {}).get(name, {})})
        ax.set(xlabel=xlabel, title=title)
        if title in logy:
            ax.set_yscale("log")
        if logx:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=8)
    return fig


def bars(groups: dict[str, dict[str, float]], ylabel: str = "", title: str = "", ylim: tuple[float, float] | None = None):
    """Grouped bars: ``{group: {series: value}}``, one colour per series, values written on the bars."""
    fig, (ax,) = figure()
    series = list(dict.fromkeys(name for values in groups.values() for name in values))
    width = 0.8 / len(series)
    for k, name in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        heights = [values.get(name, float("nan")) for values in groups.values()]
        rects = ax.bar(xs, heights, width=width, label=name, color=f"C{k}")
        ax.bar_label(rects, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set(ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, ncols=min(len(series), 3), loc="upper center")
    return fig
