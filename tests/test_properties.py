"""Property-based tests (hypothesis): the scorer and the catalog writer on whatever arrives.

Issue #10 asks for a layer that drives scoring and catalog writing over random candidate
counts, stamp contents with NaNs and odd CCD ids.  Each test states a property that must hold
for *every* input its strategy can draw, not just for the handful of cases a person thought of:

* scoring (every shipped model): one finite P(real) in [0, 1] per stamp, whatever the stamps hold
  (noise, point sources, NaN patches up to whole stamps / channels, constants, 1e30, denormals);
  a stamp's score depends neither on the other stamps of the call (order, neighbours, a call of
  one) nor on ``batch_size`` / ``cpu_chunk`` nor on the input type or channel order; a pair model
  ignores the difference channel; scoring is deterministic and leaves the caller's array alone;
* normalisation: finite output, NaN pixels -> exactly 0, per-stamp, invariant under rescaling
  the stamp by a power of two (the schemes are scale-free; an absolute epsilon would show);
* CCD ids: any text is either refused with ``InputError`` or accepted unchanged, and an accepted
  id only ever names plain files inside the output folder, distinct from every other id's files;
  the manifest reader accepts exactly the valid, case-unique ids and names the offending rows;
* catalogs: per-CCD tables written as ``_stage_write`` writes them come back from
  ``collect_catalog`` complete, in manifest order, bit-equal (NaN and inf kept), with str
  columns, no temporaries left behind, and a damaged catalog reported in ``errors`` -- never
  silently truncated -- while the other CCDs' rows all survive.

Bugs this file found, now fixed and kept as regressions: NaN scores from pixels near the float32
limit and +-1 for constant stamps (float32 statistics), a crash on an empty batch, wrong row
numbers in manifest errors, a merge lost to one damaged string cell, in-place catalog damage
merged silently (now caught by FITS checksums), and CCD ids cut to 32 characters in catalogs.

Everything is deterministic (``derandomize=True``, no example database); large arrays are made by
NumPy from hypothesis-drawn seeds and recipes, so examples still shrink to small recipes.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from classifier.data import CHANNELS
from classifier.infer import WEIGHTS_DIR, Scorer
from classifier.normalize import normalize_stamps
from pipeline.config import RunConfig
from pipeline.detect import CandidateTable
from pipeline.graph import ccd_paths, collect_catalog
from pipeline.io import (
    CCD_ID_MAX_LENGTH,
    CCD_ID_PATTERN,
    InputError,
    atomic_path,
    check_ccd_ids,
    read_manifest,
    validate_ccd_id,
    write_catalog,
)
from pipeline.steps import finalize_candidates

SHIPPED = sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))
STAMP = 51
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read, set straight back (no other way; at import, before any test runs)


def _settings(n: int, **kw):
    """Deterministic hypothesis settings: fixed examples, no deadline, no database on disk."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], **kw)


@functools.cache
def _scorer(name: str, batch_size: int = 1024, cpu_chunk: int = 64) -> Scorer:
    """One scorer per (model, batch, chunk) for the whole module (loading costs ~50 ms).

    One torch thread: the results must not depend on it, and on a busy machine (a CI runner, a
    parallel test session) two spinning OpenMP threads per tiny chunk are 30-100x slower."""
    return Scorer(name, batch_size=batch_size, cpu_chunk=cpu_chunk, threads=1)


# ============================================================================ stamp recipes

#: What an edit does to one stamp; the value list is read per kind (see _apply).
_EDIT_KINDS = ("source", "nan_patch", "nan_stamp", "nan_channel", "constant", "huge", "denormal")
_VALUES = (3.3, 0.0, 7.0, -1e3, 65535.0, 1e30, -1e30, 1e34, 1e-40, 123.456)
_HUGE = (1e30, -1e30, 1e34, 3e33)


def _edit():
    return st.tuples(
        st.sampled_from(_EDIT_KINDS),
        st.integers(0, 10**6),          # stamp (mod N)
        st.integers(0, 3),              # channel; 3 = all channels
        st.integers(0, STAMP - 1), st.integers(0, STAMP - 1),  # patch corner
        st.integers(1, STAMP), st.integers(1, STAMP),          # patch size (whole stamp possible)
        st.sampled_from(_VALUES),
    )


