"""Tests of the ``pipeline`` command line: one vocabulary (--device, --quiet, seeds), help text on
every option, a light ``pipeline --help``, ``--version``, the held-out check of ``pipeline
evaluate`` and the failure report of ``pipeline dataset``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from pipeline.cli import COMMANDS, DEVICES, SEEDS, TRAINING_SEED, build_parser, main

#: Modules ``pipeline --help`` must not import (each costs tenths of a second or more).
HEAVY = ("torch", "dask", "distributed", "astropy", "scipy", "photutils", "reproject", "pipeline.simulate.core")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.fixture(scope="module")
def commands() -> dict[str, argparse.ArgumentParser]:
    return _subparsers(build_parser())


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


# ----------------------------------------------------------------------------- fast help, --version


def _modules_after(argv: list[str]) -> tuple[set[str], str]:
    code = ("import sys\nfrom pipeline import cli\ntry:\n    cli.main(%r)\nexcept SystemExit:\n    pass\n"
            "print('MODULES', ' '.join(sorted(sys.modules)))" % (argv,))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES "))
    return set(line.split()[1:]), proc.stdout


def test_top_level_help_lists_every_command_without_importing_heavy_modules():
    loaded, out = _modules_after(["--help"])
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert not {m for m, _ in COMMANDS.values()} & loaded  # no subcommand module imported at all
    for name, (_module, help_text) in COMMANDS.items():
        assert name in out and help_text in out
    assert str(TRAINING_SEED) in out  # the seed table is in the epilog


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_help_imports_only_its_own_module(name):
    """``pipeline NAME --help`` defines NAME's options without torch, Dask, astropy or SciPy.
    (``simulate`` is left out: its package's ``__init__`` imports the simulator.)"""
    loaded, out = _modules_after([name, "--help"])
    assert f"usage: pipeline {name}" in out
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    others = {m for n, (m, _) in COMMANDS.items() if n != name}
    assert not others & loaded


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"pipeline (transient-pipeline) {version('transient-pipeline')}"


def test_unknown_command_and_no_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main([]) == 2
    assert "usage: pipeline" in capsys.readouterr().out


# ----------------------------------------------------------------------------- vocabulary


def test_every_option_of_every_command_has_help(commands):
    hidden_ok = {"--no-progress"}  # kept working, not advertised
    missing = []
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            if action.help == argparse.SUPPRESS:
                assert set(action.option_strings) <= hidden_ok, f"{name} {flag} is hidden"
            elif not (action.help or "").strip():
                missing.append(f"{name} {flag}")
    assert not missing, f"options without help: {missing}"


def test_device_is_auto_cpu_gpu_everywhere_with_cuda_a_deprecated_alias(commands, capsys):
    with_device = {n for n, p in commands.items() if _option(p, "--device")}
    assert with_device >= {"subtract", "run", "train", "evaluate", "saliency", "benchmark"}
    for name in with_device:
        action = _option(commands[name], "--device")
        assert tuple(action.choices) == DEVICES == ("auto", "cpu", "gpu")
        assert "default" in action.help and "auto:" in action.help, name
        assert "cuda" not in commands[name].format_help()  # the alias is not advertised
    p = commands["evaluate"]
    capsys.readouterr()
    assert p.parse_args(["--model", "m", "--data", "d", "--device", "cuda"]).device == "gpu"
    assert "deprecated" in capsys.readouterr().err
    assert p.parse_args(["--model", "m", "--data", "d", "--device", "GPU"]).device == "gpu"
    assert p.parse_args(["--model", "m", "--data", "d"]).device == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--data", "d", "--device", "tpu"])
    assert "invalid choice" in capsys.readouterr().err
    # the defaults chosen per command
    defaults = {n: _option(commands[n], "--device").default for n in with_device}
    chosen = {"subtract": "cpu", "run": None, "train": "auto", "evaluate": "auto", "saliency": "cpu",
              "benchmark": "cpu"}
    assert {n: defaults[n] for n in chosen} == chosen


def test_quiet_everywhere_there_is_progress_and_no_progress_still_works(commands):
    with_quiet = {n for n, p in commands.items() if _option(p, "--quiet")}
    required = {"run": ["--out", "o"], "dataset": ["--out", "o"], "train": ["--model", "pair", "--data", "d",
                                                                           "--out", "o"], "benchmark": ["--out", "o"]}
    assert with_quiet >= set(required)
    for name in required:
        p = commands[name]
        assert p.parse_args(required[name]).quiet is False
        assert p.parse_args(required[name] + ["--quiet"]).quiet is True
        assert p.parse_args(required[name] + ["--no-progress"]).quiet is True
        assert "--no-progress" not in p.format_help()


def test_seed_help_names_the_training_seed_and_defaults_are_held_out(commands):
    from pipeline.commands.run import DEFAULT_FIELD
    from pipeline.datasets import DatasetConfig

    defaults = {}
    for name, p in commands.items():
        action = _option(p, "--seed")
        if action is None:
            continue
        assert str(TRAINING_SEED) in action.help, name
        defaults[name] = action.default
    assert set(defaults) == {"simulate", "run", "dataset", "train", "benchmark"}
    simulation = {"simulate": defaults["simulate"], "run": DEFAULT_FIELD["seed"], "dataset": defaults["dataset"],
                  "benchmark": defaults["benchmark"]}
    for name, seed in simulation.items():
        assert seed != TRAINING_SEED and name in SEEDS[seed], (name, seed)
    assert DatasetConfig().seed == defaults["dataset"] == 3000
    assert "not a simulation seed" in _option(commands["train"], "--seed").help.lower()


def test_device_names_map_in_one_place():
    import torch

    from classifier.infer import torch_device
    from classifier.train import resolve_device as train_device
    from pipeline.config import RunConfig, canonical_device, resolve_device

    assert torch_device("cpu") == train_device("cpu") == torch.device("cpu")
    assert torch_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert torch_device("gpu").type == torch_device("cuda").type == "cuda"
    else:
        for name in ("gpu", "cuda"):
            with pytest.raises(RuntimeError, match="no CUDA device"):
                torch_device(name)
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'gpu'"):
        torch_device("tpu")
    assert [canonical_device(n) for n in ("auto", "CPU", "gpu", "cuda")] == ["auto", "cpu", "gpu", "gpu"]
    with pytest.raises(ValueError):
        canonical_device("tpu")
    assert RunConfig(device="cuda").device == "gpu"
    with pytest.raises(ValueError, match="resolved by the command line"):
        RunConfig(device="auto")
    assert resolve_device("cpu") == ("cpu", "as asked") and resolve_device("gpu")[0] == "gpu"


def test_auto_device_follows_whether_a_gpu_is_usable(monkeypatch):
    import pipeline.config as config

    monkeypatch.setattr(config, "gpu_usable", lambda torch_too=True: (False, "no GPU here"))
    assert config.resolve_device("auto") == ("cpu", "no GPU here")
    monkeypatch.setattr(config, "gpu_usable", lambda torch_too=True: (True, "GPU: test"))
    assert config.resolve_device("auto") == ("gpu", "GPU: test")


def test_run_resolves_auto_before_the_config(commands, monkeypatch, capsys):
    import pipeline.config as config
    from pipeline.commands.run import _run_config

    p = commands["run"]
    monkeypatch.setattr(config, "gpu_usable", lambda torch_too=True: (False, "no GPU here"))
    cfg, _sched = _run_config(p.parse_args(["--out", "o", "--device", "auto"]))
    assert cfg.device == "cpu" and "--device auto: cpu (no GPU here)" in capsys.readouterr().out
    monkeypatch.setattr(config, "gpu_usable", lambda torch_too=True: (True, "GPU: test"))
    cfg, sched = _run_config(p.parse_args(["--out", "o", "--device", "auto", "--scheduler", "local"]))
    assert cfg.device == "gpu" and sched.gpus_per_worker == 1
    cfg, _sched = _run_config(p.parse_args(["--out", "o", "--device", "cuda"]))
    assert cfg.device == "gpu"
    assert _run_config(p.parse_args(["--out", "o"]))[0].device == "cpu"  # no --device: the config's


# ----------------------------------------------------------------------------- held-out check of evaluate


def _named(stamps, names):
    """A copy of ``stamps`` whose CCD column cycles through ``names``."""
    out = stamps.subset(np.arange(len(stamps)))
    out.meta["ccd"] = np.array([names[i % len(names)] for i in range(len(out))])
    out.attrs = {"stream": "dia", "source": "simulated",
                 "simulation_seeds": sorted({int(n.split("-")[0][1:]) for n in names})}
    return out


@pytest.fixture(scope="module")
def stamps():
    from classifier.synthetic import make_synthetic_set

    return make_synthetic_set(40, seed=5)


def test_ccd_split_assignment_is_the_builders_rule():
    from classifier.data import ccd_split_assignment

    a = ccd_split_assignment(10, (0.7, 0.1, 0.2), 0)
    assert sorted(a.tolist()) == ["test"] * 2 + ["train"] * 7 + ["val"]
    assert (a == ccd_split_assignment(10, (7, 1, 2), 0)).all()  # fractions are normalised
    assert set(ccd_split_assignment(5, (1, 0, 0), 3).tolist()) == {"train"}
    assert set(ccd_split_assignment(5, (0, 0, 1), 3).tolist()) == {"test"}


def test_overlap_from_recorded_training_ccds(stamps):
    from classifier.evaluate import training_overlap

    meta = {"provenance": {"training_ccds": ["s1000-ccd00", "s1000-ccd01"], "simulation_seeds": [1000]}}
    seen = _named(stamps, ["s1000-ccd00", "s1000-ccd05"])  # every other stamp from a training CCD
    res = training_overlap(meta, seen, "m")
    assert res["checked"] and res["n_overlapping"] == 20 and res["overlapping_ccds"] == ["s1000-ccd00"]
    assert "NOT held out" in res["warning"] and "1000" in res["warning"]
    # same seed, other CCDs: held out, said in a note
    res = training_overlap(meta, _named(stamps, ["s1000-ccd05"]), "m")
    assert res["warning"] is None and res["n_overlapping"] == 0 and "held out" in res["note"]
    res = training_overlap(meta, _named(stamps, ["s3000-ccd00", "s3000-ccd01"]), "m")
    assert res["warning"] is None and res["shared_seeds"] == [] and res["data_seeds"] == [3000]
    # nothing to compare with: said, not guessed
    assert training_overlap({}, seen, "m")["checked"] is False
    unsimulated = stamps.subset(np.arange(len(stamps)))
    assert training_overlap(meta, unsimulated, "m")["checked"] is False
    # the instrument presets share CCD names: a ZTF CCD of seed 1000 is not the DECam one
    ztf = _named(stamps, ["s1000-ccd00", "s1000-ccd05"])
    ztf.attrs["instrument"] = "ztf"
    res = training_overlap(meta, ztf, "m")
    assert res["checked"] is False and res["warning"] is None and "ztf" in res["note"]
    ztf_meta = {"provenance": {**meta["provenance"], "train": {"attrs": {"instrument": "ztf"}}}}
    assert training_overlap(ztf_meta, ztf, "m")["n_overlapping"] == 20


def test_overlap_of_the_shipped_weights_from_their_dataset_config(stamps):
    """The shipped weights record the data set config of their training set (seed 1000, 150 CCDs,
    70/10/20 split with split seed 0): its train and val CCDs overlap, its test CCDs do not."""
    from classifier.data import ccd_split_assignment
    from classifier.evaluate import training_data, training_overlap
    from classifier.infer import load_weights

    _net, _spec, meta, _path = load_weights("triplet")
    seen = training_data(meta)
    cfg = meta["provenance"]["train"]["attrs"]["dataset_config"]
    assert seen["seeds"] == [TRAINING_SEED] == [cfg["seed"]]
    split = ccd_split_assignment(cfg["n_ccds"], cfg["fractions"], cfg["split_seed"])
    assert len(seen["ccds"]) == int((split != "test").sum()) == 120
    train_k = int(np.flatnonzero(split == "train")[0])
    test_k = int(np.flatnonzero(split == "test")[0])
    data = _named(stamps, [f"s1000-ccd{train_k:02d}", f"s1000-ccd{test_k:02d}"])
    res = training_overlap(meta, data, "triplet")
    assert res["n_overlapping"] == 20 and res["overlapping_ccds"] == [f"s1000-ccd{train_k:02d}"]
    # CCD 0-39 of seed 1000 (the old default of pipeline dataset): mostly training CCDs
    old_default = _named(stamps, [f"s1000-ccd{k:02d}" for k in range(40)])
    assert training_overlap(meta, old_default, "triplet")["n_overlapping"] == int((split[:40] != "test").sum())


def test_evaluate_model_warns_only_when_the_set_overlaps_training(stamps):
    from classifier.evaluate import TrainingDataOverlapWarning, evaluate_model

    overlapping = _named(stamps, ["s1000-ccd00", "s1000-ccd01", "s1000-ccd02"])
    with pytest.warns(TrainingDataOverlapWarning, match="NOT held out"):
        res = evaluate_model("triplet", overlapping, device="cpu")
    assert res.warnings and res.training_overlap["n_overlapping"] > 0
    assert res.summary().startswith("WARNING: ")
    assert res.to_dict()["warnings"] == res.warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingDataOverlapWarning)
        res = evaluate_model("triplet", _named(stamps, ["s3000-ccd00", "s3000-ccd01"]), device="cpu")
    assert res.warnings == [] and res.training_overlap["checked"] and res.training_overlap["n_overlapping"] == 0
    assert not res.summary().startswith("WARNING")


