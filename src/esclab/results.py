"""README's Results table, generated from recorded runs so that it cannot drift from what the code gives.

Each row is a committed record, `reports/results/<name>.json`: the run's title,
the command that made it, its recipe (the overrides `params.yaml` was composed
with), the machine, the code (the commit, which must have been clean, and the code
identity's sha256, identity.py), the data (the DVC md5s of the raw dataset, the split table
and the feature cache) and the pooled metrics. `esclab results` (`make results`)
refreshes the record whose recipe the workspace ran, from `reports/metrics.json`,
`dvc.lock` and the cross-validation's MLflow parent run, then rewrites the table
between README's markers from all records. Records of runs that need data or
hardware this machine lacks (real ESC-50, a GPU) stay as they were recorded where
they ran. A test reruns `make demo`'s pipeline and fails if README changes.
"""

import json
import logging
from pathlib import Path

import yaml
from mlflow import MlflowClient
from omegaconf import DictConfig

from esclab.atomic import atomic_file
from esclab.errors import EsclabError
from esclab.params import recorded_overrides
from esclab.identity import git_state
from esclab.tracking import CODE_TAG, FOLD_TAG, HARDWARE_TAG, KEY_TAG, hardware, identity_of, resolve_uri

log = logging.getLogger(__name__)

BEGIN = "<!-- results: written by `make results` from reports/results/*.json; edit those, not this table -->"
END = "<!-- end of results -->"
BENCH_BEGIN = ("<!-- benchmarks: written by `make results` from reports/bench/*.json, which bench/ writes; rerun a "
               "benchmark, not this table -->")
BENCH_END = "<!-- end of benchmarks -->"
# Overrides that say where the data or the runs live, not what is computed: a local copy of
# ESC-50 (dataset.source_dir=...) runs the same recipe as the download, and its data hashes say so.
LOCATION = ("dataset.source_dir=", "dataset.archive=", "dataset.url=", "paths.", "tracking.")
KEPT_METRICS = ("accuracy_mean", "accuracy_std", "fold_accuracy", "macro_f1", "n_clips", "n_classes")
FIELDS = ("title", "command", "overrides", "machine", "data", "metrics")
STAGE_OUTPUTS = {"raw": "download", "split": "split", "features": "features"}


def recipe(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(LOCATION)]


def load_json_files(folder: Path, fields: tuple[str, ...], fix: str) -> dict[Path, dict]:
    """Every JSON file in `folder`, by file name order (a table's row order), each with `fields`; `fix` says how to
    mend a broken one."""
    loaded = {}
    for path in sorted(folder.glob("*.json")):
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise EsclabError(f"{path} is not valid JSON ({err}): {fix}") from None
        missing = [field for field in fields if field not in content]
        if missing:
            raise EsclabError(f"{path} lacks {', '.join(missing)}: each needs {', '.join(fields)}; {fix}")
        loaded[path] = content
    return loaded


def load_records(folder: Path) -> dict[Path, dict]:
    """Every results record in `folder`."""
    records = load_json_files(folder, FIELDS, "fix it, or restore it with git")
    if not records:
        raise EsclabError(f"no results records in {folder}: restore reports/results/ with git")
    return records


def check_up_to_date(root: Path) -> None:
    """reports/ must be what `dvc repro` gives for params.yaml now, not an older or a hand-run output."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        changed = repo.status(targets=["evaluate"], with_deps=True)
    if changed:
        raise EsclabError(f"the pipeline's outputs are not up to date with params.yaml ({', '.join(changed)} "
                          "changed): run `dvc repro` first, then `make results`")


def locked_md5s(root: Path, paths: DictConfig) -> dict[str, str]:
    """The md5 dvc.lock records for the raw dataset, the split table and the feature cache."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    md5s = {}
    for name, stage in STAGE_OUTPUTS.items():
        outs = {out["path"]: out["md5"] for out in lock["stages"][stage]["outs"]}
        md5s[name] = outs[str(paths[name])]
    return md5s


