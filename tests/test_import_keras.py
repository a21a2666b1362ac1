"""``pipeline import-keras``: Keras HDF5 checkpoints of the paper's CNNs -> our weights files.

Each test writes a small Keras-2-layout HDF5 file with h5py (random weights, fixed seed) and checks
the converted torch model against an independent NumPy forward pass of the Keras computation
(channels-last valid correlation, 2x2 max pooling, Keras (row, col, channel) flatten, softmax with
column 0 = real).  With ``KERAS_CHECKPOINT_DIR`` pointing at a folder holding the authors'
``model_checkpoint_AAD_3s3DH.h5`` / ``model_checkpoint_CCC_3s2DH.h5`` the same check runs on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from classifier.infer import Scorer
from classifier.keras_import import KerasImportConfig, KerasImportError, convert_keras_checkpoint, read_keras_h5
from classifier.models import build_model, prepare_input
from pipeline.commands import import_keras

# The paper's two networks as Keras layer lists: (class, config); conv = (filters, kernel size).
_ARCH = {
    "triplet-paper": {"input": (51, 153, 1), "layers": [
        ("Conv2D", (16, 5)), ("MaxPooling2D", None), ("Dropout", None),
        ("Conv2D", (32, 5)), ("MaxPooling2D", None), ("Dropout", None),
        ("Conv2D", (64, 5)), ("MaxPooling2D", None), ("Dropout", None),
        ("Flatten", None), ("Dense", 32), ("Dense", 2)]},
    "pair-paper": {"input": (51, 102, 1), "layers": [
        ("Conv2D", (1, 7)), ("MaxPooling2D", None),
        ("Conv2D", (16, 3)), ("MaxPooling2D", None), ("Dropout", None),
        ("Conv2D", (32, 3)), ("MaxPooling2D", None), ("Dropout", None),
        ("Flatten", None), ("Dense", 32), ("Dense", 2)]},
}


def _keras_model(name: str, seed: int = 0, filters: dict[int, int] | None = None) -> dict:
    """Layers (name, class, config, weights) of a Keras Sequential with random Glorot-scaled weights.

    Layer names are deliberately not Keras's auto-generated ones, and each layer's weights live
    under yet another name (as in the authors' pair checkpoint), so nothing can rely on them.
    ``filters`` overrides the filter count of the k-th convolution (a malformed model).
    """
    rng = np.random.default_rng(seed)
    arch = _ARCH[name]
    rows, cols, cin = arch["input"]
    layers = []
    n_dense = sum(cls == "Dense" for cls, _ in arch["layers"])
    k_conv = k_dense = 0
    for i, (cls, par) in enumerate(arch["layers"]):
        lname = f"{cls.lower()}_L{i}"
        conf: dict = {"name": lname, "trainable": True, "dtype": "float32"}
        weights = {}
        if i == 0:
            conf["batch_input_shape"] = [None, rows, cols, cin]
        if cls == "Conv2D":
            nf, ks = par
            nf = (filters or {}).get(k_conv, nf)
            k_conv += 1
            conf.update(filters=nf, kernel_size=[ks, ks], strides=[1, 1], padding="valid",
                        data_format="channels_last", dilation_rate=[1, 1], activation="relu", use_bias=True)
            scale = np.sqrt(6.0 / (ks * ks * (cin + nf)))
            weights = {"kernel": rng.uniform(-scale, scale, (ks, ks, cin, nf)),
                       "bias": rng.normal(0, 0.05, nf)}
            rows, cols, cin = rows - ks + 1, cols - ks + 1, nf
        elif cls == "MaxPooling2D":
            conf.update(pool_size=[2, 2], strides=[2, 2], padding="valid", data_format="channels_last")
            rows, cols = rows // 2, cols // 2
        elif cls == "Dropout":
            conf.update(rate=0.4)
        elif cls == "Flatten":
            conf.update(data_format="channels_last")
            cin, rows, cols = rows * cols * cin, 1, 1
        elif cls == "Dense":
            k_dense += 1
            conf.update(units=par, activation="softmax" if k_dense == n_dense else "relu", use_bias=True)
            scale = np.sqrt(6.0 / (cin + par)) * (3.0 if k_dense == n_dense else 1.0)
            weights = {"kernel": rng.uniform(-scale, scale, (cin, par)), "bias": rng.normal(0, 0.1, par)}
            cin = par
        layers.append({"name": lname, "class": cls, "config": conf,
                       "weights": {k: v.astype(np.float32) for k, v in weights.items()}})
    return {"input": arch["input"], "layers": layers}


def _write_h5(path: Path, model: dict, layout: str) -> Path:
    """Write ``model`` in Keras 2's HDF5 layout: ``"model"`` (model.save) or ``"weights"`` (save_weights)."""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.2.4-tf"
        f.attrs["backend"] = b"tensorflow"
        if layout == "model":
            cfg = {"class_name": "Sequential", "config": {"name": "sequential", "layers": [
                {"class_name": layer["class"], "config": layer["config"]} for layer in model["layers"]]}}
            f.attrs["model_config"] = json.dumps(cfg).encode()
            f.attrs["training_config"] = b"{}"
            group = f.create_group("model_weights")
            group.attrs["keras_version"] = b"2.2.4-tf"
            group.attrs["backend"] = b"tensorflow"
            listed = model["layers"]
        else:
            group = f
            listed = [layer for layer in model["layers"] if layer["weights"]]
        group.attrs["layer_names"] = np.array([layer["name"].encode() for layer in listed])
        for layer in listed:
            lg = group.create_group(layer["name"])
            inner = f"{layer['name']}_w9"
            names = [f"{inner}/{k}:0" for k in ("kernel", "bias") if k in layer["weights"]]
            lg.attrs["weight_names"] = np.array([n.encode() for n in names]) if names else np.array([], "f8")
            for n, k in zip(names, ("kernel", "bias")):
                lg.create_dataset(n, data=layer["weights"][k])
    return path


def _keras_forward(model: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy forward pass of the Keras model on NHWC input: (pre-softmax logits, softmax), float64."""
    h = np.asarray(x, dtype=np.float64)
    for layer in model["layers"]:
        cls, w = layer["class"], layer["weights"]
        if cls == "Conv2D":
            k = w["kernel"].astype(np.float64)
            kh, kw = k.shape[:2]
            ho, wo = h.shape[1] - kh + 1, h.shape[2] - kw + 1
            out = np.zeros((h.shape[0], ho, wo, k.shape[3]))
            for i in range(kh):  # valid cross-correlation, one kernel offset at a time
                for j in range(kw):
                    out += h[:, i:i + ho, j:j + wo, :] @ k[i, j]
            h = np.maximum(out + w["bias"], 0.0)
        elif cls == "MaxPooling2D":
            n, hh, ww, c = h.shape
            h = h[:, :hh // 2 * 2, :ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
        elif cls == "Flatten":
            h = h.reshape(h.shape[0], -1)  # C order over (row, col, channel): Keras's flatten
        elif cls == "Dense":
            z = h @ w["kernel"].astype(np.float64) + w["bias"]
            if layer["config"]["activation"] == "relu":
                h = np.maximum(z, 0.0)
            else:
                e = np.exp(z - z.max(axis=1, keepdims=True))
                return z, e / e.sum(axis=1, keepdims=True)
    raise AssertionError("model has no output layer")


def _torch_net(name: str, state: dict) -> torch.nn.Module:
    net = build_model(name)
    net.load_state_dict(state, strict=True)
    return net.eval()


@pytest.mark.parametrize("layout", ["model", "weights"])
@pytest.mark.parametrize("name", ["triplet-paper", "pair-paper"])
def test_converted_model_matches_keras_forward(tmp_path, name, layout):
    model = _keras_model(name, seed=3)
    path = _write_h5(tmp_path / f"{name}.h5", model, layout)
    state, meta = convert_keras_checkpoint(path, name)
    net = _torch_net(name, state)
    x = np.random.default_rng(5).normal(0.0, 1.0, (5, *model["input"]))
    x = (x * np.array([0.3, 1.0, 2.0, 4.0, 8.0])[:, None, None, None]).astype(np.float32)  # varied outputs
    z_keras, p_keras = _keras_forward(model, x)
    with torch.no_grad():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        logits = net(xt).double().numpy()
        fast = net.infer(xt).double().numpy()
    p_ours = torch.softmax(torch.from_numpy(logits), 1).numpy()
    assert np.ptp(p_keras[:, 0]) > 0.2  # the comparison is not between constant outputs
    # our logit 1 = real = Keras column 0, logit 0 = bogus = Keras column 1
    np.testing.assert_allclose(logits, z_keras[:, ::-1], atol=2e-5 * max(1.0, np.abs(z_keras).max()))
    np.testing.assert_allclose(p_ours[:, 1], p_keras[:, 0], atol=1e-5)
    np.testing.assert_allclose(p_ours[:, 0], p_keras[:, 1], atol=1e-5)
    np.testing.assert_allclose(fast, logits, atol=1e-5)
    assert meta["conversion"]["parameters"] == sum(v.numel() for v in net.parameters())
    assert meta["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["trained_on"] == "DES autoScan (Acero-Cuellar et al. 2023)"
    assert ("full model" if layout == "model" else "weights only") in meta["source"]["format"]
    # the file's own layer names are used (ours are not Keras's conv2d, conv2d_1, ...)
    assert [m["keras"] for m in meta["conversion"]["layers"]][0] == model["layers"][0]["name"]


def test_real_column_one_keeps_the_class_order(tmp_path):
    model = _keras_model("pair-paper", seed=4)
    path = _write_h5(tmp_path / "p.h5", model, "model")
    state, meta = convert_keras_checkpoint(path, "pair-paper", KerasImportConfig(real_column=1))
    x = np.random.default_rng(6).normal(0.0, 1.0, (4, *model["input"])).astype(np.float32)
    with torch.no_grad():
        p = torch.softmax(_torch_net("pair-paper", state)(torch.from_numpy(x).permute(0, 3, 1, 2)), 1).numpy()
    np.testing.assert_allclose(p, _keras_forward(model, x)[1], atol=1e-5)
    assert meta["conversion"]["keras_real_column"] == 1
    with pytest.raises(ValueError, match="real_column"):
        KerasImportConfig(real_column=2)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    import_keras.add_arguments(parser)
    return import_keras.main(parser.parse_args(argv))


def test_command_writes_weights_every_scorer_reads(tmp_path, capsys):
    model = _keras_model("triplet-paper", seed=7)
    h5 = _write_h5(tmp_path / "model_checkpoint.h5", model, "model")
    out = tmp_path / "des" / "triplet.pt"
    assert _run([str(h5), "--model", "triplet-paper", "--out", str(out)]) == 0
    assert "126,050 parameters" in capsys.readouterr().out
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temporary left
    scorer = Scorer(out)
    assert scorer.name == "triplet-paper"
    assert scorer.metadata["source"]["file"] == "model_checkpoint.h5"
    assert scorer.metadata["source"]["sha256"] == hashlib.sha256(h5.read_bytes()).hexdigest()
    assert scorer.metadata["trained_on"].startswith("DES autoScan")
    # raw stamps through our normalisation and panel layout, then the Keras computation
    rng = np.random.default_rng(8)
    stamps = rng.normal(100.0, 10.0, (6, 3, 51, 51)).astype(np.float32)
    stamps[:, :2, 20:31, 20:31] += 400.0 * rng.uniform(0, 1, (6, 2, 1, 1)).astype(np.float32)
    stamps[:3, 2, 23:28, 23:28] += 300.0  # a source in the difference of half of them
    x = prepare_input(stamps, "triplet-paper")  # (N, 1, 51, 153)
    p_keras = _keras_forward(model, x.transpose(0, 2, 3, 1))[1][:, 0]
    np.testing.assert_allclose(scorer.score(stamps), p_keras, atol=1e-5)


def test_wrong_model_and_malformed_files_are_refused(tmp_path, capsys):
    triplet = _keras_model("triplet-paper", seed=1)
    full = _write_h5(tmp_path / "triplet_full.h5", triplet, "model")
    wonly = _write_h5(tmp_path / "triplet_weights.h5", triplet, "weights")
    # a triplet checkpoint is not a pair model: the input shape (full file) or the first layer that
    # does not fit (weights-only file, no architecture recorded) is named
    with pytest.raises(KerasImportError, match=r"triplet_full\.h5.*\(51, 153, 1\).*pair-paper"):
        convert_keras_checkpoint(full, "pair-paper")
    with pytest.raises(KerasImportError, match=r"triplet_weights\.h5: layer 'conv2d_L0'.*kernel shape \(5, 5, 1, 16\)"):
        convert_keras_checkpoint(wonly, "pair-paper")
    # a convolution with the wrong number of filters
    bad = _write_h5(tmp_path / "bad.h5", _keras_model("triplet-paper", seed=1, filters={1: 24}), "model")
    with pytest.raises(KerasImportError, match=r"bad\.h5: layer 'conv2d_L3'.*\(5, 5, 16, 24\)"):
        convert_keras_checkpoint(bad, "triplet-paper")
    # an extra layer type our model does not have
    extra = _keras_model("pair-paper", seed=1)
    extra["layers"].insert(2, {"name": "bn", "class": "BatchNormalization", "config": {"name": "bn"},
                               "weights": {}})
    with pytest.raises(KerasImportError, match=r"layer 'bn' is a BatchNormalization"):
        convert_keras_checkpoint(_write_h5(tmp_path / "bn.h5", extra, "model"), "pair-paper")
    # HDF5 but not Keras; not HDF5 at all; a model we have no Keras original of
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(KerasImportError, match=r"plain\.h5: not a Keras checkpoint"):
        read_keras_h5(tmp_path / "plain.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(KerasImportError, match=r"text\.h5: not an HDF5 file"):
        read_keras_h5(tmp_path / "text.h5")
    with pytest.raises(KerasImportError, match="no Keras original"):
        convert_keras_checkpoint(full, "triplet")
    # the command: exit status 2, the message on stderr, nothing written
    out = tmp_path / "out.pt"
    assert _run([str(full), "--model", "pair-paper", "--out", str(out)]) == 2
    assert "triplet_full.h5" in capsys.readouterr().err
    assert _run([str(tmp_path / "missing.h5"), "--model", "pair-paper", "--out", str(out)]) == 2
    assert "missing.h5: no such file" in capsys.readouterr().err
    assert not out.exists()


def test_paper_normalisation_matches_the_authors_preprocessing():
    """Our ``prepare_input`` for triplet-paper against the authors' 3-sigma preprocessing as their
    code computes it (float64): difference z-scored with the population std; search and template
    each mapped so the min / max of the pixels strictly inside mean +- 3 std go to 0 / 1;
    panels concatenated along the columns as [difference | search | template]."""
    rng = np.random.default_rng(2)
    stamps = rng.normal(50.0, 5.0, (4, 3, 51, 51))
    stamps[:, :2, 22:29, 22:29] += rng.uniform(100, 2000, (4, 2, 1, 1))  # bright outliers, kept above 1
    tmpl, srch, diff = stamps[:, 0], stamps[:, 1], stamps[:, 2]

    def three_sigma(img):
        mu, sd = img.mean(axis=(1, 2), keepdims=True), img.std(axis=(1, 2), keepdims=True)
        out = np.empty_like(img)
        for i in range(len(img)):
            inside = img[i][(img[i] > mu[i] - 3 * sd[i]) & (img[i] < mu[i] + 3 * sd[i])]
            out[i] = (img[i] - inside.min()) / (inside.max() - inside.min())
        return out

    zdiff = (diff - diff.mean(axis=(1, 2), keepdims=True)) / diff.std(axis=(1, 2), keepdims=True)
    theirs = np.concatenate([zdiff, three_sigma(srch), three_sigma(tmpl)], axis=2)
    ours = prepare_input(stamps.astype(np.float32), "triplet-paper")[:, 0]
    assert ours.max() > 1.5  # outliers beyond the 3-sigma range are kept, not clipped
    np.testing.assert_allclose(ours, theirs, atol=2e-5 * np.abs(theirs).max())
    pair = prepare_input(stamps.astype(np.float32), "pair-paper")[:, 0]
    np.testing.assert_allclose(pair, theirs[:, :, 51:], atol=2e-5 * np.abs(theirs).max())


_REAL = {"triplet-paper": "model_checkpoint_AAD_3s3DH.h5", "pair-paper": "model_checkpoint_CCC_3s2DH.h5"}


@pytest.mark.parametrize("name", sorted(_REAL))
def test_authors_checkpoints(name):
    """The published DES checkpoints (not shipped: set KERAS_CHECKPOINT_DIR to a folder holding them)."""
    folder = os.environ.get("KERAS_CHECKPOINT_DIR")
    if not folder or not (Path(folder) / _REAL[name]).is_file():
        pytest.skip("KERAS_CHECKPOINT_DIR with the authors' checkpoints not set")
    path = Path(folder) / _REAL[name]
    ckpt = read_keras_h5(path)
    model = {"input": _ARCH[name]["input"], "layers": [
        {"name": layer.name, "class": layer.class_name, "config": layer.config,
         "weights": {k: v.astype(np.float32) for k, v in layer.weights.items()}} for layer in ckpt.layers]}
    state, meta = convert_keras_checkpoint(path, name)
    x = prepare_input(np.random.default_rng(9).normal(100, 10, (8, 3, 51, 51)).astype(np.float32), name)
    with torch.no_grad():
        p = torch.softmax(_torch_net(name, state)(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(p[:, 1], _keras_forward(model, x.transpose(0, 2, 3, 1))[1][:, 0], atol=1e-5)
    assert meta["conversion"]["parameters"] == {"triplet-paper": 126_050, "pair-paper": 45_908}[name]
