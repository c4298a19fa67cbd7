"""The layers of DESIGN.md "Layers", held by parsing every import of the packages.

mpm/cli/                                      imported by nothing
mpm (model, recipes, ...), t2i, unimm_chat, dataproc    the capabilities
mpm/core/                                     imports nothing else from the project
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PACKAGES = ("dataproc", "unimm_chat", "mpm", "t2i")
# What a package may import from the other packages (beyond mpm.core, which all may use). A module path allows the
# module and anything below it; "unimm_chat.read_conversations" allows that one name from `unimm_chat`.
ALLOWED = {
    "dataproc": set(),
    "unimm_chat": {"dataproc.langid", "dataproc.translate", "dataproc.vqa_answers", "dataproc.shards"},
    "mpm": {
        "dataproc.langid", "dataproc.translate", "dataproc.vqa_answers", "dataproc.shards",
        "t2i", "unimm_chat.read_conversations", "unimm_chat.Conversation",
    },
    "t2i": {"dataproc.shards", "dataproc.sharder.filters"},
}  # fmt: skip


def imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, imported name) for every import in a file (module `module`, by default its path's), `from a.b import
    c` giving "a.b.c"; relative imports resolved against its package, and `importlib.import_module("a.b")` calls
    with a literal name too."""
    package = (module or module_of(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from ..x import y, inside package a.b.c: a.b.x.y
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def project_files():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def allowed(importer: str, name: str) -> bool:
    """May module `importer` import `name` (a dotted path into the project)?"""
    target = name.split(".")[0]
    if target not in PACKAGES:
        return True  # the standard library or a third-party package
    if name.startswith("mpm.cli"):
        return importer.startswith("mpm.cli")  # nothing imports the CLI but the CLI itself
    if importer.startswith("mpm.cli"):
        return True  # the top layer may use everything
    if importer.startswith("mpm.core"):
        return name.startswith("mpm.core")  # the foundation imports nothing else of the project
    if name.startswith("mpm.core") or name == "mpm.__version__":
        return True
    source = importer.split(".")[0]
    if target == source:
        return True
    if any(part.startswith("_") for part in name.split(".")[1:]):
        return False  # another package's private names are its internals
    return any(name == rule or name.startswith(rule + ".") for rule in ALLOWED[source])


def test_every_import_follows_the_layers():
    broken = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in project_files()
        for line, name in imports(path)
        if not allowed(module_of(path), name)
    ]
    assert not broken, "imports that break the layers of DESIGN.md:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("importer", "name", "ok"),
    [
        ("mpm.core.runs", "mpm.modeling.X", False),
        ("mpm.core.images", "dataproc.sharder.images.to_rgb", False),
        ("dataproc.shards", "mpm.core.images.upright_rgb", True),
        ("dataproc.shards", "mpm.modeling.MPMForConditionalGeneration", False),
        ("mpm.processor", "dataproc.sharder.images.upright_rgb", False),
        ("mpm.data", "dataproc.shards.iter_samples", True),
        ("mpm.data", "unimm_chat.conversations.ConversationFormatError", False),
        ("mpm.data", "unimm_chat.read_conversations", True),
        ("unimm_chat.build", "mpm.cli.main", False),
        ("unimm_chat.translate", "dataproc.translate.HFTranslator", True),
        ("t2i.pipeline", "mpm.recipes.i2t.train", False),
        ("mpm.data", "dataproc.shards._pipeline", False),
        ("mpm.core.runs", "mpm.core.errors.ConfigError", True),
    ],
)
def test_the_rule_itself(importer, name, ok):
    assert allowed(importer, name) is ok


def test_relative_and_dynamic_imports_are_seen(tmp_path):
    probe = tmp_path / "probe.py"  # as if it were mpm/core/probe.py
    probe.write_text("from ..cli import main\nimport importlib\nimportlib.import_module('dataproc.sharder')\n")
    names = [name for _, name in imports(probe, "mpm.core.probe")]
    assert names == ["mpm.cli.main", "importlib", "dataproc.sharder"]
    assert not any(allowed("mpm.core.probe", n) for n in ("mpm.cli.main", "dataproc.sharder"))


def test_building_the_parser_loads_neither_torch_nor_transformers():
    code = (
        "import sys; from mpm.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'webdataset', 'pyarrow') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert run.stdout.strip() == "[]"
