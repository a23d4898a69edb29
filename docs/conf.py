"""Sphinx configuration of the torchnmf documentation (``make docs``).

The build runs offline: intersphinx reads the inventories cached in
``_intersphinx/`` (refreshed by ``python docs/fetch_inventories.py`` where the
network allows) and drops the projects without one, unless
``TORCHNMF_DOCS_ONLINE=1`` asks for the live inventories.
"""
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torchnmf  # noqa: E402

from _intersphinx_config import intersphinx_mapping_for  # noqa: E402

project = "torchnmf"
author = "the torchnmf developers"
copyright = "the torchnmf developers"
release = torchnmf.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "matplotlib.sphinxext.plot_directive",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "_intersphinx",
    "screenshots",
    # included by guide/20-solvers.rst, guide/55-scaling.rst and benchmarks.rst
    # rather than built on their own
    "solvers.md",
    "scaling.md",
    "benchmarks.md",
    "gallery/*.ipynb",
    "sg_execution_times.rst",
]

# -- API reference: one page per public name --------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False  # a module's public names are its __all__
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"show-inheritance": True}
# PyTorch's docstring sections, read by napoleon
napoleon_google_docstring = True
napoleon_numpy_docstring = True  # the scikit-learn estimator is numpydoc
napoleon_custom_sections = [("Shape", "notes_style")]
napoleon_use_rtype = False

# -- cross-references to the libraries we build on -------------------------------
intersphinx_mapping = intersphinx_mapping_for(
    HERE / "_intersphinx", online=os.environ.get("TORCHNMF_DOCS_ONLINE") == "1"
)
intersphinx_timeout = 10

# -- Markdown pages (benchmarks.md, solvers.md) -----------------------------------
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
# guide/20-solvers.rst and benchmarks.rst include solvers.md and benchmarks.md
# below their own titles, so those files' headings start at level 2 there
suppress_warnings = ["myst.header"]

# -- the benchmark figures (benchmarks.rst, drawn by benchmark_figures.py) --------
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]

# -- gallery ----------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "gallery",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "within_subsection_order": "FileNameSortKey",
    "show_memory": False,
    "plot_gallery": "True",
    # "Examples using X" on the API pages
    "doc_module": ("torchnmf",),
    "backreferences_dir": "api/backreferences",
    "reference_url": {"torchnmf": None},
}

# -- HTML ---------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"torchnmf {release}"
html_static_path = ["_static"]
html_css_files = ["torchnmf.css"]
html_theme_options = {
    "logo": {"text": "torchnmf"},
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
    "secondary_sidebar_items": ["page-toc", "sourcelink"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_show_sourcelink = True
# pages without sub-pages get no (empty) left sidebar
html_sidebars = {name: [] for name in ("index", "intro", "install", "benchmarks")}
html_context = {"default_mode": "light"}

# MathJax comes from its CDN when the pages are read.  To read them offline (the
# screenshots of docs/screenshots.sh), point TORCHNMF_DOCS_MATHJAX at a folder
# holding MathJax 3 (tex-chtml.js and its output/ fonts); it is copied into
# _static.
if os.environ.get("TORCHNMF_DOCS_MATHJAX"):
    html_static_path.append(os.environ["TORCHNMF_DOCS_MATHJAX"])
    mathjax_path = "tex-chtml.js"


# torch.nn.Module hooks that our models override for printing, not for users
_MODULE_PLUMBING = {"extra_repr"}


def _skip_foreign_members(app, what, name, obj, skip, options):
    """Leave out what our classes inherit from scikit-learn, torch or builtins."""
    module = getattr(obj, "__module__", None) or ""
    if what == "class" and (module.split(".")[0] in ("sklearn", "torch", "builtins") or name in _MODULE_PLUMBING):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_foreign_members)
