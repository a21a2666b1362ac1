"""Tests of classifier/: stamp sets, normalisation, models, metrics, training, inference, saliency."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from classifier.data import StampSet
from classifier.evaluate import accuracy, confusion_matrix, evaluate_scores, missed_detection_rate, roc_auc, roc_curve
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
                "triplet": (3, 3, 51, 51), "pair": (3, 2, 51, 51), "pair-sky": (3, 2, 51, 51),
                "pair-sky-lite": (3, 2, 51, 51)}[name]
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
        train_model("pair-paper", train, val, _fast_config(epochs=2, **cos), tmp_path / "cos", device="cpu",
                    resume=True)


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


class _Linear(torch.nn.Module):
    """Logits ``(0, <w, x> + b)``: P(real) = sigmoid(<w, x> + b), so dP/dx = P (1 - P) w exactly."""

    def __init__(self, w: np.ndarray, b: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.as_tensor(w))
        self.b = b

    def forward(self, x):
        s = (x * self.w).sum(dim=(1, 2, 3)) + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


#: where each model's input holds the template and the search stamps (the documented layouts):
#: (channel, columns)
_PANELS = {"triplet-paper": {"template": (0, slice(102, 153)), "search": (0, slice(51, 102))},  # [diff | srch | tmpl]
           "pair-paper": {"template": (0, slice(51, 102)), "search": (0, slice(0, 51))},  # [search | template]
           "triplet": {"template": (0, slice(0, 51)), "search": (1, slice(0, 51))},
           "pair": {"template": (0, slice(0, 51)), "search": (1, slice(0, 51))},
           "pair-sky": {"template": (0, slice(0, 51)), "search": (1, slice(0, 51))},
           "pair-sky-lite": {"template": (0, slice(0, 51)), "search": (1, slice(0, 51))}}


@pytest.mark.parametrize("name", list(MODELS))
def test_saliency_of_a_linear_model_is_its_hand_gradient(name):
    """A linear model that reads the template and search stamps only: each map is P (1 - P) |w|
    over its stamp, computed by hand; the difference map is zero; the fractions are the shares of
    sum |w| (P (1 - P) cancels): template 2/3, search 1/3."""
    spec = get_spec(name)
    stamps = make_synthetic_set(12, seed=3).stamps
    x = prepare_input(stamps, spec).astype(np.float64)
    rng = np.random.default_rng(0)
    w = np.zeros(x.shape[1:], np.float32)
    for stamp, share in (("template", 2.0), ("search", 1.0)):
        ch, cols = _PANELS[name][stamp]
        v = rng.normal(0.0, 0.01, (51, 51))  # signed: saliency is |grad|
        w[ch, :, cols] = share * v / np.abs(v).sum()
    p = 1.0 / (1.0 + np.exp(-((x * w).sum(axis=(1, 2, 3)) + 0.3)))
    assert (p * (1 - p)).min() > 0.01  # not saturated: the gradient is not ~0
    res = saliency_maps(_Linear(w, 0.3), spec, stamps, batch_size=5)  # batches of 5, 5, 2
    assert res.channels == spec.channels and res.maps.shape == (12, len(spec.channels), 51, 51)
    np.testing.assert_allclose(res.scores, p, rtol=1e-5)
    for stamp, share in (("template", 2 / 3), ("search", 1 / 3)):
        k = res.channels.index(stamp)
        ch, cols = _PANELS[name][stamp]
        expected = (p * (1 - p))[:, None, None] * np.abs(w[ch, :, cols])[None]
        np.testing.assert_allclose(res.maps[:, k], expected, rtol=1e-4, atol=1e-10)
        np.testing.assert_allclose(res.fractions[:, k], share, rtol=1e-4)
    if "difference" in res.channels:
        assert (res.maps[:, res.channels.index("difference")] == 0).all()
        assert (res.fractions[:, res.channels.index("difference")] == 0).all()


def test_saliency_maps_follow_the_input_stamp():
    """A model that only reads the search panel puts all its saliency there."""
    spec = get_spec("triplet-paper")
    stamps = make_synthetic_set(6, seed=4).stamps

    class SearchOnly(torch.nn.Module):
        def forward(self, x):
            s = x[..., 51:102].mean(dim=(1, 2, 3))
            return torch.stack([-s, s], 1)

    res = saliency_maps(SearchOnly(), spec, stamps)
    k = res.channels.index("search")
    np.testing.assert_allclose(res.fractions[:, k], 1.0)


def test_saliency_table_groups_by_outcome():
    """Mean fractions of hand-made objects in each of TP, FP, TN, FN (score >= 0.5 is 'real')."""
    from classifier.saliency import SaliencyResult

    fractions = np.array([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.4, 0.4, 0.2],
                          [0.5, 0.5, 0.0]])
    res = SaliencyResult(np.zeros((6, 3, 51, 51), np.float32), fractions, np.array([0.9, 0.8, 0.2, 0.1, 0.7, 0.5]),
                         ("template", "search", "difference"))
    table = saliency_table(res, np.array([1, 0, 0, 1, 1, 0]))
    assert {g: table[g]["n"] for g in table} == {"TP": 2, "FP": 2, "TN": 1, "FN": 1}
    assert table["TP"] == pytest.approx({"n": 2, "template": 0.3, "search": 0.35, "difference": 0.35})
    assert table["FP"] == pytest.approx({"n": 2, "template": 0.55, "search": 0.35, "difference": 0.1})
    assert table["TN"] == pytest.approx({"n": 1, "template": 0.1, "search": 0.1, "difference": 0.8})
    assert table["FN"] == pytest.approx({"n": 1, "template": 0.3, "search": 0.3, "difference": 0.4})
    none_real = saliency_table(res, np.zeros(6, int))
    assert none_real["TP"] == {"n": 0, "template": None, "search": None, "difference": None}


# ----------------------------------------------------------------------------- process-wide state


@pytest.fixture
def torch_threads_3():
    """torch set to 3 threads for the test (a value no code under test asks for), then put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def test_scorer_uses_its_threads_only_while_scoring(tmp_path, torch_threads_3):
    path = save_weights(build_model("pair-paper"), get_spec("pair-paper"), tmp_path / "p.pt")
    stamps = make_synthetic_set(70, seed=5).stamps
    scorer = Scorer(path, threads=1)
    assert torch.get_num_threads() == 3  # constructing a scorer changes nothing
    seen = []
    infer = scorer.net.infer
    scorer.net.infer = lambda x: (seen.append(torch.get_num_threads()), infer(x))[1]
    scores = scorer.score(stamps)  # two CPU chunks (64 + 6)
    assert seen == [1, 1]  # "threads this scorer uses"
    assert torch.get_num_threads() == 3 and _in_a_new_thread(torch.get_num_threads) == 3
    np.testing.assert_allclose(scores, Scorer(path).score(stamps), rtol=0, atol=1e-6)


