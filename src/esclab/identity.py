"""The code a result comes from, as a hash (DESIGN.md, "Identity of a result").

A fold's code identity is the content of the files a training run executes: train.py,
every module of the package it imports at any depth (those imported inside a function
too, since a function may run), the modules conf/ names as `_target_`s, and the lock
files that pin every package. It goes into the run key, so a fold trained, or a
checkpoint written, by other code is never reused, resumed or pooled.

`closure` is also what dvc.yaml's stage dependencies are checked against
(tests/test_stage_deps.py): DVC reruns a train stage exactly when one of these files
changes, which is when the identity changes.

`esclab.cli` is read differently from the other modules: each of its stage functions
imports its stage's code inside the function, so that `esclab split` never loads the
training code, and only the function a stage runs counts for that stage.
"""

import ast
import hashlib
import json
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: src/esclab/identity.py
SOURCE = ROOT / "src"
LOCKS = ("requirements.lock", "requirements-nodeps.lock")
DISPATCHER = "esclab.cli"
TRAIN_ENTRY = "train.py"


def module_file(name: str) -> Path | None:
    """The source file of package module `name` (esclab.a.b -> src/esclab/a/b.py or .../b/__init__.py)."""
    base = SOURCE.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported(tree: ast.AST, package: str) -> set[str]:
    """The esclab modules an AST imports: `import esclab.x`, `from esclab.x import y` (y too, where it is a module
    of its own) and relative imports resolved against `package`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] == "esclab" and module_file(name)}


def top_level(tree: ast.Module) -> ast.Module:
    """A module's imports that run when it is imported, not those inside its functions."""
    return ast.Module(body=[node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)],
                      type_ignores=[])


def with_parents(name: str) -> set[str]:
    """Importing esclab.a.b runs esclab/__init__.py and esclab/a/__init__.py first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def entry_imports(entry: str) -> set[str]:
    """The modules an entry point imports: a file's every import, or for `module:function` the module's top-level
    imports and those inside that function."""
    if ":" not in entry:
        return imported(ast.parse((ROOT / entry).read_text()), "")
    module, function = entry.split(":")
    path = module_file(module)
    tree = ast.parse(path.read_text())
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function]
    if not body:
        raise ValueError(f"{path} has no function {function}")
    return imported(top_level(tree), module) | imported(body[0], module) | {module}


@cache
def closure(entry: str, targets: tuple[str, ...] = ()) -> tuple[Path, ...]:
    """Every package file that `entry` (a path under the repository, or `module:function`) and the config's
    `_target_` modules `targets` may execute, sorted."""
    pending = set().union(*(with_parents(name) for name in entry_imports(entry) | set(targets)))
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        tree = ast.parse(path.read_text())
        if name == DISPATCHER:  # its stage functions' imports belong to their stages (module docstring)
            tree = top_level(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for found in imported(tree, package):
            pending |= with_parents(found) - seen
    files = {module_file(name) for name in seen} - {None}
    if ":" not in entry:
        files.add(ROOT / entry)
    return tuple(sorted(files))


def conf_targets() -> tuple[str, ...]:
    """The esclab modules that conf/ names as `_target_`s (a scheduler's factory, a search's callback): Hydra
    imports them by name, so no import statement leads to them."""
    found = set()
    for path in (ROOT / "conf").rglob("*.yaml"):
        for line in path.read_text().splitlines():
            key, _, value = line.strip().partition(":")
            if key == "_target_" and value.strip().startswith("esclab."):
                target = value.split("#")[0].strip()
                module = target.rpartition(".")[0]
                found.add(module if module_file(module) else target)
    return tuple(sorted(found))


def files_hash(files) -> str:
    """sha256 over each file's path (relative to the repository) and bytes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"(missing)")
        digest.update(b"\0")
    return digest.hexdigest()


def training_files() -> tuple[Path, ...]:
    """The files a training run executes or is installed by: train.py's closure, the modules conf/ names, and
    the lock files. dvc.yaml's train stage depends on exactly these."""
    return closure(TRAIN_ENTRY, conf_targets()) + tuple(ROOT / name for name in LOCKS)


@cache
def code_sha256() -> str:
    """The code identity of a training run: what the run key, fold.json, checkpoints, MLflow (tag
    esclab.code.sha256) and Results records carry."""
    return files_hash(training_files())


def git_state() -> dict[str, str]:
    """The commit checked out, and whether the code differs from it: any tracked change or untracked file under
    src/, conf/, train.py or the lock files (not params.yaml, dvc.lock or outputs, which `make demo` rewrites)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--untracked-files=all", "--", "src", "conf", TRAIN_ENTRY, *LOCKS)
        return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(changed)).lower()}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git.commit": "none", "git.dirty": "unknown"}


# The config a fold's result depends on: what dvc.yaml's train stage lists as params, less `train.parallel_folds`
# (how many folds train at once). Where the data comes from and what it is are in the data's hashes; where outputs
# and runs go (paths, tracking), how hard a download tries and how evaluate pools are not the fold's result.
CONFIG_KEYS = ("seed", "lr", "model", "optimizer", "scheduler", "trainer", "train", "augment")
PARTS = ("code", "config", "data", "weights")


def config_sha256(config: dict) -> str:
    """sha256 of the CONFIG_KEYS of a resolved config (a plain dict)."""
    kept = {key: config[key] for key in CONFIG_KEYS if key in config}
    kept["train"] = {k: v for k, v in kept.get("train", {}).items() if k != "parallel_folds"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def run_identity(config: dict, data: dict[str, str], weights: str | None) -> dict:
    """A cross-validation's identity: the hashes of its code, config, data (DVC md5s by path name) and pretrained
    weights, and `run_key`, their hash, which finds its MLflow runs and marks each of its outputs."""
    parts = {"code": code_sha256(), "config": config_sha256(config), "data": dict(sorted(data.items())),
             "weights": weights}
    return parts | {"run_key": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]}


def changed(recorded: dict | None, current: dict) -> str:
    """Which parts of `current` differ from a `recorded` identity, in words ("" when they are the same run)."""
    if not recorded:
        return "no identity recorded (made by an older esclab)"
    if recorded.get("run_key") == current["run_key"]:
        return ""
    parts = [part for part in PARTS if recorded.get(part) != current[part]]
    return f"other {', '.join(parts)}" if parts else "another run key"
