"""Typed configuration: one dataclass per service, read from CLI flags with `TURNOUT_*` fallbacks.

A service declares its settings once, as dataclass fields with `opt(...)`; `parse()` builds the
argparse parser from them, takes each default from the environment (`--kv-block-size` falls back
to `TURNOUT_KV_BLOCK_SIZE`), and returns the filled dataclass. Values from the environment are
parsed with the field's type, so a bad `TURNOUT_PORT=abc` is a clear start-up error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "TURNOUT_"


def opt(default: Any = dataclasses.MISSING, help: str = "", choices: Sequence[Any] | None = None,
        flag: str | None = None) -> Any:
    """A config field: its default, help text, allowed values and (rarely) a custom flag name."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def env_name(field: dataclasses.Field[Any]) -> str:
    return ENV_PREFIX + field.name.upper()


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


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """Add one flag per field of dataclass `cls` to `parser`, defaults from the environment."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
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
                parser.add_argument(name, dest=field.name, action=argparse.BooleanOptionalAction,
                                    default=default, help=help_text)
                continue
            if tp is list:
                if raw is not None:
                    default = [p for p in raw.split(",") if p]
                parser.add_argument(name, dest=field.name, nargs="*", default=default,
                                    help=help_text)
                continue
            if raw is not None:
                default = tp(raw)
        except ValueError as exc:
            parser.error(f"environment variable {env}={raw!r}: {exc}")
        parser.add_argument(name, dest=field.name, type=tp, default=default,
                            choices=field.metadata.get("choices"), help=help_text)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def parse(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
          description: str | None = None) -> T:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))


def to_argv(config: Any, only: Sequence[str] | None = None) -> list[str]:
    """Flags that reproduce `config` (for passing settings through to child processes)."""
    argv: list[str] = []
    for field in dataclasses.fields(config):
        if only is not None and field.name not in only:
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
    flag that fills both (so `turnout up --block-size 32` reaches worker and router alike)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    seen: set[str] = set()
    for cls in classes:
        add_arguments(parser, cls, skip=sorted(seen))
        seen.update(f.name for f in dataclasses.fields(cls))
    ns = parser.parse_args(argv)
    return [from_namespace(cls, ns) for cls in classes]


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

    def model_name(self) -> str:
        return self.served_model_name or self.model or "mock"