def run_of(cfg: DictConfig, md5s: dict[str, str]) -> dict[str, str]:
    """The machine the cross-validation trained on and the code it ran, from its MLflow parent run (this machine's
    and the code checked out now if it has none).

    The run is found by its key, made from the data's md5s as dvc.lock records them (the ones the
    tracker hashed), so the dataset is not hashed a second time.
    """
    uri = resolve_uri(cfg.tracking.uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    identity = identity_of(cfg, md5s)
    found = experiment and client.search_runs([experiment.experiment_id], f"tags.`{KEY_TAG}` = '{identity['run_key']}'"
                                              f" and tags.`{FOLD_TAG}` = 'all'", max_results=1)
    tags = found[0].data.tags if found else {}
    if HARDWARE_TAG not in tags:
        log.info("results: no MLflow run of this cross-validation in %s names its machine; recording this one", uri)
        tags = {HARDWARE_TAG: hardware(), CODE_TAG: identity["code"]} | git_state()
    return {"machine": tags[HARDWARE_TAG], "code": {"commit": tags.get("git.commit", "none"),
                                                   "dirty": tags.get("git.dirty", "unknown"),
                                                   "sha256": tags.get(CODE_TAG, identity["code"])}}


def record_workspace(cfg: DictConfig, root: Path, records: dict[Path, dict]) -> Path | None:
    """Refresh the record of the recipe that params.yaml was composed with, from the workspace's outputs.

    A record made on another machine is kept unless `+results.replace=true`: CPU kernels
    differ in the last bits between processors, which flips a few clips of a small
    demo, so a record is evidence from the machine it names, and this run is compared with it.
    """
    overrides = recorded_overrides((root / "params.yaml").read_text())
    matches = [path for path, record in records.items() if recipe(record["overrides"]) == recipe(overrides)]
    if not matches:
        log.info("results: the workspace's recipe (overrides: %s) has no row in reports/results/; "
                 "to add one, copy a record there and set its title, command and overrides",
                 " ".join(overrides) or "none")
        return None
    metrics_file = root / cfg.paths.reports / "metrics.json"
    if not metrics_file.is_file():
        log.info("results: %s not found; run `dvc repro` to record this workspace's run", metrics_file)
        return None
    check_up_to_date(root)
    metrics = json.loads(metrics_file.read_text())
    md5s = locked_md5s(root, cfg.paths)
    path, made = matches[0], run_of(cfg, md5s)
    machine = made["machine"]
    # What the row is stays; what a run made it from is this run's (an older record's notes on its run go).
    record = ({k: v for k, v in records[path].items() if k in ("title", "command", "overrides")} | made
              | {"data": md5s, "metrics": {k: metrics[k] for k in KEPT_METRICS}})
    kept = records[path]
    if kept.get("code") and (kept["data"], kept["metrics"], kept["machine"]) == (md5s, record["metrics"], machine):
        log.info("results: %s already records this run's data and metrics, made by the code it names", path)
        return None
    if kept["metrics"] and kept["machine"] != machine and not cfg.get("results", {}).get("replace", False):
        log.info("results: kept %s, made on %s; this run, on %s, gives accuracy %s (the record: %s). "
                 "To record this machine's run instead: `make results ARGS=+results.replace=true`",
                 path, kept["machine"], machine, accuracy_cell(record["metrics"]), accuracy_cell(kept["metrics"]))
        return None
    if made["code"]["dirty"] != "false":
        raise EsclabError(f"the run to record in {path} ran code that differs from commit {made['code']['commit'][:12]}"
                          " (git.dirty): commit the code, rerun the pipeline (dvc repro), then `make results`, so "
                          "that the record names the code that made it")
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    records[path] = record
    log.info("results: recorded the workspace's run in %s", path)
    return path


def percent(value: float) -> str:
    return f"{100 * value:.4g}"


def accuracy_cell(metrics: dict) -> str:
    if not metrics:  # a row added by hand, whose run has not been recorded yet
        return "not recorded yet: run its command, then `make results`"
    folds = metrics["fold_accuracy"]
    if "accuracy_mean" not in metrics:  # a record of some folds only
        return "; ".join(f"fold {k} only: **{percent(v)} %**" for k, v in folds.items())
    spread = ", ".join(percent(v) for v in folds.values())
    return f"**{100 * metrics['accuracy_mean']:.2f} ± {100 * metrics['accuracy_std']:.2f} %** (folds {spread})"


def code_cell(code: dict | None) -> str:
    """The commit a record's run ran (records made before esclab recorded the code say so)."""
    return f"`{code['commit'][:8]}`" if code else "not recorded"


def render_table(records: dict[Path, dict]) -> str:
    lines = ["| run | command | accuracy (5-fold mean ± std) | macro-F1 | data: md5 of raw / split / features | "
             "code: commit | machine | record |", "|---|---|---|---|---|---|---|---|"]
    for path, r in records.items():
        macro_f1 = f"{r['metrics']['macro_f1']:.3f}" if "macro_f1" in r["metrics"] else "–"
        data = " / ".join(f"`{r['data'][name][:8]}`" if r["data"][name] else "–" for name in STAGE_OUTPUTS)
        lines.append(f"| {r['title']} | `{r['command']}` | {accuracy_cell(r['metrics'])} | {macro_f1} | {data} | "
                     f"{code_cell(r.get('code'))} | {r['machine']} | [{path.name}](reports/results/{path.name}) |")
    return "\n".join(lines)


def load_benchmarks(folder: Path) -> dict[Path, dict]:
    """Every benchmark result in `folder` (bench/report.py writes them)."""
    return load_json_files(folder, ("title", "headline", "provenance"), "rerun its benchmark, or restore it with git")


def render_benchmarks(results: dict[Path, dict]) -> str:
    lines = ["| benchmark | command | result | machine | code: commit | result file |", "|---|---|---|---|---|---|"]
    for path, r in results.items():
        made = r["provenance"]
        commit = f"`{made['commit'][:8]}`" + (" (uncommitted changes)" if made["dirty"] != "false" else "")
        lines.append(f"| {r['title']} | `{made['command']}` | {r['headline']} | {made['machine']} | {commit} | "
                     f"[{path.name}](reports/bench/{path.name}) |")
    return "\n".join(lines)


def between(text: str, begin: str, end: str, table: str, readme: Path) -> str:
    """`text` with `table` between the markers `begin` and `end`."""
    if begin not in text or end not in text:
        raise EsclabError(f"{readme} lacks the markers {begin} ... {end}: restore them with git")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{table}\n{end}{rest.split(end, 1)[1]}"


def write_readme(readme: Path, table: str, benchmarks: str | None = None) -> bool:
    """Put `table` (and `benchmarks`) between README's markers; True if README changed."""
    text = readme.read_text()
    new = between(text, BEGIN, END, table, readme)
    if benchmarks is not None:
        new = between(new, BENCH_BEGIN, BENCH_END, benchmarks, readme)
    if new == text:
        return False
    with atomic_file(readme) as tmp:
        tmp.write_text(new)
    return True


def write_results(cfg: DictConfig, root: Path = Path(".")) -> bool:
    """The `results` command: record the workspace's run, if it is a row of the table, then rewrite the table and
    the benchmarks' table."""
    records = load_records(root / "reports" / "results")
    record_workspace(cfg, root, records)
    benchmarks = render_benchmarks(load_benchmarks(root / "reports" / "bench"))
    changed = write_readme(root / "README.md", render_table(records), benchmarks)
    log.info("results: README.md %s", "updated" if changed else "unchanged")
    return changed
