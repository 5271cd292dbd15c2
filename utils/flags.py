"""The argument parser of every script and tool: no prefix matching, and a mistake is one line.

argparse would take ``--epoch 1`` as ``--epochs 1`` (prefix matching) and answer a misspelt flag with the
whole usage block; here the first is refused like any unknown flag, and every error is one line that names
the nearest known flags, with exit code 2. Every option that takes a value shows its default in ``--help``.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn


def format_value(value: Any) -> str:
    """A value as a help text shows it: ``0.3333333333333333`` -> ``0.333333``, lists spaced, None -> ``none``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(format_value(v) for v in value)
    return "none" if value is None else str(value)


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to the help of an option that takes a value and has a default, unless the help
    already says what its default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if (action.option_strings and action.nargs != 0 and action.default not in (None, "", argparse.SUPPRESS)
                and "default" not in help):
            help += f" (default: {format_value(action.default)})".replace("%", "%%")
        return help


class FlagParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``allow_abbrev=False``, one-line errors and defaults in the help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        # An unknown flag is named before a missing required one: "--outt" says more than "--out is required".
        tokens = list(sys.argv[1:] if args is None else args)
        tokens = tokens[:tokens.index("--")] if "--" in tokens else tokens
        known = set(self.known_flags())
        unknown = [t for t in tokens if t.startswith("--") and t.split("=", 1)[0] not in known]
        if unknown:
            self.error(self.unknown_flags_message(unknown))
        return super().parse_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            message = self.unknown_flags_message(message.removeprefix("unrecognized arguments: ").split())
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def known_flags(self) -> list[str]:
        return [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]

    def unknown_flags_message(self, tokens: list[str]) -> str:
        """The unknown flags among ``tokens``, each with the nearest known ones ("did you mean --batch-size?")."""
        flags = [token.split("=", 1)[0] for token in tokens if token.startswith("-")]
        if not flags:
            return f"unexpected argument(s) {' '.join(tokens)}; every value follows its option"
        known = self.known_flags()
        parts = []
        for flag in flags:
            close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
            parts.append(f"{flag} (did you mean {' or '.join(close)}?)" if close else flag)
        return f"unknown option{'s' if len(flags) > 1 else ''} {', '.join(parts)}"


def parse_bool(text: str) -> bool:
    """A flag's true/false value, spelt as the stage options accept it (true/false, yes/no, on/off, 1/0)."""
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
             "off": False}.get(str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def add_shared_similarity(parser: argparse.ArgumentParser, help: str) -> None:
    """``--shared-similarity [BOOL]`` as the stage option of that name spells it, and the old
    ``--per-class-sim`` (= ``--shared-similarity false``) for scripts that use it."""
    parser.add_argument("--shared-similarity", nargs="?", const=True, default=True, type=parse_bool,
                        metavar="BOOL", help=help + " (default: true)")
    parser.add_argument("--per-class-sim", dest="shared_similarity", action="store_false",
                        help="old spelling of --shared-similarity false")
