"""scikit-learn's estimator checks on every estimator of the package."""

import pytest
from sklearn.utils.estimator_checks import (
    check_param_validation,
    check_set_output_transform,
    check_transformer_get_feature_names_out,
    parametrize_with_checks,
)

from sklearn_hash import (
    AGH,
    ITQ,
    OPQ,
    DeepQuantizationNetwork,
    IVFQuantizedNeighbors,
    ProductQuantizer,
    QuantizedNeighbors,
    QuantizedNeighborsTransformer,
    SpectralHashing,
)
from sklearn_hash._dqn import _torch_available

HAS_TORCH = _torch_available()  # the deep model is tested where its extra is installed

# Small settings: the checks fit on tiny data sets (a few features, tens of rows).
ESTIMATORS = [
    SpectralHashing(n_bits=2),
    ITQ(n_bits=2, n_iter=5),
    AGH(n_bits=2, n_anchors=5),
    AGH(n_bits=2, n_anchors=5, n_layers=2),
    ProductQuantizer(n_bits=4, subspace_bits=2, n_iter=5),
    OPQ(n_bits=4, subspace_bits=2, n_iter=2, n_pq_iter=3),
    QuantizedNeighbors(ITQ(n_bits=2, n_iter=5), n_neighbors=3),
    QuantizedNeighbors(ProductQuantizer(n_bits=4, subspace_bits=2, n_iter=5), n_neighbors=3),
    IVFQuantizedNeighbors(ProductQuantizer(n_bits=4, subspace_bits=2, n_iter=5), n_lists=2,
                          n_probe=1, n_neighbors=3, random_state=0),
    IVFQuantizedNeighbors(ProductQuantizer(n_bits=4, subspace_bits=2, n_iter=5), n_lists=4,
                          coarse="multi-index", n_probe=1, n_neighbors=3, random_state=0),
    QuantizedNeighborsTransformer(ITQ(n_bits=2, n_iter=5, random_state=0), n_neighbors=3),
    QuantizedNeighborsTransformer(ProductQuantizer(n_bits=4, subspace_bits=2, random_state=0), n_neighbors=3),
]
if HAS_TORCH:
    ESTIMATORS += [
        DeepQuantizationNetwork(
            n_bits=4, subspace_bits=2, hidden_layer_sizes=(8,), embedding_dim=4,
            max_epochs=3, batch_size=16, random_state=0,
        ),
        QuantizedNeighbors(
            DeepQuantizationNetwork(
                n_bits=4, subspace_bits=2, embedding_dim=4, max_epochs=2, random_state=0
            ),
            n_neighbors=3,
        ),
    ]
TRANSFORMERS = [e for e in ESTIMATORS if hasattr(e, "transform")]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_param_validation(estimator):
    check_param_validation(type(estimator).__name__, estimator)


@pytest.mark.parametrize("estimator", TRANSFORMERS, ids=repr)
def test_set_output_transform(estimator):
    check_set_output_transform(type(estimator).__name__, estimator)


@pytest.mark.parametrize("estimator", TRANSFORMERS, ids=repr)
def test_get_feature_names_out(estimator):
    check_transformer_get_feature_names_out(type(estimator).__name__, estimator)
