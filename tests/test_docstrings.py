"""The docstring examples of every public module run as written."""

import doctest
import importlib

import pytest

MODULES = [
    "sklearn_hash._agh",
    "sklearn_hash._itq",
    "sklearn_hash._ivf",
    "sklearn_hash._spectral",
    "sklearn_hash._neighbors",
    "sklearn_hash._opq",
    "sklearn_hash._pq",
    "sklearn_hash._transformer",
    "sklearn_hash.datasets._esc10",
    "sklearn_hash.metrics._retrieval",
]


@pytest.mark.parametrize("name", MODULES + ["sklearn_hash._dqn"])
def test_docstring_examples(name):
    if name == "sklearn_hash._dqn":
        pytest.importorskip("torch")
        pytest.importorskip("skorch")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
