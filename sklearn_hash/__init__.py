"""sklearn-hash: learning to hash and product quantization for fast similarity search.

Every method is a scikit-learn estimator whose ``transform`` gives compact
codes; :class:`QuantizedNeighbors` indexes and searches them with exact,
multi-threaded kernels, and :class:`IVFQuantizedNeighbors` searches product
codes without scanning them all; :mod:`sklearn_hash.metrics` scores the
rankings.
"""

from ._agh import AGH
from ._dqn import DeepQuantizationNetwork
from ._itq import ITQ
from ._ivf import IVFQuantizedNeighbors
from ._neighbors import QuantizedNeighbors
from ._opq import OPQ
from ._pq import ProductQuantizer
from ._spectral import SpectralHashing
from ._transformer import QuantizedNeighborsTransformer
from ._version import __version__

__all__ = [
    "AGH",
    "DeepQuantizationNetwork",
    "ITQ",
    "IVFQuantizedNeighbors",
    "OPQ",
    "ProductQuantizer",
    "QuantizedNeighbors",
    "QuantizedNeighborsTransformer",
    "SpectralHashing",
    "__version__",
]
