"""``pipeline subtract``: PSF-matched difference of two FITS exposures, like HOTPANTS."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import add_device_argument

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline subtract``."""
    parser.add_argument("search", help="search exposure (FITS)")
    parser.add_argument("template", help="template exposure (FITS); resampled onto the search grid")
    parser.add_argument("--out", required=True, help="difference image (FITS: IMAGE, VARIANCE, MASK)")
    add_device_argument(parser, "cpu", "where the PSF matching and subtraction run: cpu (NumPy/SciPy, the "
                        "reference; default) or gpu (CuPy)")
    parser.add_argument("--convolve", choices=("auto", "template", "search"), default="auto",
                        help="image to convolve (default: the one with the narrower PSF)")
    parser.add_argument("--search-hdu", default=None, help="HDU of the search image")
    parser.add_argument("--template-hdu", default=None, help="HDU of the template image")
    parser.add_argument("--decorrelate", action="store_true", help="decorrelate the difference noise")
    parser.add_argument("--config", default=None,
                        help="TOML with PsfMatchConfig parameters ([psf_match] table or top level)")


def main(args: argparse.Namespace) -> int:
    """Align, PSF-match, subtract and write; print a one-line kernel summary.

    The difference is built by :func:`pipeline.steps.difference_image`, the function
    ``pipeline run`` uses, so both commands give the same difference for the same pair.
    """
    import dataclasses
    import time

    from dia import PsfMatchConfig, StarSelectionError
    from pipeline.align import AlignConfig, align_pair
    from pipeline.config import config_from_dict, load_toml, resolve_device, run_table
    from pipeline.io import InputError, read_exposure, write_difference
    from pipeline.outdir import OutputError
    from pipeline.steps import difference_image, ensure_fwhm

    def hdu(value):
        return None if value is None else (int(value) if str(value).isdigit() else value)

    device, why = resolve_device(args.device, torch_too=False)
    if args.device == "auto":
        print(f"--device auto: {device} ({why})", flush=True)
    try:
        data = load_toml(args.config) if args.config else {}
        config = config_from_dict(PsfMatchConfig, run_table(data, "psf_match", args.config or ""),
                                  where=f"{args.config} [psf_match]" if args.config else "")
        config = dataclasses.replace(config, convolve=args.convolve, decorrelate=args.decorrelate or config.decorrelate)
        t0 = time.perf_counter()
        search = ensure_fwhm(read_exposure(args.search, hdu=hdu(args.search_hdu)))
        template = ensure_fwhm(read_exposure(args.template, hdu=hdu(args.template_hdu)))
        t1 = time.perf_counter()
        aligned = align_pair(search, template, AlignConfig())
        t2 = time.perf_counter()
        diff = difference_image(aligned, config, device)
        t3 = time.perf_counter()
        write_difference(diff, search, args.out, template_fwhm=aligned.template.fwhm)
    except (InputError, StarSelectionError, ValueError, FileNotFoundError, RuntimeError, ImportError,
            OutputError) as exc:
        print(f"pipeline subtract: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output cannot be written (full disk, no permission)
        print(f"pipeline subtract: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    stats = diff.stats
    print(f"{args.out}: convolved the {diff.convolved} (FWHM search {search.fwhm:.2f} px, template "
          f"{aligned.template.fwhm:.2f} px on the search grid); {stats.used} kernel stars used of {stats.found} "
          f"peaks; load {t1 - t0:.2f} s, align {t2 - t1:.2f} s, match+subtract {t3 - t2:.2f} s ({device})")
    return 0