def _apply(x: np.ndarray, edit, rng: np.random.Generator) -> None:
    kind, i, c, y0, x0, h, w, value = edit
    i %= x.shape[0]
    ch = slice(None) if c == 3 else slice(c, c + 1)
    patch = (i, ch, slice(y0, y0 + h), slice(x0, x0 + w))
    if kind == "source":  # a point source on every chosen channel, peak 10 .. 1e7 x noise
        yy, xx = np.mgrid[:STAMP, :STAMP]
        sigma = 0.6 + (h % 8)
        with np.errstate(all="ignore"):
            noise = float(np.nanstd(x[i])) if np.isfinite(x[i]).any() else 1.0
        peak = 10.0 ** (1 + w % 7) * (noise if np.isfinite(noise) and noise > 1e-3 else 1.0)
        x[i, ch] += (peak * np.exp(-0.5 * ((yy - y0) ** 2 + (xx - x0) ** 2) / sigma**2)).astype(np.float32)
    elif kind == "nan_patch":
        x[patch] = np.nan
    elif kind == "nan_stamp":
        x[i] = np.nan
    elif kind == "nan_channel":
        x[i, c % 3] = np.nan
    elif kind == "constant":  # a whole stamp (or channel) at one value
        x[i, ch] = np.float32(value)
    elif kind == "huge":
        x[patch] = np.float32(_HUGE[(y0 + x0) % len(_HUGE)])
    elif kind == "denormal":  # subnormal float32 noise
        x[patch] = (rng.standard_normal(x[patch].shape) * 1e-41).astype(np.float32)


@st.composite
def stamp_batches(draw, max_n: int = 150, max_edits: int = 14, min_n: int = 0) -> np.ndarray:
    """(N, 3, 51, 51) float32 stamps: Gaussian noise on a background, then edits.

    The edits are the hypothesis-drawn ones (they shrink to a minimal list) plus, at a drawn rate,
    random ones from the seed, so that every batch mixes clean and damaged stamps."""
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    level = draw(st.sampled_from([100.0, 0.0, -50.0, 1e4]))
    sigma = draw(st.sampled_from([5.0, 1.0, 1e-3, 300.0]))
    rate = draw(st.sampled_from([0.0, 0.1, 0.5]))
    rng = np.random.default_rng(seed)
    x = (level + sigma * rng.standard_normal((n, 3, STAMP, STAMP))).astype(np.float32)
    if n:
        for edit in draw(st.lists(_edit(), max_size=max_edits)):
            _apply(x, edit, rng)
        for i in np.flatnonzero(rng.random(n) < rate):
            edit = (_EDIT_KINDS[rng.integers(len(_EDIT_KINDS))], int(i), int(rng.integers(4)),
                    *(int(v) for v in rng.integers(0, STAMP, 2)), *(int(v) for v in rng.integers(1, STAMP + 1, 2)),
                    _VALUES[rng.integers(len(_VALUES))])
            _apply(x, edit, rng)
    return x


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


# ============================================================================ scorer


@pytest.mark.parametrize("name", SHIPPED)
@_settings(16)
@given(stamps=stamp_batches(), batch_size=st.integers(1, 160), cpu_chunk=st.integers(1, 70),
       perm_seed=st.integers(0, 2**32 - 1), singles=st.lists(st.integers(0, 10**6), max_size=3),
       channel_order=st.permutations(CHANNELS))
