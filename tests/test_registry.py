"""The plugin core: entry-point discovery, failure records, lookup, hook checking."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import uapx
from uapx.errors import UapxError
from uapx.registry import Registry

from plugin_dists import write_distribution

REPO = Path(__file__).resolve().parents[1]

GOOD = '''
import uapx
from uapx.methods import Direction, UAPMethod

class First(UAPMethod):
    name = "first-row"
    description = "the first perturbation row"
    def directions(self, pset):
        return [Direction(pset.matrix()[0])]

@uapx.hookimpl
def uapx_add_uap_methods():
    return [First]

@uapx.hookimpl
def uapx_report_environment():
    return {"goodplugin-lib": "9.9"}
'''


def test_builtins_come_through_entry_points():
    reg = Registry().load_entrypoints()
    names = {c.name: c for c in reg.components.values()}
    for name, kind in [("average", "method"), ("svd", "method"), ("pgd-l2", "attack"), ("pgd-linf", "attack")]:
        assert names[name].kind == kind
        assert names[name].plugin.distribution == "uapx"
        assert names[name].plugin.version == uapx.__version__
        assert names[name].description
    assert all(r.ok for r in reg.records if r.distribution == "uapx"), [r.error for r in reg.records]


def test_core_never_imports_a_plugin_by_name():
    pattern = re.compile(r"^\s*(from|import)\s+uapx_plugins", re.M)
    offenders = [p.name for p in (REPO / "uapx").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_third_party_distribution_is_discovered(tmp_path, monkeypatch):
    write_distribution(tmp_path, "goodplugin", "1.2.3", {"goodplugin": GOOD}, {"good": "goodplugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry().load_entrypoints()
    comp = reg.get("first-row")
    assert (comp.kind, comp.plugin.distribution, comp.plugin.version) == ("method", "goodplugin", "1.2.3")
    assert reg.environment()["goodplugin-lib"] == "9.9"


def test_broken_plugin_is_recorded_and_others_still_work(tmp_path, monkeypatch):
    write_distribution(tmp_path, "brokenplugin", "0.1", {"brokenplugin": "raise ImportError('no module named zzz')"},
                       {"broken": "brokenplugin"})
    write_distribution(tmp_path, "typoplugin", "0.1", {"typoplugin": "import uapx\n@uapx.hookimpl\n"
                       "def uapx_add_uap_method():\n    return []\n"}, {"typo": "typoplugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry().load_entrypoints()
    recs = {r.name: r for r in reg.records}
    assert "ImportError" in recs["broken"].error and "zzz" in recs["broken"].error
    assert "uapx_add_uap_method" in recs["typo"].error  # misspelled hook is an error
    assert reg.get("svd").kind == "method"
    with pytest.raises(UapxError, match="failed to load: broken"):
        reg.get("nonexistent")


def test_duplicate_names_are_refused(tmp_path, monkeypatch):
    dup = GOOD.replace('"first-row"', '"svd"')
    write_distribution(tmp_path, "dupplugin", "0.1", {"dupplugin": dup}, {"zz-dup": "dupplugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry().load_entrypoints()
    rec = next(r for r in reg.records if r.name == "zz-dup")
    assert "already provided" in rec.error
    assert reg.get("svd").plugin.distribution == "uapx"


def test_disabling(tmp_path, monkeypatch):
    write_distribution(tmp_path, "goodplugin", "1.0", {"goodplugin": GOOD}, {"good": "goodplugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "average" not in Registry(disabled=["average"]).load_entrypoints().components
    monkeypatch.setenv("UAPX_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry().load_entrypoints()
    assert "first-row" not in reg.components and "svd" in reg.components


def test_unknown_name_lists_the_known_ones():
    reg = Registry().load_entrypoints()
    with pytest.raises(UapxError) as exc:
        reg.check_names(["svd", "nope"])
    msg = str(exc.value)
    assert "'nope'" in msg and "average" in msg and "svd" in msg and "\n" not in msg
    with pytest.raises(UapxError, match="unknown attack"):
        reg.get("svd", "attack")
