"""A team's shared MLflow server, `make mlflow-server`: runs in PostgreSQL, artifacts uploaded through the server
into its folder, and esclab pointed at it by MLFLOW_TRACKING_URI alone."""

from pathlib import Path

import psycopg
import pytest
from conftest import NO_SERVER_JOBS, REPO, compose_config, free_port, serving, tiny_overrides
from sqlalchemy.engine import URL, make_url

from esclab.errors import EsclabError
from esclab.tracking import Tracker

# The README's database for the server: a login role, and a database it owns.
PASSWORD = "team-secret"
DATABASE = [f"CREATE ROLE mlflow LOGIN PASSWORD '{PASSWORD}'", "CREATE DATABASE mlflow OWNER mlflow"]


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """`make mlflow-server` on a new database of the test cluster, its password in $PGPASSWORD (not in the URI), as
    README advises, and allowing requests addressed to 127.0.0.1:<port> only: the server's address, the database's
    URI (with the password, for the test's own queries) and the artifacts folder."""
    with psycopg.connect(postgres, autocommit=True) as admin:
        for statement in DATABASE:
            admin.execute(statement)
    cluster = make_url(postgres)
    database = URL.create("postgresql", "mlflow", host=cluster.host, port=cluster.port, database="mlflow")
    root, port = tmp_path_factory.mktemp("team_server"), free_port()
    # -o setup: the suite runs inside `make test`, which has set the environment up already.
    command = ["make", "--no-print-directory", "-C", str(REPO), "-o", "setup", "mlflow-server",
               f"MLFLOW_BACKEND={database.render_as_string()}", f"MLFLOW_ARTIFACTS={root / 'artifacts'}",
               "MLFLOW_HOST=127.0.0.1", f"MLFLOW_PORT={port}", "MLFLOW_WORKERS=1",
               f"MLFLOW_ALLOWED_HOSTS=127.0.0.1:{port}"]
    env = {"PGPASSWORD": PASSWORD} | NO_SERVER_JOBS
    with serving(command, f"http://127.0.0.1:{port}/health", root / "server.log", env):
        uri = database.set(password=PASSWORD).render_as_string(hide_password=False)
        yield f"http://127.0.0.1:{port}", uri, root / "artifacts"


def train_fold_1(tiny_data: dict[str, Path], out: Path, server: str) -> None:
    """Fold 1 of the tiny data for one epoch, as `python train.py` runs it with MLFLOW_TRACKING_URI=`server` and no
    tracking setting, from `out` (in this process: a second interpreter would only add its start-up)."""
    from esclab.training.run import train

    overrides = [o for o in tiny_overrides(tiny_data, out, "fold=1", "trainer.max_epochs=1",
                                           "tracking.log_model=false") if not o.startswith("tracking.uri")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", server)
        patch.chdir(out)
        train(compose_config(*overrides))


def rows(database: str, query: str, *args) -> list[tuple]:
    """The rows of `query`, read from PostgreSQL itself, not through MLflow."""
    with psycopg.connect(database) as db:
        return db.execute(query, args).fetchall()


FOLD_RUNS = """SELECT fold.value, r.run_uuid, r.status, r.artifact_uri, parent.value FROM runs r
               JOIN tags fold ON fold.run_uuid = r.run_uuid AND fold.key = 'esclab.fold'
               LEFT JOIN tags parent ON parent.run_uuid = r.run_uuid AND parent.key = 'mlflow.parentRunId'"""


@pytest.fixture(scope="module")
def trained(team_server, tiny_data, tmp_path_factory) -> Path:
    """Fold 1 trained once into the team server; the folder it ran in, and wrote models/ and reports/ to."""
    out = tmp_path_factory.mktemp("team_client")
    train_fold_1(tiny_data, out, team_server[0])
    return out


def test_a_run_logged_by_MLFLOW_TRACKING_URI_lands_in_postgresql_and_its_artifacts_on_the_server(team_server,
                                                                                                  trained):
    _, database, artifacts = team_server
    runs = {fold: (run_id, status, artifact_uri, parent) for fold, run_id, status, artifact_uri, parent
            in rows(database, FOLD_RUNS)}
    assert set(runs) == {"all", "1"}
    child, status, artifact_uri, parent = runs["1"]
    assert status == "FINISHED" and parent == runs["all"][0]
    metrics = {key for (key,) in rows(database, "SELECT DISTINCT key FROM metrics WHERE run_uuid = %s", child)}
    assert {"train/loss", "val/acc", "test/acc"} <= metrics
    assert rows(database, "SELECT value FROM params WHERE run_uuid = %s AND key = 'fold'", child) == [("1",)]

    # Served artifacts: the client uploaded through the server (mlflow-artifacts:/), which wrote them to its folder.
    assert artifact_uri.startswith("mlflow-artifacts:/")
    checkpoint = artifacts / artifact_uri.removeprefix("mlflow-artifacts:/") / "checkpoint" / "fold_1.ckpt"
    assert checkpoint.read_bytes() == (trained / "models" / "fold_1.ckpt").read_bytes()
    assert not {"mlruns", "mlartifacts", "mlflow.db"} & {path.name for path in trained.iterdir()}  # nothing local


def test_the_same_fold_run_again_joins_its_runs_on_the_server_and_is_not_retrained(team_server, trained, tiny_data,
                                                                                    caplog):
    _, database, _ = team_server
    count = "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM metrics), (SELECT count(*) FROM params)"
    before = rows(database, count)
    with caplog.at_level("INFO", logger="esclab.training.run"):
        train_fold_1(tiny_data, trained, team_server[0])
    assert "fold 1: already trained by this code, config, data and weights" in caplog.text
    assert rows(database, count) == before  # the parent found on the server by its key, no new run, nothing relogged


def test_a_name_the_server_does_not_allow_fails_before_training(team_server, tiny_data, tmp_path):
    """MLflow answers /health for any Host, and its API with 403 for one it does not allow (here localhost)."""
    server = team_server[0].replace("127.0.0.1", "localhost")
    cfg = compose_config(*tiny_overrides(tiny_data, tmp_path, "fold=1", f"tracking.uri={server}"))
    with pytest.raises(EsclabError, match="refuses requests addressed to localhost:.*MLFLOW_ALLOWED_HOSTS=localhost:"):
        Tracker(cfg)
