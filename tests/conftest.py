"""Shared fixtures: small real datasets written to disk by the tests themselves, a real MLflow server, a real WebDAV
server."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest
import requests

from esclab.data.synthetic import write_tree

REPO = Path(__file__).resolve().parents[1]


ORIGINAL_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def tracking_uri_stays_in_its_test():
    """mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI, which a later test's subprocesses
    (`dvc repro` in test_pipeline.py) would inherit and log into another test's store. Restored to
    what pytest started with, since module fixtures that train set it before a test begins."""
    yield
    if ORIGINAL_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = ORIGINAL_TRACKING_URI


# Small enough to be quick, shaped like ESC-50: every class in every fold.
TINY = dict(n_classes=5, clips_per_class=5, duration=1.0, sample_rate=16000, seed=0)


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    """A synthetic ESC-50-master/ folder (audio/ + meta/); copy it before changing it."""
    return write_tree(tmp_path_factory.mktemp("tiny"), **TINY)


@pytest.fixture
def raw(tiny_tree, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may break."""
    return Path(shutil.copytree(tiny_tree, tmp_path / "raw"))

# The tiny dataset's features: 32 mel bands x 126 frames keep cnn4 quick on a CPU.
TINY_FEATURES = dict(sample_rate=16000, duration=1.0, n_fft=512, hop_length=128, n_mels=32)


def split_and_features(tree: Path, root: Path, n_folds: int = 5) -> dict[str, Path]:
    """A tiny dataset's tree taken through split and features into `root`: the paths.* a training run reads."""
    from esclab.data.features import LogMelSettings, write_features
    from esclab.data.split import write_split

    split = root / "split.csv"
    write_split(tree, split, n_classes=TINY["n_classes"], n_folds=n_folds, esc10_only=False)
    features = write_features(split, root / "features", LogMelSettings(**TINY_FEATURES), device="cpu", num_workers=0)
    return {"raw": tree, "split": split, "features": features}


@pytest.fixture(scope="session")
def tiny_data(tiny_tree, tmp_path_factory) -> dict[str, Path]:
    """The tiny dataset taken through split and features."""
    return split_and_features(tiny_tree, tmp_path_factory.mktemp("tiny_data"))


FOLDER_GROUPS = r"^(.+)_\d+\."  # <source>_<take>.<ext>, the synthetic folder tree's names


@pytest.fixture(scope="session")
def folder_tree(tmp_path_factory) -> Path:
    """The synthetic folder-per-class tree (crying 10 / screaming 18 / normal 50); copy it before changing it."""
    from esclab.data.synthetic import write_folder_tree

    return write_folder_tree(tmp_path_factory.mktemp("folder") / "tree")


@pytest.fixture(scope="session")
def folder_split(folder_tree, tmp_path_factory) -> dict[str, Path]:
    """The synthetic folder tree and its grouped 3-fold split table (paths.raw, paths.split)."""
    from esclab.data.folder import write_folder_split

    split = tmp_path_factory.mktemp("folder_split") / "split.csv"
    write_folder_split(folder_tree, split, n_folds=3, group_pattern=FOLDER_GROUPS)
    return {"raw": folder_tree, "split": split}


