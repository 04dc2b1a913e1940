"""`esclab <stage> [overrides]`: the Hydra entry points that dvc.yaml runs and `esclab results`; `esclab predict`,
`esclab export` and `esclab serve`, which take plain flags.

Each stage reads the composed config (conf/ by default; dvc.yaml passes
`--config-dir . --config-name params` so the stages read params.yaml) and calls
one function with plain arguments. A user-causable error prints one line and
exits 1; HYDRA_FULL_ERROR=1 shows the traceback instead.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from esclab.config import check_config
from esclab.errors import EsclabError
from esclab.logs import silence_known_noise

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def download(cfg: DictConfig) -> None:
    from esclab.data import download as dl
    from esclab.data.folder import check_root
    from esclab.data.synthetic import write_lookalike

    ds = cfg.dataset
    archive, source_dir = ds.archive, ds.source_dir
    if ds.synthetic is not None and not (ds.archive or ds.source_dir or ds.url):
        made = write_lookalike(ds.layout, Path(cfg.paths.downloads), ds.name, n_folds=ds.n_folds,
                               settings=ds.synthetic)
        archive, source_dir = (None, made) if made.is_dir() else (made, None)
    if ds.layout == "folder":
        check_root(Path(source_dir))
    dl.prepare_raw(Path(cfg.paths.raw), downloads=Path(cfg.paths.downloads), url=ds.url, archive=archive,
                   source_dir=source_dir, sha256=ds.sha256, size=ds.size, **cfg.download)


def split(cfg: DictConfig) -> None:
    """The split table, read the way dataset.layout says (one of config.CHOICES', checked before any stage runs)."""
    from esclab.data.folder import write_folder_split
    from esclab.data.split import write_split
    from esclab.data.urbansound import write_urbansound_split

    ds = cfg.dataset
    raw, out = Path(cfg.paths.raw), Path(cfg.paths.split)
    if ds.layout == "folder":
        write_folder_split(raw, out, n_folds=ds.n_folds, n_classes=ds.n_classes, **ds.folder)
    elif ds.layout == "urbansound8k":
        write_urbansound_split(raw, out, n_folds=ds.n_folds, n_classes=ds.n_classes)
    else:
        write_split(raw, out, n_classes=ds.n_classes, n_folds=ds.n_folds, esc10_only=ds.esc10_only)


def features(cfg: DictConfig) -> None:
    from esclab.data.representations import write_cache

    write_cache(Path(cfg.paths.split), Path(cfg.paths.features), cfg.features)


def evaluate(cfg: DictConfig) -> None:
    from esclab.training.run import evaluate as pool_folds

    pool_folds(cfg)


def results(cfg: DictConfig) -> None:
    from esclab.results import write_results

    write_results(cfg)


STAGES = {"download": download, "split": split, "features": features, "evaluate": evaluate, "results": results}


def run_reporting_errors(fn, cfg: DictConfig):
    """Check the config, run a stage and return what it returns; a user-causable error becomes one line on stderr
    and exit status 1."""
    silence_known_noise()
    try:
        check_config(cfg)
        return fn(cfg)
    except EsclabError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"esclab: error: {err}", file=sys.stderr)
        sys.exit(1)


# Commands that read no config (the model carries its own): plain flags, not Hydra overrides; module -> main(argv).
COMMANDS = {"predict": "esclab.serving.predict", "export": "esclab.serving.export", "serve": "esclab.serving.app"}


def run_command(name: str, argv: list[str]) -> None:
    """`esclab predict|export|serve ...`: a user-causable error is one line on stderr and exit status 1."""
    import importlib

    silence_known_noise()
    try:
        sys.exit(importlib.import_module(COMMANDS[name]).main(argv))
    except EsclabError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"esclab: error: {err}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] in COMMANDS:
        run_command(sys.argv[1], sys.argv[2:])
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        print(f"usage: esclab {{{','.join(STAGES)}}} [key=value ...], or esclab {{{','.join(COMMANDS)}}} [--help] ...",
              file=sys.stderr)
        sys.exit(2)
    stage = STAGES[sys.argv.pop(1)]
    # Data stages keep no Hydra run folder: their record is dvc.lock.
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(
        lambda cfg: run_reporting_errors(stage, cfg))()
