"""Reproducibility (issue 5): the same config and data on CPU give the same bytes.

The feature cache's rebuild is checked in test_features.py
(test_rebuilt_cache_is_byte_identical); the DVC view, one fold's outputs
deleted and rebuilt to the same bytes, in test_pipeline.py.
"""

import filecmp
import shutil

from conftest import compose_config, tiny_overrides

from esclab.training.run import train


def test_two_whole_cross_validations_from_clean_write_byte_identical_reports(tiny_data, tmp_path):
    """What two `make demo` runs from clean do: the same outputs folder, emptied in between."""
    work = tmp_path / "work"
    # MLflow keeps its database open in this process, so it lives outside the folder that is emptied.
    overrides = [o for o in tiny_overrides(tiny_data, work, "tracking.log_model=false")
                 if not o.startswith("tracking.uri=")] + [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    train(compose_config(*overrides))
    first = shutil.copytree(work / "reports", tmp_path / "first")
    shutil.rmtree(work)
    train(compose_config(*overrides))

    names = ["metrics.json", "per_class.csv", *(f"folds/{k}/{f}" for k in range(1, 6)
                                                for f in ("predictions.csv", "history.csv", "fold.json"))]
    for name in names:
        assert filecmp.cmp(first / name, work / "reports" / name, shallow=False), name
