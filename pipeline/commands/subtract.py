"""``pipeline subtract``: PSF-matched difference of two FITS exposures, like HOTPANTS.

Each image may come with separate mask, weight (inverse variance) or variance files, as
HOTPANTS's ``-imi/-tmi`` and ``-ini/-tni``; they are read by :func:`pipeline.io.read_exposure`
through :meth:`pipeline.io.PairEntry.load`, the call ``pipeline run`` makes for a manifest row.
``--search-fwhm``/``--template-fwhm`` replace the header or measured PSF FWHM.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pipeline.cli import add_device_argument

__all__ = ["add_arguments", "main", "positive_pixels"]

#: The separate per-image files: (image, kind) -> option.  ``kind`` is the read_exposure role.
_PLANE_OPTIONS = {
    ("search", "mask"): "--search-mask",
    ("search", "weight"): "--search-weight",
    ("search", "variance"): "--search-variance",
    ("template", "mask"): "--template-mask",
    ("template", "weight"): "--template-weight",
    ("template", "variance"): "--template-variance",
}


def positive_pixels(text: str) -> float:
    """argparse type of a FWHM in pixels: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline subtract``."""
    parser.add_argument("search", help="search exposure (FITS)")
    parser.add_argument("template", help="template exposure (FITS); resampled onto the search grid")
    parser.add_argument("--out", required=True, help="difference image (FITS: IMAGE, VARIANCE, MASK)")
    add_device_argument(parser, "cpu", "where the PSF matching and subtraction run: cpu (NumPy/SciPy, the "
                        "reference; default) or gpu (CuPy)")
    parser.add_argument("--convolve", choices=("auto", "template", "search"), default="auto",
                        help="image to convolve (default: the one with the narrower PSF)")
    hdu_note = ("also the HDU read from its --{0}-mask/-weight/-variance files when given (default: "
                "IMAGE/SCI or the first 2-D HDU of the image file, the first 2-D HDU of the others)")
    parser.add_argument("--search-hdu", default=None,
                        help="HDU of the search image (index or EXTNAME); " + hdu_note.format("search"))
    parser.add_argument("--template-hdu", default=None,
                        help="HDU of the template image (index or EXTNAME); " + hdu_note.format("template"))
    for image in ("search", "template"):
        parser.add_argument(f"--{image}-mask", metavar="FILE", default=None,
                            help=f"separate {image} mask (FITS, same shape; non-zero = bad pixel); replaces a "
                                 f"MASK/DQ HDU of the {image} file")
        noise = parser.add_mutually_exclusive_group()
        noise.add_argument(f"--{image}-weight", metavar="FILE", default=None,
                           help=f"separate {image} inverse-variance weight (FITS, same shape; <= 0 = no data); "
                                f"replaces a VARIANCE/WEIGHT HDU of the {image} file")
        noise.add_argument(f"--{image}-variance", metavar="FILE", default=None,
                           help=f"separate {image} variance in ADU^2 (FITS, same shape); not with "
                                f"--{image}-weight")
    parser.add_argument("--search-fwhm", metavar="PX", type=positive_pixels, default=None,
                        help="search PSF FWHM in search pixels, instead of the header's FWHM keyword or the "
                             "one measured from the stars")
    parser.add_argument("--template-fwhm", metavar="PX", type=positive_pixels, default=None,
                        help="template PSF FWHM in template pixels (before resampling onto the search grid), "
                             "instead of the header's or the measured one")
    parser.add_argument("--decorrelate", action="store_true", help="decorrelate the difference noise")
    parser.add_argument("--no-cosmics", action="store_true",
                        help="do not mask cosmic rays (default: L.A.Cosmic flags them CR in the search, and in the "
                             "template when its NCOMBINE card is 1 or absent, before the kernel fit)")
    parser.add_argument("--config", default=None,
                        help="TOML with PsfMatchConfig parameters ([psf_match] table or top level)")


def _option_of(message: str, files: dict[str, str | None]) -> str:
    """The option(s) whose file an :class:`~pipeline.io.InputError` message is about.

    :func:`~pipeline.io.read_exposure` starts its messages with the file's path (``path: ...`` or
    ``path[HDU]: ...``).  A file given to several options (one mask for both images) names them all.
    """
    named = [option for option, name in files.items() if name is not None
             and any(message.startswith(f"{Path(name)}{sep}") for sep in (":", "["))]
    return "/".join(named) or "input"


def _input_files(args: argparse.Namespace) -> dict[str, str | None]:
    """Option (or positional argument) -> the file given to it, None when absent."""
    files: dict[str, str | None] = {"SEARCH": args.search, "TEMPLATE": args.template}
    for option in _PLANE_OPTIONS.values():
        files[option] = getattr(args, option[2:].replace("-", "_"))
    return files


def _load(args: argparse.Namespace):
    """Read both exposures as ``pipeline run`` reads a manifest row (:meth:`PairEntry.load`).

    Raises
    ------
    pipeline.io.InputError
        One line that starts with the option (or argument) whose file is missing, unreadable,
        without the HDU asked for, or of another shape than its image.
    """
    from pipeline.io import InputError, PairEntry

    files = _input_files(args)
    for option, name in files.items():  # before reading anything
        if name is not None and not Path(name).exists():
            raise InputError(f"{option}: {name}: no such file")

    def path(option):
        return None if files[option] is None else Path(files[option])

    entry = PairEntry(ccd="", search=Path(args.search), template=Path(args.template),
                      search_hdu=args.search_hdu, template_hdu=args.template_hdu,
                      search_mask=path("--search-mask"), search_weight=path("--search-weight"),
                      search_variance=path("--search-variance"),
                      template_mask=path("--template-mask"), template_weight=path("--template-weight"),
                      template_variance=path("--template-variance"))
    try:
        return entry.load()
    except InputError as exc:
        raise InputError(f"{_option_of(str(exc), files)}: {exc}") from None


def _with_fwhm(exposure, fwhm: float | None, option: str):
    """The exposure with its FWHM replaced by the command line's (when given), the provenance saying so."""
    import dataclasses

    if fwhm is None:
        return exposure
    was = f" ({exposure.provenance.get('fwhm', 'header')} {exposure.fwhm:g} px not used)" \
        if math.isfinite(exposure.fwhm) else ""
    provenance = dict(exposure.provenance, fwhm=f"{option} {fwhm:g}{was}")
    return dataclasses.replace(exposure, fwhm=float(fwhm), provenance=provenance)


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
    from pipeline.graph import tune_heap, without_planes
    from pipeline.io import InputError, write_difference
    from pipeline.outdir import OutputError
    from pipeline.steps import difference_image, ensure_fwhm

    tune_heap(reuse=True)  # one pair, then exit: freed frames are reused, never handed back
    device, why = resolve_device(args.device, torch_too=False)
    if args.device == "auto":
        print(f"--device auto: {device} ({why})", flush=True)
    try:
        data = load_toml(args.config) if args.config else {}
        config = config_from_dict(PsfMatchConfig, run_table(data, "psf_match", args.config or ""),
                                  where=f"{args.config} [psf_match]" if args.config else "")
        config = dataclasses.replace(config, convolve=args.convolve, decorrelate=args.decorrelate or config.decorrelate)
        t0 = time.perf_counter()
        search, template = _load(args)
        search = ensure_fwhm(_with_fwhm(search, args.search_fwhm, "--search-fwhm"))
        template = ensure_fwhm(_with_fwhm(template, args.template_fwhm, "--template-fwhm"))
        from pipeline.cosmics import CosmicRayConfig, mask_pair_cosmics  # the stage of pipeline run's load

        search, template, _ = mask_pair_cosmics(search, template, CosmicRayConfig(enabled=not args.no_cosmics))
        t1 = time.perf_counter()
        aligned = align_pair(search, template, AlignConfig())
        # the template on its own grid is done with (only its metadata is printed): its ~100 MB of pages are
        # free for the difference, as pipeline run's align stage frees them
        template = without_planes(template)
        t2 = time.perf_counter()
        diff = difference_image(aligned, config, device)
        t3 = time.perf_counter()
        write_difference(diff, search, args.out, template_fwhm=aligned.template.fwhm,
                         template_fwhm_source=template.provenance.get("fwhm"), registration=aligned.registration)
    except (InputError, StarSelectionError, ValueError, FileNotFoundError, RuntimeError, ImportError,
            OutputError) as exc:
        print(f"pipeline subtract: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output cannot be written (full disk, no permission)
        print(f"pipeline subtract: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    stats = diff.stats
    print(f"{args.out}: convolved the {diff.convolved} (FWHM search {search.fwhm:.2f} px "
          f"[{search.provenance.get('fwhm', '?')}], template {template.fwhm:.2f} px "
          f"[{template.provenance.get('fwhm', '?')}], {aligned.template.fwhm:.2f} px on the search grid); "
          f"{stats.used} kernel stars used of {stats.found} peaks; load {t1 - t0:.2f} s, align {t2 - t1:.2f} s, "
          f"match+subtract {t3 - t2:.2f} s ({device})")
    if stats.fallback:
        print(f"note: {stats.fallback}")
    reg = aligned.registration
    if reg is not None and reg.applied:
        print(f"note: the template's WCS was shifted by ({reg.shift_x_px:+.3f}, {reg.shift_y_px:+.3f}) px "
              f"+- {reg.shift_err_px:.3f}, measured on {reg.n_shift} stars (align.registration_refine); "
              "header REGSHFTX / REGSHFTY")
    for label, exposure in (("search", search), ("template", template)):
        noise = str(exposure.provenance.get("variance", ""))
        if noise.startswith("sky only"):
            print(f"note: {label} variance: {noise}")
    if stats.background != "stamps":
        print(f"note: differential background from the {stats.background}")
    if diff.decorrelated and stats.variance_scale != 1.0:
        print(f"note: decorrelated variance scaled by {stats.variance_scale:.3f} (measured on the difference; "
              "psf_match.decorrelate_variance)")
    return 0
