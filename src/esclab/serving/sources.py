"""Where a model for `esclab predict` / `esclab serve` comes from: what `--models` names.

- a folder of fold models (`models/`, the default): the cross-validation, folds averaged;
- an exported file (`*.onnx`, esclab export): run by onnxruntime, no torch;
- an MLflow run, `runs:/<id>`: a cross-validation's parent run (all its folds) or one fold's run;
- a registered model, `models:/<name>/<version>`, `models:/<name>/latest` or `models:/<name>@<alias>`: the
  cross-validation that version was registered from (training registers each one as `tracking.register_as`).

MLflow's fold models are the fold runs' `checkpoint/fold_<k>.ckpt` artifacts, downloaded
from the tracking server (`--tracking-uri`, else $MLFLOW_TRACKING_URI, else the
workspace's sqlite:///mlflow.db) into a temporary folder and loaded from there.
Each source has `classes`, `duration` (seconds per window), `description` and
`predict_windows(windows, rate) -> probabilities (windows x classes)`.
"""

import tempfile
from pathlib import Path

from esclab.errors import EsclabError

MLFLOW = ("runs:/", "models:/")


def load_model(models: str | Path, fold: int | None = None, tracking_uri: str | None = None):
    if str(models).startswith(MLFLOW):
        return load_from_mlflow(str(models), fold, tracking_uri)
    models = Path(models)
    if models.suffix == ".onnx":
        from esclab.serving.runtime import ExportedModel

        if fold is not None:
            raise EsclabError(f"--fold picks a fold of a cross-validation's folder; {models} is an exported model, "
                              "which holds the folds it was exported with: leave --fold out")
        return ExportedModel(models)
    from esclab.serving.models import load_cross_validation

    return load_cross_validation(models, fold)


def run_of(uri: str, client) -> str:
    """The run id a runs:/ or models:/ address names."""
    from mlflow.exceptions import MlflowException

    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").strip("/").split("/")[0]
    name, alias = (uri.removeprefix("models:/").split("@", 1) + [None])[:2]
    name, _, version = name.strip("/").partition("/")
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias).run_id
        if version in ("", "latest"):
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise EsclabError(f"no registered model {name!r} at {client.tracking_uri}: train one (it registers "
                                  "as tracking.register_as), or check the name in the MLflow UI's Models page")
            return max(versions, key=lambda v: int(v.version)).run_id
        return client.get_model_version(name, version).run_id
    except MlflowException as err:
        raise EsclabError(f"{uri} is not in the model registry at {client.tracking_uri} ({err.error_code}): check the "
                          "name and version in the MLflow UI's Models page, or pass --tracking-uri") from None


def load_from_mlflow(uri: str, fold: int | None, tracking_uri: str | None):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from esclab.serving.models import load_cross_validation
    from esclab.tracking import FOLD_TAG, resolve_uri

    client = MlflowClient(resolve_uri(tracking_uri))
    run_id = run_of(uri, client)
    try:
        run = client.get_run(run_id)
        one_fold = run.data.tags.get(FOLD_TAG, "all")
        if one_fold != "all" and fold is None:
            fold = int(one_fold)  # a fold's run is that fold's model
        runs = [run] if one_fold != "all" else client.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        with tempfile.TemporaryDirectory() as tmp:
            for each in runs:
                if any(a.path == "checkpoint" for a in client.list_artifacts(each.info.run_id)):
                    client.download_artifacts(each.info.run_id, "checkpoint", tmp)
            folder = Path(tmp) / "checkpoint"
            if not folder.is_dir():
                raise EsclabError(f"MLflow run {run_id} ({uri}) holds no fold models (checkpoint/fold_<k>.ckpt): it is "
                                  "not an esclab training run, or its folds have not finished")
            model = load_cross_validation(folder, fold)
    except MlflowException as err:
        raise EsclabError(f"cannot read {uri} from MLflow at {client.tracking_uri} ({err.error_code}): check the run "
                          "id in the MLflow UI, or pass --tracking-uri (default: $MLFLOW_TRACKING_URI, else "
                          "sqlite:///mlflow.db)") from None
    model.description = f"{model.description} from {uri}"
    return model
