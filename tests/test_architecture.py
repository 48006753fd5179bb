"""Architecture rules: layers from the README, no import cycles, one home for exceptions.

Every ``import`` in ``src/silotune`` is read with ``ast`` (function-local ones too, since a cycle
kept alive only by a local import is still a cycle). A unit is a top-level package (``crypto``) or
a top-level module (``cli``); the README's layers block says which units may import which.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "silotune"


def layers() -> dict[str, int]:
    """Unit -> layer, from the README's ``<!-- layers -->`` block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- layers -->\n```\n(.*?)```\n<!-- /layers -->", text, re.S)
    assert match, "README.md lost its <!-- layers --> block"
    out = {}
    for line in match.group(1).splitlines():
        level, *units = line.split()
        out.update(dict.fromkeys(units, int(level)))
    return out


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "silotune" or len(parts) == 1:
        return None  # third-party, or the (empty) package root
    return parts[1]


def imports(src: Path = SRC) -> dict[tuple[str, str], set[str]]:
    """(importing unit, imported unit) -> the modules where the import is written."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in src.rglob("*.py"):
        module = ".".join(path.relative_to(src.parent).with_suffix("").parts)
        source = unit_of(module.removesuffix(".__init__"))
        if source is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                target = unit_of(name)
                if target is None or target == source:
                    continue
                if (src / target).is_dir() or (src / f"{target}.py").exists():
                    edges[(source, target)].add(module)
    return edges


def test_every_unit_has_a_layer() -> None:
    units = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    units |= {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    missing = units - set(layers())
    assert not missing, f"add {sorted(missing)} to the layers block in README.md"


def test_imports_only_go_down_the_layers() -> None:
    level = layers()
    bad = [
        f"{a} (layer {level[a]}) imports {b} (layer {level[b]}) in {sorted(where)}"
        for (a, b), where in sorted(imports().items())
        if level[b] >= level[a]
    ]
    assert not bad, "\n".join(bad)


def test_no_two_units_import_each_other() -> None:
    edges = imports()
    cycles = sorted({tuple(sorted(pair)) for pair in edges if pair[::-1] in edges})
    assert not cycles, cycles


def test_the_checker_sees_a_planted_function_local_upward_import(tmp_path) -> None:
    """The rule can fail: in a fake tree where crypto imports train inside a function."""
    fake = tmp_path / "src" / "silotune"
    for unit in ("crypto", "train"):
        (fake / unit).mkdir(parents=True)
        (fake / unit / "__init__.py").write_text("")
    (fake / "crypto" / "bad.py").write_text("def f():\n    from silotune.train import loop\n")
    assert imports(fake) == {("crypto", "train"): {"silotune.crypto.bad"}}


def test_every_exception_class_lives_in_errors_py() -> None:
    """One hierarchy rooted at SilotuneError, in one module (the CLI prints any of it as a line)."""
    import inspect

    import silotune.errors as errors

    for _, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, Exception) and cls.__module__ == errors.__name__:
            assert issubclass(cls, errors.SilotuneError), cls
    outside = []
    for path in SRC.rglob("*.py"):
        if path.name == "errors.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                if any(re.search(r"(Error|Exception|Violation|Failed)$", b) for b in bases):
                    outside.append(f"{path.relative_to(SRC)}: {node.name}({', '.join(bases)})")
    assert not outside, outside
