"""Sphinx configuration of the sklearn-hash documentation (built offline, with -W)."""

import os
import sys
from pathlib import Path

import sklearn_hash

project = "sklearn-hash"
author = "the sklearn-hash developers"
copyright = "2026, the sklearn-hash developers"
version = release = sklearn_hash.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]
# Offline builds: no intersphinx unless asked for (SKLEARN_HASH_INTERSPHINX=1).
if os.environ.get("SKLEARN_HASH_INTERSPHINX"):
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "sklearn": ("https://scikit-learn.org/stable", None),
    }

templates_path = ["_templates"]
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5"]
autosummary_generate = True
# The searchers' shared index methods (kneighbors, add, save, ...) come from IndexMixin:
# documented on each class; what scikit-learn's base classes give is not.
autodoc_default_options = {
    "members": True,
    "inherited-members": ("BaseEstimator,TransformerMixin,ClassNamePrefixFeaturesOutMixin,"
                          "_MetadataRequester,_SetOutputMixin"),
}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# Cross-references to other projects resolve only with intersphinx.
nitpicky = False
suppress_warnings = ["config.cache"]

html_theme = "pydata_sphinx_theme"
html_title = "sklearn-hash"
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
html_static_path = []

root = Path(__file__).resolve().parents[1]
sphinx_gallery_conf = {
    "examples_dirs": str(root / "examples"),
    "gallery_dirs": "auto_examples",
    "doc_module": ("sklearn_hash",),
    "backreferences_dir": "generated/backreferences",
    "reference_url": {"sklearn_hash": None},
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py|_data\.py",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "plot_gallery": "True",
}
sys.path.insert(0, str(root / "examples"))  # the examples import their _data helper
