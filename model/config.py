"""One source of defaults: dataclass configs whose fields are also the command-line flags.

    @dataclass
    class TrainConfig:
        steps: int = option(1000, "optimizer steps", check=POSITIVE)

        def __post_init__(self):
            validate(self)

    add_config_arguments(parser, TrainConfig, defaults={"steps": 300})   # --steps, checked at parse time
    cfg = config_from_args(TrainConfig, args)                            # the dataclass, validated again

A field's default is the default everywhere (Python and CLI); a command changes it only through ``defaults``,
which its ``--help`` then shows.
"""
from __future__ import annotations

import argparse
import math
import typing
from dataclasses import MISSING, Field, dataclass, field, fields


@dataclass(frozen=True)
class Check:
    test: typing.Callable[[typing.Any], bool]
    text: str

    def __call__(self, value) -> bool:
        return self.test(value)


POSITIVE = Check(lambda x: x > 0 and math.isfinite(x), "> 0")
NON_NEGATIVE = Check(lambda x: x >= 0 and math.isfinite(x), ">= 0")
FRACTION = Check(lambda x: 0 <= x < 1, "in [0, 1)")
UNIT = Check(lambda x: 0 < x <= 1, "in (0, 1]")


def option(default=MISSING, help: str = "", *, check: Check | None = None, choices=None, flag: str | None = None,
           cli: bool = True) -> Field:
    """A config field: its default, --help text, validity check and choices (``cli=False``: not a flag)."""
    meta = {"help": help, "check": check, "choices": choices, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(f: Field, prefix: str = "") -> str:
    return f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-")


def _problem(f: Field, value) -> str | None:
    check, choices = f.metadata.get("check"), f.metadata.get("choices")
    if value is None:
        return None
    if choices is not None and value not in choices:
        return f"must be one of {list(choices)}, got {value!r}"
    if check is not None and not check(value):
        return f"must be {check.text}, got {value!r}"
    return None


def validate(cfg, prefix: str = "") -> None:
    """ValueError naming the flag of the first invalid field of ``cfg``."""
    for f in fields(cfg):
        problem = _problem(f, getattr(cfg, f.name))
        if problem:
            raise ValueError(f"{type(cfg).__name__}.{f.name} ({flag_name(f, prefix)}) {problem}")


def _base_type(hint):
    """int for int / int | None; list for list[...]; else the hint itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _base_type(args[0])
    return typing.get_origin(hint) or hint


def _parser_type(f: Field, base):
    def convert(text: str):
        if base is list:
            value = [t.strip() for t in text.split(",") if t.strip()]
        else:
            try:
                value = base(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        problem = _problem(f, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = getattr(base, "__name__", "value")
    return convert


def add_config_arguments(parser, cls, *, defaults: dict | None = None, skip=(), prefix: str = "") -> None:
    """One flag per field of ``cls`` (``--prefix-name``); ``defaults`` overrides the dataclass defaults."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    unknown = set(defaults) - {f.name for f in fields(cls)}
    if unknown:
        raise TypeError(f"add_config_arguments: {cls.__name__} has no fields {sorted(unknown)}")
    for f in fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
        base = _base_type(hints[f.name])
        kw = dict(dest=prefix + f.name, default=default, help=f.metadata.get("help", ""))
        if base is bool:
            parser.add_argument(flag_name(f, prefix), action=argparse.BooleanOptionalAction, **kw)
            continue
        if default is None and f.name not in defaults and f.default is MISSING and f.default_factory is MISSING:
            kw["required"] = True
        if f.metadata.get("choices") is not None:
            kw["choices"] = f.metadata["choices"]
        if kw["help"] and default is not None and base is not list:
            kw["help"] += " (default: %(default)s)"
        parser.add_argument(flag_name(f, prefix), type=_parser_type(f, base), **kw)


def config_from_args(cls, args, *, prefix: str = "", **overrides):
    """``cls`` from the flags add_config_arguments added (a field absent from ``args`` keeps its default)."""
    kw = {f.name: getattr(args, prefix + f.name) for f in fields(cls) if hasattr(args, prefix + f.name)}
    return cls(**{**kw, **overrides})


def _checked(base, check: Check):
    def convert(text: str):
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {check.text}, got {text}")
        return value

    convert.__name__ = base.__name__
    return convert


# argparse types for flags outside a config dataclass
positive_int = _checked(int, POSITIVE)
positive_float = _checked(float, POSITIVE)