def folder_overrides(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides that train fold 1 of the synthetic folder dataset's 3 folds for one epoch, writing under `out`."""
    return ["dataset=synthetic_folder", "dataset.n_folds=3", "fold=1", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "train.batch_size=8", "lr=1e-3", "tracking.log_model=false",
            *(f"paths.{name}={path}" for name, path in data.items()), f"paths.models={out / 'models'}",
            f"paths.reports={out / 'reports'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", *extra]


def compose_config(*overrides: str):
    """conf/ composed as `python train.py` would, with overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def tiny_overrides(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides that point a run at the tiny data, write under `out` and train briefly."""
    features = [f"features.{k}={v}" for k, v in TINY_FEATURES.items()]
    paths = [f"paths.{k}={v}" for k, v in data.items()] + [f"paths.models={out / 'models'}",
                                                           f"paths.reports={out / 'reports'}"]
    return ["dataset=synthetic", f"dataset.synthetic.n_classes={TINY['n_classes']}", *features, *paths,
            "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "train.batch_size=8", "lr=1e-3",
            f"tracking.uri=sqlite:///{out / 'mlflow.db'}", *extra]


@pytest.fixture(scope="session")
def cnn4_run(tiny_data, tmp_path_factory) -> Path:
    """A whole tiny cross-validation of cnn4 (models/ and reports/ under the returned folder)."""
    from esclab.training.run import train

    out = tmp_path_factory.mktemp("predict_cnn4")
    train(compose_config(*tiny_overrides(tiny_data, out, "tracking.log_model=false")))
    return out


def embedding_cache(split: Path, out: Path, *features: str) -> Path:
    """The embedding cache of the tiny dataset's 1-s clips that the `features` overrides name, in `out`/features."""
    from esclab.data.representations import write_cache

    return write_cache(split, out / "features", compose_config(*features, "features.duration=1.0").features)


def train_on_cache(tiny_data: dict[str, Path], cache: Path, out: Path, *overrides: str) -> Path:
    """A tiny cross-validation on an embedding cache into `out` (models/, reports/, mlflow.db)."""
    from esclab.training.run import train

    tiny = [o for o in tiny_overrides(tiny_data, out) if not o.startswith(("features.", "paths.features"))]
    train(compose_config("tracking.log_model=false", *overrides, *tiny, "features.duration=1.0",
                         f"paths.features={cache}"))
    return out


def embedding_run(tiny_data: dict[str, Path], out: Path, features: str, *overrides: str) -> Path:
    """A tiny cross-validation on `features`' embeddings of the tiny dataset (1-s clips) into `out`."""
    return train_on_cache(tiny_data, embedding_cache(tiny_data["split"], out, features), out, *overrides)


@pytest.fixture(scope="session")
def tiny_clap(tmp_path_factory) -> Path:
    """A randomly initialised CLAP small enough for a test, as save_pretrained writes a hub checkpoint: the model,
    its feature extractor (16 kHz, windows of 1 s, 16 mel bands) and a byte-level BPE tokenizer trained on the
    tiny dataset's class names and the prompts' words. Both towers project to 8 dimensions."""
    import tokenizers
    import torch
    import transformers as hf

    from esclab.data.synthetic import CATEGORIES

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([*CATEGORIES, "This is a sound of", "A recording of"], vocab_size=400,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # RoBERTa's ids 0..4
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = hf.RobertaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                                    model_max_length=32)
    text = hf.ClapTextConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=40)
    # HTSAT reads its mel frames as a spec_size-square image, spec_size / num_mel_bins strips of them.
    audio = hf.ClapAudioConfig(num_mel_bins=16, spec_size=64, patch_size=4, patch_stride=4, window_size=4,
                               depths=[1, 1], num_attention_heads=[1, 2], patch_embeds_hidden_size=8,
                               hidden_size=16)
    torch.manual_seed(0)
    model = hf.ClapModel(hf.ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=8))
    with torch.no_grad():
        model.logit_scale_a.fill_(3.0)  # the audio-to-text scale set apart from the text-to-audio one (both log 1/0.07)
    extractor = hf.ClapFeatureExtractor(feature_size=16, sampling_rate=16000, max_length_s=1, hop_length=160,
                                        fft_window_size=512, frequency_max=8000, truncation="rand_trunc")
    folder = tmp_path_factory.mktemp("tiny_clap")
    model.save_pretrained(folder)
    hf.ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def head_run(tiny_data, tmp_path_factory) -> Path:
    """A tiny cross-validation of seed 002's system: frozen YAMNet embeddings, a linear SVM per fold."""
    return embedding_run(tiny_data, tmp_path_factory.mktemp("predict_svm"), "features=yamnet", "experiment=yamnet_svm")


ESCLAB = [sys.executable, "-c", "from esclab.cli import main; main()"]


