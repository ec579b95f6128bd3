"""The report's figures: ``curves.png``, ``lr_sensitivity.png``, ``regime_map.png`` and ``sharpness.png``
(matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from optimlab.regimes import LABELS
from optimlab.report.aggregate import ONLY_WHERE_DRAWN, PLOT_LABELS, MapCell, grid_position, label_counts, majority
from optimlab.report.rows import setting_key, tested_at_lr, width_key
from optimlab.report.tables import fmt


REGIME_COLORS = {"healthy": "#2ca02c", "slow": "#1f77b4", "oscillating": "#ff7f0e", "diverging": "#d62728",
                 "underfit": "#9467bd", "overfit": "#8c564b", "crashed": "#7f7f7f", "interrupted": "#bbbbbb",
                 "unfinished": "#e4e4e4", "unreadable": "#e377c2"}


MAX_CURVES = 48  # beyond this curves.png would be unreadable; the tables still list every run


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Around each panel, in inches: its two-line title above, its x label below, its y labels on the left
# and (a twin axis) on the right. Fixed margins instead of tight_layout, which draws the figure once
# more to measure it: curves.png of 48 runs took 13.0 s with it and 6.6 s without (medians of three
# interleaved, AMD EPYC).
PANEL_INCHES = (4.2, 3.2)
TITLE_INCHES, XLABEL_INCHES, YLABEL_INCHES, LOG_YLABEL_INCHES = 0.55, 0.5, 0.75, 0.95  # 6x10^-1: wide


def _panel_grid(plt: Any, n: int, cols: int, legend_inches: float = 0.0,
                twin_axis: bool = False) -> tuple[Any, Any]:
    """A figure of ``n`` run panels, ``cols`` a row, spaced for their labels (``twin_axis``: a y axis on
    the right too) above a legend ``legend_inches`` high; the unused cells of the last row hidden."""
    nrows = math.ceil(n / cols)
    width, height = PANEL_INCHES[0] * cols, PANEL_INCHES[1] * nrows + legend_inches
    right = LOG_YLABEL_INCHES if twin_axis else 0.2
    panel_width, panel_height = PANEL_INCHES[0] - YLABEL_INCHES - right, PANEL_INCHES[1] - TITLE_INCHES - XLABEL_INCHES
    spacing = {"left": YLABEL_INCHES / width, "right": 1 - right / width, "top": 1 - TITLE_INCHES / height,
               "bottom": (legend_inches + XLABEL_INCHES) / height, "wspace": (YLABEL_INCHES + right) / panel_width,
               "hspace": (TITLE_INCHES + XLABEL_INCHES) / panel_height}
    fig, axes = plt.subplots(nrows, cols, figsize=(width, height), squeeze=False, gridspec_kw=spacing)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def _legend_layout(labels: list[str], cols: int, most: int) -> tuple[int, float]:
    """(columns, inches) of a legend of ``labels`` below ``cols`` panels: as many columns as fit the figure's
    width (about 0.08 inch a character and 0.6 for the marker), at most ``most``; long settings get fewer."""
    entry = 0.08 * max((len(label) for label in labels), default=1) + 0.6
    ncol = max(1, min(most, int(PANEL_INCHES[0] * cols // entry)))
    return ncol, 0.25 * math.ceil(len(labels) / ncol) + 0.1


def _run_titles(runs: list[dict[str, Any]]) -> list[str]:
    """Each panel's title: name, optimizer and lr, and below it the label; where two runs would share
    a title, also their setting, widths and seed, and their data seed where it is not the seed (a sweep over
    seeds, data seeds or widths drew identical ones)."""
    heads = [f"{r.get('name') or r['run']}: {r.get('optimizer')} lr {fmt(r.get('lr'))}" for r in runs]
    shared = {head for head, n in Counter(heads).items() if n > 1}

    def seeds(r: dict[str, Any]) -> str:
        apart = r.get("data_seed") not in (None, r.get("seed"))
        return f"seed {fmt(r.get('seed'))}" + (f", data seed {fmt(r['data_seed'])}" if apart else "")

    return [(f"{r.get('name') or r['run']}: {r.get('setting') or r.get('optimizer')} lr {fmt(r.get('lr'))}\n"
             f"{r.get('widths') or '-'}, {seeds(r)}: {r['regime']}") if head in shared
            else f"{head}\n{r['regime']}" for head, r in zip(heads, runs)]


ACCURACY_LINES = (("train_acc", "-"), ("val_acc", ":"), ("test_acc", "--"))  # each run's panel: (key, style)
LOSS_LINES = (("train_loss", "-"), ("test_loss", "--"), ("train_loss_max", ":"))  # on its log axis


def _line_label(key: str) -> str:
    return "largest step loss" if key == "train_loss_max" else key.replace("_", " ")


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    from matplotlib.ticker import LogFormatter, MaxNLocator

    runs = [r for r in rows if r["history"]][:MAX_CURVES]
    cols = min(4, len(runs))
    labels = [_line_label(key) for key, _ in (*ACCURACY_LINES, *LOSS_LINES)]
    ncol, legend_inches = _legend_layout(labels, cols, len(labels))
    fig, axes = _panel_grid(plt, len(runs), cols, legend_inches=legend_inches, twin_axis=True)
    for ax, r, title in zip(axes.flat, runs, _run_titles(runs)):
        epochs = [h["epoch"] for h in r["history"]]
        for key, style in ACCURACY_LINES:
            ax.plot(epochs, [h.get(key) for h in r["history"]], style, color="black", label=_line_label(key))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel("accuracy")
        loss_ax = ax.twinx()
        for key, style in LOSS_LINES:
            loss_ax.plot(epochs, [h.get(key) for h in r["history"]], style, color="tab:red", alpha=0.7,
                         label=_line_label(key))
        loss_ax.set_ylabel("loss", color="tab:red")
        loss_ax.set_yscale("log")
        # plain numbers: over a narrow range the minor ticks' "2.305 x 10^0" pushed the label off the figure
        loss_ax.yaxis.set_major_formatter(LogFormatter())
        loss_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        color = REGIME_COLORS.get(r["regime"], "black")
        ax.set_title(title, color=color, fontsize=10, fontweight="bold")
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2)
    acc_handles, acc_labels = axes.flat[0].get_legend_handles_labels()
    loss_handles, loss_labels = fig.axes[-1].get_legend_handles_labels() if runs else ([], [])
    fig.legend(acc_handles + loss_handles, acc_labels + loss_labels, loc="lower center", ncol=ncol, frameon=False)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_lr_sensitivity(rows: list[dict[str, Any]], path: Path) -> None:
    """Final test accuracy against lr, one line per optimizer, points coloured by regime (majority
    over seeds, of the runs with a test accuracy: :func:`~optimlab.report.rows.tested_at_lr`), a bar from
    the lowest to the highest run where there are several and ``*`` where their labels disagree (as on the
    map); one panel per model width when the sweep varies it."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rows = tested_at_lr(rows)
    widths = sorted({r["widths"] for r in rows}, key=width_key)
    optimizers = sorted({r["setting"] for r in rows}, key=setting_key)
    # optimizers by line style and marker, never by colour: colour means the regime
    styles = {o: (["-", "--", ":", "-."][i % 4], "osD^v<>"[i % 7]) for i, o in enumerate(optimizers)}
    cols = min(3, len(widths))  # rows of three: readable at README width
    # The legend below the panels (inside one it would hide points): up to two entries per panel's width in a row.
    ncol, legend_inches = _legend_layout([*styles, *LABELS], cols, 2 * cols)
    fig, axes = _panel_grid(plt, len(widths), cols, legend_inches=legend_inches)
    for ax, width in zip(axes.flat, widths):
        by_opt: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["widths"] == width:
                by_opt[r["setting"]][r["lr"]].append(r)
        for optimizer, points in sorted(by_opt.items(), key=lambda item: setting_key(item[0])):
            lrs = sorted(points)
            accs_at = {lr: [m["final_test_acc"] for m in points[lr]] for lr in lrs}
            means = [statistics.fmean(accs_at[lr]) for lr in lrs]
            line, marker = styles[optimizer]
            # Drawn at log10(lr) on a linear axis: matplotlib's log axis overflows past ~1e290 (a sweep's
            # lr 1e307 left it showing 1 to 10, every point off it).
            ax.plot([math.log10(lr) for lr in lrs], means, line, color="0.35", zorder=2)
            for lr, mean in zip(lrs, means):
                counts = label_counts(points[lr])
                regime = majority(counts)  # the map's tie rule (over the runs tested here)
                accs = accs_at[lr]
                if len(accs) > 1:  # the seeds' spread, which a mean alone hides
                    ax.vlines(math.log10(lr), min(accs), max(accs), color="0.35", lw=1, zorder=1)
                ax.scatter([math.log10(lr)], [mean], color=REGIME_COLORS[regime],
                           marker=marker, zorder=3, s=40, edgecolor="black", linewidth=0.5)
                if len(counts) > 1:
                    ax.annotate("*", (math.log10(lr), mean), xytext=(4, 2), textcoords="offset points", fontsize=9)
        # Whole decades in view, so that the ticks are powers of ten however narrow the panel's lrs.
        exponents = [math.log10(lr) for points in by_opt.values() for lr in points]
        ax.set_xlim(math.floor(min(exponents)) - 0.1, math.ceil(max(exponents)) + 0.1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda exponent, _: f"$10^{{{exponent:g}}}$"))
        ax.set_xlabel("learning rate")
        ax.set_ylim(0, 1)
        ax.set_title(f"widths {width}" if len(widths) > 1 else "")
        ax.set_ylabel("final test accuracy")
    handles = [plt.Line2D([], [], color="0.35", ls=line, marker=marker, mfc="white", mec="black")
               for line, marker in styles.values()]
    handles += [plt.Line2D([], [], ls="", marker="o", color=REGIME_COLORS[label], mec="black") for label in LABELS]
    fig.legend(handles, [*styles, *LABELS], fontsize=9, loc="lower center", ncol=ncol, frameon=False)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_regime_map(cells: dict[tuple[str, str, float], MapCell], path: Path,
                    stability: list[dict[str, Any]] | None = None, model: str = "mlp") -> None:
    """One panel per optimizer (setting, :func:`~optimlab.report.rows.name_settings`): lr (x) by width
    (y: the ``model``'s hidden widths, or a CNN's channels), each cell (:func:`~optimlab.report.aggregate.map_cells`)
    coloured by the regime most of its runs got, marked * where they disagree, and annotated with their mean final
    test accuracy; with
    ``stability`` (:func:`~optimlab.report.aggregate.stability_table`), a black bar at each width's
    predicted largest stable lr, or an arrow at the edge of the lrs it lies beyond."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    drawn = {label for cell in cells.values() for label in cell.counts}
    labels = [label for label in PLOT_LABELS if label not in ONLY_WHERE_DRAWN or label in drawn]
    optimizers = sorted({key[0] for key in cells}, key=setting_key)
    lrs = sorted({key[2] for key in cells})
    widths = sorted({key[1] for key in cells}, key=width_key)
    size = (3.2 + 0.45 * len(lrs) * len(optimizers), 0.5 * len(widths) + 2)
    fig, axes = plt.subplots(1, len(optimizers), figsize=size, squeeze=False)
    cmap = ListedColormap([REGIME_COLORS[label] for label in labels])
    beyond = False  # a predicted boundary drawn as an arrow
    for ax, optimizer in zip(axes.flat, optimizers):
        grid = [[math.nan] * len(lrs) for _ in widths]
        for i, w in enumerate(widths):
            for j, lr in enumerate(lrs):
                cell = cells.get((optimizer, w, lr))
                if cell is None:
                    continue
                grid[i][j] = labels.index(cell.regime)
                text = "" if cell.mean_test_acc is None else f"{100 * cell.mean_test_acc:.0f}"
                if not cell.agreed:
                    text += "*"
                if text:
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white")
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(labels) - 0.5, aspect="auto", origin="lower")
        for t in stability or []:
            if t["optimizer"] == optimizer and t["width"] in widths and not math.isnan(t["predicted_max_lr"]):
                x, i = grid_position(t["predicted_max_lr"], lrs), widths.index(t["width"])
                if -0.5 <= x <= len(lrs) - 0.5:
                    ax.plot([x, x], [i - 0.45, i + 0.45], color="black", lw=2.5)
                else:  # beyond the grid's lrs (an infinite one: no positive sharpness): an arrow at that edge
                    edge, marker = (-0.5, "<") if x < 0 else (len(lrs) - 0.5, ">")
                    ax.plot([edge], [i], marker=marker, color="black", ms=7, clip_on=False)
                    beyond = True
        # three significant digits: a half-decade grid's 0.00316 read 0.0032 beside 0.000316 and 0.0316
        ax.set_xticks(range(len(lrs)), [f"{lr:.3g}" for lr in lrs], rotation=60, fontsize=7)
        ax.set_yticks(range(len(widths)), widths, fontsize=7)
        ax.set_xlabel("learning rate")
        title = optimizer.replace(" (", "\n(", 1)
        # at most the panel's width (a character ~0.6 of the font size): a long setting ran into the next panel
        fits = 0.9 * size[0] / len(optimizers) * 72 / (0.6 * max(len(line) for line in title.splitlines()))
        ax.set_title(title, fontsize=min(10.0, max(6.0, fits)))
    axes.flat[0].set_ylabel("conv channels" if model == "cnn" else "hidden widths")
    handles = [plt.Rectangle((0, 0), 1, 1, color=REGIME_COLORS[label]) for label in labels]
    if stability:
        handles.append(plt.Line2D([], [], color="black", lw=2.5, marker=">" if beyond else None))
        labels = [*labels, "predicted largest stable lr" + (" (an arrow: beyond the grid)" if beyond else "")]
    # three entries a row: a row of eight is wider than a narrow map and would be cut at both edges
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), frameon=False, fontsize=8)
    fig.suptitle("Diagnosed regime: the label most runs got\n"
                 "(cell text: mean final test accuracy, %; *: runs disagree)", fontsize=10)
    legend_inches = 0.15 + 0.17 * math.ceil(len(labels) / 3)  # the legend's rows of 8-point text
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sharpness(rows: list[dict[str, Any]], path: Path) -> None:
    """Per tracked run: the (preconditioned) sharpness against the optimizer's stability threshold at
    every measurement its record holds (``curvature.series``; log scale), the first crossing and the
    first non-finite value marked. A run with no positive value to draw (every measurement non-finite)
    gets no panel: a log axis has nothing to show."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    tracked = [r for r in rows if (r.get("curvature") or {}).get("series")]
    runs = [r for r in tracked if any(value is not None and value > 0
                                      for row in r["curvature"]["series"] for value in row[1:])][:MAX_CURVES]
    if not runs:
        return
    fig, axes = _panel_grid(plt, len(runs), 2 if len(runs) <= 4 else 4)  # two a row for a few: README width
    for ax, r, title in zip(axes.flat, runs, _run_titles(runs)):
        curvature = r["curvature"]
        color = REGIME_COLORS.get(r["regime"], "black")
        what = "preconditioned sharpness" if curvature.get("preconditioned") else "sharpness"
        # null in the record: a measurement that was not finite (JSON has no NaN), drawn as a gap
        steps, sharpness, threshold = zip(*[(step, math.nan if value is None else value,
                                             math.nan if bound is None else bound)
                                            for step, value, bound in curvature["series"]])
        point = "o" if len(steps) == 1 else ""  # a lone measurement is no line
        margin = max(1.0, 0.03 * (max(steps) - min(steps)))  # the steps in view also where no value is finite
        ax.set_xlim(min(steps) - margin, max(steps) + margin)
        ax.plot(steps, sharpness, "-", marker=point, color=color, label=what)
        if not all(math.isnan(bound) for bound in threshold):
            ax.plot(steps, threshold, "--", marker=point, color="black",
                    label=curvature.get("threshold_formula") or "threshold")
        if curvature.get("first_crossing_step") is not None:
            ax.axvline(curvature["first_crossing_step"], color=color, alpha=0.4, lw=1)
        if r.get("diverged_at_step") is not None:
            ax.axvline(r["diverged_at_step"], color="black", ls=":", lw=1, label="first non-finite value")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", integer=True))  # whole numbers, as many as fit
        ax.legend(fontsize=7, loc="best")
        ax.set_title(title, color=color, fontsize=10, fontweight="bold")
    fig.savefig(path, dpi=90)
    plt.close(fig)
