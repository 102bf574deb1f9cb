"""The served model: resolved from the MLflow registry, loaded safely, swapped without downtime.

A reload loads the new version completely (and checks it) before replacing the
reference the request handlers read, so requests never wait for a load and never see
a half-loaded model; a request reads the reference once and uses that model throughout.
If anything about the new version is wrong, the old one keeps serving. A load also
builds the version's ``Predictor`` (compiled and verified when possible, see
``serving.predictor``), so requests never pay for it.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serving.predictor import Predictor, build_predictor
from tasks.model_io import SKOPS_TRUSTED_TYPES

if TYPE_CHECKING:
    from serving.config import ServingSettings
    from tasks.dataset_spec import ColumnSpec, DatasetSpec

log = logging.getLogger(__name__)

# Waits between attempts while no model could be loaded yet (MLflow down, alias not set).
INITIAL_RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 60.0


class ModelUnavailable(RuntimeError):
    """No model can be resolved or loaded; the message says which and why."""


class ModelNotFound(ModelUnavailable):
    """The registry answered: no such model, alias or version."""


def _unavailable(message: str, err: Any) -> ModelUnavailable:
    missing = getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"
    return (ModelNotFound if missing else ModelUnavailable)(message)


class StoreBusy(RuntimeError):
    """A load of this model is running; the request conflicts with it (409)."""


@dataclass(frozen=True)
class ModelHandle:
    """One loaded model version and its provenance.

    Attributes:
        pipeline: The fitted scikit-learn pipeline (preprocessing + estimator).
        name: Registered model name.
        version: Registered model version.
        run_id: MLflow run that logged the model.
        training_data_sha256: Content hash of the training data (version tag ``content_sha256``,
            else the run's ``lineage.json``), or None when neither records it.
        loaded_at: When this server loaded it (UTC).
        alias: The alias it was resolved from, or None for a pinned version.
        predictor: How requests are scored with ``pipeline`` (built at load time); None when
            the store was not given the feature columns, then the pipeline is called as is.
    """

    pipeline: Any
    name: str
    version: str
    run_id: str | None
    training_data_sha256: str | None
    loaded_at: dt.datetime
    alias: str | None = None
    predictor: Predictor | None = None

    @property
    def classes(self) -> list[Any]:
        """Labels in the column order of ``predict_proba``, as plain Python values."""
        return [value.item() if hasattr(value, "item") else value for value in self.pipeline.classes_]


class ModelStore:
    """Resolves the alias (or pinned version), loads the model and keeps the current one.

    Args:
        tracking_uri: MLflow tracking (and registry) server.
        model_name: Registered model name.
        alias: Alias to follow; ignored when ``version`` is pinned.
        version: Pinned model version.
        expected_classes: Labels the model must predict (the spec's target values); a
            model trained on something else is refused.
        expected_features: Input columns the model must take (the spec's features).
        poll_seconds: Check the alias this often and reload when it moved; 0 turns polling off.
        feature_columns: The spec's feature columns; when given, each load builds the
            model's ``Predictor`` for them (else handles carry none).
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        model_name: str,
        alias: str | None = "champion",
        version: str | None = None,
        expected_classes: Sequence[Any] = (),
        expected_features: Sequence[str] = (),
        poll_seconds: float = 0.0,
        feature_columns: Sequence[ColumnSpec] = (),
    ) -> None:
        if not alias and not version:
            raise ValueError("give an alias to follow or a pinned version")
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.alias = None if version else alias
        self.pinned_version = version
        self.expected_classes = list(expected_classes)
        self.expected_features = list(expected_features)
        self.poll_seconds = poll_seconds
        self.feature_columns = list(feature_columns)
        self._current: ModelHandle | None = None
        self._swap_lock = threading.Lock()
        # Serialises reloads (poller and /admin/reload) so two never load the same version at once.
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()
        # Set by promote(): the version served until the alias points at it.
        self._held_version: str | None = None
        self.last_error: str | None = None

    @classmethod
    def from_settings(
        cls,
        settings: ServingSettings,
        spec: DatasetSpec,
        *,
        model_name: str | None = None,
        alias: str | None = None,
        version: str | None = None,
    ) -> ModelStore:
        """A store for a model (default: the settings' default model), checked against the dataset ``spec``."""
        default = model_name is None or model_name == settings.model_name
        return cls(
            tracking_uri=settings.tracking_uri,
            model_name=model_name or settings.model_name,
            alias=alias or settings.model_alias,
            version=version or (settings.model_version if default else None),
            expected_classes=spec.target.allowed_values,
            expected_features=spec.feature_names,
            poll_seconds=settings.alias_poll_seconds,
            feature_columns=spec.features,
        )

    @property
    def current(self) -> ModelHandle | None:
        """The model to serve now, or None before the first successful load."""
        return self._current

    def _client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def resolve_version(self) -> str:
        """The version to serve: the pinned one, else the one the alias points at now.

        Raises:
            ModelUnavailable: The alias or model does not exist, or the registry is unreachable.
        """
        if self.pinned_version:
            return self.pinned_version
        from mlflow.exceptions import MlflowException

        try:
            return str(self._client().get_model_version_by_alias(self.model_name, self.alias).version)
        except MlflowException as err:
            raise _unavailable(
                f"cannot resolve {self.model_name}@{self.alias} at {self.tracking_uri}: {err.message}", err
            ) from err

    def load(self, version: str) -> ModelHandle:
        """Download, check and load one version (without serving it).

        Only skops artifacts whose trusted types are within ``SKOPS_TRUSTED_TYPES`` are
        loaded: the artifact store is not trusted to say which types are safe.

        Raises:
            ModelUnavailable: The version cannot be fetched, is not a safe skops pipeline, or
                does not fit the dataset (other classes or features).
        """
        import mlflow.sklearn
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model

        where = f"{self.model_name} v{version}"
        try:
            details = self._client().get_model_version(self.model_name, version)
            with tempfile.TemporaryDirectory(prefix="serving-model-") as folder:
                local = download_artifacts(
                    artifact_uri=f"models:/{self.model_name}/{version}",
                    dst_path=folder,
                    tracking_uri=self.tracking_uri,
                    registry_uri=self.tracking_uri,
                )
                flavor = Model.load(local).flavors.get("sklearn") or {}
                _check_serialization(flavor, where)
                pipeline = mlflow.sklearn.load_model(local)
        except ModelUnavailable:
            raise
        except MlflowException as err:
            raise _unavailable(f"cannot load {where} from {self.tracking_uri}: {err.message}", err) from err
        except Exception as err:  # whatever breaks a load (I/O, skops refusing a type), the old model serves on
            raise ModelUnavailable(f"cannot load {where}: {type(err).__name__}: {err}") from err
        self._check_fits_dataset(pipeline, where)
        predictor = build_predictor(pipeline, self.feature_columns) if self.feature_columns else None
        return ModelHandle(
            pipeline=pipeline,
            name=self.model_name,
            version=str(version),
            run_id=details.run_id or None,
            training_data_sha256=self._training_hash(details),
            loaded_at=dt.datetime.now(dt.UTC),
            alias=self.alias,
            predictor=predictor,
        )

    def _check_fits_dataset(self, pipeline: Any, where: str) -> None:
        if not (hasattr(pipeline, "predict_proba") and hasattr(pipeline, "classes_")):
            raise ModelUnavailable(f"{where} is not a fitted classifier with predict_proba")
        classes = sorted(value.item() if hasattr(value, "item") else value for value in pipeline.classes_)
        if self.expected_classes and classes != sorted(self.expected_classes):
            raise ModelUnavailable(
                f"{where} predicts {classes}, the dataset's labels are {sorted(self.expected_classes)}"
            )
        features = getattr(pipeline, "feature_names_in_", None)
        if self.expected_features and features is not None and sorted(features) != sorted(self.expected_features):
            missing = sorted(set(features) - set(self.expected_features))
            raise ModelUnavailable(
                f"{where} was trained on other features than the dataset spec's (e.g. {missing[:5]})"
            )

    def _training_hash(self, details: Any) -> str | None:
        tagged = (details.tags or {}).get("content_sha256")
        if tagged or not details.run_id:
            return tagged
        # Older versions carry the hash only in the run's lineage (the last snapshot trained on).
        try:
            from mlflow.artifacts import load_dict

            lineage = load_dict(f"runs:/{details.run_id}/lineage.json")
        except Exception as err:  # provenance is informative; its absence must not block serving
            log.info("no training-data hash for %s v%s: %s", self.model_name, details.version, err)
            return None
        hashes = lineage.get("content_hashes") or []
        return hashes[-1] if hashes else None

    def swap(self, handle: ModelHandle) -> ModelHandle | None:
        """Serve ``handle`` from now on; returns the model it replaced."""
        with self._swap_lock:
            old, self._current = self._current, handle
        self._loaded.set()
        return old

    def not_ready_reason(self) -> str | None:
        """Why no model is served yet (loading, or the last error), None once one is."""
        if self._current is not None:
            return None
        what = f"{self.model_name}@{self.alias}" if self.alias else f"{self.model_name} v{self.pinned_version}"
        if self.last_error:
            return self.last_error
        return f"loading {what} from {self.tracking_uri}"

    def reload(self) -> tuple[str | None, str]:
        """Resolve the alias now and serve that version if it is not already served.

        After ``promote`` the promoted version keeps serving until the alias points at it
        (then the store follows the alias again), so a completed release is not undone by
        an alias that has not moved yet.

        Returns:
            (old_version, new_version); equal when nothing changed.

        Raises:
            ModelUnavailable: Resolving or loading failed; the old model keeps serving.
        """
        with self._reload_lock:
            return self._reload_locked()

    def _reload_locked(self) -> tuple[str | None, str]:
        old = self._current
        try:
            version = self.resolve_version()
            held = self._held_version
            if held is not None and old is not None and old.version == held:
                if version != held:
                    self.last_error = None
                    return held, held
                self._held_version = None  # the alias caught up: follow it from now on
            if old is not None and old.version == version:
                self.last_error = None
                return old.version, version
            handle = self.load(version)
            self.swap(handle)
            self.last_error = None
            log.info("serving %s v%s (was %s)", self.model_name, version, old.version if old else "nothing")
            return (old.version if old else None), version
        finally:
            if self._current is not None:
                self._loaded.set()

    def begin_reload(self) -> Future[tuple[str | None, str]] | None:
        """Start a reload on its own thread; None when a load is already running (the caller answers 409).

        The caller awaits the returned future (``asyncio.wrap_future``) instead of holding a
        worker thread while the model downloads.
        """
        if not self._reload_lock.acquire(blocking=False):
            return None
        future: Future[tuple[str | None, str]] = Future()

        def run() -> None:
            try:
                future.set_result(self._reload_locked())
            except BaseException as err:  # handed to the waiting request
                future.set_exception(err)
            finally:
                self._reload_lock.release()

        threading.Thread(target=run, name=f"reload-{self.model_name}", daemon=True).start()
        return future

    @property
    def busy(self) -> bool:
        """A load (first load, poll or reload) is running."""
        return self._reload_lock.locked()

    def promote(self, handle: ModelHandle) -> ModelHandle | None:
        """Serve ``handle`` (a loaded candidate) as the baseline, without a reload.

        It keeps serving until the followed alias points at its version (a pinned store
        is pinned to it from now on). Returns the model it replaced.

        Raises:
            StoreBusy: A load is running (try again when it is done).
        """
        if not self._reload_lock.acquire(blocking=False):
            raise StoreBusy(f"a load of {self.model_name} is running")
        try:
            if self.pinned_version:
                self.pinned_version = handle.version
                self._held_version = None
            else:
                # Held only while the alias lags behind (a later reload then follows it again once it
                # caught up); already there (the release moved it first): follow it from now on, so a
                # rollback of the alias is followed by the next reload.
                self._held_version = None if self._alias_points_at(handle.version) else handle.version
            return self.swap(handle)
        finally:
            self._reload_lock.release()

    def _alias_points_at(self, version: str) -> bool:
        try:
            return self.resolve_version() == version
        except ModelUnavailable:  # the registry is unreachable: hold the version (the safe side)
            return False

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        """Block until a model is served (True) or ``timeout`` passed (False)."""
        return self._loaded.wait(timeout)

    def start(self) -> None:
        """Load the model in the background, retrying until it loads, then poll the alias if asked.

        Returns at once: the server listens while the model loads (``/ready`` says so),
        and a model registered later is picked up by itself.
        """
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name=f"model-store-{self.model_name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background thread (a load in progress finishes first, up to ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _watch(self) -> None:
        retry = INITIAL_RETRY_SECONDS
        polling = self.poll_seconds > 0 and not self.pinned_version
        if self._current is not None and not polling:
            return  # given a model already (e.g. swapped in by hand), and nothing to poll
        wait = self.poll_seconds if self._current is not None else 0.0  # the first load at once
        while not self._stop.wait(wait):
            waiting_for_first = self._current is None
            try:
                old, new = self.reload()
            except ModelUnavailable as err:
                self.last_error = str(err)
                if waiting_for_first:
                    log.error("no model to serve yet: %s (retrying in %.0f s)", err, retry)
                else:
                    log.warning("model reload failed, still serving %s: %s", self._version_text(), err)
                wait, retry = retry, min(retry * 2, MAX_RETRY_SECONDS)
                continue
            except Exception:  # never let the watcher die: the next attempt may succeed
                log.exception("unexpected error while loading the model")
                wait = retry
                continue
            retry = INITIAL_RETRY_SECONDS
            if old is not None and old != new:
                log.info("alias %s moved: v%s -> v%s", self.alias, old, new)
            if self.poll_seconds <= 0 or self.pinned_version:
                return  # loaded, and nothing to poll
            wait = self.poll_seconds

    def _version_text(self) -> str:
        return f"v{self._current.version}" if self._current else "nothing"


def _check_serialization(flavor: dict[str, Any], where: str) -> None:
    if flavor.get("serialization_format") != "skops":
        raise ModelUnavailable(
            f"{where} is serialised as {flavor.get('serialization_format')!r}; "
            "the server loads only skops artifacts (never pickle)"
        )
    declared = set(flavor.get("skops_trusted_types") or ())
    unexpected = sorted(declared - set(SKOPS_TRUSTED_TYPES))
    if unexpected:
        raise ModelUnavailable(f"{where} asks to trust types outside SKOPS_TRUSTED_TYPES: {unexpected}")
