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
# Flags of other programs that our text names on purpose (argparse's --help, git's, torchrun's, nvidia-smi's,
# sbatch's), and the placeholder of a usage line ("[--flag value ...]").
FOREIGN = {"help", "porcelain", "untracked-files", "standalone", "nproc_per_node", "nproc-per-node", "flag",
           "query-gpu", "format", "partition", "job-name", "requeue", "signal", "gres", "time", "array", "output"}


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


LIBRARIES = ("data", "engine", "losses", "models", "utils")


def _project_imports(path: Path) -> set[str]:
    """Modules of this project that ``path`` imports, anywhere in the file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {n for n in names if n.split(".")[0] in (*LIBRARIES, "tools") and _is_module(n)}
    return found


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


# The layers, lowest first: a module imports only modules of its own layer or lower ones.
LAYERS = {"utils": 0, "data": 1, "models": 1, "losses": 1, "engine": 2, "tools": 3}
STEP_SCRIPTS = sorted(ROOT.glob("step*.py"))


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _import_graph() -> dict[str, set[str]]:
    """Every module of the project (libraries, tools, step scripts) -> the project modules it imports."""
    paths = [p for package in LAYERS for p in sorted((ROOT / package).rglob("*.py"))] + STEP_SCRIPTS
    return {_module_name(path): _project_imports(path) - {_module_name(path)} for path in paths}


def _layer(module: str) -> int:
    return LAYERS.get(module.split(".")[0], LAYERS["tools"])  # the step scripts are at the top, with tools/


def test_libraries_import_downward_without_cycles():
    graph = _import_graph()
    assert len(graph) > 30
    upward = {m: sorted(d for d in deps if _layer(d) > _layer(m)) for m, deps in graph.items()}
    assert not {m: d for m, d in upward.items() if d}, (
        f"imports must go down the layers utils < data, models, losses < engine < tools and the step scripts: "
        f"{ {m: d for m, d in upward.items() if d} }")

    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_training_never_imports_the_synthetic_generator():
    """Nothing the step scripts or the trainer import, directly or not, is of data/synthetic/."""
    graph = _import_graph()
    reached: set[str] = set()
    todo = [_module_name(p) for p in STEP_SCRIPTS] + ["engine.trainer"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            # Importing a.b.c also runs the packages a and a.b.
            todo += [*graph.get(module, ()), *(module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1))]
    synthetic = sorted(m for m in reached if m == "data.synthetic" or m.startswith("data.synthetic."))
    assert len(reached) > 20 and not synthetic, f"the training path imports {synthetic}"


def test_stage_names_are_tested_only_in_the_stage_table():
    pattern = re.compile(r'== "step|!= "step|\bstage ==|\bstage !=')
    offenders = [f"{path.relative_to(ROOT)}:{n}" for package in ("engine", "tools", "utils")
                 for path in sorted((ROOT / package).rglob("*.py")) if path.name != "stages.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"test a Stage field (utils/stages.py) instead: {offenders}"


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    block = layout[layout.index("```") + 3:layout.index("```", layout.index("```") + 3)]
    text: dict[str, str] = {}
    folder = ""
    for line in block.splitlines():  # "engine/     a.py, b.py", "data/synthetic/  c.py" and indented continuations
        if line[:1].strip():
            folder = line.split()[0].rstrip("/")
        text[folder] = text.get(folder, "") + line
    modules = [path for package in (*LIBRARIES, "tools") for path in sorted((ROOT / package).rglob("*.py"))
               if path.name != "__init__.py"]
    assert any(path.parent.parent != ROOT for path in modules)  # the subpackages are walked too
    missing = [path.relative_to(ROOT).as_posix() for path in modules
               if path.name not in text.get(path.parent.relative_to(ROOT).as_posix(), "")]
    assert not missing, f"the README's layout section does not name {missing}"
