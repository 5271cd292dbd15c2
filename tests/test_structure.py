"""The code base's own rules: messages name real flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from utils.config import OPTIONS

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("data", "engine", "losses", "models", "tools", "utils") for p in sorted((ROOT / d).rglob("*.py"))]
CODE += sorted(ROOT.glob("step*.py"))
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:[-_][a-z0-9]+)*)")
# Flags of other programs that our text names on purpose (argparse's --help, git's, torchrun's), and the
# placeholder of a usage line ("[--flag value ...]").
FOREIGN = {"help", "porcelain", "untracked-files", "standalone", "nproc_per_node", "nproc-per-node", "flag"}


def _strings_and_flags(path: Path) -> tuple[list[str], set[str]]:
    """Every string constant in ``path`` and every flag it defines with ``add_argument``."""
    strings, defined = [], set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.append(node.value)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            defined |= {a.value[2:] for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return strings, defined


def test_every_flag_named_in_a_message_exists():
    defined = {key.replace("_", "-") for key in OPTIONS} | {"config", "preset"}
    named: dict[str, set[str]] = {}
    for path in CODE:
        strings, flags = _strings_and_flags(path)
        defined |= flags
        for text in strings:
            for match in FLAG.finditer(text):
                named.setdefault(match.group(1), set()).add(path.relative_to(ROOT).as_posix())
    assert len(named) > 20  # the scan sees the messages
    unknown = {flag: sorted(files) for flag, files in named.items() if flag not in defined | FOREIGN}
    assert not unknown, f"messages name flags that no parser defines: {unknown}"
