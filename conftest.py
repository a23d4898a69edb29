"""Doctest collection for ``make test`` (see testpaths in pyproject.toml).

Every module of the package is imported for its docstring examples, except the
``python -m torchnmf`` entry point and the modules whose optional extra is not
installed.  Each doctest starts from the same random state, so that examples
printing numbers print the same ones every time.
"""
import importlib.util

import pytest

collect_ignore = ["torchnmf/__main__.py", "docs/conf.py"]

# module -> the optional packages its docstrings need
_OPTIONAL = {
    "torchnmf/estimator.py": ("sklearn", "scipy"),
    "torchnmf/plot.py": ("matplotlib",),
    "docs/guide/85-estimator.rst": ("sklearn", "scipy"),
    "docs/guide/57-streaming.rst": ("sklearn", "scipy"),
}
for _path, _packages in _OPTIONAL.items():
    if any(importlib.util.find_spec(name) is None for name in _packages):
        collect_ignore.append(_path)


@pytest.fixture(autouse=True)
def _seeded_doctest(request):
    """Seed torch and numpy before each doctest (and leave other tests alone)."""
    if isinstance(request.node, pytest.DoctestItem):
        import numpy as np
        import torch

        torch.manual_seed(0)
        np.random.seed(0)
    yield
