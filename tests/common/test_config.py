"""Typed configuration: flags grouped by the class that declares them, plain fields that are not
flags, and refused values as one-line errors."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import opt, parse, parse_configs, to_argv


@dataclasses.dataclass
class Base:
    """Base settings."""

    name: str = opt("a", help="a name")


@dataclasses.dataclass
class Child(Base):
    """Child settings."""

    size: int = opt(1, help="a size")
    derived: int = 0  # filled in by code: no flag

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"--size must be >= 0, got {self.size}")


def test_help_groups_flags_by_the_class_declaring_them(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(Child, ["--help"])
    out = capsys.readouterr().out
    base, child = out.index("Base settings:"), out.index("Child settings:")
    assert base < out.index("--name NAME  a name", base) < child
    assert child < out.index("--size SIZE  a size", child)
    assert "--name" not in out[child:]


def test_plain_fields_are_not_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(Child, ["--derived", "3"])
    assert "unrecognized arguments: --derived" in capsys.readouterr().err
    assert to_argv(Child(name="x", size=2, derived=5)) == ["--name", "x", "--size", "2"]


def test_a_refused_value_is_one_line_and_exit_status_2(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_configs([Child], ["--size", "-1"], prog="demo")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "demo: error: --size must be >= 0, got -1\n"
    monkeypatch.setenv("TURNOUT_SIZE", "-2")  # from the environment alike
    with pytest.raises(SystemExit):
        parse(Child, [], prog="demo")
    assert capsys.readouterr().err == "demo: error: --size must be >= 0, got -2\n"
