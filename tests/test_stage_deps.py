"""dvc.yaml's stages depend on exactly the code they run: each stage's import closure inside src/, computed from
its entry point (esclab/identity.py), and the lock files. A missing entry lets `dvc status` say "up to date" after an
edit that changes the stage's outputs; an extra one reruns a stage for nothing."""

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from esclab.identity import LOCKS, ROOT, closure, training_files

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def entry_of(stage: dict) -> str:
    """What a stage's command runs: `esclab <name>` is esclab.cli's function <name>; `python train.py` the file."""
    cmd = (stage.get("do") or stage)["cmd"].split()
    return f"esclab.cli:{cmd[1]}" if cmd[0] == "esclab" else cmd[1]


def expected(name: str, stage: dict) -> set[Path]:
    """The files a stage runs. A train stage runs training_files(); evaluate checks that the folds it pools have
    the training code's identity, which it computes from those same files."""
    entry = entry_of(stage)
    files = set(training_files()) if name in ("train", "evaluate") else set()
    return files | set(closure(entry)) | {ROOT / lock for lock in LOCKS}


def covered(stage: dict) -> set[Path]:
    """The code files a stage's deps name: .py files, folders of them (every .py file under it), lock files."""
    files = set()
    for dep in (stage.get("do") or stage)["deps"]:
        path = REPO / dep
        if "${" in dep or not (dep.endswith((".py", ".lock")) or path.is_dir() and dep.startswith("src/")):
            continue  # data, and paths.* from params.yaml
        files |= {p for p in path.rglob("*.py") if "__pycache__" not in p.parts} if path.is_dir() else {path}
    return {ROOT / p.relative_to(REPO) for p in files}


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_depends_on_exactly_the_code_it_runs(name):
    stage = STAGES[name]
    want, have = expected(name, stage), covered(stage)
    missing = sorted(str(p.relative_to(ROOT)) for p in want - have)
    extra = sorted(str(p.relative_to(ROOT)) for p in have - want)
    assert not missing, f"dvc.yaml's {name} stage runs these but does not depend on them: add them: {missing}"
    assert not extra, f"dvc.yaml's {name} stage depends on code it never runs: remove them: {extra}"


def test_a_closure_follows_lazy_imports_and_parent_packages_but_not_other_stages_code():
    """The training closure holds what train.py imports inside functions (the training loop), each package's
    __init__.py, and the modules conf/ names as _target_s; the split stage's holds none of the training code."""
    train = {str(p.relative_to(ROOT)) for p in training_files()}
    assert {"train.py", "src/esclab/training/run.py", "src/esclab/training/__init__.py", "src/esclab/__init__.py",
            "src/esclab/training/schedules.py", "src/esclab/config.py", "requirements.lock"} <= train
    split = {str(p.relative_to(ROOT)) for p in closure("esclab.cli:split")}
    assert "src/esclab/data/split.py" in split and not any("training" in p for p in split)
