"""DES autoScan loader on a small tree in the release layout, made here."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from classifier.autoscan import load_autoscan, read_autoscan_labels


def _write(path, arr, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "gif":
        Image.fromarray(arr.astype(np.uint8), mode="L").save(path.with_suffix(".gif"))
    elif fmt == "fits.gz":
        fits.PrimaryHDU(arr.astype(np.float32)).writeto(path.with_name(path.name + ".fits.gz"))
    else:
        fits.PrimaryHDU(arr.astype(np.float32)).writeto(path.with_suffix(".fits"))


@pytest.fixture()
def tree(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "autoscan"
    truth = {}
    # IDs 100..129: OBJECT_TYPE 0 (real) for even IDs < 112, else bogus -> 6 real, 24 bogus
    lines = ["# autoScan features", "# release 3", "# columns documented elsewhere", "# OBJECT_TYPE 0=real",
             "# 1=bogus", "# end of comments", "ID,OBJECT_TYPE,CCDID,SNR,MAG"]
    for oid in range(100, 130):
        otype = 0 if (oid < 112 and oid % 2 == 0) else 1
        if oid != 128:  # 128 has stamps but no label
            lines.append(f"{oid},{otype},{oid % 5 + 1},{10 + oid % 7},{21.5}")
        fmt = ["fits", "gif", "fits.gz"][oid % 3]
        folder = root / f"stamps{oid // 10}" / f"sub{oid % 2}"
        stamps = {}
        for prefix in ("temp", "srch", "diff"):
            if oid == 105 and prefix == "diff":
                continue  # missing stamp
            arr = rng.integers(0, 255, size=(51, 51))
            _write(folder / f"{prefix}{oid}", arr, fmt)
            stamps[prefix] = arr
        truth[oid] = (otype, stamps)
    (root / "autoscan_features.3.csv").write_text("\n".join(lines) + "\n")
    return root, truth


def test_labels_file(tree):
    root, _ = tree
    cols = read_autoscan_labels(root / "autoscan_features.3.csv")
    assert cols["ID"].size == 29 and set(cols["OBJECT_TYPE"].tolist()) == {0, 1}


def test_loader_labels_stamps_and_split(tree):
    root, truth = tree
    full = load_autoscan(root, balance=False, split="none")
    ids = full.meta["truth_id"].tolist()
    assert 105 not in ids and 128 not in ids and len(ids) == 28
    assert full.channels == ("template", "search", "difference")
    for k, oid in enumerate(ids):
        otype, stamps = truth[oid]
        assert full.labels[k] == (1 if otype == 0 else 0)  # OBJECT_TYPE 0 = real -> label 1
        np.testing.assert_array_equal(full.stamps[k, 0], stamps["temp"])
        np.testing.assert_array_equal(full.stamps[k, 1], stamps["srch"])
        np.testing.assert_array_equal(full.stamps[k, 2], stamps["diff"])
        assert full.meta["ccd"][k] == f"ccd{oid % 5 + 1}"
    assert full.attrs["stream"] == "autoscan"

    bal = load_autoscan(root, seed=3)
    n_real = int(full.labels.sum())
    assert (bal.labels == 1).sum() == (bal.labels == 0).sum() == n_real
    assert set(bal.meta["split"]) <= {"train", "val", "test"} and "train" in set(bal.meta["split"])
    for sp in ("train", "test"):
        sub = bal.select(sp)
        assert (sub.labels == 1).sum() == (sub.labels == 0).sum()  # the random split is balanced too


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_autoscan(tmp_path / "nowhere")
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="autoscan_features"):
        load_autoscan(tmp_path / "a")
