"""Small typed registries: the names a study file may use, mapped to the code behind them.

Every registry is filled by decorators in the module that defines the entries, so a
name exists exactly where its implementation is written (lm-eval's pattern).
"""

from __future__ import annotations

import inspect
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownName(KeyError):
    """A study file named something no registry holds."""

    def __init__(self, kind: str, name: str, allowed: list[str]):
        self.kind, self.name, self.allowed = kind, name, allowed
        super().__init__(f"unknown {kind} {name!r}; allowed: {', '.join(allowed)}")

    def __str__(self) -> str:
        return self.args[0]


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str = "") -> Callable[[T], T]:
        """Register under `name`; `doc`, the line `farm ls` shows, defaults to the first line of the
        entry's docstring (or of its `fn` or `load`: the function behind a record of it)."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = obj
            self._docs[name] = doc
            return obj

        return add

    def doc(self, name: str) -> str:
        entry = self.get(name)
        candidates = [getattr(entry, "fn", None), getattr(entry, "load", None), entry if callable(entry) else None]
        docs = [self._docs.get(name)] + [inspect.getdoc(c) for c in candidates if c is not None and c.__doc__]
        return next((d.strip().split("\n\n")[0].replace("\n", " ") for d in docs if d), "")

    def get(self, name: str) -> T:
        _load_builtins()
        if name not in self._entries:
            raise UnknownName(self.kind, name, self.names())
        return self._entries[name]

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._entries)


sources: Registry = Registry("dataset source")
transforms: Registry = Registry("transform")
stages: Registry = Registry("stage kind")
metrics: Registry = Registry("metric")
scorers: Registry = Registry("scorer")


def _load_builtins() -> None:
    # Importing these modules runs their @register decorators. They import only light
    # modules at top level (torch/trl are imported inside the functions that need them),
    # so validating a study file stays fast and starts nothing.
    import farm.data.sources  # noqa: F401
    import farm.data.transforms  # noqa: F401
    import farm.eval.harmlessness  # noqa: F401
    import farm.eval.harness  # noqa: F401
    import farm.eval.metrics  # noqa: F401
    import farm.eval.misalignment  # noqa: F401
    import farm.eval.reward  # noqa: F401
    import farm.eval.safety  # noqa: F401
    import farm.label.scorers  # noqa: F401
    import farm.train  # noqa: F401