def esclab(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`esclab <args>` in a fresh process, as a user runs it (errors as one line: HYDRA_FULL_ERROR unset), with `env`
    added to the environment."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | (env or {})
    return subprocess.run([*ESCLAB, *args], cwd=cwd, env=env, capture_output=True, text=True)


def pytest_configure(config):
    """The warnings esclab silences in its own processes (esclab/logs.py), silenced here too; every other one shows.

    pytest runs the tests in a worker process per core (pytest-xdist, pyproject.toml): each worker, and every command
    its tests start, computes with one thread, so the workers share the cores instead of fighting over them."""
    from esclab.logs import pytest_filters

    for line in pytest_filters():
        config.addinivalue_line("filterwarnings", line)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The files that hold whole-pipeline runs (marked slow) go first. With a worker per core, a file to a worker
    (pyproject.toml), the longest file then starts at once rather than last, when the other worker would idle
    waiting for it. The sort is stable: each file keeps its own order."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def kill_when(args: list[str], cwd: Path, ready: Callable[[], bool], timeout: float = 300,
              env: dict[str, str] | None = None) -> None:
    """Run `args`; SIGKILL its whole process group (kill -9 of a stage and its workers) as soon as `ready()` is
    true."""
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=env)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{args[:2]} ended (exit {proc.poll()}) before it could be killed: {proc.stderr.read()[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(command: list[str], ready: str, log: Path, env: dict[str, str] | None = None,
            auth: tuple[str, str] | None = None) -> Iterator[None]:
    """`command` running in a session of its own (output in `log`, `env` added to its environment) once a GET of
    `ready` (with basic `auth`) answers; at the end of the block the server and every process it started are
    stopped, whatever happened."""
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if requests.get(ready, auth=auth, timeout=1).ok:
                    break
            except requests.RequestException:  # refused while starting, or a read timeout on a busy machine
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"{command[0]} did not serve {ready} within 90 s:\n{log.read_text()[-3000:]}")
        yield
    finally:
        with suppress(ProcessLookupError):  # none left, when it had failed to start
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        # A server started by a wrapper (make) outlives it while it stops its own workers: wait for all of them.
        _, alive = psutil.wait_procs(group(server.pid), timeout=30)
        for process in alive:
            process.kill()


def group(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid`."""
    def pgid_of(process: psutil.Process) -> int | None:
        with suppress(ProcessLookupError, psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE:
                return os.getpgid(process.pid)
        return None
    return [process for process in psutil.process_iter() if pgid_of(process) == pgid]


# MLflow 3's server also starts a job runner and seven huey consumers for its GenAI jobs (judges, trace archival),
# which esclab never submits: not started by the tests' servers, whose start and stop they would slow down.
NO_SERVER_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    with serving([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                  "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                 f"http://127.0.0.1:{port}/health", root / "server.log", env=NO_SERVER_JOBS):
        yield f"http://127.0.0.1:{port}"


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: initdb's on PATH, else Debian's newest /usr/lib/postgresql/*/bin."""
    if initdb := shutil.which("initdb"):
        return Path(initdb).parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda path: [int(part) for part in path.parents[1].name.split(".")])
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of its own, on a free port of 127.0.0.1 and nowhere else: its superuser's URI (password
    login, as a team's server has). Made for speed, not safety (fsync off); it and its folder go with the module.

    initdb and postgres refuse to run as root, so as root (CI) they run as the `postgres` user of Debian's package,
    in a folder under /tmp that it owns: pytest's tmp_path is private to root. Debian's own cluster is not started.
    """
    bindir = postgres_bin()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: `apt-get install -y postgresql`")
        pytest.skip("needs PostgreSQL's initdb and postgres: `apt-get install -y postgresql` (Debian)")
    as_user = dict(user="postgres", group="postgres", extra_groups=[]) if os.geteuid() == 0 else {}
    root = Path(tempfile.mkdtemp(prefix="esclab-postgres-"))
    if as_user:
        shutil.chown(root, "postgres", "postgres")

    def pg(program: str, *args: str) -> None:
        done = subprocess.run([str(bindir / program), *args], cwd=root, capture_output=True, text=True, **as_user)
        if done.returncode:
            log = root / "server.log"
            pytest.fail(f"{program} failed: {done.stderr}{log.read_text() if log.is_file() else ''}")

    password, port = "esclab-tests", free_port()
    (root / "password").write_text(password)
    try:
        pg("initdb", "--pgdata=data", "--username=postgres", "--pwfile=password", "--auth=scram-sha-256",
           "--encoding=UTF8", "--locale=C", "--no-sync")
        settings = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories= -c fsync=off"
        pg("pg_ctl", "--pgdata=data", "--log=server.log", "--wait", "--timeout=60", "-o", settings, "start")
        try:
            yield f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
        finally:
            pg("pg_ctl", "--pgdata=data", "--mode=immediate", "stop")
    finally:
        shutil.rmtree(root)


WEBDAV_USER = ("esclab", "not-a-secret")  # the test WebDAV server's one account: user, password (basic auth)


@pytest.fixture(scope="module")
def webdav_server(tmp_path_factory):
    """A real WebDAV server (WsgiDAV on cheroot) on a free port of 127.0.0.1 that lets in WEBDAV_USER only, sharing
    an empty folder; yields that folder as a DVC remote URL. The folder exists beforehand, as on a real server: DVC's
    WebDAV client makes the folders below a remote's URL, never the URL's own."""
    root = tmp_path_factory.mktemp("webdav")
    (root / "share/esclab").mkdir(parents=True)
    port = free_port()
    user, password = WEBDAV_USER
    config = {"host": "127.0.0.1", "port": port, "provider_mapping": {"/": str(root / "share")},
              "http_authenticator": {"accept_basic": True, "accept_digest": False, "default_to_digest": False},
              "simple_dc": {"user_mapping": {"*": {user: {"password": password}}}}, "verbose": 1}
    (root / "wsgidav.json").write_text(json.dumps(config))
    with serving([str(Path(sys.executable).parent / "wsgidav"), "--config", str(root / "wsgidav.json")],
                 f"http://127.0.0.1:{port}/esclab/", root / "wsgidav.log", auth=WEBDAV_USER):
        yield f"webdav://127.0.0.1:{port}/esclab"


def printed_warnings(output: str) -> list[str]:
    """Lines of a command's output that print a Python warning: '<file>.py:<line>: ...' (Lightning's format
    leaves out the category, so the location is what they share)."""
    return [line for line in output.splitlines() if re.search(r"\.py:\d+: ", line)]
