"""Every measured figure README and conf/ show is generated from a committed record that names the command, machine
and commit that made it (README's Results and Benchmarks tables, `make results`), or it is not shown. What remains in
the prose are published figures with their source, settings and sizes that follow from them: each listed below
with why it may stand."""

import re

import pytest
from conftest import REPO

from esclab.results import BEGIN, BENCH_BEGIN, BENCH_END, END

# A number with a unit that measures something: accuracy, spread, speed, size, time.
FIGURE = re.compile(r"(?<![\w.])~?\d+(?:[.,]\d+)?(?:\s?(?:%|x\b|ms\b|MB\b|GB\b|MiB\b|GiB\b|h\b|hours?\b|minutes?\b|"
                    r"min\b|clips/s|samples/s|TFLOP/s|GFLOP)|\s?±)")
NOT_MEASURED = {
    # published results, each next to its source in the text
    "95.6 %": "AST's paper (Gong et al., 2021)",
    "90 %": "LAION's CLAP paper, and esclab's target",
    "61.25 %": "the seed report's cnn4 (shared/seeds/003)",
    "81.3 %": "human listeners (Piczak, 2015)",
    "94.7 %": "PANNs' CNN14 (Kong et al., 2020)",
    "84.9 %": "EnvNet-v2 (Tokozume et al., 2018)",
    "90.44 %": "the ResNet50 seed's own report (UrbanSound8K)",
    "91.07 %": "the wav2vec2 seed's own report",
    "85.67 %": "the wav2vec2 seed's own report",
    "84.33 %": "the Whisper seed's own report (UrbanSound8K)",
    # sizes and settings
    "600 MB": "the ESC-50 archive's size",
    "~6 GB": "the UrbanSound8K archive's size",
    "25 ms": "YAMNet's frames, as its authors define them",
    "10 ms": "YAMNet's hop, as its authors define it",
    "20 ms": "wav2vec2's frame rate",
    "46 ms": "n_fft=2048 at 44.1 kHz",
    "11.6 ms": "hop_length=512 at 44.1 kHz",
    "441 MB": "ESC-50's log-mel rows in float32: 2000 x 128 x 431 x 4 bytes",
    "440 MB": "cnn4's 110 M-parameter dense layer in float32",
    "200 MB": "seed 004's memory budget",
    "4 x": "DDP's effective batch: 4 processes x 16 clips",
    "20 %": "bench/report.py's SPREAD_LIMIT, a setting",
    "15x": "the strong recipe's peak lr over the seed's, a ratio of two settings",
}


def prose(text: str) -> str:
    """README without its generated tables."""
    for begin, end in ((BEGIN, END), (BENCH_BEGIN, BENCH_END)):
        head, rest = text.split(begin, 1)
        text = head + rest.split(end, 1)[1]
    return text


def unbacked(lines: list[str]) -> list[str]:
    return [f"{figure!r} in: {line.strip()[:100]}" for line in lines for figure in FIGURE.findall(line)
            if figure.strip() not in NOT_MEASURED]


def test_readme_shows_no_measured_figure_outside_its_generated_tables():
    found = unbacked(prose((REPO / "README.md").read_text()).splitlines())
    assert not found, ("README shows figures no committed record backs: put them in a results record or a "
                       "benchmark's JSON (make results renders them), or remove them:\n" + "\n".join(found))


@pytest.mark.parametrize("path", sorted((REPO / "conf").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_conf_comments_show_no_measured_figure(path):
    comments = [line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line]
    found = unbacked(comments)
    assert not found, f"{path.relative_to(REPO)}: figures no record backs (README's Results has them):\n" + \
        "\n".join(found)


def test_a_figure_in_prose_is_found():
    assert unbacked(["it reaches 89.25 ± 2.52 % in 4 min 40 s, 13.2 clips/s, 94 MB"]) == [
        "'89.25 ±' in: it reaches 89.25 ± 2.52 % in 4 min 40 s, 13.2 clips/s, 94 MB",
        "'2.52 %' in: it reaches 89.25 ± 2.52 % in 4 min 40 s, 13.2 clips/s, 94 MB",
        "'4 min' in: it reaches 89.25 ± 2.52 % in 4 min 40 s, 13.2 clips/s, 94 MB",
        "'13.2 clips/s' in: it reaches 89.25 ± 2.52 % in 4 min 40 s, 13.2 clips/s, 94 MB",
        "'94 MB' in: it reaches 89.25 ± 2.52 % in 4 min 40 s, 13.2 clips/s, 94 MB"]