def test_scores_are_finite_probabilities_independent_of_batching(name, stamps, batch_size, cpu_chunk, perm_seed,
                                                                 singles, channel_order):
    n = len(stamps)
    original = stamps.copy()
    scorer = _scorer(name)
    ref = scorer.score(stamps)

    # one finite probability per stamp, and the caller's array untouched
    assert ref.shape == (n,) and ref.dtype == np.float32
    assert np.isfinite(ref).all(), f"{name}: non-finite scores at {np.flatnonzero(~np.isfinite(ref))}"
    assert ((ref >= 0) & (ref <= 1)).all()
    assert _same(stamps, original), f"{name}: score() modified its input"

    # deterministic: the same call gives the same bits
    assert np.array_equal(scorer.score(stamps), ref)

    # batch_size / cpu_chunk do not matter
    other = _scorer(name, batch_size, cpu_chunk).score(stamps)
    np.testing.assert_allclose(other, ref, rtol=0, atol=1e-5, err_msg=f"{name} batch {batch_size} chunk {cpu_chunk}")

    # neither do the neighbours: shuffled batch, and single stamps alone
    perm = np.random.default_rng(perm_seed).permutation(n)
    np.testing.assert_allclose(scorer.score(stamps[perm]), ref[perm], rtol=0, atol=1e-5, err_msg=f"{name} shuffled")
    for i in sorted({0, n - 1, *(s % max(n, 1) for s in singles)}) if n else ():
        np.testing.assert_allclose(scorer.score(stamps[i:i + 1]), ref[i:i + 1], rtol=0, atol=1e-5,
                                   err_msg=f"{name}: stamp {i} alone vs in a batch of {n}")

    # a tensor, or the channels in another order (named), score the same
    np.testing.assert_allclose(scorer.score(torch.from_numpy(stamps.copy())), ref, rtol=0, atol=1e-6)
    order = [CHANNELS.index(c) for c in channel_order]
    np.testing.assert_allclose(scorer.score(np.ascontiguousarray(stamps[:, order]), channels=tuple(channel_order)),
                               ref, rtol=0, atol=1e-6, err_msg=f"{name} channels {channel_order}")

    # a pair model never looks at the difference
    if "difference" not in scorer.channels and n:
        junk = stamps.copy()
        junk[:, 2] = np.where(np.arange(STAMP) % 2, np.nan, 1e30)
        assert np.array_equal(scorer.score(junk), ref), f"{name} reads the difference channel"


@pytest.mark.parametrize("name", ["triplet", "triplet-paper"])
@_settings(10)
@example(value=1.4e35, channel=1, n=1).via("discovered failure")
@example(value=1.4e35, channel=2, n=1).via("discovered failure")
@given(value=st.floats(1.4e35, 3.4e38), channel=st.integers(0, 2), n=st.integers(1, 5))
def test_scores_stay_finite_for_extreme_finite_pixels(name, value, channel, n):
    stamps = np.zeros((n, 3, STAMP, STAMP), np.float32)
    stamps[0, channel] = np.float32(value)
    assert np.isfinite(_scorer(name).score(stamps)).all()


def test_scorer_refuses_bad_batch_settings():
    for bad in ({"batch_size": 0}, {"batch_size": -3}, {"cpu_chunk": 0}):
        with pytest.raises(ValueError):
            Scorer("pair", **bad)


# ============================================================================ normalisation

_CHANNEL_SETS = [CHANNELS, ("template", "search"), ("difference",), ("search", "difference")]


