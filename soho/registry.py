"""Registries: classes found by their ``name`` (tasks, pre-training objectives)."""
from __future__ import annotations

from typing import Dict, Type, TypeVar

from soho.config import ConfigError

C = TypeVar("C", bound=type)


class Registry(Dict[str, type]):
    """Classes by their ``name`` attribute, in registration order; :meth:`register` is a class decorator."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls: C) -> C:
        if cls.name in self and self[cls.name] is not cls:
            raise ValueError(f"a {self.kind} named {cls.name!r} is already registered ({self[cls.name].__name__})")
        self[cls.name] = cls
        return cls

    def lookup(self, name: str, key: str) -> Type:
        """The class registered as ``name``; a ConfigError naming the config ``key`` when there is none."""
        if name not in self:
            raise ConfigError(f"{key}: no {self.kind} named {name!r} (registered: {', '.join(self)})")
        return self[name]
