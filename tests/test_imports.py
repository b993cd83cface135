"""Every module of the package imports (catches a broken import in code no other test reaches)."""

import importlib
import pkgutil

import vpotool


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(vpotool.__path__, "vpotool.")]
    assert "vpotool.stages.sample" in names
    for name in names:
        importlib.import_module(name)