@pytest.mark.parametrize("scheme", ["shared", "paper"])
@_settings(40)
@given(stamps=stamp_batches(max_n=12, min_n=1), channels=st.sampled_from(_CHANNEL_SETS), as_tensor=st.booleans())
def test_normalisation_is_finite_per_stamp_and_zero_where_missing(scheme, stamps, channels, as_tensor):
    idx = [CHANNELS.index(c) for c in channels]
    x = np.ascontiguousarray(stamps[:, idx])
    original = x.copy()
    out = normalize_stamps(torch.from_numpy(x) if as_tensor else x, scheme, channels)
    out = out.numpy() if as_tensor else out
    assert isinstance(out, np.ndarray) and out.shape == x.shape and out.dtype == np.float32
    assert np.isfinite(out).all(), f"non-finite output at {np.argwhere(~np.isfinite(out))[:5].tolist()}"
    assert (out[np.isnan(x)] == 0).all(), "a missing (NaN) pixel did not map to 0"
    assert _same(x, original), "normalize_stamps modified its input"
    for i in range(len(x)):  # each stamp normalised on its own
        np.testing.assert_allclose(normalize_stamps(x[i:i + 1], scheme, channels)[0], out[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["shared", "paper"])
def test_normalisation_of_no_stamps_is_no_stamps(scheme):
    for channels in _CHANNEL_SETS:
        x = np.zeros((0, len(channels), STAMP, STAMP), np.float32)
        out = normalize_stamps(x, scheme, channels)
        assert out.shape == x.shape and out.dtype == np.float32


@pytest.mark.parametrize("scheme", ["shared", "paper"])
@_settings(30)
@given(stamps=stamp_batches(max_n=6, max_edits=6, min_n=1).filter(lambda s: np.nanmax(np.abs(s), initial=0) < 1e12),
       k_images=st.integers(-20, 20), k_diff=st.integers(-20, 20))
def test_normalisation_does_not_depend_on_the_flux_unit(scheme, stamps, k_images, k_diff):
    """Both schemes are scale-free: template and search scaled together (they share one scale in
    "shared"), the difference on its own.  Powers of two are exact in floating point, so the result
    must be bit-identical -- an absolute epsilon or threshold anywhere would break it."""
    # keep squares of pixel values inside float32's normal range for every scale drawn
    stamps = np.where(np.abs(stamps) < 1e-4, 0, stamps).astype(np.float32)
    if scheme == "shared":
        # Left out: a search stamp with no spread (all NaN or one value) has no noise to share, and
        # shared_scale then falls back to a scale of 1 ADU for template and search -- a unit-dependent
        # choice, reported to the lead, not pinned here.
        search = stamps[:, 1].reshape(len(stamps), -1)
        assume(all(np.unique(row[np.isfinite(row)]).size > 1 for row in search))
    scaled = stamps.copy()
    scaled[:, :2] *= np.float32(2.0**k_images)
    scaled[:, 2] *= np.float32(2.0**k_diff)
    np.testing.assert_array_equal(normalize_stamps(scaled, scheme), normalize_stamps(stamps, scheme))


@pytest.mark.parametrize("scheme", ["shared", "paper"])
@_settings(20)
@example(values=(3.3, 3.3, 3.3), nan_rows=0).via("discovered failure")
@given(values=st.tuples(*[st.floats(-1e6, 1e6, allow_nan=False, width=32)] * 3), nan_rows=st.integers(0, 50))
def test_constant_stamp_normalises_to_zero(scheme, values, nan_rows):
    x = np.empty((1, 3, STAMP, STAMP), np.float32)
    x[0] = np.asarray(values, np.float32)[:, None, None]
    x[0, :, :nan_rows] = np.nan  # missing rows do not change "constant"
    np.testing.assert_array_equal(normalize_stamps(x, scheme), 0)


# ============================================================================ CCD ids

#: Ids the rule accepts (up to the length limit), with odd but legal characters.
valid_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", fullmatch=True).filter(lambda s: ".." not in s)
#: Any text, biased towards the characters that matter for paths.
hostile_ids = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(list("aZ09._+-/\\ \x00\n\t:~*?$é\u2215\uff0e") + ["..", "../"]),
             max_size=30).map("".join),
    st.text(alphabet="abc.", min_size=60, max_size=300),
    st.builds(lambda p, s: p + s, st.sampled_from(["-", ".", "..", "/", "../", "~/", " ", "C:\\", "\x00"]),
              valid_ids),
    valid_ids,
)


@_settings(300)
@given(ccd=st.one_of(hostile_ids, st.none(), st.integers(), st.binary(max_size=8), st.floats()))
def test_ccd_id_is_refused_or_names_only_plain_files_inside_out(ccd):
    try:
        got = validate_ccd_id(ccd)
    except InputError:
        # refused exactly when it breaks the documented rule
        assert not (isinstance(ccd, str) and 0 < len(ccd) <= CCD_ID_MAX_LENGTH
                    and CCD_ID_PATTERN.fullmatch(ccd) and ".." not in ccd), f"valid id {ccd!r} refused"
        if isinstance(ccd, str):
            with pytest.raises(InputError):
                ccd_paths(Path("out"), ccd)
        return
    assert got is ccd
    # what an accepted id may look like, checked independently of the pattern
    assert isinstance(ccd, str) and 1 <= len(ccd) <= CCD_ID_MAX_LENGTH and ccd.isascii() and ccd.isprintable()
    assert not ccd.startswith((".", "-")) and ".." not in ccd
    assert not set(ccd) & set("/\\ \x00:*?\"<>|~$")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        paths = ccd_paths(out, ccd)
        assert set(paths) == {"catalog", "status", "stamps", "diff"}
        for kind, p in paths.items():
            assert p.resolve().is_relative_to(out.resolve()), f"{kind} path {p} leaves {out}"
            assert p.parent in (out / "ccds", out / "diff") and p.name.startswith(ccd)
            assert p.name == ccd + {"catalog": ".fits", "status": ".json", "stamps": "_stamps.fits",
                                    "diff": ".fits"}[kind]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")  # the OS takes the name as one plain file
            assert os.listdir(p.parent).count(p.name) == 1


