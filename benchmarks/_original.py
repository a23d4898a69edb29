"""The original torchnmf 0.3.5, imported as ``torchnmf_original`` so it never shadows ours.

``make bench`` installs it without dependencies into a separate target
directory (``.venv/peers/torchnmf-0.3.5``, or the folder named by the
environment variable ``TORCHNMF_ORIGINAL``); the package there is loaded
under another module name, so ``import torchnmf`` keeps meaning this
repository.  :func:`load` returns ``None`` where the peer is not installed,
and the benchmark drops its columns.
"""
import importlib.util
import os
import pathlib
import sys

__all__ = ["NAME", "load"]

NAME = "torchnmf_original"
DEFAULT = pathlib.Path(__file__).resolve().parent.parent / ".venv" / "peers" / "torchnmf-0.3.5"


def load():
    """The original package as a module (``.nmf``, ``.plca``, ``.trainer``), or ``None``."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    package = pathlib.Path(os.environ.get("TORCHNMF_ORIGINAL", DEFAULT)) / "torchnmf"
    init = package / "__init__.py"
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location(
        NAME, init, submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # an incompatible install: treat as missing
        del sys.modules[NAME]
        return None
    return module