def test_pipeline_evaluate_warns_on_stderr_and_in_its_json(stamps, tmp_path, capsys):
    for seed, overlaps in ((1000, True), (3000, False)):
        path = _named(stamps, [f"s{seed}-ccd00", f"s{seed}-ccd01"]).save(tmp_path / f"s{seed}.npz")
        out = tmp_path / f"eval{seed}"
        assert main(["evaluate", "--model", "triplet", "--data", str(path), "--split", "all", "--out", str(out),
                     "--device", "cpu"]) == 0
        captured = capsys.readouterr()
        report = json.loads((out / "evaluation.json").read_text())
        assert report["training_overlap"]["data_seeds"] == [seed]
        if overlaps:
            assert "pipeline evaluate: WARNING:" in captured.err and "NOT held out" in captured.err
            assert report["warnings"] and report["training_overlap"]["n_overlapping"] > 0
        else:
            assert "WARNING" not in captured.err + captured.out
            assert report["warnings"] == [] and report["training_overlap"]["n_overlapping"] == 0
            assert "held out" in captured.out


# ----------------------------------------------------------------------------- dataset failures


def _fake_ccd(ok: set[int], stamps, broken: tuple[str, ...] = ()):
    """A stand-in for ``build_ccd_stamps``: CCDs in ``ok`` give a small stamp set per stream (streams
    in ``broken`` fail on every CCD), the other CCDs fail."""

    def fake(k, config, run_config, streams):
        name = f"s{config.seed}-ccd{k:02d}"
        part = stamps.subset(np.arange(8 * k, 8 * k + 8))
        part.meta["ccd"] = np.array([name] * len(part))
        bad = streams if k not in ok else tuple(s for s in streams if s in broken)
        return {"ccd": name, "n_transients": 3, "seconds": 0.0,
                "sets": {s: part for s in streams if s not in bad},
                "errors": {s: f"StarSelectionError: only {k} kernel stars on CCD {k}" for s in bad}}

    return fake


