"""Every bad input through the CLI: one line naming the fix, a non-zero exit, no traceback, nothing lost."""
from __future__ import annotations

import torch
from torch import nn

import pytest

from uapx.cli import main
from uapx.models import save_model
from uapx.models.architectures import build

from plugin_dists import write_distribution

FAST = ["--n-samples", "20", "--steps", "2", "--batch-size", "10", "--random-draws", "1", "--k", "1"]


class NaNNet(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] * float("nan")


def make_case(name: str, tmp_path, monkeypatch):
    """Build the bad input; returns (argv, expected words in the error)."""
    if name == "missing data root":
        return ["analyze", "--data-root", str(tmp_path / "nope")], "does not exist"
    if name == "wrong data layout":
        (tmp_path / "root" / "cifar10-jpeg" / "test" / "cats").mkdir(parents=True)
        return ["analyze", "--dataset", "cifar10", "--data-root", str(tmp_path / "root")], "class folders"
    if name == "data root without the data set":
        (tmp_path / "empty").mkdir()
        return ["analyze", "--data-root", str(tmp_path / "empty")], "no mnist test data found"
    if name == "truncated checkpoint":
        p = tmp_path / "m.pt"
        save_model(p, build("mnist-cnn"), "mnist-cnn")
        p.write_bytes(p.read_bytes()[:5000])
        return ["analyze", "--model", str(p)], "is corrupt, truncated"
    if name == "checkpoint of another architecture":
        p = tmp_path / "r.pt"
        torch.save(build("resnet-small").state_dict(), p)
        return ["analyze", "--model", str(p), "--arch", "mnist-cnn"], "does not fit"
    if name == "eps <= 0":
        return ["analyze", "--eps", "-0.5"], "--eps: must be a positive"
    if name == "steps < 1":
        return ["analyze", "--steps", "0"], "--steps: must be >= 1"
    if name == "step size <= 0":
        return ["analyze", "--step-size", "-1"], "--step-size: must be a positive"
    if name == "NaN arising in gradients":
        p = tmp_path / "nan.pt"
        torch.jit.script(NaNNet()).save(str(p))
        return ["analyze", "--model", str(p)], "NaN or Inf"
    if name == "unknown plugin":
        return ["analyze", "--plugins", "svd,spectrun"], "choose from"
    if name == "plugin that raises":
        write_distribution(tmp_path / "site", "raiser", "0.1", {"raiser": RAISER}, {"raiser": "raiser"})
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        return ["analyze", "--plugins", "raiser"], "plugin 'raiser' failed: RuntimeError: boom"
    if name == "unwritable output folder":
        (tmp_path / "file").write_text("x")
        return ["analyze", "--out", str(tmp_path / "file" / "rep")], "cannot write"
    if name == "report folder holding another run":
        return ["analyze", "--out", str(tmp_path / "existing")], "--overwrite"
    if name == "more samples than exist":
        return ["analyze", "--n-samples", "10001"], "between 1 and 10000"
    if name == "unknown attack":
        return ["analyze", "--attack", "fgsm"], "unknown attack"
    if name == "malformed --set":
        return ["analyze", "--set", "svd=3"], "PLUGIN.KEY=VALUE"
    raise KeyError(name)


RAISER = '''
import uapx
from uapx.methods import UAPMethod

class Raiser(UAPMethod):
    name = "raiser"
    description = "always fails"
    def directions(self, pset):
        raise RuntimeError("boom")

@uapx.hookimpl
def uapx_add_uap_methods():
    return [Raiser]
'''

CASES = ["missing data root", "wrong data layout", "data root without the data set", "truncated checkpoint",
         "checkpoint of another architecture", "eps <= 0", "steps < 1", "step size <= 0",
         "NaN arising in gradients", "unknown plugin", "plugin that raises", "unwritable output folder",
         "report folder holding another run", "more samples than exist", "unknown attack", "malformed --set"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, tmp_path, monkeypatch, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "report.json").write_text('{"precious": true}')
    argv, needle = make_case(case, tmp_path, monkeypatch)
    out_given = "--out" in argv
    if not out_given:
        argv += ["--out", str(tmp_path / "rep")]
    code = main([argv[0], *FAST, *argv[1:]])  # the case's own options come last and win
    err = capsys.readouterr().err
    assert code in (2, 3), err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("uapx: error: "), err  # progress bars aside
    assert err.rstrip("\n").splitlines()[-1] == errors[0]
    assert needle in errors[0] and "fix: " in errors[0] and "Traceback" not in err
    assert (existing / "report.json").read_text() == '{"precious": true}'  # nothing lost
    assert not (tmp_path / "rep").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing half-written


def test_images_outside_the_box_and_nan_inputs_via_the_api():
    from uapx.errors import UapxError
    from uapx.pipeline import _check_images

    with pytest.raises(UapxError, match="outside \\[0, 1\\]"):
        _check_images(torch.full((2, 1, 4, 4), 1.5))
    with pytest.raises(UapxError, match="NaN or Inf"):
        _check_images(torch.tensor([[[[float("nan")]]]]))
