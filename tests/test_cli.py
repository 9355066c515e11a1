"""The CLI end to end, in-process: plugins, info, analyze on the embedded default, errors."""
from __future__ import annotations

import json
import re

import pytest
import torch

from uapx.cli import main

SMALL = ["--n-samples", "60", "--steps", "5", "--batch-size", "30", "--random-draws", "3", "--k", "3"]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plugins_lists_builtins_with_distribution(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert rows["average"][1:4] == ["method", "uapx", "0.1.0"]
    assert rows["svd"][1] == "method" and rows["pgd-l2"][1] == "attack"


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    info = dict(line.split(": ", 1) for line in out.splitlines())
    assert info["torch"] == torch.__version__
    assert info["kernel backend"].split()[0] in ("cpu", "cuda", "reference")
    assert "average" in info["plugins loaded"]


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "report"
    assert main(["analyze", *SMALL, "--out", str(out)]) == 0
    return out


def test_analyze_embedded_default_writes_a_complete_report(small_report):
    files = {p.name for p in small_report.iterdir()}
    assert {"report.json", "index.html", "uaps.pt"} <= files
    rep = json.loads((small_report / "report.json").read_text())
    assert rep["config"]["model"] == "zoo:mnist-natural" and rep["config"]["seed"] == 0
    # one split (the embedded MNIST test split): the sample of 60 is halved, fit on 30, judged on 30
    assert rep["data"]["source"] == "embedded MNIST test split" and rep["data"]["n_images"] == 30
    assert rep["uaps"]["held_out"]["n_images"] == 30 and rep["uaps"]["held_out"]["protocol"] == "sample"
    assert rep["environment"]["torch"] == torch.__version__
    # every perturbation respects the budget
    assert rep["attack"]["perturbation_norm"]["max"] <= 2.0 + 1e-4
    evs = rep["uaps"]["evaluations"]
    assert {"average", "svd:v1", "svd:v2", "svd:v3"} <= set(evs)
    assert any(k.startswith("average:class-") for k in evs)
    pngs = [p for p in files if p.endswith(".png")]
    assert len(pngs) >= 3 and {p["file"] for p in rep["plots"]} == set(pngs)
    page = (small_report / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert not re.search(r"""src=['"](?!data:)""", page)  # self-contained


def test_same_seed_same_numbers(small_report, tmp_path):
    again = tmp_path / "again"
    assert main(["analyze", *SMALL, "--out", str(again)]) == 0
    a, b = (json.loads((d / "report.json").read_text()) for d in (small_report, again))
    for key in ("attack", "uaps", "diagnostics"):
        assert a[key] == b[key]


def test_existing_report_is_refused_without_overwrite(small_report, capsys):
    before = (small_report / "report.json").read_text()
    code, _, err = run(capsys, "analyze", *SMALL, "--out", str(small_report))
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert (small_report / "report.json").read_text() == before


@pytest.mark.parametrize("argv, needle", [
    (["--eps", "0"], "--eps: must be a positive"),
    (["--eps", "-1"], "--eps: must be a positive"),
    (["--eps", "inf"], "--eps: must be a positive finite"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--step-size", "0"], "--step-size: must be a positive"),
    (["--k", "abc"], "--k: expected a whole number, got 'abc'"),
    (["--random-draws", "0"], "--random-draws: must be >= 1"),
    (["--device", "tpu:0"], "unknown device 'tpu:0'"),
    (["--plugins", "svd,bogus"], "unknown plugin 'bogus'"),
    (["--attack", "bogus"], "unknown attack 'bogus'"),
    (["--n-samples", "20000"], "--n-samples 20000 is out of range"),
    (["--model", "zoo:nope"], "no zoo model 'nope'"),
    (["--data-root", "/nonexistent/uapx-data"], "does not exist"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, tmp_path, argv, needle):
    code, _, err = run(capsys, "analyze", *SMALL, *argv, "--out", str(tmp_path / "r"))
    assert code != 0
    assert needle in err and err.startswith("uapx: error: ") and err.count("\n") == 1 and "fix:" in err
    assert not (tmp_path / "r").exists()


def test_plugin_settings_reach_the_plugin(tmp_path):
    out = tmp_path / "r"
    assert main(["analyze", *SMALL, "--plugins", "svd", "--set", "svd.k=2", "--set", "svd.center=true",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    glob = [k for k in rep["uaps"]["evaluations"] if ":class-" not in k]
    assert glob == ["svd:v1", "svd:v2"]
    assert rep["uaps"]["evaluations"]["svd:v1"]["method"] == "SVDUAP(k=2, center=True, solver='gram', per_class=True, norm='l2')"


def test_saved_uaps_apply_to_another_run_and_transfer(small_report, tmp_path, capsys):
    from uapx.methods import load_uaps

    uaps = load_uaps(small_report / "uaps.pt")
    rep = json.loads((small_report / "report.json").read_text())
    assert {u.name for u in uaps} == set(rep["uaps"]["evaluations"])
    assert all(abs(float(u.vector.norm()) - 2.0) < 1e-4 for u in uaps)
    out = tmp_path / "applied.json"
    code, stdout, _ = run(capsys, "apply", str(small_report / "uaps.pt"), "--only", "average,svd:v1",
                          "--n-samples", "60", "--out", str(out))
    assert code == 0 and "svd:v1" in stdout and "random" in stdout
    applied = json.loads(out.read_text())
    # the same UAPs on the same 60 images and model (the sample: 30 fit images and 30 held out): the
    # report's numbers, pooled
    for name in ("average", "svd:v1"):
        for sign in ("plus", "minus"):
            fit, held = rep["uaps"]["evaluations"][name][sign], rep["uaps"]["held_out"]["evaluations"][name][sign]
            pooled = (fit["fooling_rate"] * fit["n"] + held["fooling_rate"] * held["n"]) / (fit["n"] + held["n"])
            assert applied["evaluations"][name][sign]["fooling_rate"] == pytest.approx(pooled)
    code, _, err = run(capsys, "apply", str(small_report / "uaps.pt"), "--only", "nope")
    assert code == 2 and "no UAP named 'nope'" in err


def test_transfer_to_another_model(tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert main(["analyze", *SMALL, "--plugins", "average", "--transfer", "zoo:mnist-natural",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    t = rep["uaps"]["transfer"]["zoo:mnist-natural"]
    # transferring to the very same model reproduces the model's own numbers (on the held-out images)
    held = rep["uaps"]["held_out"]
    assert t["evaluations"]["average"]["fooling_rate"] == held["evaluations"]["average"]["fooling_rate"]
    assert set(t["evaluations"]) == {"average"}


def test_trajectory_samples_sets_how_many_trajectories_are_recorded(capsys, tmp_path):
    out = tmp_path / "r"
    code, _, _ = run(capsys, "analyze", "--plugins", "trajectory", "--n-samples", "20", "--steps", "3",
                     "--trajectory-samples", "7", "--set", "trajectory.restarts=2", "--out", str(out))
    assert code == 0
    traj = json.loads((out / "report.json").read_text())["diagnostics"]["trajectory"]
    assert traj["images"] == 7 and traj["steps"] == 3
    code, _, err = run(capsys, "analyze", "--trajectory-samples", "0", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--trajectory-samples" in err and not (tmp_path / "bad").exists()


def _defaults_of(parser, command):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: a.default for a in sub._actions if a.dest not in ("help",)}, sub


@pytest.mark.parametrize("command, owner", [("analyze", "AnalyzeConfig"), ("attack", "AnalyzeConfig"),
                                            ("train", "TrainConfig"), ("reproduce", "ReproduceConfig")])
def test_every_option_takes_its_default_from_the_config_dataclass_and_has_help(command, owner):
    import dataclasses

    from uapx import pipeline, reproduce, train
    from uapx.cli import build_parser

    cls = {"AnalyzeConfig": pipeline.AnalyzeConfig, "TrainConfig": train.TrainConfig,
           "ReproduceConfig": reproduce.ReproduceConfig}[owner]
    fields = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
              for f in dataclasses.fields(cls)}
    defaults, sub = _defaults_of(build_parser(installed=False), command)
    own = {"n_samples"} if command == "attack" else set()  # attack saves the whole split by default
    shared = [d for d in defaults if d in fields and d not in own and d != "out"]
    assert len(shared) >= 8
    for dest in shared:
        assert defaults[dest] == fields[dest], dest
    for action in sub._actions:
        assert action.help and len(action.help) > 8, action.dest  # every option explains itself


def test_apply_defaults_come_from_apply_uaps():
    import inspect

    from uapx.cli import build_parser
    from uapx.pipeline import apply_uaps

    defaults, _ = _defaults_of(build_parser(installed=False), "apply")
    sig = inspect.signature(apply_uaps).parameters
    for dest in ("dataset", "split", "n_samples", "batch_size", "draws", "seed", "device", "out"):
        assert defaults[dest] == sig[dest].default, dest


def test_the_default_model_is_the_zoo_natural_model_of_the_data_set(capsys, small_report, monkeypatch):
    import functools

    from uapx import pipeline
    from uapx.models import zoo
    from uapx.pipeline import AnalyzeConfig

    for ds in ("mnist", "cifar10"):  # one statement (uapx.defaults.default_model), a model the zoo ships
        assert AnalyzeConfig(dataset=ds).resolved().model == f"zoo:{ds}-natural"
        assert f"{ds}-natural" in zoo.names()
    seen = {}
    real = pipeline.apply_uaps
    spy = functools.wraps(real)(lambda path, **kw: seen.update(kw) or real(path, **kw))  # keeps the signature
    monkeypatch.setattr(pipeline, "apply_uaps", spy)
    code, _, _ = run(capsys, "apply", str(small_report / "uaps.pt"), "--n-samples", "20", "--random-draws", "1")
    assert code == 0 and seen["model"] == "zoo:mnist-natural"


def test_help_lists_architectures_attacks_and_zoo_models(capsys):
    from uapx.models import ARCHITECTURES, zoo

    code, out, _ = run(capsys, "analyze", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert all(a in flat for a in ARCHITECTURES)
    assert "pgd-l2" in flat and "pgd-linf" in flat
    assert all(f"zoo:{n}" in flat for n in zoo.names())


def test_zoo_lists_every_card_with_its_accuracies(capsys):
    from uapx.models import zoo

    code, out, _ = run(capsys, "zoo")
    assert code == 0
    for name in zoo.names():
        card = zoo.card(name)
        lines = out.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(f"zoo:{name} "))
        row, ra = lines[at], card["robust_attack"]
        assert f"{100 * card['clean_accuracy']:.2f}%" in row and f"{100 * card['robust_accuracy']:.2f}%" in row
        norm = {"l2": "L2", "linf": "Linf"}[ra["norm"]]
        assert f"{ra['steps']}-step PGD-{norm} eps {ra['eps']}" in row
        strong = card.get("strong_attack")
        if isinstance(strong, dict) and "accuracy" in strong:  # the next line: the strong attack, with its threat model
            nxt = lines[at + 1]
            assert f"{100 * strong['accuracy']:.2f}%" in nxt and f"{strong['steps']}-step PGD-" in nxt
            assert f"eps {strong['eps']} x {strong['restarts']} restarts" in nxt


def test_plugins_settings_lists_constructor_keys_with_defaults(capsys):
    code, out, _ = run(capsys, "plugins", "--settings")
    assert code == 0
    assert "--set svd.k=...  a whole number; default 5" in out
    assert "--set svd.center=...  true/false; default false" in out
    assert "--set sgd-uap.step_size=...  a number or none; default none" in out
    assert "--set pgd-l2.eps=...  a number; default --eps" in out


def test_disabling_a_plugin_works_before_and_after_the_subcommand(capsys):
    for argv in (["-p", "no:average", "plugins"], ["plugins", "-p", "no:average"]):
        code, out, _ = run(capsys, *argv)
        rows = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
        assert code == 0 and "average" not in rows and "svd" in rows
        assert "disabled  plugin 'average'" in out


def test_set_values_are_converted_to_the_constructor_types():
    from uapx.registry import get_registry
    from uapx.settings import convert

    svd = get_registry().get("svd").cls
    assert convert("svd", svd, {"k": "3", "center": "yes", "solver": "lapack"}) == \
        {"k": 3, "center": True, "solver": "lapack"}
    sgd = get_registry().get("sgd-uap").cls
    assert convert("sgd-uap", sgd, {"step_size": "none", "loss_clip": "2"}) == {"step_size": None, "loss_clip": 2.0}
    assert convert("sgd-uap", sgd, {"epochs": 4}) == {"epochs": 4}  # Python values pass as they are
