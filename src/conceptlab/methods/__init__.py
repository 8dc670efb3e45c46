"""Ways of teaching the frozen backbone a concept: one module per method, one interface (base.Method).

Methods are found, not listed: every module of this package that defines a concrete Method subclass,
and every class another installed package advertises under the `conceptlab.methods` entry-point
group (`[project.entry-points."conceptlab.methods"] mine = "my_pkg.my_method:MyMethod"`), so a
user's own method works like the shipped ones.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import ConceptFileError, ConfigError
from ..formats import read_tensor_file, reading
from .base import Concept, Method

ENTRY_POINT_GROUP = "conceptlab.methods"
__all__ = ["Concept", "Method", "registered_methods", "read_concept", "ENTRY_POINT_GROUP"]


def _methods_in(module) -> list[type[Method]]:
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Method)
        and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]


@functools.cache
def registered_methods() -> dict[str, type[Method]]:
    """Every method conceptlab can train and read files of, by name."""
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            for cls in _methods_in(importlib.import_module(f"{__name__}.{info.name}")):
                found[cls.name] = cls
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        cls = entry.load()
        if not (inspect.isclass(cls) and issubclass(cls, Method)):
            raise ConfigError(
                f"entry point {entry.name} = {entry.value} ({ENTRY_POINT_GROUP}) is not a conceptlab Method class"
            )
        found[cls.name] = cls
    return found


def read_concept(path: str | Path) -> Concept:
    """The learned concept in a file, recognised by the method whose format it is."""
    with reading(path):
        file = read_tensor_file(path)
        for method in registered_methods().values():
            concept = method.concept_from_file(file)
            if concept is not None:
                return concept
    known = "; ".join(f"{name}: {cls.file_formats}" for name, cls in registered_methods().items())
    raise ConceptFileError(f"{file.path} is not a concept file of any method conceptlab knows ({known})")
