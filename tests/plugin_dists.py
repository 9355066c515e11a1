"""Write real (if tiny) installed distributions: a module plus a ``.dist-info`` folder with its
own ``entry_points.txt`` -- exactly what pip leaves on disk for a plugin package."""
from __future__ import annotations

from pathlib import Path


def write_distribution(site: Path, dist: str, version: str, modules: dict[str, str],
                       entry_points: dict[str, str]) -> Path:
    """Install ``modules`` (name -> source) under ``site`` with entry points in group ``uapx``."""
    site.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[uapx]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    (info / "RECORD").write_text("")
    return info
