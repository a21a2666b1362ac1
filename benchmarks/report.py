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

__all__ = ["make_plots", "headline", "headline_markdown", "build_blocks", "to_markdown", "to_html",
           "write_reports"]

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


def make_plots(data: dict, plot_dir: str | Path) -> dict[str, str]:
    """Stage-cost bars, completeness versus magnitude and S/N, cost versus accuracy (PNG paths)."""
    # figures on their own Agg canvas, no pyplot: the caller's matplotlib backend is untouched
    plot_dir = Path(plot_dir)
    runs = _main_runs(data)
    out: dict[str, str] = {}

    # stage-cost bars: one panel per mode, wall and CPU seconds per CCD per stage
    modes = [m for m in ("dia", "direct") if f"cpu-{m}" in runs]
    fig = new_figure((5.5 * len(modes), 3.8))
    axes = fig.subplots(1, len(modes), sharex=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        cost = runs[f"cpu-{mode}"]["cost"]
        labels = [_STAGE_LABELS[s["stage"]] for s in cost["stages"]]
        y = np.arange(len(labels))
        ax.barh(y - 0.2, [s["wall_s"] for s in cost["stages"]], 0.4, color=_COLORS[mode], label="wall")
        ax.barh(y + 0.2, [s["cpu_s"] for s in cost["stages"]], 0.4, color=_COLORS[mode], alpha=0.45, label="CPU")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlabel("seconds per CCD (mean)")
        ax.set_title(f"{mode}: {cost['wall_per_ccd']:.2f} s wall / CCD, "
                     f"{cost['ccds_per_core_hour']:.0f} CCDs per core-hour", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Stage cost per CCD ({data['config']['workers']} CPU workers, 1 thread each)", fontsize=10)
    fig.tight_layout()
    out["stage_cost"] = str(save_figure(fig, plot_dir / "stage_cost.png"))

    e2e = {m: runs[f"cpu-{m}"].get("end_to_end") for m in modes if runs[f"cpu-{m}"].get("end_to_end")}
    if e2e:
        fig = new_figure((11, 4))
        a1, a2 = fig.subplots(1, 2)
        for mode, e in e2e.items():
            c = [(r["lo"] + r["hi"]) / 2 for r in e["by_mag"]]
            a1.plot(c, [np.nan if r["completeness"] is None else r["completeness"] for r in e["by_mag"]], "o-",
                    color=_COLORS[mode], label=f"{mode}: score >= {e['threshold']:g}")
            a1.plot(c, [np.nan if r["detected"] is None else r["detected"] for r in e["by_mag"]], "--",
                    color=_COLORS[mode], alpha=0.5, label=f"{mode}: detected")
            if e["m50"] is not None:
                a1.axvline(e["m50"], color=_COLORS[mode], lw=0.8, ls=":")
                a1.text(e["m50"], 0.56 if mode == "dia" else 0.40, f" m50={e['m50']:.2f}", color=_COLORS[mode],
                        fontsize=8)
            rows = [r for r in e["by_snr"] if r["n"]]
            xs = [math.sqrt(max(r["lo"], 1.0) * (r["hi"] if r["hi"] is not None and math.isfinite(r["hi"])
                                                 else 2 * r["lo"])) for r in rows]
            a2.plot(xs, [r["completeness"] for r in rows], "o-", color=_COLORS[mode], label=mode)
            a2.plot(xs, [r["detected"] for r in rows], "--", color=_COLORS[mode], alpha=0.5)
        a1.axhline(0.5, color="0.7", lw=0.8)
        a1.set_xlabel("transient magnitude (truth)")
        a1.set_ylabel("completeness")
        a1.set_ylim(-0.02, 1.05)
        a1.legend(fontsize=7, loc="lower left")
        a1.set_title("End-to-end completeness vs magnitude", fontsize=9)
        a2.set_xscale("log")
        a2.set_xlabel("truth S/N of the transient in the search image (bin centre)")
        a2.set_ylim(-0.02, 1.05)
        a2.set_title("vs S/N (solid: selected, dashed: detected)", fontsize=9)
        a2.legend(fontsize=8)
        fig.tight_layout()
        out["completeness"] = str(save_figure(fig, plot_dir / "completeness.png"))

        # cost (x) versus accuracy (y): one point per mode and device
        fig = new_figure((10, 4))
        b1, b2 = fig.subplots(1, 2)
        for r in runs.values():
            e = r.get("end_to_end")
            if not e:
                continue
            x = r["cost"]["core_s_per_ccd"]
            if x is None or not math.isfinite(x) or x <= 0:  # every CCD failed: no cost to show
                continue
            marker = "o" if r["device"] == "cpu" else "s"
            for ax, val in ((b1, e["completeness"]), (b2, e["purity"])):
                if val is None:
                    continue
                ax.plot([x], [val], marker, color=_COLORS[r["mode"]], ms=9)
                ax.annotate(f"{r['mode']} ({r['device']})\n{e['false_positives_per_ccd']:.1f} FP/CCD", (x, val),
                            textcoords="offset points", xytext=(6, -14 if val > 0.15 else 6), fontsize=8)
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        for ax, name in ((b1, "completeness at the operating threshold"), (b2, "purity at the operating threshold")):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("cost: core-seconds per CCD")
            ax.set_ylabel(name)
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
        xs = [r["cost"]["core_s_per_ccd"] for r in runs.values() if r.get("end_to_end")]
        xs = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
        if xs:
            for ax in (b1, b2):
                ax.set_xlim(min(xs) / 2.5, max(xs) * 2.5)
        fig.suptitle("Cost versus accuracy (one point per mode and device)", fontsize=10)
        fig.tight_layout()
        out["cost_accuracy"] = str(save_figure(fig, plot_dir / "cost_vs_accuracy.png"))
    return out


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
            "completeness": e.get("completeness"), "m50": e.get("m50"),
            "false_positives_per_ccd": e.get("false_positives_per_ccd"),
            "false_positives_per_deg2": e.get("false_positives_per_deg2"), "purity": e.get("purity")}
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
                     _pct(m["completeness"]), _fmt(m["m50"], 2), _fmt(m["false_positives_per_ccd"], 2),
                     _fmt(m["false_positives_per_deg2"], 1), _pct(m["purity"])])
    ratio = h.get("ratio_dia_over_direct")
    if ratio:
        rows.append(["dia / direct", _fmt(ratio["wall"], 2), _fmt(ratio["cpu"], 2), "", "", "", "", "", ""])
    blocks: list = [("table", ["mode", "wall s / CCD", "CPU s / CCD", "CCDs / core-hour", "completeness",
                               "m50 (mag)", "FP / CCD", "FP / deg²", "purity"], rows)]
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
        b.append(("p", "Warm-up (imports and loading both CNNs once per worker, not counted above): "
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
                       + ". The last row is the direct mode's model on its own (direct-stream) candidates."))
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
            b.append(("img", "ROC of the direct mode's model on the direct-stream candidates", fig["roc_direct"]))
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
        b.append(("p", "Each mode at its operating threshold against the injected transients (those closer than the "
                       "detection edge to the border are not counted). Detected: a candidate within 2 px; selected: "
                       "and its score >= the threshold. A false positive is a selected candidate not matched to a "
                       "transient. m50: magnitude where the completeness falls through 50% (linear interpolation "
                       "between bin centres). CCDs counted (done in every run): "
                       + ", ".join(data.get("end_to_end_ccds") or []) + "."))
        rows = []
        for mode, e in e2e.items():
            if not e:
                continue
            rows.append([mode, _fmt(e["n_transients"]), f"{e['n_detected']} ({_pct(e['completeness_detected'])})",
                         f"{e['n_selected']} ({_pct(e['completeness'])})", _fmt(e["m50"], 2),
                         _fmt(e["m50_detected"], 2), _fmt(e["n_false_positives"]),
                         _fmt(e["false_positives_per_ccd"], 2), _fmt(e["false_positives_per_deg2"], 1),
                         _pct(e["purity"]), _fmt(e["n_candidates"])])
        b.append(("table", ["mode", "transients", "detected", "selected", "m50", "m50 detected", "FP", "FP / CCD",
                            "FP / deg²", "purity", "candidates"], rows))
        modes = [m for m, e in e2e.items() if e]
        bins = e2e[modes[0]]["by_mag"]
        rows = []
        for i, bn in enumerate(bins):
            if not bn["n"]:
                continue
            rows.append([_bin(bn["lo"], bn["hi"], ".1f"), _fmt(bn["n"])]
                        + [f"{e2e[m]['by_mag'][i]['n_completeness']} ({_pct(e2e[m]['by_mag'][i]['completeness'], 0)})"
                           for m in modes])
        b.append(("table", ["mag", "transients"] + [f"{m} selected" for m in modes], rows))
        rows = []
        for i, bn in enumerate(e2e[modes[0]]["by_snr"]):
            if not bn["n"]:
                continue
            rows.append([_bin(bn["lo"], bn["hi"]), _fmt(bn["n"])]
                        + [f"{e2e[m]['by_snr'][i]['n_completeness']} ({_pct(e2e[m]['by_snr'][i]['completeness'], 0)})"
                           for m in modes])
        b.append(("table", ["truth S/N", "transients"] + [f"{m} selected" for m in modes], rows))
        if fig.get("completeness"):
            b.append(("img", "Completeness versus magnitude and S/N", fig["completeness"]))
        if fig.get("cost_accuracy"):
            b.append(("img", "Cost versus accuracy", fig["cost_accuracy"]))

    b.append(("h2", "Configuration and versions"))
    b.append(("p", "Versions: " + ", ".join(f"{k2} {v}" for k2, v in data["versions"].items()) + "."))
    b.append(("p", "Seeds: " + ", ".join(f"{k2} = {v}" for k2, v in data["seeds"].items()) + "."))
    b.append(("p", "Benchmark configuration: `" + json.dumps(cfg) + "`"))
    b.append(("p", "Run configuration (dia mode; direct differs only in `mode`): `"
                   + json.dumps(data["run_config"]["dia"]) + "`"))
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


def write_reports(data: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` (each atomically) in ``out_dir``."""
    out = Path(out_dir)
    blocks = build_blocks(data)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(_finite(data), indent=1, default=_json_default))
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(to_markdown(blocks))
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(to_html(blocks, out))
    return paths
