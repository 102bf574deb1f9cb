"""Scoring the served pipeline fast, with exactly the pipeline's answers.

A scikit-learn pipeline costs tens of milliseconds per call whatever the number of rows:
the ``ColumnTransformer`` validates every column through pandas, and a random forest
validates its input once per tree. The server therefore scores through a ``Predictor``:

* ``CompiledPredictor`` does the same arithmetic without the per-call overhead: the
  one-hot encoding in numpy, a forest as a loop over its fitted trees (summed in the
  order scikit-learn sums them with ``n_jobs=1``), a histogram gradient boosting model
  on one OpenMP thread (its per-row sums do not depend on the thread count, and on a
  server sharing its cores with the event loop and other processes, OpenMP's
  fork-join per tree turns a 1 ms call into hundreds of milliseconds under load), and
  any other step or estimator through scikit-learn itself. It is built only for pipelines whose every step it knows,
  and served only after it reproduced the pipeline's labels and probabilities on a probe
  sample drawn from the dataset spec (``build_predictor``).
* ``PipelinePredictor`` calls the pipeline itself; it serves everything else.

Both take rows as tuples in the spec's feature order (already validated by the request
schema) and return the labels with the class-probability matrix. The label is the
class with the highest probability only for estimators whose ``predict`` is defined
that way in scikit-learn (forests, trees, histogram gradient boosting); any other
estimator is asked for its own ``predict``, so a label is always what the pipeline decides.

``predict`` scores rows together, as the pipeline scores one batch; ``predict_each``
gives every row exactly the answer it would get scored alone. The two differ only for
estimators computed with BLAS (e.g. a logistic regression in float32 may differ in the
last bit between a batch and a single row): for them ``predict_each`` scores row by row,
so a single-record request gets the same answer however many requests share its
micro-batch.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from serving.schema import EXACT_IN_FLOAT64
from tasks.dataset_spec import CATEGORICAL, ColumnSpec

log = logging.getLogger(__name__)

# Largest difference in a probability tolerated between a compiled predictor and the
# pipeline on the probe sample: scikit-learn's threaded forests sum their trees in
# whatever order the threads finish, so the pipeline itself varies in the last bits.
PROBABILITY_TOLERANCE = 1e-9
PROBE_ROWS = 256
ROW_BY_ROW_PROBES = 8
_EXACT_IN_FLOAT64 = EXACT_IN_FLOAT64


class Predictor:
    """Scores rows with the pipeline itself (the reference behaviour).

    Args:
        pipeline: A fitted classifier with ``predict_proba`` and ``classes_``, usually a
            scikit-learn ``Pipeline`` of preprocessing steps and a final estimator.
        columns: The features, in the order of the row tuples, with the dtypes the
            pipeline was trained with.
    """

    kind = "pipeline"

    def __init__(self, pipeline: Any, columns: Sequence[ColumnSpec]) -> None:
        self.pipeline = pipeline
        self.columns = list(columns)
        self.feature_names = [c.name for c in self.columns]
        self.dtypes = {c.name: c.dtype for c in self.columns}
        self.preprocess, self.estimator = _split(pipeline)
        self.classes = np.asarray(pipeline.classes_)
        self.labels_from_argmax = _predicts_argmax(self.estimator)
        self.batch_invariant = _is_batch_invariant(self.preprocess, self.estimator)

    def describe(self) -> str:
        """One line naming how rows are scored (for the logs)."""
        return f"scikit-learn pipeline ({type(self.estimator).__name__})"

    def predict(self, rows: Sequence[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Score rows together, as the pipeline scores one batch.

        Args:
            rows: Feature values in the order of ``columns``, one tuple per row.

        Returns:
            (labels, probabilities): labels in the dtype of ``classes_``, probabilities of
            shape (rows, classes) in the column order of ``classes_``.
        """
        features = self._transform(rows)
        probabilities = np.asarray(self._predict_proba(features))
        if self.labels_from_argmax:
            labels = self.classes.take(np.argmax(probabilities, axis=1), axis=0)
        else:
            labels = np.asarray(self.estimator.predict(features))
        return labels, probabilities

    def predict_each(self, rows: Sequence[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Score rows each as if it were alone (one call when that gives the same answers)."""
        if self.batch_invariant or len(rows) <= 1:
            return self.predict(rows)
        scored = [self.predict([row]) for row in rows]
        return np.concatenate([labels for labels, _ in scored]), np.vstack([p for _, p in scored])

    def frame(self, rows: Sequence[Sequence[Any]]) -> pd.DataFrame:
        """The rows as the pipeline was trained on them: named columns in the spec's dtypes."""
        return pd.DataFrame(_matrix(rows, self.columns), columns=self.feature_names).astype(self.dtypes)

    def _transform(self, rows: Sequence[Sequence[Any]]) -> Any:
        frame = self.frame(rows)
        return frame if self.preprocess is None else self.preprocess.transform(frame)

    def _predict_proba(self, features: Any) -> np.ndarray:
        return self.estimator.predict_proba(features)


class CompiledPredictor(Predictor):
    """The pipeline's arithmetic without its per-call overhead (see the module docstring).

    Build it with ``compile_pipeline``, which refuses pipelines it cannot reproduce, and
    serve it only after ``verify`` found no difference.
    """

    kind = "compiled"

    def __init__(self, pipeline: Any, columns: Sequence[ColumnSpec], blocks: list[_Block], trees: list[Any]) -> None:
        super().__init__(pipeline, columns)
        self.blocks = blocks
        self.trees = trees
        self.n_classes = len(self.classes)
        self._safe_float64 = all(c.dtype in _EXACT_IN_FLOAT64 for c in self.columns)
        self.boosting = _is_plain_hist_gradient_boosting(self.estimator)
        if self.boosting:
            # The booster converts its input to float64 first: one-hot 0/1 columns are made in
            # float64 directly (the same values) instead of float32 and copied.
            for block in self.blocks:
                if isinstance(block, _OneHotBlock):
                    block.dtype = np.dtype(np.float64)

    def describe(self) -> str:
        encoded = sum(len(b.positions) for b in self.blocks if isinstance(b, _OneHotBlock))
        others = [type(b.transformer).__name__ for b in self.blocks if isinstance(b, _SklearnBlock)]
        estimator = f"{len(self.trees)} trees summed in numpy" if self.trees else type(self.estimator).__name__
        if self.boosting:
            estimator += " on one thread"
        parts = [f"one-hot of {encoded} features in numpy"] if encoded else []
        parts += [f"{name} via scikit-learn" for name in others]
        return f"compiled ({', '.join(parts + [estimator])})"

    def _transform(self, rows: Sequence[Sequence[Any]]) -> Any:
        matrix = _matrix(rows, self.columns)
        outputs = [block.transform(matrix, self) for block in self.blocks]
        if len(outputs) == 1:
            return outputs[0]
        # ColumnTransformer concatenates its dense outputs the same way (dtypes promoted alike).
        return np.hstack(outputs)

    def _predict_proba(self, features: Any) -> np.ndarray:
        if self.boosting:
            # HistGradientBoostingClassifier.predict_proba, each part on one OpenMP thread (module docstring).
            raw = _in_parts(lambda part: self.estimator._raw_predict(part, n_threads=1), features)
            return self.estimator._loss.predict_proba(raw)
        if not self.trees:
            return self.estimator.predict_proba(features)
        # The forest's own validation casts to float32; non-finite input is left to it (it raises).
        features = np.asarray(features, dtype=np.float32)
        if not np.isfinite(features).all():
            return self.estimator.predict_proba(features)
        return _in_parts(self._forest_proba, features)

    def _forest_proba(self, features: np.ndarray) -> np.ndarray:
        total = np.zeros((features.shape[0], self.n_classes), dtype=np.float64)
        for tree in self.trees:
            total += tree.predict(features)[:, : self.n_classes]
        total /= len(self.trees)
        return total


# Rows per part when a large batch is scored on several threads; a part never waits for
# another (no barrier per tree as with OpenMP), so a busy core only slows its own part.
ROWS_PER_PART = 2500
_PARTS = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="predict-part")


def _in_parts(score: Any, features: np.ndarray) -> np.ndarray:
    """``score(features)``, computed on row ranges in parallel threads (the scoring releases the GIL).

    Rows are scored independently (the booster's sums run per row), so the parts
    concatenated are exactly the answer of one call.
    """
    parts = min(os.cpu_count() or 1, len(features) // ROWS_PER_PART)
    if parts < 2:
        return score(features)
    bounds = np.linspace(0, len(features), parts + 1, dtype=int)
    results = list(_PARTS.map(score, [features[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]))
    return np.concatenate(results)


class _Block:
    """One fitted transformer of the ColumnTransformer and the feature positions it reads."""

    def __init__(self, positions: list[int]) -> None:
        self.positions = positions

    def transform(self, matrix: np.ndarray, predictor: CompiledPredictor) -> np.ndarray:
        raise NotImplementedError


class _OneHotBlock(_Block):
    """``OneHotEncoder(sparse_output=False)`` without ``drop`` or infrequent categories, in numpy.

    All features of the block are compared with their categories in one broadcast
    comparison (categories padded with NaN, which equals nothing) rather than one
    comparison per feature.
    """

    def __init__(
        self,
        positions: list[int],
        categories: list[np.ndarray],
        dtype: Any,
        unknown_is_error: bool,
        column_dtypes: Sequence[str] = (),
    ) -> None:
        super().__init__(positions)
        self.categories = categories
        self.dtype = dtype
        self.unknown_is_error = unknown_is_error
        self.width = sum(len(c) for c in categories)
        self.column_dtypes = list(column_dtypes) or ["float64"] * len(positions)
        most = max((len(c) for c in categories), default=0)
        self.padded = np.full((len(categories), most), np.nan)
        for k, feature_categories in enumerate(categories):
            self.padded[k, : len(feature_categories)] = feature_categories.astype(np.float64)
        self.cast_groups = [
            (dtype, [j for j, d in enumerate(self.column_dtypes) if d == dtype])
            for dtype in sorted(set(self.column_dtypes) - {"float64"})
        ]
        uneven = any(len(c) != most for c in categories)
        self.kept = [k * most + i for k, c in enumerate(categories) for i in range(len(c))] if uneven else None

    def transform(self, matrix: np.ndarray, predictor: CompiledPredictor) -> np.ndarray:
        if matrix.dtype != np.float64:
            return self._feature_by_feature(matrix, predictor)
        values = matrix[:, self.positions]
        for dtype, where in self.cast_groups:
            # Cast first, as the pipeline does (e.g. to int8 or float32): the encoder compares cast values.
            values[:, where] = values[:, where].astype(dtype)
        hits = values[:, :, None] == self.padded[None, :, :]
        # Categories are distinct: every value is known exactly when there is one hit per value.
        if self.unknown_is_error and np.count_nonzero(hits) != values.size:
            position = self.positions[int(np.nonzero(~hits.any(axis=2).all(axis=0))[0][0])]
            raise ValueError(f"unknown category in feature {predictor.feature_names[position]!r}")
        flat = hits.reshape(matrix.shape[0], -1)
        return (flat if self.kept is None else flat[:, self.kept]).astype(self.dtype)

    def _feature_by_feature(self, matrix: np.ndarray, predictor: CompiledPredictor) -> np.ndarray:
        out = np.empty((matrix.shape[0], self.width), dtype=self.dtype)
        start = 0
        for position, categories in zip(self.positions, self.categories, strict=True):
            column = matrix[:, position].astype(predictor.columns[position].dtype)
            hits = column[:, None] == categories[None, :]
            if self.unknown_is_error and not hits.any(axis=1).all():
                raise ValueError(f"unknown category in feature {predictor.feature_names[position]!r}")
            out[:, start : start + len(categories)] = hits
            start += len(categories)
        return out


class _SklearnBlock(_Block):
    """Any other fitted transformer, called by scikit-learn on its columns."""

    def __init__(self, positions: list[int], transformer: Any) -> None:
        super().__init__(positions)
        self.transformer = transformer

    def transform(self, matrix: np.ndarray, predictor: CompiledPredictor) -> np.ndarray:
        names = [predictor.feature_names[p] for p in self.positions]
        frame = pd.DataFrame(
            {name: matrix[:, p].astype(predictor.dtypes[name]) for name, p in zip(names, self.positions, strict=True)}
        )
        out = self.transformer.transform(frame)
        if not isinstance(out, np.ndarray) or out.ndim != 2:
            raise TypeError(f"{type(self.transformer).__name__} returned {type(out).__name__}, not a dense matrix")
        return out


def build_predictor(
    pipeline: Any, columns: Sequence[ColumnSpec], *, probe_rows: int = PROBE_ROWS, seed: int = 0
) -> Predictor:
    """The fastest predictor that gives the pipeline's answers.

    Compiles the pipeline when it can and checks the compiled predictor against the
    pipeline on ``probe_rows`` rows drawn from the spec; any refusal, error or difference
    is logged and the pipeline itself is served. Never raises for a fitted classifier.

    Args:
        pipeline: The fitted classifier.
        columns: The dataset spec's features (order, dtypes, allowed values, bounds).
        probe_rows: Size of the probe sample.
        seed: Seed of the probe sample.

    Returns:
        A ``CompiledPredictor`` when verified, else a ``Predictor`` of the pipeline.
    """
    reference = Predictor(pipeline, columns)
    started = time.perf_counter()
    try:
        compiled = compile_pipeline(pipeline, columns)
        difference = verify(compiled, pipeline, probe_sample(columns, probe_rows, seed))
    except _NotCompilable as reason:
        log.info("scoring with the pipeline itself: %s", reason)
        return reference
    except Exception as err:  # a model that fails on the probe fails on requests too: the pipeline answers them
        log.warning(
            "cannot check a compiled predictor (%s: %s): scoring with the pipeline itself", type(err).__name__, err
        )
        return reference
    if difference is not None:
        log.warning("compiled predictor differs from the pipeline (%s): scoring with the pipeline itself", difference)
        return reference
    log.info(
        "scoring with a %s, verified on %d probe rows in %.0f ms",
        compiled.describe(),
        probe_rows,
        1000 * (time.perf_counter() - started),
    )
    return compiled


class _NotCompilable(Exception):
    """The pipeline holds something the compiler does not reproduce; the message says what."""


def compile_pipeline(pipeline: Any, columns: Sequence[ColumnSpec]) -> CompiledPredictor:
    """A ``CompiledPredictor`` of ``pipeline`` (not yet verified: see ``verify``).

    Raises:
        _NotCompilable: The pipeline is not a ColumnTransformer followed by a classifier,
            or a step is configured in a way the compiler does not reproduce.
    """
    from sklearn.compose import ColumnTransformer

    preprocess, estimator = _split(pipeline)
    if preprocess is None:
        raise _NotCompilable(f"{type(pipeline).__name__} is not a pipeline with a preprocessing step")
    steps = [step for _, step in getattr(preprocess, "steps", [("preprocess", preprocess)])]
    if len(steps) != 1 or type(steps[0]) is not ColumnTransformer:
        raise _NotCompilable("preprocessing is not a single ColumnTransformer")
    transformer = steps[0]
    _check_default_output(transformer)
    if getattr(transformer, "sparse_output_", False):
        raise _NotCompilable("the ColumnTransformer outputs a sparse matrix")
    names = [c.name for c in columns]
    blocks: list[_Block] = []
    for name, fitted, selection in transformer.transformers_:
        positions = _positions(selection, names, transformer, name)
        if fitted == "drop" or not positions:
            continue
        if fitted == "passthrough":
            raise _NotCompilable(f"transformer {name!r} passes columns through")
        blocks.append(_one_hot_block(fitted, positions, columns) or _SklearnBlock(positions, fitted))
    if not blocks:
        raise _NotCompilable("the ColumnTransformer outputs no column")
    return CompiledPredictor(pipeline, columns, blocks, _forest_trees(estimator))


def verify(candidate: Predictor, pipeline: Any, rows: Sequence[Sequence[Any]]) -> str | None:
    """Compare a predictor with the pipeline on ``rows``: None when they agree, else the difference.

    Batches are compared with one pipeline call on all rows. ``predict_each`` of a
    predictor that is not batch-invariant is compared with one pipeline call per row, on
    the first ``ROW_BY_ROW_PROBES`` rows (each call costs the pipeline's full overhead).
    Labels must be equal, probabilities within ``PROBABILITY_TOLERANCE``.
    """
    frame = candidate.frame(rows)
    cases = [("batch", candidate.predict(rows), pipeline.predict(frame), pipeline.predict_proba(frame))]
    if not candidate.batch_invariant:
        single_frames = [candidate.frame([row]) for row in rows[:ROW_BY_ROW_PROBES]]
        cases.append(
            (
                "row by row",
                candidate.predict_each(rows[:ROW_BY_ROW_PROBES]),
                np.concatenate([np.asarray(pipeline.predict(f)) for f in single_frames]),
                np.vstack([pipeline.predict_proba(f) for f in single_frames]),
            )
        )
    for what, (labels, probabilities), expected_labels, expected_probabilities in cases:
        try:
            if not np.array_equal(labels, np.asarray(expected_labels)):
                return f"{what}: {int((labels != expected_labels).sum())} of {len(labels)} labels differ"
            gap = float(np.max(np.abs(probabilities - expected_probabilities)))
        except (TypeError, ValueError) as err:  # shapes or dtypes that cannot even be compared
            return f"{what}: incomparable output ({err})"
        if not gap <= PROBABILITY_TOLERANCE:  # also catches NaN
            return f"{what}: probabilities differ by up to {gap:.3g}"
    return None


def probe_sample(columns: Sequence[ColumnSpec], rows: int, seed: int = 0) -> list[tuple[Any, ...]]:
    """Rows the request schema would accept: allowed values, or numbers within the spec's bounds."""
    rng = np.random.default_rng(seed)
    values: list[list[Any]] = []
    for column in columns:
        if column.kind == CATEGORICAL:
            values.append([v.item() if hasattr(v, "item") else v for v in rng.choice(column.allowed_values, rows)])
            continue
        dtype = np.dtype(column.dtype)
        limits = np.iinfo(dtype) if column.is_integer else np.finfo(dtype)
        # Wide but finite, so scaled values stay finite in float32 too.
        low = max(column.min_value if column.min_value is not None else -1e6, float(limits.min))
        high = min(column.max_value if column.max_value is not None else 1e6, float(limits.max))
        drawn = rng.uniform(low, high, rows)
        drawn[: min(rows, 2)] = [low, high][: min(rows, 2)]
        values.append([int(v) for v in np.round(drawn)] if column.is_integer else [float(v) for v in drawn])
    return list(zip(*values, strict=True))


def _matrix(rows: Any, columns: Sequence[ColumnSpec]) -> np.ndarray:
    """The rows (tuples, or already a matrix) as one 2-D array: float64 when that holds every value exactly, else objects."""
    if isinstance(rows, np.ndarray):
        matrix = rows
    elif all(c.dtype in _EXACT_IN_FLOAT64 for c in columns):
        # One pass over the values: np.array would first work out the nesting of the tuples.
        count = len(rows) * len(columns)
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.float64, count=count)
        matrix = flat.reshape(len(rows), len(columns)) if len(rows) else flat.reshape(0, len(columns))
    else:
        matrix = np.array(rows, dtype=object)
    if matrix.ndim != 2 or matrix.shape[1] != len(columns):
        raise ValueError(f"expected rows of {len(columns)} features, got an array of shape {matrix.shape}")
    return matrix


def _split(pipeline: Any) -> tuple[Any | None, Any]:
    """(preprocessing, final estimator) of a scikit-learn Pipeline; (None, model) for anything else."""
    from sklearn.pipeline import Pipeline

    if isinstance(pipeline, Pipeline) and len(pipeline.steps) > 1:
        return pipeline[:-1], pipeline.steps[-1][1]
    return None, pipeline


def _predicts_argmax(estimator: Any) -> bool:
    """Whether scikit-learn defines the estimator's label as the most probable class."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.ensemble._forest import ForestClassifier
    from sklearn.tree import DecisionTreeClassifier

    kind = type(estimator)
    definitions = [
        (ForestClassifier.predict, ForestClassifier.predict_proba),
        (DecisionTreeClassifier.predict, DecisionTreeClassifier.predict_proba),
        (HistGradientBoostingClassifier.predict, HistGradientBoostingClassifier.predict_proba),
    ]
    unmodified = (getattr(kind, "predict", None), getattr(kind, "predict_proba", None)) in definitions
    return unmodified and getattr(estimator, "n_outputs_", 1) == 1


def _is_batch_invariant(preprocess: Any, estimator: Any) -> bool:
    """Whether a row's answer cannot depend on the other rows of its batch (row-wise arithmetic only)."""
    from sklearn.ensemble._forest import ForestClassifier
    from sklearn.tree import DecisionTreeClassifier

    trees = isinstance(estimator, ForestClassifier | DecisionTreeClassifier) and _predicts_argmax(estimator)
    # Boosting sums each row's leaf values over the iterations in one order, whatever the batch.
    trees = trees or _is_plain_hist_gradient_boosting(estimator)
    return trees and (preprocess is None or _row_wise(preprocess))


def _is_plain_hist_gradient_boosting(estimator: Any) -> bool:
    """An unmodified, fitted HistGradientBoostingClassifier (its private scoring calls are the ones we know)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return (
        type(estimator) is HistGradientBoostingClassifier
        and hasattr(estimator, "_predictors")
        and hasattr(estimator, "_loss")
        and _predicts_argmax(estimator)
    )


def _row_wise(transformer: Any) -> bool:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    if isinstance(transformer, str):
        return transformer in ("drop", "passthrough")
    if type(transformer) is Pipeline:
        return all(_row_wise(step) for _, step in transformer.steps if step is not None)
    if type(transformer) is ColumnTransformer:
        return all(_row_wise(fitted) for _, fitted, _ in transformer.transformers_)
    return type(transformer) in (OneHotEncoder, SimpleImputer, StandardScaler)


def _check_default_output(transformer: Any) -> None:
    import sklearn

    configured = (getattr(transformer, "_sklearn_output_config", None) or {}).get("transform", "default")
    if configured != "default" or sklearn.get_config().get("transform_output", "default") != "default":
        raise _NotCompilable("the ColumnTransformer is set to output dataframes")


def _positions(selection: Any, names: list[str], transformer: Any, name: str) -> list[int]:
    """Feature positions (in spec order) of a ColumnTransformer column selection."""
    selected = [selection] if isinstance(selection, str | int) else list(np.atleast_1d(selection))
    fitted_names = list(getattr(transformer, "feature_names_in_", []))
    resolved: list[str] = []
    for item in selected:
        if isinstance(item, str):
            resolved.append(item)
        elif isinstance(item, int | np.integer) and not isinstance(item, bool) and fitted_names:
            resolved.append(str(fitted_names[int(item)]))
        else:
            raise _NotCompilable(f"transformer {name!r} selects columns by {type(item).__name__}")
    missing = sorted(set(resolved) - set(names))
    if missing:
        raise _NotCompilable(f"transformer {name!r} reads columns outside the spec: {missing[:5]}")
    return [names.index(n) for n in resolved]


def _one_hot_block(fitted: Any, positions: list[int], columns: Sequence[ColumnSpec]) -> _OneHotBlock | None:
    """A numpy one-hot block for a plain OneHotEncoder; None for any other transformer."""
    from sklearn.preprocessing import OneHotEncoder

    if type(fitted) is not OneHotEncoder:
        return None
    if fitted.sparse_output or getattr(fitted, "drop_idx_", None) is not None:
        raise _NotCompilable("a OneHotEncoder outputs a sparse matrix or drops a category")
    if getattr(fitted, "_infrequent_enabled", False):
        raise _NotCompilable("a OneHotEncoder groups infrequent categories")
    if fitted.handle_unknown not in ("ignore", "error", "infrequent_if_exist"):
        raise _NotCompilable(f"a OneHotEncoder handles unknown values with {fitted.handle_unknown!r}")
    categories = [np.asarray(c) for c in fitted.categories_]
    for position, values in zip(positions, categories, strict=True):
        numeric = values.dtype.kind in "iuf" and np.isfinite(values.astype(np.float64)).all()
        if not numeric or columns[position].dtype not in _EXACT_IN_FLOAT64:
            raise _NotCompilable(f"feature {columns[position].name!r} has non-numeric categories or an int64 dtype")
    dtypes = [columns[position].dtype for position in positions]
    return _OneHotBlock(positions, categories, np.dtype(fitted.dtype), fitted.handle_unknown == "error", dtypes)


def _forest_trees(estimator: Any) -> list[Any]:
    """The fitted trees of an unmodified single-output forest classifier; [] for other estimators."""
    from sklearn.ensemble._forest import ForestClassifier

    if not (isinstance(estimator, ForestClassifier) and _predicts_argmax(estimator)):
        return []
    trees = [getattr(tree, "tree_", None) for tree in estimator.estimators_]
    if not trees or any(tree is None for tree in trees):
        raise _NotCompilable("the forest has no fitted trees")
    return trees
