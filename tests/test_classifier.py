"""Tests of classifier/: stamp sets, normalisation, models, metrics, training, inference, saliency."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from classifier.data import StampSet
from classifier.evaluate import (accuracy, confusion_matrix, evaluate_scores, missed_detection_rate,
                                 roc_auc, roc_curve)
from classifier.infer import Scorer, WeightsError, load_weights
from classifier.models import MODELS, build_model, count_parameters, get_spec, prepare_input
from classifier.normalize import normalize_stamps
from classifier.saliency import saliency_maps, saliency_table
from classifier.synthetic import make_synthetic_set
from classifier.train import TrainConfig, save_weights, train_model


@pytest.fixture(scope="module")
def small_set() -> StampSet:
    return make_synthetic_set(800, seed=1, snr_range=(8.0, 60.0)).split_by_ccd(seed=0)


def _fast_config(**kw) -> TrainConfig:
    base = dict(epochs=6, batch_size=64, optimizer="adamw", lr=3e-3, progress=False, threads=2, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained_pair(small_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("pair-paper")
    result = train_model("pair-paper", small_set.select("train"), small_set.select("val"), _fast_config(epochs=10), out,
                         device="cpu")
    return out, result


# ----------------------------------------------------------------------------- models


def test_paper_parameter_counts():
    assert count_parameters(build_model("triplet-paper")) == 126_050
    assert count_parameters(build_model("pair-paper")) == 45_908


@pytest.mark.parametrize("name", list(MODELS))
def test_models_forward_shapes(name):
    stamps = np.random.default_rng(0).normal(size=(3, 3, 51, 51)).astype(np.float32)
    x = prepare_input(stamps, name)
    spec = get_spec(name)
    expected = {"triplet-paper": (3, 1, 51, 153), "pair-paper": (3, 1, 51, 102),
                "triplet": (3, 3, 51, 51), "pair": (3, 2, 51, 51)}[name]
    assert x.shape == expected
    with torch.no_grad():
        assert build_model(name).eval()(torch.from_numpy(x)).shape == (3, 2)
    assert spec.layout in ("side-by-side", "channels")


@pytest.mark.parametrize("name", list(MODELS))
def test_inference_form_equals_forward(name):
    """Each model's fast CPU inference form gives the logits of its eval-mode forward (BatchNorm
    with non-trivial running statistics folded in), in both memory layouts."""
    torch.manual_seed(2)
    net = build_model(name)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    stamps = make_synthetic_set(40, seed=4).stamps
    x = torch.as_tensor(prepare_input(stamps, get_spec(name)))
    with torch.inference_mode():
        ref = net(x)
        for layout in (torch.contiguous_format, torch.channels_last):
            torch.testing.assert_close(net.infer(x.contiguous(memory_format=layout)), ref, rtol=0, atol=1e-5)


def test_scorer_chunks_do_not_change_scores(tmp_path):
    torch.manual_seed(3)
    path = save_weights(build_model("triplet-paper"), get_spec("triplet-paper"), tmp_path / "t.pt")
    stamps = make_synthetic_set(100, seed=5).stamps
    net, spec, _, _ = load_weights(path)
    with torch.inference_mode():
        ref = torch.softmax(net(torch.as_tensor(prepare_input(stamps, spec))), 1)[:, 1].numpy()
    for chunk in (1, 7, 64, 500):
        np.testing.assert_allclose(Scorer(path, batch_size=33, cpu_chunk=chunk).score(stamps), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cpu_chunk"):
        Scorer(path, cpu_chunk=0)


def test_paper_panel_order():
    """triplet-paper input is [difference | search | template], pair-paper [search | template]."""
    stamps = np.zeros((1, 3, 51, 51), np.float32)
    for c in range(3):
        stamps[0, c] = np.random.default_rng(c).normal(size=(51, 51)) * (c + 1)
    x = prepare_input(stamps, "triplet-paper")[0, 0]
    norm = normalize_stamps(stamps, "paper")[0]
    np.testing.assert_allclose(x[:, :51], norm[2], atol=1e-6)
    np.testing.assert_allclose(x[:, 51:102], norm[1], atol=1e-6)
    np.testing.assert_allclose(x[:, 102:], norm[0], atol=1e-6)
    xp = prepare_input(stamps, "pair-paper")[0, 0]
    np.testing.assert_allclose(xp[:, :51], norm[1], atol=1e-6)
    np.testing.assert_allclose(xp[:, 51:], norm[0], atol=1e-6)


# ----------------------------------------------------------------------------- normalisation


def test_paper_minmax_hand_example():
    """49 pixels at 0, 50 at 2, one outlier at 1000: mean 11, std ~99.4, so 0..2 -> 0..1, outlier kept."""
    vals = np.array([0.0] * 49 + [2.0] * 50 + [1000.0], np.float32).reshape(1, 1, 10, 10)
    out = normalize_stamps(vals, "paper", ("template",))
    flat = out.ravel()
    np.testing.assert_allclose(flat[:49], 0.0, atol=1e-6)
    np.testing.assert_allclose(flat[49:99], 1.0, atol=1e-6)
    np.testing.assert_allclose(flat[99], 500.0, rtol=1e-5)


def test_paper_normalisation_definition():
    rng = np.random.default_rng(5)
    stamps = rng.normal(300.0, 7.0, size=(4, 3, 51, 51)).astype(np.float32)
    stamps[:, :, 25, 25] += 5000.0  # a bright star's peak: an outlier
    stamps[:, :, 10, 40] -= 3000.0  # a dead pixel: an outlier below the range
    out = normalize_stamps(stamps, "paper")
    d = out[:, 2].reshape(4, -1)
    np.testing.assert_allclose(d.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.std(1), 1.0, atol=1e-5)
    for i in range(4):
        for c in (0, 1):
            x = stamps[i, c].astype(np.float64)
            inside = np.abs(x - x.mean()) <= 3 * x.std()
            y = out[i, c]
            assert y[inside].min() == pytest.approx(0.0, abs=1e-6)
            assert y[inside].max() == pytest.approx(1.0, abs=1e-6)
            assert y[25, 25] > 10.0  # the outlier keeps its linear value
            assert y[10, 40] < -5.0
            # linear: y = a x + b on every pixel
            a, b = np.polyfit(x.ravel(), y.ravel(), 1)
            np.testing.assert_allclose(y, a * x + b, atol=1e-4)


def test_normalisation_nan_pixels_deterministic():
    rng = np.random.default_rng(6)
    stamps = rng.normal(100.0, 3.0, size=(2, 3, 51, 51)).astype(np.float32)
    with_nan = stamps.copy()
    with_nan[:, :, :, :10] = np.nan
    for scheme in ("paper", "shared"):
        out = normalize_stamps(with_nan, scheme)
        assert np.isfinite(out).all()
        assert (out[:, :, :, :10] == 0).all()
        # valid pixels use statistics of valid pixels only: same as normalising the cropped stamp
        ref = normalize_stamps(np.ascontiguousarray(stamps[:, :, :, 10:]), scheme)
        np.testing.assert_allclose(out[:, :, :, 10:], ref, atol=1e-5)
        np.testing.assert_array_equal(out, normalize_stamps(with_nan, scheme))


def test_shared_scheme_keeps_flux_ratio():
    rng = np.random.default_rng(7)
    search = rng.normal(0.0, 5.0, size=(3, 51, 51)).astype(np.float32)
    search[:, 20:30, 20:30] += 200.0
    stamps = np.stack([0.5 * search + 40.0, search + 700.0, search], axis=1)
    out = normalize_stamps(stamps, "shared")
    np.testing.assert_allclose(np.sinh(out[:, 0]), 0.5 * np.sinh(out[:, 1]), rtol=1e-4, atol=1e-4)


def test_constant_stamp_maps_to_zero():
    out = normalize_stamps(np.full((1, 3, 51, 51), 7.0, np.float32), "paper")
    assert np.isfinite(out).all() and (out == 0).all()


# ----------------------------------------------------------------------------- metrics


def test_auc_of_known_ranking():
    labels = np.array([1, 0, 1, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2])
    assert roc_auc(labels, scores) == pytest.approx(3 / 6)
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5  # a tie counts one half
    fpr, tpr, _ = roc_curve(labels, scores)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.5)


def test_missed_detection_rate_at_fpr():
    bogus = np.arange(100, dtype=float)           # 0 .. 99
    real = 50.0 + 0.5 * np.arange(100)            # 50 .. 99.5
    labels = np.r_[np.zeros(100, int), np.ones(100, int)]
    scores = np.r_[bogus, real]
    # FPR <= 1%: only the bogus at 99 may pass -> reals 99.5, 99, 98.5 pass -> MDR 97/100
    mdr, thr = missed_detection_rate(labels, scores, 0.01)
    assert mdr == pytest.approx(0.97) and thr == 98.5
    mdr3, thr3 = missed_detection_rate(labels, scores, 0.03)
    assert mdr3 == pytest.approx(0.93) and thr3 == 96.5


def test_confusion_accuracy_and_breakdowns():
    labels = np.array([1, 1, 0, 0, 1])
    scores = np.array([0.9, 0.2, 0.6, 0.1, 0.5])
    assert confusion_matrix(labels, scores) == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    assert accuracy(labels, scores) == pytest.approx(3 / 5)
    meta = {"snr": np.array([4.0, 6.0, 4.5, 30.0, 6.5]), "kind": np.array(["t", "t", "cr", "star", "t"])}
    res = evaluate_scores(labels, scores, meta)
    rows = {(r["lo"], r["hi"]): r for r in res.per_snr}
    assert rows[(0.0, 5.0)]["n"] == 2 and rows[(0.0, 5.0)]["accuracy"] == 0.5
    assert rows[(5.0, 7.0)]["efficiency"] == 0.5
    kinds = {r["kind"]: r for r in res.per_kind}
    assert kinds["cr"]["accuracy"] == 0.0 and kinds["star"]["accuracy"] == 1.0
    d = res.to_dict()
    assert d["confusion"]["tp"] == 2 and "roc" in d


# ----------------------------------------------------------------------------- data sets


def test_stampset_roundtrip_balance_split(tmp_path):
    s = make_synthetic_set(300, seed=2, n_ccds=12)
    unbalanced = s.subset(np.flatnonzero((s.labels == 0) | (np.arange(300) % 3 == 0)))
    bal = unbalanced.balance(seed=1)
    assert (bal.labels == 1).sum() == (bal.labels == 0).sum() == (unbalanced.labels == 1).sum()
    split = s.split_by_ccd((0.7, 0.1, 0.2), seed=4)
    ccd_split = {}
    for c, sp in zip(split.meta["ccd"], split.meta["split"]):
        assert ccd_split.setdefault(c, sp) == sp  # no CCD in two splits
    assert set(split.meta["split"]) == {"train", "val", "test"}
    path = split.save(tmp_path / "set.npz")
    back = StampSet.load(path)
    np.testing.assert_array_equal(back.stamps, split.stamps)
    np.testing.assert_array_equal(back.labels, split.labels)
    for k in split.meta:
        np.testing.assert_array_equal(back.meta[k], split.meta[k])
    assert back.attrs["split"]["method"] == "ccd"
    assert len(StampSet.concatenate([back.select("train"), back.select("test")])) == \
        (split.meta["split"] != "val").sum()


def test_stampset_load_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="bad.npz"):
        StampSet.load(bad)
    np.savez(tmp_path / "partial.npz", stamps=np.zeros((1, 3, 51, 51), np.float32))
    with pytest.raises(ValueError, match="partial.npz.*labels"):
        StampSet.load(tmp_path / "partial.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        StampSet.load(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- training and inference


def test_model_learns_small_set(trained_pair, small_set):
    out, result = trained_pair
    test = small_set.select("test")
    scores = Scorer(out).score(test.stamps)
    assert accuracy(test.labels, scores) > 0.72  # chance: 0.5
    assert roc_auc(test.labels, scores) > 0.8
    assert (out / "history.json").is_file() and (out / "last.pt").is_file()
    assert result.val_metrics["val_accuracy"] > 0.7


def test_resume_matches_uninterrupted(small_set, tmp_path):
    train = small_set.select("train").subset(np.arange(200))
    val = small_set.select("val")
    cfg = _fast_config(epochs=3, batch_size=50)
    full = train_model("pair-paper", train, val, cfg, tmp_path / "full", device="cpu")

    class Killed(Exception):
        pass

    def kill_after_two(epoch, record):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train_model("pair-paper", train, val, cfg, tmp_path / "resumed", device="cpu", callback=kill_after_two)
    resumed = train_model("pair-paper", train, val, cfg, tmp_path / "resumed", device="cpu", resume=True)
    assert resumed.epochs_run == full.epochs_run == 3
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [h["val_loss"] for h in full.history] == [h["val_loss"] for h in resumed.history]


def test_resume_extends_a_finished_constant_lr_run(small_set, tmp_path):
    """With a constant learning rate, a finished run resumed with a higher epoch limit continues
    exactly as a run started with that limit; a cosine schedule (which depends on it) refuses."""
    train = small_set.select("train").subset(np.arange(200))
    val = small_set.select("val")
    full = train_model("pair-paper", train, val, _fast_config(epochs=3, batch_size=50), tmp_path / "full", device="cpu")
    train_model("pair-paper", train, val, _fast_config(epochs=2, batch_size=50), tmp_path / "ext", device="cpu")
    ext = train_model("pair-paper", train, val, _fast_config(epochs=3, batch_size=50), tmp_path / "ext", device="cpu",
                      resume=True)
    assert ext.epochs_run == 3
    assert [h["val_loss"] for h in full.history] == [h["val_loss"] for h in ext.history]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ext" / "last.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    cos = dict(batch_size=50, schedule="cosine")
    train_model("pair-paper", train, val, _fast_config(epochs=1, **cos), tmp_path / "cos", device="cpu")
    with pytest.raises(ValueError, match="different config.*epochs"):
        train_model("pair-paper", train, val, _fast_config(epochs=2, **cos), tmp_path / "cos", device="cpu", resume=True)


def test_pair_scorer_ignores_difference(trained_pair, small_set):
    out, _ = trained_pair
    scorer = Scorer(out, batch_size=37)
    stamps = small_set.stamps[:100].copy()
    s1 = scorer.score(stamps)
    stamps[:, 2] = np.random.default_rng(0).normal(size=stamps[:, 2].shape)
    np.testing.assert_array_equal(s1, scorer.score(stamps))
    np.testing.assert_array_equal(s1, scorer.score(np.ascontiguousarray(stamps[:, :2]), ("template", "search")))
    assert ((s1 >= 0) & (s1 <= 1)).all()


def test_weights_errors(trained_pair, tmp_path):
    out, _ = trained_pair
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((out / "model.pt").read_bytes()[:300])
    with pytest.raises(WeightsError, match="corrupt.pt.*corrupt"):
        Scorer(corrupt)
    with pytest.raises(WeightsError, match="not found"):
        Scorer(tmp_path / "nothing.pt")
    # pair-paper weights labelled as triplet-paper: keys/shapes do not fit
    obj = torch.load(out / "model.pt", weights_only=True)
    obj["metadata"]["model"] = get_spec("triplet-paper").metadata()
    wrong = tmp_path / "wrong_arch.pt"
    torch.save(obj, wrong)
    with pytest.raises(WeightsError, match="wrong_arch.pt.*triplet-paper"):
        load_weights(wrong)
    # metadata contradicting the registered model
    obj = torch.load(out / "model.pt", weights_only=True)
    obj["metadata"]["model"]["scheme"] = "shared"
    mism = tmp_path / "mismatch.pt"
    torch.save(obj, mism)
    with pytest.raises(WeightsError, match="mismatch.pt.*scheme"):
        load_weights(mism)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="other.pt"):
        load_weights(tmp_path / "other.pt")


def test_save_weights_roundtrip(tmp_path):
    net = build_model("triplet")
    path = save_weights(net, get_spec("triplet"), tmp_path / "t.pt", note="x")
    loaded, spec, meta, _ = load_weights(path)
    assert spec.name == "triplet" and meta["note"] == "x"
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


# ----------------------------------------------------------------------------- saliency


@pytest.mark.parametrize("name", list(MODELS))
def test_saliency_fractions_sum_to_one(name):
    torch.manual_seed(0)
    net = build_model(name)
    stamps = make_synthetic_set(12, seed=3).stamps
    res = saliency_maps(net, get_spec(name), stamps, batch_size=5)
    assert res.fractions.shape == (12, len(get_spec(name).channels))
    np.testing.assert_allclose(res.fractions.sum(1), 1.0, atol=1e-6)
    assert (res.fractions >= 0).all() and res.maps.shape[2:] == (51, 51)


def test_saliency_maps_follow_the_input_stamp():
    """A model that only reads the search panel puts all its saliency there."""
    spec = get_spec("triplet-paper")
    net = build_model("triplet-paper")
    stamps = make_synthetic_set(6, seed=4).stamps

    class SearchOnly(torch.nn.Module):
        def forward(self, x):
            s = x[..., 51:102].mean(dim=(1, 2, 3))
            return torch.stack([-s, s], 1)

    res = saliency_maps(SearchOnly(), spec, stamps)
    k = res.channels.index("search")
    np.testing.assert_allclose(res.fractions[:, k], 1.0)
    labels = np.array([1, 0, 1, 0, 1, 0])
    table = saliency_table(res, labels)
    assert sum(row["n"] for row in table.values()) == 6
    del net
