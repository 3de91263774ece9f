"""sklearn-hash: learning to hash and product quantization for fast similarity search.

Every method is a scikit-learn estimator whose ``transform`` gives compact
codes; :class:`QuantizedNeighbors` indexes and searches them with exact,
multi-threaded kernels; :mod:`sklearn_hash.metrics` scores the rankings.
"""

from ._agh import AGH
from ._itq import ITQ
from ._neighbors import QuantizedNeighbors
from ._pq import ProductQuantizer
from ._spectral import SpectralHashing

__version__ = "0.1.0.dev0"

__all__ = [
    "AGH",
    "ITQ",
    "ProductQuantizer",
    "QuantizedNeighbors",
    "SpectralHashing",
    "__version__",
]
