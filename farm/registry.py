"""Small typed registries: the names a study file may use, mapped to the code behind them.

Every registry is filled by decorators in the module that defines the entries, so a
name exists exactly where its implementation is written (lm-eval's pattern), and found by
listing its packages.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownName(KeyError, ValueError):
    """A study file named something no registry holds (a ValueError too, so a pydantic validator that
    looks a name up reports it as the field's error)."""

    def __init__(self, kind: str, name: str, allowed: list[str]):
        self.kind, self.name, self.allowed = kind, name, allowed
        super().__init__(f"unknown {kind} {name!r}; allowed: {', '.join(allowed)}")

    def __str__(self) -> str:
        return self.args[0]


class Registry(Generic[T]):
    """Names a study file may use, each registered by the module that defines it. The modules of
    `packages` are found by listing the packages, not by a hand-kept list: `get(name)` imports the
    module of that name first (`farm.stages.dpo` for "dpo"), and `names()` every module of them (a
    kind whose name is not its module's, such as `ai_feedback` in `farm.stages.cai`, is found so)
    and every module another installed package names by an entry point of the package's group.
    The modules import only light modules at top level (torch, trl and lm-eval inside the functions
    that need them), so validating a study file stays fast and starts nothing."""

    def __init__(self, kind: str, packages: tuple[str, ...]):
        self.kind, self.packages = kind, packages
        self._entries: dict[str, T] = {}
        self._docs: dict[str, str] = {}
        self._scanned = False

    def register(self, name: str, doc: str = "") -> Callable[[T], T]:
        """Register under `name`; `doc`, the line `farm ls` shows, defaults to the first line of the
        entry's docstring (or of its `run`, `fn` or `load`: the function behind a stage kind or a record of it)."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = obj
            self._docs[name] = doc
            return obj

        return add

    def doc(self, name: str) -> str:
        entry = self.get(name)
        # A class's own docstring, not one it inherits (a stage kind's base class says what every stage has).
        candidates = [entry if callable(entry) else None, *(getattr(entry, a, None) for a in ("run", "fn", "load"))]
        docs = [self._docs.get(name)] + [vars(c).get("__doc__") if isinstance(c, type) else c.__doc__ for c in candidates if c is not None]
        return next((inspect.cleandoc(d).split("\n\n")[0].replace("\n", " ") for d in docs if d), "")

    def get(self, name: str) -> T:
        if name not in self._entries and name.isidentifier():  # ("x.y" would name a package x)
            for package in self.packages:
                if importlib.util.find_spec(f"{package}.{name}") is not None:
                    importlib.import_module(f"{package}.{name}")
        if name not in self._entries:
            self._scan()
        if name not in self._entries:
            raise UnknownName(self.kind, name, self.names())
        return self._entries[name]

    def names(self) -> list[str]:
        self._scan()
        return sorted(self._entries)

    def _scan(self) -> None:
        if not self._scanned:
            for package in self.packages:
                for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
                    importlib.import_module(f"{package}.{module.name}")
                # Entries of other installed packages: their modules named by entry points of the
                # package's name as group (a kind of one's own: group "farm.stages").
                for entry in importlib.metadata.entry_points(group=package):
                    entry.load()
            self._scanned = True


sources: Registry = Registry("dataset source", ("farm.data",))
transforms: Registry = Registry("transform", ("farm.data",))
stages: Registry = Registry("stage kind", ("farm.stages",))
metrics: Registry = Registry("metric", ("farm.eval",))
scorers: Registry = Registry("scorer", ("farm.label",))
# A study's steps after its grid (Study E's pairwise arena): objects with `wanted(study)`, `done(out)`,
# `run(trials, plans, store, out)` and `tables(out)` for the report, `out` the study's results folder.
steps: Registry = Registry("after-grid step", ("farm.eval",))
