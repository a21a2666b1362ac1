"""``pipeline vet``: one self-contained HTML page to vet a run's candidates by eye."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline vet``."""
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the --out folder of `pipeline run`")
    parser.add_argument("--threshold", type=float, default=None,
                        help="show candidates with score >= T (default: the run's score_threshold)")
    parser.add_argument("--out", default=None, help="HTML file to write (default: OUT_DIR/vet.html)")
    parser.add_argument("--max", type=int, default=None, dest="max_rows", metavar="N",
                        help="at most N candidates, highest scores first (default 500)")


def main(args: argparse.Namespace) -> int:
    """Write the vetting page and print where it is and what it holds."""
    from pipeline.io import InputError
    from pipeline.vet import VetError, write_vet_page

    try:
        result = write_vet_page(args.out_dir, args.out, threshold=args.threshold, max_rows=args.max_rows)
    except (VetError, InputError, ValueError) as exc:
        print(f"pipeline vet: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the page cannot be written (full disk, no permission)
        print(f"pipeline vet: cannot write {args.out or 'the page'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for ccd, reason in result.stamp_problems.items():
        print(f"pipeline vet: warning: {ccd}: stamps not shown: {reason}", file=sys.stderr)
    more = f" (the {result.n_shown} highest; raise --max for more)" if result.n_shown < result.n_above else ""
    print(f"{result.path}: {result.n_shown} of {result.n_above} candidates with score >= {result.threshold:g}"
          f"{more}; {result.n_without_stamps} without stamps")
    return 0
