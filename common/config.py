"""Typed configuration: one dataclass per service, read from CLI flags with `TURNOUT_*` fallbacks.

A service declares its settings once, as dataclass fields with `opt(...)`; `parse()` builds the
argparse parser from them, takes each default from the environment (`--block-size` falls back
to `TURNOUT_BLOCK_SIZE`), and returns the filled dataclass. Values from the environment are
parsed with the field's type, so a bad `TURNOUT_PORT=abc` is a clear start-up error, and so is a
value the dataclass's `__post_init__` refuses (a `ValueError`: one line, exit status 2).

Only fields made with `opt` are flags; a plain dataclass field is a setting the code fills in.
`--help` lists the flags in one group per dataclass that declares them, titled by the first line
of its docstring, so a command that takes several configs reads grouped.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "TURNOUT_"


class StartupRefused(ValueError):
    """A start-up check refused the environment (unsafe keys or discovery directory): the
    service exits with this one line, not a traceback."""


def opt(default: Any = dataclasses.MISSING, help: str = "", choices: Sequence[Any] | None = None,
        flag: str | None = None) -> Any:
    """A config field: its default, help text, allowed values and (rarely) a custom flag name."""
    meta = {"help": help, "choices": choices, "flag": flag, "cli": True}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def require(config: object, rule: str, *names: str, holds: Callable[[Any], bool]) -> None:
    """ValueError naming the first of `names` (fields of `config`) whose value `holds` refuses,
    as `--flag-name must <rule>, got <value>`; write `holds` so that NaN fails it."""
    for name in names:
        value = getattr(config, name)
        if not holds(value):
            raise ValueError(f"--{name.replace('_', '-')} must {rule}, got {value}")


def is_flag(field: dataclasses.Field[Any]) -> bool:
    """Whether a field is a command-line flag (made with `opt`)."""
    return bool(field.metadata.get("cli"))


def flag_name(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def env_name(field: dataclasses.Field[Any]) -> str:
    return ENV_PREFIX + field.name.upper()


def on_command_line(argv: Sequence[str], name: str) -> bool:
    """Whether the flag of field `name` is on the command line `argv` (`--flag v`, `--flag=v`)."""
    flag = "--" + name.replace("_", "-")
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def flag_given(argv: Sequence[str], name: str) -> bool:
    """Whether the flag of field `name` is on the command line `argv` or its TURNOUT_* variable
    in the environment (a default that was chosen rather than fallen back on)."""
    return on_command_line(argv, name) or ENV_PREFIX + name.upper() in os.environ


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation like `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])[0], True
    if origin is list:
        return list, False
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def group_title(cls: type) -> str:
    """The first line of the class's own docstring (a dataclass without one: its name)."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(cls.__name__ + "("):  # the signature dataclasses writes
        return cls.__name__
    return doc.strip().splitlines()[0].rstrip(".")


