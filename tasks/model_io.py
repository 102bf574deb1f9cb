"""Safe (de)serialisation of scikit-learn objects with skops, never pickle.

skops refuses to load types it does not know are safe; the few our pipelines
contain are listed here explicitly and passed to MLflow as ``skops_trusted_types``.
Anything else found in an artifact is refused rather than trusted.
"""

from __future__ import annotations

from typing import Any

# Every type skops flags as untrusted in our pipelines (ColumnTransformer + the three
# candidate families); checked by tests/tasks/test_model_io.py against real pipelines.
SKOPS_TRUSTED_TYPES = [
    "numpy.dtype",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.tree._tree.Tree",
]


def dump_skops(obj: Any) -> bytes:
    import skops.io

    return skops.io.dumps(obj)


def load_skops(body: bytes) -> Any:
    """Load a skops artifact, trusting only ``SKOPS_TRUSTED_TYPES``.

    Raises:
        ValueError: The artifact holds a type outside the list (named in the message).
    """
    import skops.io

    unexpected = sorted(set(skops.io.get_untrusted_types(data=body)) - set(SKOPS_TRUSTED_TYPES))
    if unexpected:
        raise ValueError(f"refusing to load skops artifact with types outside SKOPS_TRUSTED_TYPES: {unexpected}")
    return skops.io.loads(body, trusted=SKOPS_TRUSTED_TYPES)
