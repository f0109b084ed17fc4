"""Command-line plumbing shared by every entry point: parsers built from config dataclasses, and one-line errors.

    @dataclass
    class TrainConfig:
        lr: float = arg(1e-4, "peak learning rate")
        train_mode: str = arg("ups_only", "what trains", choices=("ups_only", "joint"))
        remask: bool = arg(True, "re-mask committed tokens", flags=("--no_remask",))

    parser = ArgumentParser(description="...")
    add_config_args(parser, TrainConfig, group="optimisation")   # one declaration per setting
    cfg = config_from_args(TrainConfig, parser.parse_args(argv))

    if __name__ == "__main__":
        run_main(main)       # a user's mistake: `error: <what and how to fix>` on stderr, exit 2, no traceback

A user's mistake is a `UserError`, a `ValueError` or a missing / unreadable path (`FileNotFoundError`,
`NotADirectoryError`, `IsADirectoryError`, `PermissionError`): the library raises those with messages that name
the problem and the fix, and `run_main` prints them as one line. Anything else is a bug and keeps its traceback.
`REMEDI_DEBUG=1` shows the traceback of a user error too.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any, Callable, Optional, Sequence, TypeVar

T = TypeVar("T")
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake in what the user asked for (flags, paths, data); the message says what is wrong and the fix."""


def one_line(message: str) -> str:
    """The message with its line breaks folded into spaces (an error is printed as one line)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: str) -> typing.NoReturn:
    """Print `error: <message>` as one line to stderr and exit 2."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def run_main(main: Callable[..., Any], argv: Optional[Sequence[str]] = None) -> Any:
    """Call `main(argv)`; a user error becomes one `error:` line and exit status 2 (see the module docstring)."""
    try:
        return main(argv) if argv is not None else main()
    except USER_ERRORS as err:
        if os.environ.get("REMEDI_DEBUG"):
            raise
        message = str(err) if not isinstance(err, OSError) or err.filename is None or str(err.filename) in str(err) \
            else f"{err.strerror}: {err.filename}"
        fail(message or type(err).__name__)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (a script's docstring keeps its layout); defaults shown, except a None whose help
    already says what it resolves to."""

    def _get_help_string(self, action):
        if action.default is None and "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: one `error:` line (no usage block), exit 2; defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        fail(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------- parsers from config dataclasses


def arg(default: Any, help: str, *, flags: Sequence[str] = (), choices: Optional[Sequence[Any]] = None,
        group: Optional[str] = None, cli: bool = True, metavar: Optional[str] = None) -> Any:
    """A dataclass field carrying its command-line declaration.

    flags: option strings (default `--<name>`); a bool field whose only flag starts with `--no_` is switched off by
    it. group: argparse group title (default: the one given to add_config_args). cli=False: not on the command line.
    List defaults are copied per instance.
    """
    meta = {"help": help, "flags": tuple(flags), "choices": None if choices is None else tuple(choices),
            "group": group, "cli": cli, "metavar": metavar}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_config_args(parser: argparse.ArgumentParser, cls: type, group: Optional[str] = None,
                    exclude: Sequence[str] = (), defaults: Optional[dict] = None) -> argparse.ArgumentParser:
    """Add one option per field of dataclass `cls` declared with `arg()` (name, type, default, help, choices).

    Types: bool (store_true, or store_false for a `--no_*` flag), int / float / str / Path and their Optional,
    list[X] (nargs '+'). `defaults` overrides field defaults for this parser only (e.g. a CLI tuned for a task).
    """
    hints = typing.get_type_hints(cls)
    groups: dict[Optional[str], Any] = {}
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in exclude or not meta or not meta.get("cli", True):
            continue
        title = meta.get("group") or group
        if title not in groups:
            groups[title] = parser if title is None else _group(parser, title)
        target = groups[title]
        flags = meta["flags"] or (f"--{f.name}",)
        default = defaults.get(f.name, _default(f))
        tp = unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if tp is bool:
            negative = len(flags) == 1 and flags[0].startswith("--no_")
            kwargs.update(action="store_false" if negative else "store_true", default=default)
        else:
            if typing.get_origin(tp) in (list, Sequence, tuple):
                tp = typing.get_args(tp)[0]
                kwargs["nargs"] = "+"
            kwargs.update(type=tp, default=default)
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        target.add_argument(*flags, **kwargs)
    return parser


def _group(parser: argparse.ArgumentParser, title: str):
    for existing in parser._action_groups:  # reuse a group of the same title (several dataclasses, one section)
        if existing.title == title:
            return existing
    return parser.add_argument_group(title)


def config_from_args(cls: type[T], namespace: argparse.Namespace, **overrides: Any) -> T:
    """An instance of dataclass `cls` from the parsed namespace (fields missing from it keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    values.update(overrides)
    return cls(**values)


# ---------------------------------------------------------------- defaults that depend on the run (the recipes)


def recipe_help(what: str, recipe: Any, when: str, general: Any) -> str:
    """Help text of a default left None in a config and resolved by the run: `recipe` `when` (e.g. "with the embedded
    model"), else `general`."""
    default = f"default {recipe} {when}, else {general}"
    return f"{what}; {default}" if what else default


def fill_none(config: Any, defaults: dict, keep_none: Sequence[str] = ()) -> Any:
    """Set every field of `config` that is None to its value in `defaults`, except those in `keep_none`
    (idempotent; returns `config`)."""
    for name, value in defaults.items():
        if getattr(config, name) is None and name not in keep_none:
            setattr(config, name, value)
    return config

