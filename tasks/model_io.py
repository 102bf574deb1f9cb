"""Safe (de)serialisation of scikit-learn objects with skops, never pickle.

skops refuses to load types it does not know are safe; the few our pipelines
contain are listed here explicitly and passed to MLflow as ``skops_trusted_types``.
Anything else found in an artifact is refused rather than trusted.

``load_model`` is the one way a registered model is loaded outside the model server
(registry evaluation, drift reference scoring): a model version is untrusted input
(anyone who can write to the registry can set ``champion``), so its MLmodel metadata is
checked before a single byte of the model is deserialised, and only skops, within
``SKOPS_TRUSTED_TYPES``, is ever used to load it. ``check_sklearn_flavor`` is the same
metadata check for callers that download artifacts themselves (it imports nothing heavy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Every type skops flags as untrusted in our pipelines (ColumnTransformer + the three
# candidate families); checked by tests/tasks/test_model_io.py against real pipelines.
SKOPS_TRUSTED_TYPES = [
    "numpy.dtype",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.tree._tree.Tree",
]
SKOPS_FORMAT = "skops"


class UnsafeModel(ValueError):
    """A model version the loader refuses to deserialise; names the model, version and format or types."""


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


def check_sklearn_flavor(flavors: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Refuse a model unless its MLmodel says: sklearn flavor, skops, trusted types within ours.

    Reads metadata only (the ``flavors`` of an MLmodel file); nothing is deserialised.

    Args:
        flavors: ``mlflow.models.Model.flavors`` of the downloaded model.
        where: The model and version, for the message (e.g. ``model 'x' version 3``).

    Returns:
        The sklearn flavor's configuration.

    Raises:
        UnsafeModel: No sklearn flavor, a format other than skops (pickle and cloudpickle
            run code while loading), or declared trusted types outside ``SKOPS_TRUSTED_TYPES``.
    """
    sklearn = flavors.get("sklearn")
    if not isinstance(sklearn, Mapping):
        raise UnsafeModel(
            f"{where} has no sklearn flavor (flavors: {sorted(flavors)}); only scikit-learn pipelines "
            f"serialised with {SKOPS_FORMAT} are loaded"
        )
    serialization = sklearn.get("serialization_format")
    if serialization != SKOPS_FORMAT:
        raise UnsafeModel(
            f"{where} is serialised as {serialization!r}, not {SKOPS_FORMAT!r}; refusing to load it (pickle and "
            f"cloudpickle run arbitrary code while loading). Register a version logged with "
            f"serialization_format='skops' and skops_trusted_types=SKOPS_TRUSTED_TYPES, and move the alias to it"
        )
    declared = sklearn.get("skops_trusted_types") or []
    unexpected = sorted(set(declared) - set(SKOPS_TRUSTED_TYPES))
    if unexpected:
        raise UnsafeModel(
            f"{where} ({SKOPS_FORMAT}) declares trusted types outside SKOPS_TRUSTED_TYPES: {unexpected}; "
            "refusing to load it (a model cannot widen what is trusted)"
        )
    return dict(sklearn)


def load_model(tracking_uri: str, model_name: str, version: str) -> Any:
    """Load a registered scikit-learn model version: skops only, within ``SKOPS_TRUSTED_TYPES``.

    The version's artifacts are downloaded, its MLmodel is read and checked
    (``check_sklearn_flavor``), the skops file's types are listed without loading it, and
    only then is it loaded, trusting no more than the types it declared (already known
    to be ours). ``mlflow.sklearn.load_model`` is not used: it unpickles whatever
    format the MLmodel names.

    Args:
        tracking_uri: MLflow tracking (and registry) URI.
        model_name: Registered model name.
        version: Model version (e.g. ``"3"``).

    Returns:
        The fitted pipeline.

    Raises:
        UnsafeModel: The version is not a skops sklearn model within the trusted types
            (the message names the model, the version and its format or the types).
        mlflow.exceptions.MlflowException: The version does not exist or cannot be fetched.
    """
    import tempfile
    from pathlib import Path

    import skops.io
    import yaml
    from mlflow.artifacts import download_artifacts

    where = f"model {model_name!r} version {version}"
    with tempfile.TemporaryDirectory(prefix="model-io-") as folder:
        local = Path(
            download_artifacts(
                artifact_uri=f"models:/{model_name}/{version}",
                dst_path=folder,
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
        )
        mlmodel = local / "MLmodel"
        metadata = yaml.safe_load(mlmodel.read_text()) if mlmodel.is_file() else None
        if not isinstance(metadata, dict) or not isinstance(metadata.get("flavors"), dict):
            raise UnsafeModel(f"{where} has no readable MLmodel file with flavors; refusing to load it")
        flavor = check_sklearn_flavor(metadata["flavors"], where)
        path = (local / str(flavor.get("pickled_model", ""))).resolve()
        if not path.is_file() or not path.is_relative_to(local.resolve()):
            raise UnsafeModel(f"{where}: its MLmodel names {flavor.get('pickled_model')!r}, not a file of the model")
        trusted = list(flavor.get("skops_trusted_types") or [])
        try:
            present = skops.io.get_untrusted_types(file=path)  # reads the schema only, builds nothing
        except Exception as err:  # whatever the file really is, it is not a skops artifact
            raise UnsafeModel(
                f"{where}: {path.name} is not a readable {SKOPS_FORMAT} file ({type(err).__name__}: {err}); "
                "refusing to load it"
            ) from err
        unexpected = sorted(set(present) - set(trusted))
        if unexpected:
            raise UnsafeModel(
                f"{where} ({SKOPS_FORMAT}) holds types it does not declare as trusted: {unexpected}; refusing to load it"
            )
        return skops.io.load(path, trusted=trusted)