def test_dataset_lists_every_failed_ccd_and_fails_when_all_do(stamps, tmp_path, capsys, monkeypatch):
    import pipeline.datasets as datasets
    from classifier.data import StampSet, simulation_seeds

    args = ["dataset", "--ccds", "4", "--workers", "1", "--quiet", "--shape", "64x64", "--fractions", "1,0,1"]
    monkeypatch.setattr(datasets, "build_ccd_stamps", _fake_ccd(set(), stamps))
    assert main(args + ["--streams", "dia", "--out", str(tmp_path / "none")]) == 4
    err = capsys.readouterr().err
    for k in range(4):
        assert f"failed: s3000-ccd{k:02d} dia: StarSelectionError: only {k} kernel stars on CCD {k}" in err
    assert "no dia stamps were produced (4 of 4 CCDs failed for this stream)" in err
    assert not (tmp_path / "none" / "dia.npz").exists()
    assert "no dia stamps" in json.loads((tmp_path / "none" / "dataset.json").read_text())["error"]

    # one CCD fails: the set is written, the failure listed
    monkeypatch.setattr(datasets, "build_ccd_stamps", _fake_ccd({1, 2, 3}, stamps))
    assert main(args + ["--streams", "dia", "--out", str(tmp_path / "some")]) == 0
    captured = capsys.readouterr()
    assert "failed: s3000-ccd00 dia: StarSelectionError: only 0 kernel stars on CCD 0" in captured.err
    assert "ccd01" not in captured.err and "1 with a failed stream" in captured.out
    report = json.loads((tmp_path / "some" / "dataset.json").read_text())
    assert [bool(r["errors"]) for r in report["ccds"]] == [True, False, False, False]
    written = StampSet.load(tmp_path / "some" / "dia.npz")
    assert written.attrs["simulation_seeds"] == [3000] and simulation_seeds(written) == [3000]
    assert written.attrs["dataset_config"]["seed"] == 3000

    # the dia stream fails everywhere, the direct one works: direct is kept, the command still fails
    monkeypatch.setattr(datasets, "build_ccd_stamps", _fake_ccd({0, 1, 2, 3}, stamps, broken=("dia",)))
    assert main(args + ["--streams", "dia,direct", "--out", str(tmp_path / "half")]) == 4
    err = capsys.readouterr().err
    assert "failed: s3000-ccd03 dia: StarSelectionError" in err and "direct:" not in err
    assert (tmp_path / "half" / "direct.npz").exists() and not (tmp_path / "half" / "dia.npz").exists()


def test_simulation_failure_of_one_ccd_is_reported_not_raised(monkeypatch):
    import pipeline.simulate as simulate
    from pipeline.datasets import DatasetConfig, build_ccd_stamps

    def boom(config, seed, ccd_index):
        raise MemoryError(f"no room for CCD {ccd_index}")

    monkeypatch.setattr(simulate, "simulate_pair", boom)
    res = build_ccd_stamps(2, DatasetConfig(seed=7, shape=(64, 64)), streams=("dia", "direct"))
    assert res["ccd"] == "s7-ccd02" and res["sets"] == {}
    assert res["errors"] == {s: "simulation failed: MemoryError: no room for CCD 2" for s in ("dia", "direct")}