def declaring_class(cls: type, name: str) -> type:
    """The class in `cls`'s hierarchy that declares field `name` (a subclass's own flags read
    apart from those it inherits)."""
    for klass in cls.__mro__:
        if name in inspect.get_annotations(klass):
            return klass
    return cls


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                  groups: dict[str, Any] | None = None) -> None:
    """Add one flag per `opt` field of dataclass `cls` to `parser`, defaults from the
    environment, in one argument group per class that declares fields (`groups`: the groups
    made so far, by title, when several classes share a parser)."""
    hints = typing.get_type_hints(cls)
    groups = {} if groups is None else groups
    for field in dataclasses.fields(cls):
        if field.name in skip or not is_flag(field):
            continue
        title = group_title(declaring_class(cls, field.name))
        group = groups.get(title)
        if group is None:
            group = groups[title] = parser.add_argument_group(title)
        tp, _optional = _base_type(hints[field.name])
        name = flag_name(field)
        env = env_name(field)
        default = (field.default if field.default is not dataclasses.MISSING
                   else field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else None)
        help_text = f"{field.metadata.get('help', '')} [env {env}; default {default!r}]"
        raw = os.environ.get(env)
        try:
            if tp is bool:
                if raw is not None:
                    default = _parse_bool(raw)
                group.add_argument(name, dest=field.name, action=argparse.BooleanOptionalAction,
                                   default=default, help=help_text)
                continue
            if tp is list:
                if raw is not None:
                    default = [p for p in raw.split(",") if p]
                group.add_argument(name, dest=field.name, nargs="*", default=default,
                                   help=help_text)
                continue
            if raw is not None:
                default = tp(raw)
        except ValueError as exc:
            parser.error(f"environment variable {env}={raw!r}: {exc}")
        group.add_argument(name, dest=field.name, type=tp, default=default,
                           choices=field.metadata.get("choices"), help=help_text)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls) if is_flag(f)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def _build(parser: argparse.ArgumentParser, classes: Sequence[type],
           ns: argparse.Namespace) -> list[Any]:
    """The filled configs; a value a config refuses is a one-line error (exit status 2), not a
    traceback and not argparse's whole usage text."""
    try:
        return [from_namespace(cls, ns) for cls in classes]
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def parse(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
          description: str | None = None) -> T:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, cls)
    return _build(parser, [cls], parser.parse_args(argv))[0]


def to_argv(config: Any, only: Sequence[str] | None = None) -> list[str]:
    """Flags that reproduce `config` (for passing settings through to child processes)."""
    argv: list[str] = []
    for field in dataclasses.fields(config):
        if not is_flag(field) or (only is not None and field.name not in only):
            continue
        value = getattr(config, field.name)
        if value is None:
            continue
        name = flag_name(field)
        if isinstance(value, bool):
            argv.append(name if value else "--no-" + name[2:])
        elif isinstance(value, list):
            argv.extend([name, *map(str, value)])
        else:
            argv.extend([name, str(value)])
    return argv


def parse_configs(classes: Sequence[type], argv: Sequence[str] | None = None,
                  prog: str | None = None, description: str | None = None) -> list[Any]:
    """Parse one argv into several config dataclasses; a field name shared by two classes is one
    flag that fills both (so `turnout up --hash-seed 7` reaches workers and router alike)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    seen: set[str] = set()
    groups: dict[str, Any] = {}
    for cls in classes:
        add_arguments(parser, cls, skip=sorted(seen), groups=groups)
        seen.update(f.name for f in dataclasses.fields(cls) if is_flag(f))
    return _build(parser, classes, parser.parse_args(argv))


@dataclasses.dataclass
class ProcessConfig:
    """Settings every Turnout process has."""

    discovery: str = opt("file:/tmp/turnout-discovery",
                         help="discovery backend: file:DIR, static:FILE.json or kubernetes")
    host: str = opt("127.0.0.1", help="address to bind")
    advertise_host: str = opt("", help="address peers use to reach this process (default: host)")
    log_level: str = opt("warning", choices=["debug", "info", "warning", "error"])
    model: str = opt("", help="HF model directory or name; empty: the built-in byte-level model")
    served_model_name: str = opt("", help="model name clients use (default: --model, or 'mock')")
    lease_ttl_s: float = opt(10.0, help="discovery lease; failures are detected much faster")
    keys_dir: str = opt("", help="fleet CURVE keys (`turnout keys generate DIR`): with it the "
                        "request and event planes are encrypted and admit only the fleet")

    def __post_init__(self) -> None:
        require(self, "be positive", "lease_ttl_s", holds=lambda v: v > 0)
        ports = [f.name for f in dataclasses.fields(self)
                 if f.name == "port" or f.name.endswith("_port")]
        require(self, "lie in 0-65535 (0: any free port)", *ports,
                holds=lambda v: 0 <= v <= 65535)

    def model_name(self) -> str:
        return self.served_model_name or self.model or "mock"