@_settings(100)
@given(a=valid_ids, b=valid_ids)
@example(a="ccd07", b="ccd07_stamps")  # b's catalog would be a's stamps file: refused together
@example(a="ccd07", b="CCD07_Stamps")
def test_two_ids_never_share_an_output_file(a, b):
    pa, pb = ccd_paths(Path("/o"), a), ccd_paths(Path("/o"), b)
    files_a = {str(p).lower() for p in pa.values()}
    files_b = {str(p).lower() for p in pb.values()}
    try:
        check_ccd_ids([a, b])
        accepted = True
    except InputError:
        accepted = False
    if a.lower() != b.lower():  # even on a case-insensitive file system
        assert accepted == (not files_a & files_b), (a, b)  # refused exactly when they would share a file
    else:
        assert not accepted
    assert len(files_a) == 4  # catalog, status, stamps and diff are four files


# ---------------------------------------------------------------------------- manifests


@st.composite
def manifest_ids(draw) -> list[str]:
    """1..8 ids: valid ones, hostile text, and case variants of earlier ids (duplicates ignoring case)."""
    ids = draw(st.lists(st.one_of(valid_ids, valid_ids, hostile_ids), min_size=1, max_size=8))
    for pos, src, how in draw(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7),
                                                 st.sampled_from(["swapcase", "upper", "same", "pad"])),
                                       max_size=3)):
        if pos < len(ids) and src < pos:
            s = ids[src]
            ids[pos] = {"swapcase": s.swapcase(), "upper": s.upper(), "same": s, "pad": f" {s} "}[how]
    return ids


#: A row the reader blames (each problem starts "row K"; "repeats row K" only refers to one).
_ROW_NAMED = r"(?:row\(s\): |; )row (\d+)\b"


def _oracle(path: Path) -> tuple[list[str] | None, list[int]]:
    """(ids as the manifest reader should see them, 1-based bad rows), from the file itself."""
    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception:  # noqa: BLE001 - any text astropy cannot parse back; read_manifest must refuse it too
        return None, []
    seen, ids, bad = set(), [], []
    for k, value in enumerate(table["ccd"], start=1):
        text = "" if np.ma.is_masked(value) else str(value).strip()
        ids.append(text)
        try:
            validate_ccd_id(text if text not in ("--", "None") else "")
        except InputError:
            bad.append(k)
            continue
        if text.lower() in seen:
            bad.append(k)
            continue
        seen.add(text.lower())
    return ids, bad


@_settings(120)
@given(ids=manifest_ids())
def test_manifest_accepts_exactly_valid_case_unique_ids_and_names_bad_rows(ids):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.ecsv"
        Table({"ccd": ids, "search": ["s.fits"] * len(ids), "template": ["t.fits"] * len(ids)}).write(
            path, format="ascii.ecsv")
        expect_ids, bad = _oracle(path)
        try:
            entries = read_manifest(path)
        except InputError as exc:
            message = str(exc)
            assert str(path) in message
            if expect_ids is not None:  # the file parsed: the reader must say which rows are wrong
                assert bad, f"rows {ids!r} all valid and unique, yet refused: {message}"
                named = {int(k) for k in re.findall(_ROW_NAMED, message)}
                assert bad[0] in named, f"first bad row {bad[0]} not named: {message}"
                assert named <= set(bad), f"rows {sorted(named - set(bad))} named but fine: {message}"
            return
        assert expect_ids is not None and not bad, f"accepted bad ids {ids!r} (bad rows {bad})"
        got = [e.ccd for e in entries]
        assert got == expect_ids  # every row, in order
        assert all(validate_ccd_id(c) == c for c in got)
        assert len({c.lower() for c in got}) == len(got)
        assert all(e.search == Path(tmp) / "s.fits" and e.template == Path(tmp) / "t.fits" for e in entries)
    # valid, case-unique ids as written are never refused
    if all(CCD_ID_PATTERN.fullmatch(c) and ".." not in c and len(c) <= CCD_ID_MAX_LENGTH for c in ids) \
            and len({c.lower() for c in ids}) == len(ids):
        assert got == ids


@_settings(40)
@example(rows=[("a", False, False), ("b", True, True), ("c/d", True, True)]).via("discovered failure")
@given(rows=st.lists(st.tuples(st.one_of(valid_ids, hostile_ids), st.booleans(), st.booleans()), min_size=2,
                     max_size=6).filter(lambda r: not (r[0][1] and r[0][2])))
