"""The README's Python API example runs as written and finds the injected transients."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from astropy.table import Table

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_api_example_runs_and_finds_the_transients(sim_field, tmp_path, monkeypatch):
    blocks = _python_blocks(README.read_text())
    assert len(blocks) == 1, "the README has one Python example"
    manifest = Table.read(sim_field, format="ascii.ecsv")
    row = manifest[0]
    folder = Path(sim_field).parent
    # the example reads search.fits and template.fits from the working directory
    os.symlink(folder / row["search"], tmp_path / "search.fits")
    os.symlink(folder / row["template"], tmp_path / "template.fits")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - the documented example
    catalog = namespace["catalog"]
    truth = Table.read(folder / row["truth"], format="ascii.ecsv")
    transients = truth[truth["kind"] == "transient"]
    real = catalog[catalog["score"] >= 0.5]
    # most injected transients are among the candidates the example prints, at their injected positions
    d = np.hypot(np.asarray(real["x"])[:, None] - np.asarray(transients["x"])[None, :],
                 np.asarray(real["y"])[:, None] - np.asarray(transients["y"])[None, :])
    found = (d.min(axis=0) < 2.0).sum()
    assert found >= 0.6 * len(transients), (found, len(transients))
    assert np.isfinite(np.asarray(real["mag"])).all()
