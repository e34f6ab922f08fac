"""The machinery of wm_jax's configuration sections (config.py): frozen dataclasses whose fields
are type-checked at construction, static or traced (`traced`, `Section.static`, `Section.hyper`),
built back from JSON (`from_dict`), compared (`diff`) and hashed (`json_digest`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import numbers
import typing
from dataclasses import field
from typing import Any

import jax.numpy as jnp
import numpy as np


class ConfigError(ValueError):
    """A configuration value has the wrong type or is out of range."""


SEED_RANGE = 2**32  # jax.random.key(seed) keeps 32 bits of the seed: 2**32 collides with 0


def check_seed(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not 0 <= value < SEED_RANGE:
        raise ConfigError(f"{type(obj).__name__}.{name} must be in [0, 2**32) (the seeds the PRNG tells apart), "
                          f"got {value!r}")


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:  # tuple[int, ...]
        return isinstance(value, tuple) and all(_type_ok(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if hint is float:  # an int is a float's value too
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    return isinstance(value, hint)


def _plain(value: Any) -> Any:
    """numpy and jax scalars (0-d arrays included) as the Python number they hold: the config is
    written as JSON and compared with what JSON gives back."""
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic) or (getattr(value, "ndim", None) == 0 and hasattr(value, "item")):
        return value.item()
    return value


def _check_types(obj: Any) -> None:
    """Every field of `obj` has its declared type (numpy and jax scalars become Python numbers) and
    every float is finite (JSON has no inf or NaN): a mistyped value, e.g. a string in an edited
    config.json, is a ConfigError naming the field, not a TypeError deep in validation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = _plain(getattr(obj, f.name)), hints[f.name]
        object.__setattr__(obj, f.name, value)
        if not _type_ok(value, hint):
            want = getattr(hint, "__name__", str(hint))
            raise ConfigError(f"{type(obj).__name__}.{f.name} must be {want}, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{type(obj).__name__}.{f.name} must be finite, got {value!r}")


def positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


def non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value >= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be >= 0, got {value!r}")


def traced(default: float) -> Any:
    """A traced float field: it travels in `cfg.hyper()`, not in the static config."""
    return field(default=default, metadata={"traced": True})


class Traced:
    """Stands in for a traced field in `cfg.static()`. Equal (and hashing equal) to every marker of
    the same field, so the static config ignores the value; any use of it as a number fails."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Traced) and other.path == self.path

    def __hash__(self) -> int:
        return hash(("Traced", self.path))

    def __repr__(self) -> str:
        return f"Traced({self.path!r})"

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{self.path} is a traced hyperparameter: read it from the hyper pytree (cfg.hyper()), "
                        f"not from the static config")

    __float__ = __int__ = __bool__ = __index__ = __neg__ = __abs__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __pow__ = __rpow__ = __lt__ = __le__ = __gt__ = __ge__ = __array__ = __jax_array__ = _refuse


class Section:
    """static() / hyper() for a config dataclass and the config dataclasses inside it; every
    section checks its fields' types before its own validation."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the class's own validation, or the one it inherits (a subclass keeps its parent's checks)
        own = cls.__dict__.get("__post_init__") or getattr(cls, "_validate", None)
        cls._validate = own  # type: ignore[attr-defined]

        def __post_init__(self: Any) -> None:
            _check_types(self)
            if own is not None:
                own(self)

        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]

    def static(self, _path: str = "") -> Any:
        """This config with every traced field (here and below) replaced by its `Traced` marker."""
        out = copy.copy(self)  # not dataclasses.replace: the markers would fail validation
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, path = getattr(self, f.name), f"{_path or type(self).__name__}.{f.name}"
            if f.metadata.get("traced"):
                object.__setattr__(out, f.name, Traced(path))
            elif isinstance(value, Section):
                object.__setattr__(out, f.name, value.static(path))
        return out

    def hyper(self) -> dict[str, Any]:
        """The traced fields (here and below) as a nested dict of float32 scalars: a jit-traced pytree."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata.get("traced"):
                out[f.name] = jnp.asarray(value, jnp.float32)
            elif isinstance(value, Section) and (sub := value.hyper()):
                out[f.name] = sub
        return out


def one_of(obj: Any, name: str, options: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in options:
        raise ConfigError(f"{type(obj).__name__}.{name} must be one of {options}, got {value!r}")


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value = d[f.name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if isinstance(value, dict) and sub is not None and dataclasses.is_dataclass(sub()):
            value = from_dict(type(sub()), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, value in a, value in b) for every leaf where two nested dicts (to_dict's
    form) differ; lists and tuples compare by their items."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [(prefix, a, b)]


def json_digest(obj: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces): the hash a record file
    (agent.json, an export's config.json) carries of its own content."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))  # an edit may bring NaN: it hashes, and differs
    return hashlib.sha256(text.encode()).hexdigest()
