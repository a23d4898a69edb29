"""Which intersphinx inventories the documentation build reads.

Offline (the default, and what CI has) each project's inventory comes from
``docs/_intersphinx/<name>.inv`` when that file exists, and a project without
one is left out, so that a build without network gives no warning (``-W``).
``online=True`` reads every inventory from its site instead.
"""
from pathlib import Path

# name -> documentation root
PROJECTS = {
    "python": "https://docs.python.org/3/",
    "torch": "https://docs.pytorch.org/docs/stable/",
    "numpy": "https://numpy.org/doc/stable/",
    "scipy": "https://docs.scipy.org/doc/scipy/",
    "sklearn": "https://scikit-learn.org/stable/",
    "matplotlib": "https://matplotlib.org/stable/",
}


def intersphinx_mapping_for(cache_dir, online=False):
    """The ``intersphinx_mapping`` for the cached inventories in ``cache_dir``."""
    mapping = {}
    for name, url in PROJECTS.items():
        cached = Path(cache_dir) / f"{name}.inv"
        if online:
            mapping[name] = (url, None)
        elif cached.is_file():
            mapping[name] = (url, str(cached))
    return mapping
