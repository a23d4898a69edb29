"""The documentation's own checks: the API reference lists every public module,
every public name has a docstring, and the benchmark figures read benchmarks.md's
tables (the site itself is built by ``make docs``)."""
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# public modules that are programs rather than a library surface
NOT_IN_REFERENCE = {"cli", "cli_selection", "demo", "__main__", "__init__"}


def reference_modules():
    text = (DOCS / "api" / "index.rst").read_text(encoding="utf-8")
    return re.findall(r"^\s+(torchnmf\.[a-z_.]+)\s*$", text, flags=re.M)


def test_reference_lists_every_public_module():
    public = {
        f"torchnmf.{path.stem}"
        for path in (ROOT / "torchnmf").glob("*.py")
        if not path.stem.startswith("_") and path.stem not in NOT_IN_REFERENCE
    }
    listed = set(reference_modules())
    assert public - listed == set(), "add these modules to docs/api/index.rst"
    assert listed - public - {"torchnmf.ConvergenceWarning"} == set()


@pytest.mark.parametrize("module_name", [m for m in reference_modules() if m.count(".") == 1])
def test_public_names_have_docstrings(module_name):
    pytest.importorskip("sklearn") if module_name.endswith("estimator") else None
    pytest.importorskip("matplotlib") if module_name.endswith("plot") else None
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no module docstring"
    names = getattr(module, "__all__", None)
    assert names, f"{module_name} must define __all__ (the reference lists its names)"
    missing = [
        name for name in names
        if (inspect.isclass(getattr(module, name)) or inspect.isfunction(getattr(module, name)))
        and not inspect.getdoc(getattr(module, name))
    ]
    assert missing == []


def test_guide_pages_are_numbered_so_the_glob_orders_them():
    pages = [p.name for p in (DOCS / "guide").glob("*.rst") if p.name != "index.rst"]
    assert pages, "the guide has no pages"
    assert all(re.match(r"\d\d-[a-z0-9-]+\.(rst|md)$", name) for name in pages), pages


def test_benchmark_figures_read_the_latest_section(tmp_path):
    sys.path.insert(0, str(DOCS))
    try:
        import benchmark_figures
    finally:
        sys.path.remove(str(DOCS))
    source = tmp_path / "benchmarks.md"
    source.write_text(
        "# Benchmarks\n\n## Latest\n\n### Dense (issue 2)\n\n"
        "| beta | ours ms | sklearn/ours |\n|---|---|---|\n| 2 | 20.3 | 1.03 |\n| 1 | 77.8 | 1.56 |\n\n"
        "#### (a) digits, beta=2\n\n| method | seconds to target |\n|---|---|\n"
        "| torchnmf hals | 0.121 |\n| sklearn mu | > 0.786 (not reached) |\n\n"
        "## Older\n\n| beta | ours ms |\n|---|---|\n| 2 | 99 |\n",
        encoding="utf-8",
    )
    tables = benchmark_figures.latest_tables(source)
    assert [heading for heading, _ in tables] == ["Dense (issue 2)", "(a) digits, beta=2"]
    assert tables[0][1] == [
        {"beta": "2", "ours ms": "20.3", "sklearn/ours": "1.03"},
        {"beta": "1", "ours ms": "77.8", "sklearn/ours": "1.56"},
    ]
    assert benchmark_figures._number(tables[1][1][1]["seconds to target"]) == (0.786, False)
    assert benchmark_figures._number("0.121") == (0.121, True)
