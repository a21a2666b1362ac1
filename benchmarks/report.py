"""Plots and the three report files of a benchmark (``report.md``, ``report.html``, ``report.json``).

The report is built once as a list of blocks (headings, paragraphs, tables, figures) from the
data dict of :func:`benchmarks.suite.run_benchmark`, then rendered to Markdown and to a
self-contained HTML page (PNG figures embedded as base64).  Every number comes from that dict.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from classifier.plotting import new_figure, save_figure
from pipeline.io import atomic_path

__all__ = ["make_plots", "plot_roc_curves", "headline", "headline_markdown", "answer", "build_blocks", "to_markdown",
           "to_html", "write_reports", "write_json_and_markdown"]

_STAGE_LABELS = {"load": "load", "align": "align", "psf_fit": "PSF fit", "convolve": "convolve/subtract",
                 "detect": "detect", "stamps": "stamps", "score": "CNN", "write": "write"}
_COLORS = {"dia": "#1f77b4", "direct": "#d62728"}


# ----------------------------------------------------------------------------- helpers


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "-"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** (-digits)):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}" if abs(v) < 100 or digits == 0 else f"{v:.1f}"
    return str(v)


def _pct(v: Any, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.{digits}f}%"


def _pct_ci(v: Any, ci: Any, digits: int = 1) -> str:
    """A proportion with its interval: ``87.4% [84.0, 90.2]``."""
    if v is None:
        return "-"
    return _pct(v, digits) + (f" [{100 * ci[0]:.{digits}f}, {100 * ci[1]:.{digits}f}]" if ci else "")


def _num_ci(v: Any, ci: Any, digits: int = 2) -> str:
    """A rate with its interval: ``5.00 [3.10, 7.60]``."""
    if v is None:
        return "-"
    return _fmt(float(v), digits) + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _bin_cell(row: dict) -> str:
    """A completeness bin: ``12 (86% [60, 96])``."""
    return f"{row['n_completeness']} ({_pct_ci(row['completeness'], row.get('completeness_ci'), 0)})"


def _level(data: dict) -> float:
    """Confidence level of the report's intervals (as recorded with the end-to-end numbers)."""
    from benchmarks.metrics import CONFIDENCE_LEVEL

    for r in data.get("runs", []):
        if (r.get("end_to_end") or {}).get("level"):
            return float(r["end_to_end"]["level"])
    return CONFIDENCE_LEVEL


def _bin(lo: Any, hi: Any, fmt: str = "g") -> str:
    """Bin label; an open upper edge (inf, or None after JSON cleaning) is shown as '+'."""
    if hi is None or (isinstance(hi, float) and not math.isfinite(hi)):
        return f"> {lo:{fmt}}"
    return f"{lo:{fmt}}-{hi:{fmt}}"


def _main_runs(data: dict) -> dict[str, dict]:
    """The runs on the requested worker count, keyed ``<device>-<mode>``."""
    k = data["config"]["workers"]
    return {f"{r['device']}-{r['mode']}": r for r in data["runs"] if r["workers"] == k}


# ----------------------------------------------------------------------------- plots


def _yerr(values: list, cis: list) -> np.ndarray:
    """Asymmetric error bars (2, N) from values and [lo, hi] intervals (0 where unknown)."""
    lo = [v - c[0] if v is not None and c else 0.0 for v, c in zip(values, cis)]
    hi = [c[1] - v if v is not None and c else 0.0 for v, c in zip(values, cis)]
    return np.clip(np.array([lo, hi], float), 0.0, None)  # a bound equal to the value may differ by rounding


def _nan(v: Any) -> float:
    return np.nan if v is None else float(v)


