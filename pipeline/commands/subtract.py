"""``pipeline subtract``: PSF-matched difference of two FITS exposures, like HOTPANTS."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline subtract``."""
    parser.add_argument("search", help="search exposure (FITS)")
    parser.add_argument("template", help="template exposure (FITS); resampled onto the search grid")
    parser.add_argument("--out", required=True, help="difference image (FITS: IMAGE, VARIANCE, MASK)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="cpu (NumPy) or gpu (CuPy)")
    parser.add_argument("--convolve", choices=("auto", "template", "search"), default="auto",
                        help="image to convolve (default: the one with the narrower PSF)")
    parser.add_argument("--search-hdu", default=None, help="HDU of the search image")
    parser.add_argument("--template-hdu", default=None, help="HDU of the template image")
    parser.add_argument("--decorrelate", action="store_true", help="decorrelate the difference noise")
    parser.add_argument("--config", default=None, help="TOML with PsfMatchConfig parameters ([psf_match] table or top level)")


def main(args: argparse.Namespace) -> int:
    """Align, PSF-match, subtract and write; print a one-line kernel summary."""
    import dataclasses
    import time

    from dia import PsfMatchConfig, StarSelectionError
    from pipeline.align import align_pair
    from pipeline.config import config_from_dict, load_toml
    from pipeline.io import InputError, read_exposure, write_difference
    from pipeline.steps import ensure_fwhm

    def hdu(value):
        return None if value is None else (int(value) if str(value).isdigit() else value)

    try:
        data = load_toml(args.config) if args.config else {}
        config = config_from_dict(PsfMatchConfig, data.get("psf_match", data), where=args.config or "")
        config = dataclasses.replace(config, convolve=args.convolve, decorrelate=args.decorrelate or config.decorrelate)
        t0 = time.perf_counter()
        search = ensure_fwhm(read_exposure(args.search, hdu=hdu(args.search_hdu)))
        template = ensure_fwhm(read_exposure(args.template, hdu=hdu(args.template_hdu)))
        t1 = time.perf_counter()
        aligned = align_pair(search, template)
        t2 = time.perf_counter()
        from dia import subtract

        diff = subtract(search.image, search.variance, search.mask, aligned.template.image,
                        aligned.template.variance, aligned.template.mask, search_fwhm=search.fwhm,
                        template_fwhm=template.fwhm, config=config, device=args.device).to_numpy()
        t3 = time.perf_counter()
        write_difference(diff, search, args.out)
    except (InputError, StarSelectionError, ValueError, FileNotFoundError, RuntimeError, ImportError) as exc:
        print(f"pipeline subtract: {exc}", file=sys.stderr)
        return 2
    stats = diff.stats
    print(f"{args.out}: convolved the {diff.convolved} (FWHM search {search.fwhm:.2f} px, template "
          f"{template.fwhm:.2f} px); {stats.used} kernel stars used of {stats.found} peaks; "
          f"load {t1 - t0:.2f} s, align {t2 - t1:.2f} s, match+subtract {t3 - t2:.2f} s ({args.device})")
    return 0