def _in_a_new_thread(fn):
    """``fn()`` run in a thread that has not used torch yet (it inherits torch's default count)."""
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(60)
    return out[0]


def test_thread_scopes_overlapping_in_two_threads_restore_the_setting(torch_threads_3):
    """Thread A enters a 1-thread scope; B, starting while A is inside, enters a 2-thread scope;
    A leaves while B is inside (B keeps its 2), then B leaves.  Afterwards a new thread inherits
    3 again: a plain save/restore in each thread would have left the 1 that B started with."""
    import threading

    from classifier.infer import torch_threads

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def a():
        with torch_threads(1):
            a_in.set()
            b_in.wait(30)
        seen["a_after"] = torch.get_num_threads()
        a_out.set()

    def b():
        a_in.wait(30)
        with torch_threads(2):
            b_in.set()
            a_out.wait(30)
            seen["b_after_a_left"] = torch.get_num_threads()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert a_in.is_set() and b_in.is_set() and a_out.is_set()
    assert seen == {"a_after": 3, "b_after_a_left": 2}
    assert torch.get_num_threads() == 3 and _in_a_new_thread(torch.get_num_threads) == 3


def test_training_uses_its_threads_only_while_training(small_set, tmp_path, torch_threads_3):
    seen = []
    train_model("pair-paper", small_set.select("train").subset(np.arange(64)), small_set.select("val"),
                _fast_config(epochs=1, threads=1), tmp_path, device="cpu",
                callback=lambda epoch, record: seen.append(torch.get_num_threads()))
    assert seen == [1]
    assert torch.get_num_threads() == 3 and _in_a_new_thread(torch.get_num_threads) == 3


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    """ROC and saliency plots neither switch the caller's backend nor load pyplot (fresh process)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")  # a caller's choice, not Agg
        import numpy as np
        from classifier.evaluate import evaluate_scores, plot_roc
        from classifier.saliency import SaliencyResult, plot_saliency_gallery
        labels, scores = np.array([1, 0, 1, 0]), np.array([0.9, 0.4, 0.6, 0.2])
        plot_roc(evaluate_scores(labels, scores), {str(tmp_path / "roc.png")!r})
        res = SaliencyResult(np.ones((2, 3, 51, 51), np.float32), np.full((2, 3), 1 / 3), scores[:2],
                             ("template", "search", "difference"))
        stamps = np.random.default_rng(0).normal(size=(2, 3, 51, 51))
        plot_saliency_gallery(stamps, res, labels[:2], {str(tmp_path / "saliency.png")!r})
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["svg", "False"]
    for name in ("roc.png", "saliency.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sky_scheme_reads_stamps_in_the_frames_sky_units():
    """``sky``: a stamp set's ``sky_<channel>`` / ``sky_noise`` columns put template and search in sky units
    (``StampSet.stamps_for``), the scheme takes their ``asinh`` and nothing from the stamp itself, so a faint and a
    bright stamp keep their ratio; a set without the columns is refused by name; other schemes read the stored
    stamps."""
    from classifier.data import StampSet
    from classifier.normalize import normalize_stamps

    rng = np.random.default_rng(5)
    sky = np.array([[100.0, 40.0], [100.0, 40.0]])
    noise = np.array([10.0, 10.0])
    signal = rng.normal(0.0, 1.0, (2, 2, 51, 51))
    signal[1] *= 7  # the second stamp: the same pattern 7x brighter
    signal[1] = signal[0] * 7
    stamps = (signal * noise[:, None, None, None] + sky[:, :, None, None]).astype(np.float32)
    stamps[0, 1, 3, 4] = np.nan
    meta = {"sky_template": sky[:, 0], "sky_search": sky[:, 1], "sky_noise": noise}
    data = StampSet(stamps, np.array([1, 0]), meta, ("template", "search"))
    units = data.stamps_for("sky")
    np.testing.assert_allclose(units[~np.isnan(units)], signal[~np.isnan(units)], rtol=1e-5, atol=1e-5)
    read = normalize_stamps(units, "sky", data.channels)
    ok = np.isfinite(units)
    np.testing.assert_allclose(read[ok], np.arcsinh(signal[ok]), rtol=1e-5, atol=1e-6)
    assert read[0, 1, 3, 4] == 0 and np.isnan(stamps[0, 1, 3, 4])  # missing -> 0; the stored stamps untouched
    shared = normalize_stamps(stamps, "shared", data.channels)  # its own statistics: the 7x is normalised away
    np.testing.assert_allclose(shared[0][ok[0]], shared[1][ok[0]], atol=1e-3)  # (one pixel missing in one)
    assert data.stamps_for("shared") is data.stamps
    bare = StampSet(stamps, np.array([1, 0]), {}, ("template", "search"))
    with pytest.raises(ValueError, match="sky_template, sky_search, sky_noise"):
        bare.stamps_for("sky")