def _plain_log_ticks(axis, ticks) -> None:
    """Major ticks at ``ticks`` written as plain numbers, no minor labels (a log axis that reads)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axis.set_major_locator(FixedLocator(list(ticks)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _m50_lines(ax, items: list[tuple[str, float, str]]) -> None:
    """m50 of each mode as a vertical line whose value is written in the legend, not beside the line:
    labels in the legend cannot overlap each other or the curves, however close the m50s are."""
    styles = (":", "-.", (0, (5, 2)), (0, (1, 3)))
    for k, (mode, m50, color) in enumerate(sorted(items, key=lambda t: t[1])):
        ax.axvline(m50, color=color, lw=1.1, ls=styles[k % len(styles)], label=f"{mode}: m50 = {m50:.2f} mag")


def make_plots(data: dict, plot_dir: str | Path) -> dict[str, str]:
    """The report's figures (PNG paths by name).

    Stage-cost bars, completeness versus magnitude and S/N (95% Wilson error bars, m50 marked),
    cost versus accuracy, the operating curves of both modes (completeness versus false positives
    per CCD as the threshold sweeps 0..1) and the false positives by kind.  Works from the report
    data as loaded from ``report.json`` (no catalogs needed).
    """
    # figures on their own Agg canvas, no pyplot: the caller's matplotlib backend is untouched
    plot_dir = Path(plot_dir)
    runs = _main_runs(data)
    out: dict[str, str] = {}
    level = _level(data)

    # stage-cost bars: one panel per mode, the same stage rows in each, wall and CPU seconds per CCD
    modes = [m for m in ("dia", "direct") if f"cpu-{m}" in runs]
    present = {s["stage"] for m in modes for s in runs[f"cpu-{m}"]["cost"]["stages"]}
    order = [s for s in _STAGE_LABELS if s in present]
    fig = new_figure((5.5 * len(modes), 3.8))
    axes = fig.subplots(1, len(modes), sharex=True, sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        cost = runs[f"cpu-{mode}"]["cost"]
        by = {s["stage"]: s for s in cost["stages"]}
        y = np.arange(len(order))
        ax.barh(y - 0.2, [by[s]["wall_s"] if s in by else 0 for s in order], 0.4, color=_COLORS[mode], label="wall")
        ax.barh(y + 0.2, [by[s]["cpu_s"] if s in by else 0 for s in order], 0.4, color=_COLORS[mode], alpha=0.45,
                label="CPU")
        for yy, s in zip(y, order):
            if s not in by:
                ax.text(0.02, yy, "no such stage", va="center", fontsize=7, color="0.5",
                        transform=ax.get_yaxis_transform())
        ax.set_yticks(y, [_STAGE_LABELS[s] for s in order])
        ax.set_xlabel("seconds per CCD (mean)")
        ax.set_title(f"{mode}: {cost['wall_per_ccd']:.2f} s wall / CCD, "
                     f"{cost['ccds_per_core_hour']:.0f} CCDs per core-hour", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"Stage cost per CCD ({data['config']['workers']} CPU workers, 1 thread each)", fontsize=10)
    fig.tight_layout()
    out["stage_cost"] = str(save_figure(fig, plot_dir / "stage_cost.png"))

    e2e = {m: runs[f"cpu-{m}"].get("end_to_end") for m in modes if runs[f"cpu-{m}"].get("end_to_end")}
    if not e2e:
        return out

    # completeness versus magnitude and S/N, with the Wilson intervals of each bin
    fig = new_figure((12, 5.4))
    a1, a2 = fig.subplots(1, 2)
    labels = []
    for k, (mode, e) in enumerate(e2e.items()):
        dx = (k - (len(e2e) - 1) / 2) * 0.04  # side by side, so the error bars do not hide each other
        rows = [r for r in e["by_mag"] if r["n"]]
        c = np.array([(r["lo"] + r["hi"]) / 2 for r in rows])
        comp = [r["completeness"] for r in rows]
        a1.errorbar(c + dx, [_nan(v) for v in comp], yerr=_yerr(comp, [r.get("completeness_ci") for r in rows]),
                    fmt="o-", ms=4, capsize=2, color=_COLORS[mode],
                    label=f"{mode}: selected (score >= {e['threshold']:g})")
        a1.plot(c, [_nan(r["detected"]) for r in rows], "--", color=_COLORS[mode], alpha=0.5,
                label=f"{mode}: detected (any score)")
        if e["m50"] is not None:
            labels.append((mode, e["m50"], _COLORS[mode]))
        rows = [r for r in e["by_snr"] if r["n"]]
        xs = np.array([math.sqrt(max(r["lo"], 1.0) * (r["hi"] if r["hi"] is not None and math.isfinite(r["hi"])
                                                       else 2 * r["lo"])) for r in rows])
        comp = [r["completeness"] for r in rows]
        a2.errorbar(xs * (1 + dx), [_nan(v) for v in comp], yerr=_yerr(comp, [r.get("completeness_ci") for r in rows]),
                    fmt="o-", ms=4, capsize=2, color=_COLORS[mode], label=f"{mode}: selected")
        a2.plot(xs, [_nan(r["detected"]) for r in rows], "--", color=_COLORS[mode], alpha=0.5,
                label=f"{mode}: detected")
    _m50_lines(a1, labels)
    a1.axhline(0.5, color="0.7", lw=0.8)
    a1.set_xlabel("transient magnitude (truth)")
    a1.set_ylabel("completeness")
    a1.set_ylim(-0.02, 1.05)

    a1.set_title(f"End-to-end completeness vs magnitude ({level:.0%} Wilson intervals)", fontsize=9)
    a2.set_xscale("log")
    _plain_log_ticks(a2.xaxis, [2, 5, 10, 20, 50, 100, 200])
    a2.set_xlim(1.5, 300)
    a2.set_xlabel("truth S/N of the transient in the search image (bin centre)")
    a2.set_ylim(-0.02, 1.05)
    a2.grid(alpha=0.3)
    a2.set_title(f"vs S/N (solid: selected, dashed: detected; {level:.0%} Wilson intervals)", fontsize=9)
    # one legend under both panels: it covers no data point, whatever the curves do
    handles, names = a1.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(names) - 1) // 3), 1, 1))
    out["completeness"] = str(save_figure(fig, plot_dir / "completeness.png"))

    # cost (x, linear from 0) versus accuracy (y): one point per mode and device
    fig = new_figure((10, 4))
    b1, b2 = fig.subplots(1, 2)
    xs = []
    for r in runs.values():
        e = r.get("end_to_end")
        x = r["cost"]["core_s_per_ccd"]
        if not e or x is None or not math.isfinite(x) or x <= 0:  # every CCD failed: no cost to show
            continue
        xs.append(x)
        marker = "o" if r["device"] == "cpu" else "s"
        for ax, key in ((b1, "completeness"), (b2, "purity")):
            val = e[key]
            if val is None:
                continue
            ax.errorbar([x], [val], yerr=_yerr([val], [e.get(f"{key}_ci")]), fmt=marker, color=_COLORS[r["mode"]],
                        ms=8, capsize=3)
            ax.annotate(f"{r['mode']} ({r['device']})\n{e['false_positives_per_ccd']:.1f} FP/CCD", (x, val),
                        textcoords="offset points", xytext=(8, -22 if val > 0.3 else 8), fontsize=8)
    for ax, name in ((b1, "completeness"), (b2, "purity")):
        ax.set_xlabel("cost: core-seconds per CCD")
        ax.set_ylabel(f"{name} at the operating threshold")
        ax.set_ylim(0, 1.05)
        ax.set_xlim(0, max(xs) * 1.35 if xs else 1)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Cost versus accuracy (one point per mode and device; {level:.0%} Wilson intervals)", fontsize=10)
    fig.tight_layout()
    out["cost_accuracy"] = str(save_figure(fig, plot_dir / "cost_vs_accuracy.png"))

    # operating curves: completeness versus false positives per CCD as the threshold sweeps 0..1
    curves = {m: e.get("operating_curve") for m, e in e2e.items() if e.get("operating_curve")}
    if curves:
        cmp = (data.get("comparison") or {}).get("cpu") or {}
        fig = new_figure((8.5, 5.2))
        ax = fig.subplots()
        fmax = 1.0
        for mode, cv in curves.items():
            fp = np.array([_nan(v) for v in cv["false_positives_per_ccd"]])
            comp = np.array([_nan(v) for v in cv["completeness"]])
            fmax = max(fmax, float(np.nanmax(fp)) if fp.size else 1.0)
            ax.step(fp, comp, where="post", color=_COLORS[mode], lw=1.4,
                    label=f"{mode}: threshold 0 (upper right) to 1 (lower left)")
            i = cv.get("operating_index")
            if i is not None:
                ax.plot(fp[i], comp[i], "*", ms=14, color=_COLORS[mode], mec="k", mew=0.6, zorder=5,
                        label=f"{mode} at its operating threshold {cv['threshold'][i]:g}: "
                              f"{_pct(comp[i])}, {fp[i]:.2f} FP/CCD")
            for t, mk in ((0.1, "v"), (0.9, "^"), (0.99, "D")):
                j = int(np.searchsorted(cv["threshold"], t))
                if j < len(fp):
                    ax.plot(fp[j], comp[j], mk, ms=5, mfc="white", color=_COLORS[mode], zorder=4)
            for row in cmp.get("matched", []):
                if (row["point"] is None or cmp.get(row["mode"]) != mode
                        or row["matched_to"] != "false_positives_per_ccd"):
                    continue
                p = row["point"]
                ax.plot(p["false_positives_per_ccd"], p["completeness"], "o", ms=9, mfc="none", mew=1.5,
                        color=_COLORS[mode], zorder=5,
                        label=f"{mode} at {cmp[row['of']]}'s FP/CCD: threshold {p['threshold']:.3g}, "
                              f"{_pct(p['completeness'])}")
        for t, mk in ((0.1, "v"), (0.9, "^"), (0.99, "D")):
            ax.plot([], [], mk, ms=5, mfc="white", color="0.3", label=f"threshold {t:g}")
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
        ticks = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
        _plain_log_ticks(ax.xaxis, [t for t in ticks if t <= fmax * 1.5])
        ax.set_xlim(-0.06, fmax * 1.5)  # markers at 0 false positives drawn whole
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_xlabel("false positives per CCD (linear below 1, logarithmic above)")
        ax.set_ylabel("completeness (selected / injected transients)")
        ax.set_title("End-to-end operating curves: the score threshold sweeps 0..1", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        out["operating_curve"] = str(save_figure(fig, plot_dir / "operating_curve.png"))

    # false positives by kind (per CCD, exact Poisson intervals)
    kinds = _fp_kind_rows(e2e)
    if kinds:
        fig = new_figure((8.5, 0.5 + 0.42 * len(kinds) * max(len(e2e), 1) + 0.9))
        ax = fig.subplots()
        y = np.arange(len(kinds))
        h = 0.8 / max(len(e2e), 1)
        for k, (mode, e) in enumerate(e2e.items()):
            by = {r["kind"]: r for r in e.get("false_positives_by_kind", [])}
            vals = [by[kd]["per_ccd"] if kd in by else 0.0 for kd in kinds]
            cis = [by[kd]["per_ccd_ci"] if kd in by else None for kd in kinds]
            pos = y - 0.4 + h * (k + 0.5)
            ax.barh(pos, vals, h * 0.9, xerr=_yerr(vals, cis), capsize=2, color=_COLORS[mode],
                    error_kw={"elinewidth": 0.8, "ecolor": "0.3"},
                    label=f"{mode}: {e['false_positives_per_ccd']:.2f} FP/CCD in all")
            for p, v, kd in zip(pos, vals, kinds):
                n = by[kd]["n"] if kd in by else 0
                ax.text(v, p, f" {n}", va="center", fontsize=7, color=_COLORS[mode])
        ax.set_yticks(y, [kd.replace("_", " ") for kd in kinds])
        ax.invert_yaxis()
        ax.set_xlabel(f"false positives per CCD at the operating threshold ({level:.0%} Poisson intervals; "
                      "number: count)")
        ax.set_title("False positives by what they are (truth object within 2 px)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        out["fp_by_kind"] = str(save_figure(fig, plot_dir / "fp_by_kind.png"))
    return out


def _neighbour_label(lo: Any, hi: Any) -> str:
    """Label of a neighbour-contrast bin ``[lo, hi)`` in mag (an open edge is inf, or None after JSON cleaning)."""
    if lo is None or not math.isfinite(lo):
        return "none brighter" if hi == 0 else f"< {hi:g} mag brighter"
    if hi is None or not math.isfinite(hi):
        return f">= {lo:g} mag brighter"
    return f"{lo:g}-{hi:g} mag brighter"


def _neighbour_blocks(e2e: dict, modes: list[str], cmp: dict | None, lv: str) -> list:
    """The completeness table by the transient's brightest neighbour (both modes, and direct - dia), or nothing
    when the truth gave no search FWHM."""
    first = e2e[modes[0]].get("by_neighbour") or []
    if not first:
        return []
    radius = e2e[modes[0]].get("neighbour_radius_fwhm")
    diffs = {i: row.get("difference") for i, row in enumerate((cmp or {}).get("by_neighbour") or [])}
    rows = []
    for i, bn in enumerate(first):
        if not bn["n"]:
            continue
        row = [_neighbour_label(bn["lo"], bn["hi"]), _fmt(bn["n"])] + [_bin_cell(e2e[m]["by_neighbour"][i])
                                                                       for m in modes]
        d = diffs.get(i)
        if cmp:
            row.append(f"{_signed(100 * d['difference'], 1)} [{_signed(100 * d['interval'][0], 1)}, "
                       f"{_signed(100 * d['interval'][1], 1)}]" if d else "-")
        rows.append(row)
    head = ["brightest neighbour", "transients"] + [f"{m} selected [{lv} CI]" for m in modes]
    if cmp:
        head.append(f"direct - dia, points [{lv} CI]")
    return [("p", f"By the transient's brightest neighbour: the brightest star, galaxy or variable within {radius:g} "
                  "search-image FWHM of it (truth positions), by how many magnitudes it outshines the transient. "
                  "Without a difference image that light stays under the transient and changes with the seeing; "
                  "this table shows where the two modes differ (Newcombe's paired interval per row)."),
            ("table", head, rows)]


def _fp_kind_rows(e2e: dict) -> list[str]:
    """The kinds of the false-positive table: every kind any mode has candidates of, report order."""
    from benchmarks.metrics import KIND_ORDER

    kinds = {r["kind"] for e in e2e.values() if e for r in e.get("false_positives_by_kind", [])}
    return [k for k in KIND_ORDER if k in kinds] + sorted(kinds - set(KIND_ORDER))


def plot_roc_curves(results: dict, path: str | Path, title: str = "ROC",
                    fpr_points: tuple[float, ...] = (0.01, 0.03)) -> Path:
    """ROC curves of labelled results with their references in the legend.

    Each model's curve, its operating point (the confusion matrix at the evaluation threshold),
    the chance diagonal (TPR = FPR) and the false-positive rates of the missed-detection rates.
    The FPR axis is linear below 0.001 and logarithmic above (ticks written as plain numbers), so
    the low false-positive rates that matter are readable and FPR = 0 is on the plot.

    Parameters
    ----------
    results : dict
        ``{label: classifier.evaluate.EvaluationResult}`` (with their ROC points).
    path : path
        Output PNG (written atomically).
    title : str
    fpr_points : tuple of float
        False-positive rates drawn as reference lines.
    """
    fig = new_figure((6.4, 5.4))
    ax = fig.subplots()
    grid = np.concatenate([[0.0], np.logspace(-4, 0, 200)])
    ax.plot(grid, grid, color="0.6", lw=0.9, ls="-.", label="chance (TPR = FPR)")
    for f in fpr_points:
        ax.axvline(f, color="0.75", lw=0.8, ls="--")
    if fpr_points:
        ax.plot([], [], color="0.75", lw=0.8, ls="--",
                label="FPR " + ", ".join(f"{f:.0%}" for f in fpr_points) + " (missed-detection rates)")
    colors = [f"C{i}" for i in range(10)]
    for k, (label, res) in enumerate(results.items()):
        color = colors[k % len(colors)]
        ax.plot(res.roc["fpr"], res.roc["tpr"], color=color, lw=1.3,
                label=f"{label} (AUC {res.roc_auc:.4f}, accuracy {res.accuracy:.1%})")
        c = res.confusion
        neg, pos = c["fp"] + c["tn"], c["tp"] + c["fn"]
        if neg and pos:
            ax.plot(c["fp"] / neg, c["tp"] / pos, "o", ms=6, color=color, mec="k", mew=0.6)
    ax.plot([], [], "o", ms=6, color="0.5", mec="k", mew=0.6,
            label=f"operating point (score >= {next(iter(results.values())).threshold:g})" if results else None)
    ax.set_xscale("symlog", linthresh=1e-3, linscale=0.4)
    _plain_log_ticks(ax.xaxis, [0, 0.001, 0.01, 0.1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_xlabel("false-positive rate (linear below 0.001, logarithmic above)")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- headline


def headline(data: dict) -> dict[str, Any]:
    """The numbers of the headline table (CPU runs on the requested worker count)."""
    runs = _main_runs(data)
    h: dict[str, Any] = {"modes": {}, "models": []}
    for mode in ("dia", "direct"):
        r = runs.get(f"cpu-{mode}")
        if r is None:
            continue
        e = r.get("end_to_end") or {}
        h["modes"][mode] = {
            "wall_s_per_ccd": r["cost"]["wall_per_ccd"], "cpu_s_per_ccd": r["cost"]["cpu_per_ccd"],
            "ccds_per_core_hour": r["cost"]["ccds_per_core_hour"],
            "completeness": e.get("completeness"), "completeness_ci": e.get("completeness_ci"), "m50": e.get("m50"),
            "false_positives_per_ccd": e.get("false_positives_per_ccd"),
            "false_positives_per_ccd_ci": e.get("false_positives_per_ccd_ci"),
            "false_positives_per_deg2": e.get("false_positives_per_deg2"), "purity": e.get("purity"),
            "purity_ci": e.get("purity_ci")}
    h["ratio_dia_over_direct"] = (data.get("ratio") or {}).get("cpu")
    sl = data.get("stamp_level") or {}
    for row in sl.get("models", []):
        res = row.get("result") or {}
        h["models"].append({"model": row["model"], "stream": row["stream"], "status": row["status"],
                            "accuracy": res.get("accuracy"), "roc_auc": res.get("roc_auc"),
                            "mdr": res.get("mdr"), "n": res.get("n")})
    return h


def headline_markdown(data: dict) -> str:
    """The headline tables as Markdown (for ``benchmarks/README.md``)."""
    return to_markdown(_headline_blocks(data))


def _headline_blocks(data: dict) -> list:
    h = data["headline"]
    fprs = [f"{f:g}" for f in data["config"]["fpr_points"]]
    rows = []
    for mode, m in h["modes"].items():
        rows.append([mode, _fmt(m["wall_s_per_ccd"], 2), _fmt(m["cpu_s_per_ccd"], 2), _fmt(m["ccds_per_core_hour"], 0),
                     _pct_ci(m["completeness"], m.get("completeness_ci")), _fmt(m["m50"], 2),
                     _num_ci(m["false_positives_per_ccd"], m.get("false_positives_per_ccd_ci")),
                     _fmt(m["false_positives_per_deg2"], 1), _pct_ci(m["purity"], m.get("purity_ci"))])
    ratio = h.get("ratio_dia_over_direct")
    if ratio:
        rows.append(["dia / direct", _fmt(ratio["wall"], 2), _fmt(ratio["cpu"], 2), "", "", "", "", "", ""])
    lv = f"{_level(data):.0%}"
    blocks: list = [("table", ["mode", "wall s / CCD", "CPU s / CCD", "CCDs / core-hour", f"completeness [{lv} CI]",
                               "m50 (mag)", f"FP / CCD [{lv} CI]", "FP / deg²", f"purity [{lv} CI]"], rows)]
    mrows = []
    for m in h["models"]:
        if m["status"] != "ok":
            mrows.append([m["model"], m["stream"], f"**{m['status']}**", "", "", "", ""])
            continue
        mrows.append([m["model"], m["stream"], _fmt(m["n"]), _pct(m["accuracy"], 2), _fmt(m["roc_auc"], 4)]
                     + [_pct((m["mdr"] or {}).get(f), 1) for f in fprs])
    if mrows:
        blocks.append(("table", ["model", "candidates", "n stamps", "accuracy", "ROC AUC"]
                       + [f"MDR @ {float(f):.0%} FPR" for f in fprs], mrows))
    return blocks


def _signed(v: float, digits: int) -> str:
    return f"{v:+.{digits}f}"


def answer(data: dict, device: str = "cpu") -> dict[str, Any]:
    """The report's first paragraph: what skipping DIA saves and what it loses, with uncertainties.

    Every number comes from ``data`` (the headline, the cost ratio and ``comparison``); the
    verdict is chosen by tests on those numbers (is direct cheaper; does each interval of a
    difference exclude 0), never written in advance.

    Returns
    -------
    dict
        ``text`` (the paragraph, Markdown) and the numbers it states: ``wall_s_per_ccd``
        ``{dia, direct}``, ``ratio``, ``saved_s_per_ccd``, ``saved_fraction``, ``cpu_s_per_ccd``,
        ``ratio_cpu``, ``steady_wall_s_per_ccd`` and ``steady_ratio`` (when the runs give a steady state:
        :func:`benchmarks.metrics.steady_state`), and when truth was
        available ``completeness``, ``completeness_ci``, ``false_positives_per_ccd``,
        ``false_positives_per_ccd_ci`` (by mode), ``completeness_change`` (points, direct - dia)
        and its ``_ci``, ``fp_change`` and ``fp_ratio`` with intervals, ``m50`` (by mode),
        ``m50_change`` and its interval, ``matched`` (direct at dia's false positives per CCD),
        ``neighbour_groups`` (the paired completeness difference on the transients with no brighter neighbour
        and with one at least 1 mag brighter, when the truth gave a FWHM: :func:`benchmarks.metrics.compare_modes`),
        ``verdict`` (the sentence) and ``significant`` ``{completeness, false_positives, m50}``.
    """
    runs = _main_runs(data)
    ans: dict[str, Any] = {}
    if f"{device}-dia" not in runs or f"{device}-direct" not in runs:
        ans["text"] = "**Answer.** Not measured: both modes must run for the comparison."
        return ans
    cd, cr = runs[f"{device}-dia"]["cost"], runs[f"{device}-direct"]["cost"]
    ratio = (data.get("ratio") or {}).get(device) or {}
    wall = {"dia": cd["wall_per_ccd"], "direct": cr["wall_per_ccd"]}
    r = ratio.get("wall")
    per = [v for v in (ratio.get("per_ccd") or {}).values() if v is not None]
    ans.update(wall_s_per_ccd=wall, ratio=r, saved_s_per_ccd=wall["dia"] - wall["direct"],
               saved_fraction=1 - wall["direct"] / wall["dia"] if wall["dia"] else None)
    # a saving counts only when every CCD shows it: per-CCD ratios on both sides of 1 mean the
    # modes cost the same within this run's scatter
    cheaper = r is not None and math.isfinite(r) and r > 1 and (len(per) < 2 or min(per) > 1)
    same = r is not None and math.isfinite(r) and len(per) > 1 and min(per) <= 1 <= max(per)
    ans["same_cost"] = same
    spread = f"; per-CCD ratios {min(per):.2f}-{max(per):.2f}" if len(per) > 1 else ""
    cpu = {"dia": cd["cpu_per_ccd"], "direct": cr["cpu_per_ccd"]}
    rc = ratio.get("cpu")
    ans.update(cpu_s_per_ccd=cpu, ratio_cpu=rc)
    parts = [f"**Answer.** Skipping the difference image (direct mode) costs {wall['direct']:.2f} s per CCD against "
             f"{wall['dia']:.2f} s with it (dia), wall time of the {data['config']['workers']}-worker "
             f"{device.upper()} runs: dia / direct = {_fmt(r, 2)}{spread}"
             + (f", so direct saves {ans['saved_s_per_ccd']:.2f} s per CCD ({ans['saved_fraction']:.0%})."
                if cheaper else ", on both sides of 1: the two modes cost the same within the scatter between CCDs."
                if same else ", so direct saves nothing here.")]
    if rc is not None and math.isfinite(rc):
        parts.append(f"In CPU time: {cpu['direct']:.2f} against {cpu['dia']:.2f} s per CCD, ratio {rc:.2f}"
                     + (" (wall and CPU ratios disagree by more than 25%: other load on the machine inflated the "
                        "wall times, see the load average below; the CPU ratio is the steadier measure)."
                        if r and abs(r / rc - 1) > 0.25 else "."))
    steady = {m: (c.get("steady") or {}).get("wall_per_ccd") for m, c in (("dia", cd), ("direct", cr))}
    if all(v is not None and math.isfinite(v) for v in steady.values()) and steady["direct"] > 0:
        ans.update(steady_wall_s_per_ccd=steady, steady_ratio=steady["dia"] / steady["direct"])
        parts.append(f"In steady state (each worker's first run of each stage left out, as in a long run): "
                     f"{steady['direct']:.2f} against {steady['dia']:.2f} s per CCD, ratio {ans['steady_ratio']:.2f}.")
    cmp = (data.get("comparison") or {}).get(device)
    h = {m: runs[f"{device}-{m}"].get("end_to_end") for m in ("dia", "direct")}
    if not cmp or not all(h.values()):
        parts.append("Accuracy was not measured (no truth tables).")
        ans["text"] = " ".join(parts)
        return ans
    lv = cmp["level"]
    c, f, m = cmp["completeness"], cmp["false_positives_per_ccd"], cmp["m50"]
    t = cmp["threshold"]
    ans.update(threshold=t, level=lv, n_transients=cmp["n_transients"],
               completeness={k: h[k]["completeness"] for k in h},
               completeness_ci={k: h[k]["completeness_ci"] for k in h},
               false_positives_per_ccd={k: h[k]["false_positives_per_ccd"] for k in h},
               false_positives_per_ccd_ci={k: h[k]["false_positives_per_ccd_ci"] for k in h},
               m50={k: h[k]["m50"] for k in h})
    hd, hr = h["dia"], h["direct"]
    parts.append(f"At the operating threshold {t:g}, direct selects "
                 f"{_pct_ci(hr['completeness'], hr['completeness_ci'])} "
                 f"of the {cmp['n_transients']} injected transients and dia "
                 f"{_pct_ci(hd['completeness'], hd['completeness_ci'])} ({lv:.0%} Wilson intervals)")
    if c is not None:
        ch, ci = 100 * c["difference"], [100 * v for v in c["interval"]]
        ans.update(completeness_change=ch, completeness_change_ci=ci, completeness_p=c["p_value"])
        parts[-1] += (f": a change of {_signed(ch, 1)} points ({lv:.0%} interval [{_signed(ci[0], 1)}, "
                      f"{_signed(ci[1], 1)}], Newcombe's paired method; McNemar exact p = {c['p_value']:.2g}).")
    else:
        parts[-1] += "."
    fd, fdi = f["difference"], f["difference_interval"]
    ans.update(fp_change=fd, fp_change_ci=fdi, fp_ratio=f["ratio"], fp_ratio_ci=f["ratio_interval"], fp_p=f["p_value"])
    ratio_txt = (f", x{f['ratio']:.2f} [{f['ratio_interval'][0]:.2f}, {f['ratio_interval'][1]:.2f}]"
                 if f["ratio"] is not None and f["ratio_interval"] else "")
    parts.append("False positives per CCD: direct "
                 f"{_num_ci(hr['false_positives_per_ccd'], hr['false_positives_per_ccd_ci'])}, "
                 f"dia {_num_ci(hd['false_positives_per_ccd'], hd['false_positives_per_ccd_ci'])} "
                 f"(exact Poisson intervals), a change of {_signed(fd, 2)} per CCD "
                 f"([{_signed(fdi[0], 2)}, {_signed(fdi[1], 2)}]{ratio_txt}; "
                 f"exact conditional test p = {f['p_value']:.2g}).")
    if m["difference"] is not None:
        ans.update(m50_change=m["difference"], m50_change_ci=m["interval"])
        iv = (f", bootstrap {lv:.0%} interval [{_signed(m['interval'][0], 2)}, {_signed(m['interval'][1], 2)}]"
              if m["interval"] else "")
        parts.append(f"The 50% completeness magnitude m50 is {m['other']:.2f} (direct) against {m['reference']:.2f} "
                     f"(dia): {_signed(m['difference'], 2)} mag{iv}.")
    else:
        parts.append("The m50 of one mode is undefined (its completeness never falls through 50% in the bins), so "
                     "no m50 difference is given.")
    groups = {k: v for k, v in (cmp.get("neighbour_groups") or {}).items() if v}
    if groups:
        ans["neighbour_groups"] = groups
        said = []
        for name, what in (("isolated", "with no brighter neighbour"),
                           ("outshone", "with a neighbour at least 1 mag brighter")):
            g = groups.get(name)
            if g:
                said.append(f"on the {g['n']} {what} direct selects {g['k_a'] / g['n']:.1%} and dia "
                            f"{g['k_b'] / g['n']:.1%} ({_signed(100 * g['difference'], 1)} points, "
                            f"[{_signed(100 * g['interval'][0], 1)}, {_signed(100 * g['interval'][1], 1)}])")
        radius = cmp.get("neighbour_radius_fwhm")
        parts.append(f"By the brightest star, galaxy or variable within {radius:g} search FWHM of each transient: "
                     + "; ".join(said) + ".")
    at_fp = next((row for row in cmp.get("matched", []) if row["mode"] == "other"
                  and row["matched_to"] == "false_positives_per_ccd"), None)
    if at_fp is not None and at_fp["point"] is not None:
        p = at_fp["point"]
        ans["matched"] = p
        parts.append(f"Held to dia's {at_fp['target']:.2f} false positives per CCD, direct needs threshold "
                     f"{p['threshold']:.3g} and then selects {_pct_ci(p['completeness'], p['completeness_ci'])}.")
    # the verdict, from the numbers
    sig = {"completeness": bool(c and c["significant"]), "false_positives": bool(f["significant"]),
           "m50": bool(m.get("significant"))}
    ans["significant"] = sig
    disagree = rc is not None and math.isfinite(rc) and r and abs(r / rc - 1) > 0.25
    cheaper = cheaper and (rc is None or not math.isfinite(rc) or rc > 1)
    if cheaper and disagree:
        lo_r, hi_r = sorted([(rc, "CPU"), (r, "wall")])
        bits = [f"direct is {lo_r[0]:.2f}x ({lo_r[1]}) to {hi_r[0]:.2f}x ({hi_r[1]}) cheaper per CCD"]
    else:
        bits = [f"direct is {r:.2f}x cheaper per CCD" if cheaper
                else f"direct costs the same as dia (dia / direct = {_fmt(r, 2)} wall, {_fmt(rc, 2)} CPU; per-CCD "
                     f"ratios {min(per):.2f}-{max(per):.2f})" if same
                else f"direct is not cheaper (dia / direct = {_fmt(r, 2)} wall, {_fmt(rc, 2)} CPU)"]
    if c is None:
        bits.append("completeness could not be compared")
    elif sig["completeness"]:
        bits.append(f"it {'loses' if c['difference'] < 0 else 'gains'} a significant "
                    f"{abs(100 * c['difference']):.1f} points of completeness")
    else:
        bits.append(f"its completeness change ({_signed(100 * c['difference'], 1)} points) is not significant "
                    f"(the {lv:.0%} interval includes 0)")
    fr = f"x{f['ratio']:.2f}" if f["ratio"] is not None else "dia has none"
    if sig["false_positives"]:
        more = f["ratio"] is None or f["ratio"] > 1
        bits.append(f"it has significantly {'more' if more else 'fewer'} false positives ({fr})")
    else:
        bits.append(f"its false-positive rate ({fr}) is not significantly different")
    worse = (c is not None and sig["completeness"] and c["difference"] < 0) or \
        (sig["false_positives"] and (f["ratio"] is None or f["ratio"] > 1))
    better = (c is not None and sig["completeness"] and c["difference"] > 0) or \
        (sig["false_positives"] and f["ratio"] is not None and f["ratio"] < 1)
    if cheaper and not worse:
        end = ("skipping DIA saves compute with no measurable loss of accuracy on this field" if not better else
               "skipping DIA saves compute and is no less accurate on this field")
    elif cheaper:
        end = "the saving is paid for in accuracy"
    else:
        end = "skipping DIA brings no saving here"
    verdict = f"at threshold {t:g}, " + "; ".join(bits) + ": " + end + "."
    ans["verdict"] = verdict[0].upper() + verdict[1:]
    parts.append(f"**Verdict:** {ans['verdict']}")
    ans["text"] = " ".join(parts)
    return ans


# ----------------------------------------------------------------------------- the report


def build_blocks(data: dict) -> list:
    """The report as blocks.

    ``("h1"|"h2"|"h3", text)``, ``("p", text)``, ``("table", header, rows)``, ``("img", name, path)``.
    """
    cfg = data["config"]
    mach = data["machine"]
    runs = _main_runs(data)
    k = cfg["workers"]
    inp = data["input"]
    fig = data.get("figures", {})
    b: list = [("h1", data["title"])]
    b.append(("p", answer(data)["text"]))
    b.append(("p", f"Made {data['created']} in {data['wall_s']:.0f} s on {mach['host']}: {mach['cpu_model']}, "
                   f"{mach['cores']} cores available, {mach['memory_gb']} GB memory ({mach['platform']}). "
                   f"Load average at start {', '.join(f'{v:.1f}' for v in mach.get('load_average') or [])}, at end "
                   f"{', '.join(f'{v:.1f}' for v in mach.get('load_average_end') or [])} "
                   "(other processes on the machine slow every figure alike)."))
    b.append(("p", f"Device: {data['device_note']}"))
    shape = inp["ccd_shape"]
    src = (f"simulated {cfg['instrument']} field, seed {cfg['seed']} (training sets use seeds from "
           f"{data['seeds']['training_sets_from']}), transient density x{cfg['density_factor']:g}"
           if inp["simulated"] else f"manifest {inp['manifest']}")
    b.append(("p", f"Input: {inp['n_ccds']} CCD pair(s) of {shape[0]} x {shape[1]} px, {src}. Both modes ran through "
                   f"`pipeline.runner.run_pipeline` (the `pipeline run` graph) on a Dask LocalCluster of {k} worker "
                   f"process(es) with 1 thread each, operating threshold {cfg['score_threshold']:g}. "
                   "Every figure below was measured in this run."))
    b.append(("h2", "Headline"))
    b.extend(_headline_blocks(data))

    # cost
    b.append(("h2", "Cost per CCD"))
    b.append(("p", "Mean wall and CPU seconds per CCD of each stage, from the runs' `run.json` (the subtract stage "
                   "is split into PSF fit = star selection + kernel fit, and convolve/subtract, by the DIA's own "
                   "sub-timings; its CPU seconds are split in the same proportion). The CNN was loaded once per "
                   "worker before the runs (warm-up below), as in a long run."))
    for dev in ("cpu", "gpu"):
        if f"{dev}-dia" not in runs:
            continue
        dia, direct = runs[f"{dev}-dia"]["cost"], runs[f"{dev}-direct"]["cost"]
        st_d = {s["stage"]: s for s in dia["stages"]}
        st_r = {s["stage"]: s for s in direct["stages"]}
        rows = []
        for stage, label in _STAGE_LABELS.items():
            if stage not in st_d and stage not in st_r:
                continue
            d, r = st_d.get(stage), st_r.get(stage)
            rows.append([label, _fmt(d and d["wall_s"]), _fmt(d and d["cpu_s"]), _fmt(r and r["wall_s"]),
                         _fmt(r and r["cpu_s"])])
        rows.append(["**total**", _fmt(dia["wall_per_ccd"]), _fmt(dia["cpu_per_ccd"]), _fmt(direct["wall_per_ccd"]),
                     _fmt(direct["cpu_per_ccd"])])
        b.append(("h3", f"{dev.upper()}, {k} worker(s)"))
        b.append(("table", ["stage", "dia wall s", "dia CPU s", "direct wall s", "direct CPU s"], rows))
        ratio = data["ratio"][dev]
        per = ", ".join(f"{c} {v:.2f}" for c, v in ratio["per_ccd"].items())
        b.append(("p", f"dia / direct cost per CCD: {per} (median {_fmt(ratio['median_per_ccd'], 2)}); "
                       f"ratio of the means: wall {_fmt(ratio['wall'], 2)}, CPU {_fmt(ratio['cpu'], 2)}."))
        sd, sr = dia.get("steady") or {}, direct.get("steady") or {}
        walls = (sd.get("wall_per_ccd"), sr.get("wall_per_ccd"))
        if all(v is not None and math.isfinite(v) for v in walls) and walls[1] > 0:
            b.append(("p", f"Steady state (each worker's first run of each stage left out: it pays what a worker "
                           f"pays once, the pages its heap touches first and caches filled on first use; a long run's "
                           f"cost per CCD tends to this): dia {_fmt(walls[0])}, direct {_fmt(walls[1])} s wall per "
                           f"CCD, dia / direct {_fmt(walls[0] / walls[1], 2)}; once per worker "
                           f"{_fmt(sd.get('start_up_s'), 2)} and {_fmt(sr.get('start_up_s'), 2)} s more."))
        rows = []
        for mode, c in (("dia", dia), ("direct", direct)):
            r = runs[f"{dev}-{mode}"]
            measured = c["n_done"] * 3600.0 / (r["wall_s"] * k) if r["wall_s"] > 0 else None
            peaks = ", ".join(f"{_fmt(v, 0)}" for v in c["peak_rss_mb_per_worker"].values())
            rows.append([mode, f"{c['n_done']} / {c['n_done'] + c['n_failed']}", _fmt(c["core_s_per_ccd"], 2),
                         _fmt(c["ccds_per_core_hour"], 0), _fmt(r["wall_s"], 1), _fmt(measured, 0), peaks])
        b.append(("table", ["mode", "CCDs done", "core-s / CCD", "CCDs / core-hour (stage sum)", "run wall s",
                            f"CCDs / core-hour (run wall x {k} cores)", "peak RSS per worker (MB)"], rows))
    warm = data.get("warm_up") or {}
    if warm:
        b.append(("p", "Warm-up (imports and loading the mode's CNN once per worker of each mode's own cluster, not "
                       "counted above): "
                       + "; ".join(f"{key}: {v['wall_s']:.1f} s" for key, v in warm.items()) + "."))
    fails = {r["key"]: r["failures"] for r in data["runs"] if r["failures"]}
    if fails:
        b.append(("p", "Failed CCDs: " + "; ".join(f"{key}: " + ", ".join(f"{c} ({e})" for c, e in f.items())
                                                    for key, f in fails.items())))
    if fig.get("stage_cost"):
        b.append(("img", "Stage cost per CCD (dark: wall, light: CPU)", fig["stage_cost"]))

    if data.get("scaling"):
        b.append(("h2", "Scaling"))
        rows = []
        for mode, s in data["scaling"].items():
            rows.append([mode, " / ".join(str(w) for w in s["workers"]),
                         " / ".join(_fmt(v, 1) for v in s["run_wall_s"]),
                         " / ".join(_fmt(v, 2) for v in s["core_s_per_ccd"]), _fmt(s["speedup"], 2),
                         _pct(s["efficiency"])])
        b.append(("table", ["mode", "workers", "run wall s", "core-s / CCD", "speed-up", "parallel efficiency"], rows))
        b.append(("p", "The same CCDs on both worker counts (CPU). Efficiency = speed-up / ratio of worker counts; "
                       "core-s / CCD growing with the worker count means the workers slow each other (shared cores, "
                       "memory bandwidth, or other load on the machine: see the load average above). "
                       + ("GPU runs: " + ("shown beside the CPU runs above." if "gpu-dia" in runs else
                                          "none (" + data["device_note"] + ")"))))

    b.append(("h2", "Extrapolation"))
    b.append(("p", f"Per-CCD core-seconds of the {k}-worker runs scaled by pixel count to the target CCDs (cost "
                   "taken as proportional to pixels; star and source counts scale the same way), then divided over "
                   "N one-core workers, never below one CCD's time. The per-CCD cost was measured with "
                   f"{k} workers running at once, so their contention is in it; the extrapolation assumes N workers "
                   "on N free cores contend no more than that."))
    for dev, ex in data["extrapolation"].items():
        rows = []
        for mode, items in ex.items():
            for e in items:
                rows.append([dev, mode, e["target"], f"{e['n_ccds']} x {e['ccd_shape'][0]}x{e['ccd_shape'][1]}",
                             _fmt(e["pixel_scale_factor"], 2), _fmt(e["core_hours"], 3)]
                            + [_fmt(v, 1) for v in e["wall_min_on_workers"].values()])
        heads = list(next(iter(ex.values()))[0]["wall_min_on_workers"]) if ex else []
        b.append(("table", ["device", "mode", "target", "CCDs", "pixel factor", "core-hours"]
                  + [f"min on {n} workers" for n in heads], rows))

    sl = data.get("stamp_level")
    b.append(("h2", "Stamp-level accuracy (the paper's experiment)"))
    if not sl:
        b.append(("p", "Not measured: the input has no truth tables."))
    else:
        streams = sl["streams"]
        dia_s = streams.get("dia", {})
        same = sl.get("same_candidates_as_run") or {}
        b.append(("p", "All dia-stream candidates of the benchmark CCDs (not flagged EDGE): "
                       f"{dia_s.get('n', 0)} stamps, "
                       f"{dia_s.get('n_real', 0)} real (within 2 px of an injected transient), "
                       f"{dia_s.get('n_bogus', 0)} bogus, unbalanced as they come. Triplet models see "
                       "(template, search, difference); pair models the template and search channels of the same "
                       "triplets. Same candidates as the dia run: "
                       + (", ".join(f"{c} {'yes' if v else 'NO'}" for c, v in same.items()) or "not checked")
                       + ". The last rows (stream direct) are the models trained on the direct stream on the direct "
                       "mode's own candidates: pair-direct (ours, the direct mode's model), pair-dense (ours, trained "
                       "for the dense map too: the model of selection = \"dense\") and pair-paper-direct (the "
                       "paper's two-image CNN, the paper's recipe, pair-direct's training stamps)."))
        fprs = [f"{f:g}" for f in cfg["fpr_points"]]
        rows, missing = [], []
        for m in sl["models"]:
            if m["status"] != "ok":
                missing.append(f"{m['model']} ({m['status']}: {m.get('note', '')})")
                continue
            r = m["result"]
            rows.append([m["model"], m["stream"], m["architecture"], _fmt(r["n"]), _fmt(r["n_real"]),
                         _pct(r["accuracy"], 2), _fmt(r["roc_auc"], 4)] + [_pct(r["mdr"].get(f), 1) for f in fprs]
                        + [_fmt(m["stamps_per_s"], 0)])
        b.append(("table", ["model", "candidates", "architecture", "n", "real", "accuracy", "ROC AUC"]
                  + [f"MDR @ {float(f):.0%} FPR" for f in fprs] + ["stamps/s (CPU)"], rows))
        if missing:
            b.append(("p", "Not evaluated: " + "; ".join(missing)))
        ok = [m for m in sl["models"] if m["status"] == "ok"]
        if ok and ok[0]["result"]["per_snr"]:
            bins = ok[0]["result"]["per_snr"]
            rows = []
            for i, bn in enumerate(bins):
                if not bn["n"]:
                    continue
                row = [_bin(bn["lo"], bn["hi"]), _fmt(bn["n"]), _fmt(bn["n_real"])]
                for m in ok:
                    if m["stream"] != "dia":
                        continue
                    p = m["result"]["per_snr"][i]
                    row.append(f"{_pct(p['accuracy'])} / {_pct(p['efficiency'])}")
                rows.append(row)
            b.append(("p", "Per S/N bin of the candidate (detection S/N on the difference): accuracy / efficiency on "
                           "the real ones, at the operating threshold."))
            b.append(("table", ["S/N", "n", "real"] + [m["model"] for m in ok if m["stream"] == "dia"], rows))
        if fig.get("roc"):
            b.append(("img", "ROC curves on the same dia-stream candidates", fig["roc"]))
        if fig.get("roc_direct"):
            b.append(("img", "ROC of the direct-stream models on the direct mode's own candidates", fig["roc_direct"]))
        for model, table in (sl.get("saliency") or {}).items():
            chans = [c for c in ("template", "search", "difference") if c in next(iter(table.values()))]
            rows = [[g, _fmt(v["n"])] + [_pct(v.get(c)) for c in chans] for g, v in table.items()]
            b.append(("p", f"Saliency of {model}: mean fraction of |dP/dx| in each stamp, by outcome."))
            b.append(("table", ["outcome", "n"] + chans, rows))
            if fig.get(f"saliency_{model}"):
                b.append(("img", f"Saliency gallery: {model}", fig[f"saliency_{model}"]))

    b.append(("h2", "End-to-end accuracy"))
    e2e = {m: runs[f"cpu-{m}"].get("end_to_end") for m in ("dia", "direct") if f"cpu-{m}" in runs}
    if not any(e2e.values()):
        b.append(("p", "Not measured: the input has no truth tables."))
    else:
        lv = f"{_level(data):.0%}"
        b.append(("p", "Each mode at its operating threshold against the injected transients (those closer than the "
                       "detection edge to the border are not counted). Detected: a candidate within 2 px; selected: "
                       "and its score >= the threshold. A false positive is a selected candidate not matched to a "
                       "transient. m50: magnitude where the completeness falls through 50% (linear interpolation "
                       "between bin centres). CCDs counted (done in every run): "
                       + ", ".join(data.get("end_to_end_ccds") or []) + "."))
        b.append(("p", f"Uncertainties: every interval is two-sided at {lv}. Completeness, purity and each bin's "
                       "completeness: Wilson score interval of the binomial proportion "
                       "(`astropy.stats.binom_conf_interval`). False positives per CCD and per deg²: exact (Garwood) "
                       "Poisson interval of the count (`astropy.stats.poisson_conf_interval`). Differences between "
                       "the modes (same transients, same CCDs): completeness by Newcombe's (1998) paired method 10 "
                       "with McNemar's exact test, false positives by the exact conditional binomial test of two "
                       "Poisson counts (normal interval for the difference), m50 by a paired bootstrap of the "
                       "transients. They are statistical only: one simulated field, one seed."))
        rows = []
        for mode, e in e2e.items():
            if not e:
                continue
            rows.append([mode, _fmt(e["n_transients"]),
                         f"{e['n_detected']} "
                         f"({_pct_ci(e['completeness_detected'], e.get('completeness_detected_ci'))})",
                         f"{e['n_selected']} ({_pct_ci(e['completeness'], e.get('completeness_ci'))})",
                         _fmt(e["m50"], 2), _fmt(e["m50_detected"], 2), _fmt(e["n_false_positives"]),
                         _num_ci(e["false_positives_per_ccd"], e.get("false_positives_per_ccd_ci")),
                         _num_ci(e["false_positives_per_deg2"], e.get("false_positives_per_deg2_ci"), 1),
                         _pct_ci(e["purity"], e.get("purity_ci")), _fmt(e["n_candidates"])])
        b.append(("table", ["mode", "transients", f"detected [{lv} CI]", f"selected [{lv} CI]", "m50", "m50 detected",
                            "FP", f"FP / CCD [{lv} CI]", f"FP / deg² [{lv} CI]", f"purity [{lv} CI]", "candidates"],
                  rows))
        cmp = (data.get("comparison") or {}).get("cpu")
        if cmp:
            c, f, m = cmp["completeness"], cmp["false_positives_per_ccd"], cmp["m50"]
            rows = []
            if c is not None:
                rows.append(["completeness (points)", _signed(100 * c["difference"], 1),
                             f"[{_signed(100 * c['interval'][0], 1)}, {_signed(100 * c['interval'][1], 1)}]",
                             f"{c['p_value']:.2g}", "yes" if c["significant"] else "no",
                             f"{c['only_b']} selected by dia only, {c['only_a']} by direct only"])
            rows.append(["false positives per CCD", _signed(f["difference"], 2),
                         f"[{_signed(f['difference_interval'][0], 2)}, {_signed(f['difference_interval'][1], 2)}]",
                         f"{f['p_value']:.2g}", "yes" if f["significant"] else "no",
                         (f"ratio x{f['ratio']:.2f} [{f['ratio_interval'][0]:.2f}, {f['ratio_interval'][1]:.2f}]"
                          if f["ratio"] is not None and f["ratio_interval"] else "ratio undefined (dia has none)")])
            if m["difference"] is not None:
                rows.append(["m50 (mag)", _signed(m["difference"], 2),
                             (f"[{_signed(m['interval'][0], 2)}, {_signed(m['interval'][1], 2)}]" if m["interval"]
                              else "-"), "-", "yes" if m["significant"] else "no",
                             f"{m['n_boot_defined']} of {m['n_boot']} bootstrap resamples define both m50"])
            b.append(("p", f"direct minus dia at threshold {cmp['threshold']:g} ({cmp['n_transients']} transients, "
                           f"{cmp['n_ccds']} CCDs); significant: the {lv} interval excludes no difference."))
            b.append(("table", ["quantity", "direct - dia", f"{lv} interval", "p-value", "significant", "note"], rows))
        modes = [m for m, e in e2e.items() if e]
        bins = e2e[modes[0]]["by_mag"]
        rows = []
        for i, bn in enumerate(bins):
            if not bn["n"]:
                continue
            rows.append([_bin(bn["lo"], bn["hi"], ".1f"), _fmt(bn["n"])]
                        + [_bin_cell(e2e[m]["by_mag"][i]) for m in modes])
        b.append(("table", ["mag", "transients"] + [f"{m} selected [{lv} CI]" for m in modes], rows))
        rows = []
        for i, bn in enumerate(e2e[modes[0]]["by_snr"]):
            if not bn["n"]:
                continue
            rows.append([_bin(bn["lo"], bn["hi"]), _fmt(bn["n"])]
                        + [_bin_cell(e2e[m]["by_snr"][i]) for m in modes])
        b.append(("table", ["truth S/N", "transients"] + [f"{m} selected [{lv} CI]" for m in modes], rows))
        b += _neighbour_blocks(e2e, modes, cmp, lv)
        if fig.get("completeness"):
            b.append(("img", f"Completeness versus magnitude and S/N ({lv} Wilson intervals; dotted: m50)",
                      fig["completeness"]))

        b.append(("h3", "Operating curves"))
        b.append(("p", "Completeness against false positives per CCD as the score threshold sweeps 0..1, from the "
                       "runs' catalogs (every scored candidate is in them, matched to truth). At threshold 0 each mode "
                       "keeps everything it detected; the star marks its operating threshold. Below: the threshold "
                       "each mode needs to match the other's false-positive rate or completeness at its operating "
                       "threshold (the lowest threshold with no more false positives; the highest with no less "
                       "completeness), and what it gets there."))
        if cmp:
            rows = []
            for row in cmp.get("matched", []):
                mode, of = cmp[row["mode"]], cmp[row["of"]]
                what = ("FP / CCD" if row["matched_to"] == "false_positives_per_ccd" else "completeness")
                target = (_fmt(row["target"], 2) if row["matched_to"] == "false_positives_per_ccd"
                          else _pct(row["target"]))
                p = row["point"]
                if p is None:
                    rows.append([mode, f"{of}'s {what} ({target})", "unreachable", "-", "-"])
                    continue
                rows.append([mode, f"{of}'s {what} ({target})", f"{p['threshold']:.4g}",
                             _pct_ci(p["completeness"], p["completeness_ci"]),
                             _num_ci(p["false_positives_per_ccd"], p["false_positives_per_ccd_ci"])])
            for mode, e in e2e.items():
                if e:
                    rows.append([mode, "its operating threshold", f"{e['threshold']:g}",
                                 _pct_ci(e["completeness"], e.get("completeness_ci")),
                                 _num_ci(e["false_positives_per_ccd"], e.get("false_positives_per_ccd_ci"))])
            b.append(("table", ["mode", "matched to", "threshold", f"completeness [{lv} CI]", f"FP / CCD [{lv} CI]"],
                      rows))
        if fig.get("operating_curve"):
            b.append(("img", "Operating curves of both modes (star: operating threshold; open circle: at the other "
                             "mode's false positives per CCD)", fig["operating_curve"]))

        b.append(("h3", "False positives by kind"))
        b.append(("p", "What each mode's false positives are, by the truth object within 2 px of the candidate "
                       "(`truth_kind`; unmatched: no truth object, e.g. noise or a subtraction residual), at the "
                       f"operating threshold, per CCD with {lv} exact Poisson intervals; candidates: all scored "
                       "candidates of that kind."))
        kinds = _fp_kind_rows(e2e)
        rows = []
        for kd in kinds:
            row = [kd.replace("_", " ")]
            for mode in modes:
                by = {r["kind"]: r for r in e2e[mode].get("false_positives_by_kind", [])}
                r = by.get(kd)
                row += ([_fmt(r["n_candidates"]), _fmt(r["n"]), _num_ci(r["per_ccd"], r["per_ccd_ci"])] if r
                        else ["0", "0", "-"])
            rows.append(row)
        if rows:
            b.append(("table", ["kind"] + [h for m in modes for h in (f"{m} candidates", f"{m} FP",
                                                                       f"{m} FP / CCD [{lv} CI]")], rows))
        if fig.get("fp_by_kind"):
            b.append(("img", "False positives per CCD by kind", fig["fp_by_kind"]))
        if fig.get("cost_accuracy"):
            b.append(("img", "Cost versus accuracy", fig["cost_accuracy"]))

    b.append(("h2", "Configuration and versions"))
    b.append(("p", "Versions: " + ", ".join(f"{k2} {v}" for k2, v in data["versions"].items()) + "."))
    b.append(("p", "Seeds: " + ", ".join(f"{k2} = {v}" for k2, v in data["seeds"].items()) + "."))
    b.append(("p", "Benchmark configuration: `" + json.dumps(_finite(cfg)) + "`"))
    b.append(("p", "Run configuration (dia mode; direct differs only in `mode`): `"
                   + json.dumps(_finite(data["run_config"]["dia"])) + "`"))
    if cfg.get("run"):
        b.append(("p", "Set for both modes' runs (`pipeline benchmark --config`): `" + json.dumps(cfg["run"]) + "`"))
    b.append(("p", "Each run's own `run.json` (per-CCD, per-stage times, worker, peak memory): "
                   + ", ".join(f"`{r['run_json']}`" for r in data["runs"]) + "."))
    return b


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|")


def to_markdown(blocks: list) -> str:
    """Render blocks as Markdown (figures as relative links)."""
    lines: list[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + blk[1], ""]
        elif kind == "p":
            lines += [blk[1], ""]
        elif kind == "table":
            header, rows = blk[1], blk[2]
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            for row in rows:
                lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
            lines.append("")
        elif kind == "img":
            lines += [f"![{blk[1]}]({blk[2]})", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escape, then render `code` and **bold** spans."""
    import re

    t = html.escape(text)
    t = re.sub(r"`([^`]*)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", t)


def to_html(blocks: list, base: str | Path) -> str:
    """Render blocks as one self-contained HTML page (PNG files under ``base`` embedded as base64)."""
    base = Path(base)
    body: list[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(blk[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(str(h))}</th>" for h in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in blk[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            png = base64.b64encode((base / blk[2]).read_bytes()).decode("ascii")
            body.append(f"<figure><img alt=\"{html.escape(blk[1])}\" src=\"data:image/png;base64,{png}\">"
                        f"<figcaption>{_inline(blk[1])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222;line-height:1.4}"
             "table{border-collapse:collapse;margin:0.6em 0 1.2em;font-size:0.88em}"
             "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
             "td:first-child,th:first-child{text-align:left}code{font-size:0.8em;word-break:break-all}"
             "img{max-width:100%;border:1px solid #ddd}figcaption{font-size:0.85em;color:#555}")
    title = html.escape(blocks[0][1]) if blocks and blocks[0][0] == "h1" else "benchmark report"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """NaN and inf become None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def write_json_and_markdown(data: dict, markdown: str, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json`` (strict JSON: NaN and inf as null, NumPy scalars as numbers) and ``report.md``
    in ``out_dir``, each atomically: what every script of ``benchmarks/`` leaves in its ``--out``."""
    out = Path(out_dir)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(_finite(data), indent=1, default=_json_default))
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown)
    return paths


def write_reports(data: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` (each atomically) in ``out_dir``."""
    blocks = build_blocks(data)
    paths = write_json_and_markdown(data, to_markdown(blocks), out_dir)
    paths["html"] = Path(out_dir) / "report.html"
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(to_html(blocks, Path(out_dir)))
    return paths
