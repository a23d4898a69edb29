"""Figures of the latest run recorded in docs/benchmarks.md (drawn by docs/benchmarks.rst).

The first level-2 section of benchmarks.md is the latest full ``make bench``;
its tables are read as they are written there, so the figures follow the
file.  A table that a later edit removes or renames is simply not drawn.
"""
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

SOURCE = Path(__file__).resolve().parent / "benchmarks.md"


def latest_tables(path=SOURCE):
    """``[(heading, rows)]`` of the first level-2 section, rows as dicts of strings."""
    tables, heading, section, rows, header = [], "", 0, None, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section += 1
            if section > 1:
                break
        if section != 1:
            continue
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header, rows = cells, []
                tables.append((heading, rows))
            elif not set("".join(cells)) <= set("-: "):
                rows.append(dict(zip(header, cells)))
        else:
            header = None
    return tables


def _number(text):
    """The number in a cell (``'> 13.9 (not reached)'`` -> (13.9, False))."""
    match = re.search(r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?", text)
    value = float(match.group()) if match else float("nan")
    return value, not text.lstrip().startswith(">")


def speed():
    """Per-iteration time against scikit-learn and against the floor, dense and sparse."""
    wanted = {"Dense": "dense (4000 x 2000)", "Sparse": "sparse (20000 x 5000, 1%)"}
    tables = latest_tables()
    found = [
        (label, rows)
        for key, label in wanted.items()
        for heading, rows in tables
        if heading.startswith(key) and rows and "sklearn/ours" in rows[0]
    ]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    width = 0.8 / max(len(found), 1)
    for column, (ax, title) in enumerate(
        zip(axes, ("scikit-learn's time / ours (higher: we are faster)", "our time / the floor (1 is the floor)"))
    ):
        key = ("sklearn/ours", "ours/floor")[column]
        betas = list(dict.fromkeys(row["beta"] for _, rows in found for row in rows))
        for k, (label, rows) in enumerate(found):
            offset = (k - (len(found) - 1) / 2) * width
            positions = [betas.index(row["beta"]) + offset for row in rows]
            values = [_number(row[key])[0] for row in rows]
            bars = ax.bar(positions, values, width, label=label, color=f"C{k}")
            ax.bar_label(bars, fmt="%.2g", fontsize=8)
        ax.set_xticks(np.arange(len(betas)), [f"beta={b}" for b in betas])
        ax.axhline(1, color="0.3", lw=0.8)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle("Multiplicative updates, ms per iteration (latest recorded run)", fontsize=11)


def convergence():
    """Seconds to reach 1% above the best loss, per method and problem."""
    found = [(heading, rows) for heading, rows in latest_tables()
             if rows and "seconds to target" in rows[0]]
    if not found:
        return
    columns = min(2, len(found))
    rows_of_axes = -(-len(found) // columns)
    fig, axes = plt.subplots(rows_of_axes, columns, figsize=(10, 2.6 * rows_of_axes), layout="constrained",
                             squeeze=False)
    for ax in axes.flat[len(found):]:
        ax.set_visible(False)
    for ax, (heading, rows) in zip(axes.flat, found):
        names = [row["method"] for row in rows][::-1]
        values = [_number(row["seconds to target"]) for row in rows][::-1]
        colors = ["C0" if name.startswith("torchnmf") else "C7" for name in names]
        bars = ax.barh(names, [v for v, _ in values], color=colors)
        for bar, (value, reached) in zip(bars, values):
            if not reached:
                bar.set_hatch("//")
                bar.set_alpha(0.45)
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {'' if reached else '> '}{value:.3g}", va="center", fontsize=8)
        ax.set_xlim(0, max(v for v, _ in values) * 1.35)
        ax.set_title(heading, fontsize=9)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle("Time to within 1% of the best loss (hatched: not reached within the budget)", fontsize=11)
