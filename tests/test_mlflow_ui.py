"""The MLflow UI, seen by a real headless Chromium, shows esclab's runs at the address esclab gives.

MLflow 3's UI starts in its GenAI view: an experiment opened as it is opens on a
trace Overview (traces, tokens, an assistant), not on its runs. In MLflow 3.17.2
the experiment's `mlflow.experimentKind` tag does not change that; the sidebar's
GenAI / Model training switch (kept in the browser's localStorage) or
`workflowType=machine_learning` in the address does, and `Tracker.ui_url` puts it there.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import compose_config, tiny_overrides

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)
GENAI_ONLY = ("Judges", "Agent versions", "Detect Issues")  # the GenAI sidebar and trace overview
TRAINING_ONLY = ("Model registry",)  # the model-training sidebar


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: `apt-get install -y chromium`")
        pytest.skip("needs a Chromium to look at the MLflow UI: `apt-get install -y chromium` (Debian)")
    return CHROMIUM


@pytest.fixture(scope="module")
def trained(mlflow_server, tiny_data, tmp_path_factory):
    """One fold of a tiny cross-validation trained into the server: a parent run and its fold's child run."""
    from esclab.tracking import Tracker
    from esclab.training.run import train

    out = tmp_path_factory.mktemp("ui_train")
    cfg = compose_config(*tiny_overrides(tiny_data, out, "fold=1", "trainer.max_epochs=1",
                                         f"tracking.uri={mlflow_server}"))
    train(cfg)
    return Tracker(cfg)  # finds the experiment and the parent run that training made


def look(chromium: str, url: str, shot: Path) -> tuple[str, str]:
    """What a person opening `url` in a fresh browser sees: the page's title and text, and a screenshot."""
    profile = shot.with_suffix(".profile")  # a new user: no localStorage from an earlier visit
    for budget in (15000, 30000):  # a second, longer look if a busy machine had not drawn the page yet
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--window-size=1400,900", f"--virtual-time-budget={budget}",
             f"--screenshot={shot}", "--dump-dom", url],
            capture_output=True, text=True, timeout=90).stdout
        title = re.search(r"<title>([^<]*)</title>", dom)
        if title and "Experiment" in title[1]:
            break
    dom = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    return (title[1] if title else ""), re.sub(r"\s*<[^>]+>\s*", "\n", dom)


def test_esclab_link_opens_the_runs_table_in_the_training_view(chromium, trained, tmp_path):
    url = trained.ui_url()
    assert url.startswith(trained.uri)
    title, text = look(chromium, url, tmp_path / "runs.png")
    lines = set(text.splitlines())
    assert title.startswith("Runs - Experiment"), f"{url} shows {title!r}: see {tmp_path / 'runs.png'}"
    assert "cnn4-synthetic" in lines  # the parent run, a row of the runs table
    assert set(TRAINING_ONLY) <= lines and not set(GENAI_ONLY) & lines, f"see {tmp_path / 'runs.png'}"


def test_the_experiment_alone_opens_on_the_genai_overview(chromium, trained, tmp_path):
    """Why the address has to ask for the training view: in MLflow 3.17.2 nothing on the experiment does.
    If this fails after an MLflow upgrade, the UI now opens esclab on its runs by itself."""
    url = f"{trained.uri}/#/experiments/{trained.experiment_id}"
    title, text = look(chromium, url, tmp_path / "overview.png")
    lines = set(text.splitlines())
    assert title.startswith("Overview - Experiment"), f"{url} shows {title!r}: see {tmp_path / 'overview.png'}"
    assert "cnn4-synthetic" not in lines and set(GENAI_ONLY) <= lines
