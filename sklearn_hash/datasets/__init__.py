"""Datasets: the ESC-10 sound embeddings shipped with the package, and loaders.

:func:`load_esc10` returns the 400 ESC-10 clips as YAMNet embeddings (CC BY
3.0; the attribution file ships beside the data); :func:`load_npz` reads
other dataset files in the same layout (such as ESC-50); :func:`retrieval_split`
makes the project's retrieval protocol (queries = one fold, database = the
others, centred and L2-normalised).
"""

from ._esc10 import (
    get_esc10_attribution_path,
    load_esc10,
    load_npz,
    load_retrieval_split,
    retrieval_split,
)

__all__ = [
    "get_esc10_attribution_path",
    "load_esc10",
    "load_npz",
    "load_retrieval_split",
    "retrieval_split",
]
