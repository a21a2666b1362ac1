"""``pipeline score-alerts``: score real ZTF / Rubin alert cutouts with the real-bogus CNNs.

Reads Avro alert packet files (:mod:`pipeline.alerts`), cuts the cutouts to 51 x 51 stamps with the
alert on the centre pixel, scores them with each model and writes one row per alert: ids, one
``score_<model>`` column per model, the alert's own real-bogus fields (ZTF ``rb`` / ``drb``, Rubin
``reliability``), ``isdiffpos``, ``magpsf``, the cutout sizes and notes.  The models were trained on
simulated DECam stamps; on survey alerts the scores are an out-of-domain test, not a calibrated
probability.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli import add_device_argument

__all__ = ["add_arguments", "main", "build_table", "label_auc", "TABLE_FORMATS", "DEFAULT_MODELS"]

#: Output table suffix -> astropy format.
TABLE_FORMATS: dict[str, str] = {".ecsv": "ascii.ecsv", ".fits": "fits", ".parquet": "parquet", ".csv": "ascii.csv"}

#: Models scored when ``--model`` is not given.
DEFAULT_MODELS = ("triplet", "pair")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline score-alerts``."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="Avro alert packet files (ZTF or Rubin)")
    parser.add_argument("--model", action="append", default=None, metavar="NAME",
                        help="shipped model name, weights file or training folder; repeatable "
                             f"(default: {' and '.join(DEFAULT_MODELS)})")
    parser.add_argument("--out", default=None,
                        help=f"output table ({', '.join(TABLE_FORMATS)}); default: print the first rows")
    add_device_argument(parser, "cpu", "where the CNNs run (default cpu)")
    parser.add_argument("--negative", default="swap", choices=["swap", "positive", "observed"],
                        help="negative alerts (source fainter than in the template): 'swap' presents the "
                             "time-reversed pair (search = template cutout, template = science cutout, "
                             "difference = template - science; default), 'positive' keeps the images and makes "
                             "the difference template - science, 'observed' keeps difference = science - template")
    parser.add_argument("--label-threshold", type=float, default=0.5,
                        help="the alert's own drb (else rb; Rubin: reliability) at or above which the summary "
                             "counts it as real when it reports each model's ROC AUC (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=256, help="stamps per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _column_name(model: str) -> str:
    """``score_<name>``: the shipped name, or the stem of a weights file / training folder."""
    path = Path(model)
    if path.is_dir():
        stem = path.name
    elif path.suffix == ".pt":
        stem = path.stem if path.stem != "model" else path.parent.name
    else:
        stem = model
    return "score_" + "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in stem)


def build_table(alerts, stamps, scores: dict):
    """The output table: one row per alert.

    Parameters
    ----------
    alerts : list of pipeline.alerts.Alert
    stamps : pipeline.alerts.AlertStamps
        The stamps the scores were computed on (for ``swapped``, ``diff_sign``, ``nan_frac``).
    scores : dict column name -> ndarray (N,)

    Returns
    -------
    astropy.table.Table
        Columns ``file, record, survey, candid, objectId, diaSourceId, score_*, rb, drb,
        reliability, isdiffpos, magpsf, negative, swapped, diff_sign, size_science, size_template,
        size_difference, nan_frac, notes``; ``candid`` (ZTF) and ``diaSourceId`` (Rubin) are masked
        where the survey has none, missing floats are NaN.
    """
    import numpy as np
    from astropy.table import MaskedColumn, Table

    def ids(values):
        mask = np.array([v is None for v in values], bool)
        return MaskedColumn(np.array([0 if v is None else v for v in values], np.int64), mask=mask)

    def size(a, role):
        ny, nx = getattr(a, role).shape
        return f"{ny}x{nx}"

    t = Table()
    t["file"] = [a.path for a in alerts]
    t["record"] = np.array([a.record for a in alerts], np.int32)
    t["survey"] = [a.survey for a in alerts]
    t["candid"] = ids([a.candid for a in alerts])
    t["objectId"] = [a.object_id or "" for a in alerts]
    t["diaSourceId"] = ids([a.dia_source_id for a in alerts])
    for name, values in scores.items():
        t[name] = np.asarray(values, np.float32)
    for col in ("rb", "drb", "reliability", "magpsf"):
        t[col] = np.array([getattr(a, col) for a in alerts], np.float32)
    t["isdiffpos"] = [a.isdiffpos for a in alerts]
    t["negative"] = np.array([a.negative for a in alerts], bool)
    t["swapped"] = stamps.swapped
    t["diff_sign"] = stamps.diff_sign
    for role in ("science", "template", "difference"):
        t[f"size_{role}"] = [size(a, role) for a in alerts]
    t["nan_frac"] = stamps.nan_fraction
    t["notes"] = ["; ".join(a.notes) for a in alerts]
    for col in ("file", "survey", "objectId", "isdiffpos", "size_science", "size_template", "size_difference",
                "notes"):
        if len(t) == 0 or t[col].dtype.kind != "U":
            t[col] = t[col].astype(str)
    t.meta["comments"] = ["scores of CNNs trained on simulated DECam stamps; out of domain on survey alerts"]
    return t


def label_auc(table, score_column: str, threshold: float = 0.5):
    """ROC AUC of a score column against the alert's own classification thresholded at ``threshold``.

    The label is ``drb >= threshold`` where the alert has ``drb``, else ``rb``, else the Rubin
    ``reliability``; alerts with none are left out.

    Returns
    -------
    (auc, n_real, n_bogus) : auc is NaN unless both classes are present.
    """
    import numpy as np

    from classifier.evaluate import roc_auc

    ref = np.asarray(table["drb"], float)
    for col in ("rb", "reliability"):
        ref = np.where(np.isfinite(ref), ref, np.asarray(table[col], float))
    ok = np.isfinite(ref)
    labels = (ref[ok] >= threshold).astype(int)
    n_real, n_bogus = int(labels.sum()), int((1 - labels).sum())
    if not (n_real and n_bogus):
        return float("nan"), n_real, n_bogus
    return float(roc_auc(labels, np.asarray(table[score_column], float)[ok])), n_real, n_bogus


def main(args: argparse.Namespace) -> int:
    """Read, cut, score and write; print a summary.

    Returns 0 when every record was scored, 1 when some records or files were unreadable (each
    reported on stderr, the others scored and written), 2 when nothing could be scored or the
    models / output failed.
    """
    import numpy as np

    from classifier.infer import Scorer, WeightsError
    from pipeline.alerts import AlertError, AlertStampConfig, alert_stamps, read_alert_file
    from pipeline.io import atomic_path

    prog = "pipeline score-alerts"
    models = args.model or list(DEFAULT_MODELS)
    columns = [_column_name(m) for m in models]
    if len(set(columns)) != len(columns):
        print(f"{prog}: two models give the same score column ({columns}); rename a weights file", file=sys.stderr)
        return 2
    fmt = None
    if args.out:
        fmt = TABLE_FORMATS.get(Path(args.out).suffix.lower())
        if fmt is None:
            print(f"{prog}: --out {args.out}: unknown table type; use one of {', '.join(TABLE_FORMATS)}",
                  file=sys.stderr)
            return 2
    try:
        config = AlertStampConfig(negative=args.negative)
        scorers = [Scorer(m, device=args.device, batch_size=args.batch_size, threads=args.threads) for m in models]
        for m, scorer in zip(models, scorers):
            if scorer.spec.scheme == "sky":  # it needs the whole frames' sky and noise, which a cut-out lacks
                raise ValueError(f"model {m!r} ({scorer.spec.name}) reads stamps in the frames' sky units "
                                 f"(the dense map's detector); alert cut-outs carry no frame: use another model")
    except (WeightsError, ValueError, RuntimeError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2

    alerts, problems = [], []
    for path in args.files:
        try:
            got, errors = read_alert_file(path, config)
        except AlertError as exc:
            problems.append(str(exc))
            continue
        except ImportError as exc:
            print(f"{prog}: {exc} (install fastavro: pip install 'fastavro>=1.9')", file=sys.stderr)
            return 2
        alerts.extend(got)
        problems.extend(str(e) for e in errors)
    for msg in problems:
        print(f"{prog}: skipped: {msg}", file=sys.stderr)
    if not alerts:
        print(f"{prog}: no alert could be read from {len(args.files)} file(s) ({len(problems)} problem(s))",
              file=sys.stderr)
        return 2

    stamps = alert_stamps(alerts, config)
    scores = {col: scorer.score(stamps.data, stamps.channels) for col, scorer in zip(columns, scorers)}
    table = build_table(alerts, stamps, scores)
    table.meta["models"] = "; ".join(f"{col}={s.path}" for col, s in zip(columns, scorers))
    table.meta["negative"] = args.negative  # the --negative policy

    surveys = {s: int(np.sum(table["survey"] == s)) for s in ("ztf", "rubin")}
    print(f"{len(alerts)} alerts from {len(args.files)} file(s) (ZTF {surveys['ztf']}, Rubin {surveys['rubin']}); "
          f"{len(problems)} unreadable record(s)/file(s) skipped; {int(table['negative'].sum())} negative "
          f"(policy {args.negative})")
    for col in columns:
        s = np.asarray(table[col], float)
        auc, n_real, n_bogus = label_auc(table, col, args.label_threshold)
        few = "; too few for a meaningful AUC" if min(n_real, n_bogus) < 10 else ""
        auc_txt = (f"ROC AUC vs own drb/rb/reliability >= {args.label_threshold:g}: {auc:.3f} "
                   f"({n_real} real, {n_bogus} bogus{few})" if np.isfinite(auc) else
                   f"no AUC (labels: {n_real} real, {n_bogus} bogus)")
        print(f"  {col}: median {np.median(s):.3f}, quartiles {np.quantile(s, 0.25):.3f}-{np.quantile(s, 0.75):.3f}, "
              f">= 0.5: {int(np.sum(s >= 0.5))}/{len(s)}; {auc_txt}")
    if args.out:
        try:
            with atomic_path(args.out) as tmp:
                table.write(tmp, format=fmt, overwrite=True)
        except (OSError, ValueError, TypeError) as exc:
            print(f"{prog}: cannot write {args.out}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.out} ({len(table)} rows)")
    else:
        show = [c for c in ("candid", "objectId", "diaSourceId", *columns, "rb", "drb", "reliability", "isdiffpos",
                            "magpsf", "size_science") if c in table.colnames]
        table[show].pprint(max_lines=25, max_width=-1)
    return 1 if problems else 0