def test_manifest_names_the_right_rows_when_files_are_missing(rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.ecsv"
        Table({"ccd": [r[0] for r in rows], "search": ["s.fits" if r[1] else "" for r in rows],
               "template": ["t.fits" if r[2] else "" for r in rows]}).write(path, format="ascii.ecsv")
        ids, bad_ids = _oracle(path)
        if ids is None:
            return
        table = Table.read(path, format="ascii.ecsv")
        bad = sorted(set(bad_ids) | {k for k, row in enumerate(table, start=1)
                                     if any(np.ma.is_masked(row[c]) or not str(row[c]).strip()
                                            for c in ("search", "template"))})
        with pytest.raises(InputError) as info:
            read_manifest(path)
        named = {int(k) for k in re.findall(_ROW_NAMED, str(info.value))}
        assert named <= set(bad) and bad[0] in named, f"bad rows {bad}, message names {sorted(named)}: {info.value}"


# ============================================================================ catalogs

_FLOAT_SPECIALS = (np.nan, np.inf, -np.inf, -0.0, 1e308, 5e-324, -1e-300)
_FLOAT_COLUMNS = ("x", "y", "ra", "dec", "flux", "flux_err", "snr")


def _catalog(ccd: str, n: int, seed: int, specials: list, mode: str, model: str, special_rate: float = 0.0) -> Table:
    """A candidate table as the pipeline builds one: CandidateTable.from_columns, then finalize_candidates.

    ``specials`` (column, row, value) and, at ``special_rate``, random cells get NaN / inf / -0.0 /
    extreme values; the ids are arbitrary int64 (their extremes included)."""
    rng = np.random.default_rng(seed)
    cols = {
        "ccd": [ccd] * n,
        "id": rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64, endpoint=True),
        "x": rng.uniform(0, 2048, n), "y": rng.uniform(0, 4096, n),
        "ra": rng.uniform(0, 360, n), "dec": rng.uniform(-90, 90, n),
        "flux": rng.normal(0, 1e4, n), "flux_err": rng.uniform(0, 100, n), "snr": rng.normal(5, 20, n),
        "flags": rng.integers(0, 32, n, dtype=np.int32),
    }
    if mode == "direct":  # the direct detector's extra columns
        cols.update(search_flux=rng.normal(0, 1e3, n), template_flux=rng.normal(0, 1e3, n),
                    delta_snr=rng.normal(0, 5, n))
    scores = rng.random(n).astype(np.float32)
    if n:
        cells = [(c, r, v) for c, r, v in specials]
        for r, c in zip(*np.nonzero(rng.random((n, len(_FLOAT_COLUMNS) + 1)) < special_rate)):
            value = _FLOAT_SPECIALS[rng.integers(len(_FLOAT_SPECIALS))]
            cells.append(((_FLOAT_COLUMNS + ("score",))[c], int(r), value))
        for col, row, value in cells:
            if col == "score":
                with np.errstate(over="ignore"):  # 1e308 -> inf in float32, on purpose
                    scores[row % n] = np.float32(value)
            else:
                cols[col][row % n] = value
    table = CandidateTable.from_columns(**cols)
    config = RunConfig(mode=mode, model_dia=model, model_direct=model)
    return finalize_candidates(table, scores, config, None)


def _write_like_stage_write(out: Path, ccd: str, table: Table) -> Path:
    """What pipeline.graph._stage_write does with the finished table."""
    return write_catalog(table, ccd_paths(out, ccd)["catalog"])


def _assert_rows_equal(merged: Table, expected: list[Table]) -> None:
    """``merged`` holds exactly the rows of ``expected`` in order, bit for bit (NaN, inf, -0.0 kept)."""
    if not expected:
        assert len(merged) == 0
        return
    names = expected[0].colnames
    assert merged.colnames == names
    assert len(merged) == sum(len(t) for t in expected)
    assert not merged.masked and not any(hasattr(merged[c], "mask") for c in names), "masked columns came back"
    for name in names:
        want = np.concatenate([np.asarray(t[name]) for t in expected])
        got = np.asarray(merged[name])
        if want.dtype.kind == "U":
            assert got.dtype.kind == "U", f"column {name} came back as {got.dtype}, not str"
            assert got.tolist() == want.tolist(), f"column {name}"
        else:
            # same kind and width (FITS hands back big-endian arrays: byte order is not a property)
            assert (got.dtype.kind, got.dtype.itemsize) == (want.dtype.kind, want.dtype.itemsize), \
                f"column {name}: {got.dtype} != {want.dtype}"
            np.testing.assert_array_equal(got, want, err_msg=f"column {name}")
            if want.dtype.kind == "f":
                assert np.array_equal(np.signbit(got), np.signbit(want)), f"column {name}: sign of zero lost"


_specials = st.lists(st.tuples(st.sampled_from(_FLOAT_COLUMNS + ("score",)), st.integers(0, 49),
                               st.sampled_from(_FLOAT_SPECIALS)), max_size=8)
#: Valid ids of any allowed length.
_catalog_ids = st.lists(valid_ids, min_size=1, max_size=5, unique_by=str.lower)
#: Valid ids longer than 32 characters (the old width of the catalogs' ccd column).
_long_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_+-]{32,63}", fullmatch=True)
_models = st.sampled_from(["triplet", "pair-direct", "pair-paper", "triplet-paper"])


@_settings(30)
@given(ids=_catalog_ids, counts=st.lists(st.integers(0, 50), min_size=5, max_size=5),
       seed=st.integers(0, 2**32 - 1), specials=_specials, special_rate=st.sampled_from([0.0, 0.05, 0.5]),
       mode=st.sampled_from(["dia", "direct"]), model=_models, order_seed=st.integers(0, 2**32 - 1),
       failed_rewrite=st.booleans())
def test_catalogs_come_back_complete_in_manifest_order(ids, counts, seed, specials, special_rate, mode, model,
                                                       order_seed, failed_rewrite):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tables = {}
        for k in np.random.default_rng(order_seed).permutation(len(ids)):  # write order != manifest order
            ccd = ids[k]
            tables[ccd] = _catalog(ccd, counts[k], seed + int(k), specials, mode, model, special_rate)
            _write_like_stage_write(out, ccd, tables[ccd])

        if failed_rewrite:  # a write that dies half-way leaves the earlier catalog and no temporary
            path = ccd_paths(out, ids[-1])["catalog"]
            before = path.read_bytes()
            with pytest.raises(OSError, match="simulated"), atomic_path(path) as tmp_path:
                tmp_path.write_bytes(before[: len(before) // 2])
                raise OSError("disk full (simulated)")
            assert path.read_bytes() == before

        folder = out / "ccds"
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{c}.fits" for c in ids), "leftover files"
        assert not list(folder.glob(".*.tmp"))
        assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 & ~_UMASK for p in folder.iterdir()), \
            "catalogs not readable as a plain open() would make them (umask)"

        errors: dict[str, str] = {}
        merged = collect_catalog(out, list(ids), errors)
        assert errors == {}
        _assert_rows_equal(merged, [tables[c] for c in ids])
        assert merged["ccd"].tolist() == [c for k, c in enumerate(ids) for _ in range(counts[k])]
        assert set(merged["mode"].tolist()) <= {mode} and set(merged["model"].tolist()) <= {model}


def _damage(path: Path, kind: str, frac: float, seed: int) -> None:
    """Break a catalog the ways a crash, a full disk or a stray tool would (never its data bytes alone)."""
    data = path.read_bytes()
    with fits.open(path) as hdul:
        header_end = hdul[1].fileinfo()["datLoc"]  # first byte of the table's data
    end_card = data.rfind(b"END" + b" " * 77, 0, header_end)  # the table header's END card
    rng = np.random.default_rng(seed)
    if kind == "truncate":
        path.write_bytes(data[: int(frac * (len(data) - 1))])
    elif kind == "truncate_block":  # cut at a 2880-byte FITS block boundary
        path.write_bytes(data[: 2880 * int(frac * (len(data) // 2880 - 1))])
    elif kind == "header_garbage":  # random bytes from somewhere in the headers (END included) to the end
        cut = int(frac * end_card)
        path.write_bytes(data[:cut] + rng.integers(0, 256, len(data) - cut, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing":
        path.unlink()
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    elif kind == "text":
        path.write_text("ccd id x y\nccd01 1 2.0 3.0\n")
    elif kind == "image":  # a FITS file, but no table in it
        fits.PrimaryHDU(np.zeros((4, 4), np.float32)).writeto(path, overwrite=True)
    else:  # pragma: no cover
        raise AssertionError(kind)


_DAMAGE = ("truncate", "truncate_block", "header_garbage", "empty", "missing", "directory", "text", "image")


@pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")  # "may have been truncated"
@pytest.mark.filterwarnings("ignore::astropy.io.fits.verify.VerifyWarning")
@_settings(40)
@given(ids=_catalog_ids, counts=st.lists(st.integers(0, 50), min_size=5, max_size=5),
       seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["dia", "direct"]), model=_models,
       broken=st.integers(0, 4), kind=st.sampled_from(_DAMAGE), frac=st.floats(0, 1))
def test_a_damaged_catalog_is_reported_and_the_others_survive(ids, counts, seed, mode, model, broken, kind, frac):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tables = {ccd: _catalog(ccd, counts[k], seed + k, [], mode, model, 0.05) for k, ccd in enumerate(ids)}
        for ccd, table in tables.items():
            _write_like_stage_write(out, ccd, table)
        bad = ids[broken % len(ids)]
        _damage(ccd_paths(out, bad)["catalog"], kind, frac, seed)

        errors: dict[str, str] = {}
        merged = collect_catalog(out, list(ids), errors)
        assert set(errors) <= {bad}, f"intact catalogs reported: {errors}"
        if bad in errors:
            assert str(ccd_paths(out, bad)["catalog"]) in errors[bad]
            _assert_rows_equal(merged, [tables[c] for c in ids if c != bad])
        else:
            # only a cut through the trailing FITS padding may still read; then nothing may be lost
            assert kind.startswith("truncate"), f"{kind} catalog of {bad!r} not reported"
            _assert_rows_equal(merged, [tables[c] for c in ids])


@pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")
@_settings(15)
@example(byte=0xFF, column="ccd", bad=0, n_ccds=2).via("discovered failure")
@given(byte=st.integers(0x80, 0xFF), column=st.sampled_from(["ccd", "mode", "model"]), bad=st.integers(0, 2),
       n_ccds=st.integers(1, 3))
def test_a_non_ascii_string_cell_does_not_stop_the_merge(byte, column, bad, n_ccds):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ids = [f"ccd{k:02d}" for k in range(n_ccds)]
        tables = {c: _catalog(c, 3, k, [], "dia", "triplet") for k, c in enumerate(ids)}
        for c, t in tables.items():
            _write_like_stage_write(out, c, t)
        broken = ids[bad % n_ccds]
        path = ccd_paths(out, broken)["catalog"]
        with fits.open(path) as hdul:
            hdu = hdul[1]
            offset = hdu.fileinfo()["datLoc"] + hdu.data.dtype.fields[column][1]  # the cell of row 0
        data = bytearray(path.read_bytes())
        data[offset] = byte
        path.write_bytes(bytes(data))
        errors: dict[str, str] = {}
        merged = collect_catalog(out, ids, errors)  # must not raise
        assert set(errors) <= {broken}
        kept = [tables[c] for c in ids if c not in errors]
        assert len(merged) == sum(len(t) for t in kept)


@_settings(20)
@example(n=40, seed=1, start=0.0, length=3000, zeros=True).via("discovered failure")
@given(n=st.integers(1, 50), seed=st.integers(0, 2**32 - 1), start=st.floats(0, 1), length=st.integers(1, 4000),
       zeros=st.booleans())
def test_in_place_corruption_of_catalog_data_is_reported(n, seed, start, length, zeros):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        table = _catalog("ccd01", n, seed, [], "dia", "triplet")
        path = _write_like_stage_write(out, "ccd01", table)
        data = bytearray(path.read_bytes())
        with fits.open(path) as hdul:
            begin = hdul[1].fileinfo()["datLoc"]
            end = begin + hdul[1].header["NAXIS1"] * hdul[1].header["NAXIS2"]  # the rows, no padding
        first = begin + int(start * (end - begin - 1))
        last = min(first + length, end)
        noise = bytes(last - first) if zeros else np.random.default_rng(seed).integers(0, 256, last - first,
                                                                                       dtype=np.uint8).tobytes()
        if data[first:last] == noise:
            return
        data[first:last] = noise
        path.write_bytes(bytes(data))
        errors: dict[str, str] = {}
        merged = collect_catalog(out, ["ccd01"], errors)
        if "ccd01" not in errors:  # not reported: then it must at least be what was written
            _assert_rows_equal(merged, [table])


@_settings(15)
@example(ids=["c" * 32 + "-a", "c" * 32 + "-b"]).via("discovered failure")
@given(ids=st.lists(_long_ids, min_size=1, max_size=3, unique_by=str.lower))
def test_catalog_ccd_column_names_its_ccd_for_every_valid_id(ids):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for k, ccd in enumerate(ids):
            _write_like_stage_write(out, ccd, _catalog(ccd, 2, k, [], "dia", "triplet"))
        errors: dict[str, str] = {}
        merged = collect_catalog(out, list(ids), errors)
        assert not errors
        assert merged["ccd"].tolist() == [c for c in ids for _ in range(2)]
