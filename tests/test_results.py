"""README's Results table is generated from reports/results/*.json (the demo's rerun is in test_pipeline.py)."""

import json
import shutil

import pytest
from conftest import REPO

from esclab.errors import EsclabError
from esclab.results import (BEGIN, BENCH_BEGIN, BENCH_END, END, load_benchmarks, load_records, recipe,
                            render_benchmarks, render_table, write_readme)


def test_readme_results_table_is_what_the_records_render():
    records = load_records(REPO / "reports" / "results")
    readme = (REPO / "README.md").read_text()
    table = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert table.strip() == render_table(records), "README's Results table was edited by hand: run `make results`"


def test_readme_benchmarks_table_is_what_the_benchmark_files_render():
    readme = (REPO / "README.md").read_text()
    table = readme.split(BENCH_BEGIN, 1)[1].split(BENCH_END, 1)[0]
    assert table.strip() == render_benchmarks(load_benchmarks(REPO / "reports" / "bench")), (
        "README's Benchmarks table was edited by hand, or a benchmark ran since: run `make results`")


def test_every_benchmark_file_names_its_command_machine_and_a_clean_commit():
    for path, result in load_benchmarks(REPO / "reports" / "bench").items():
        made = result["provenance"]
        assert made["command"].startswith("python bench/") and made["machine"], path
        assert len(made["commit"]) == 40 and made["dirty"] == "false", (path, "rerun it on committed code")


def test_a_benchmark_row_shows_its_headline_command_machine_and_commit(tmp_path):
    made = {"command": "python bench/features.py", "machine": "2 CPU cores", "commit": "a" * 40, "dirty": "false"}
    (tmp_path / "features.json").write_text(json.dumps({"title": "t", "headline": "9 clips/s", "provenance": made}))
    (row,) = render_benchmarks(load_benchmarks(tmp_path)).splitlines()[2:]
    assert row == ("| t | `python bench/features.py` | 9 clips/s | 2 CPU cores | `aaaaaaaa` | "
                   "[features.json](reports/bench/features.json) |")


def test_every_record_names_its_command_machine_and_data():
    for path, record in load_records(REPO / "reports" / "results").items():
        assert record["command"] and record["machine"], path
        assert all(len(record["data"][name].removesuffix(".dir")) == 32 for name in ("raw", "split", "features")), path
        assert record["metrics"]["fold_accuracy"], path
        if "code" in record:  # records made since they name their code: a clean commit, and the code's hash
            assert len(record["code"]["commit"]) == 40 and record["code"]["dirty"] == "false", path
            assert len(record["code"]["sha256"]) == 64, path


def test_a_table_edited_by_hand_is_put_back(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    records = load_records(REPO / "reports" / "results")
    readme.write_text(readme.read_text().replace(BEGIN + "\n", BEGIN + "\n| typed | by | hand |\n"))
    assert write_readme(readme, render_table(records))
    assert readme.read_text() == (REPO / "README.md").read_text()
    assert not write_readme(readme, render_table(records))  # nothing left to change


def test_partial_runs_say_which_folds_and_full_ones_give_mean_and_spread(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    base = {"title": "t", "command": "c", "overrides": [], "machine": "m",
            "data": {"raw": "a" * 32, "split": "b" * 32, "features": "c" * 32 + ".dir"}}
    (folder / "1.json").write_text(json.dumps(base | {"metrics": {"fold_accuracy": {"1": 0.5075}}}))
    full = {"accuracy_mean": 0.97, "accuracy_std": 0.048477, "macro_f1": 0.970078,
            "fold_accuracy": {"1": 1.0, "2": 0.875, "3": 1.0, "4": 1.0, "5": 0.975}}
    (folder / "2.json").write_text(json.dumps(base | {"metrics": full}))
    (folder / "3.json").write_text(json.dumps(base | {"metrics": {}, "data": {"raw": "", "split": "", "features": ""}}))
    rows = render_table(load_records(folder)).splitlines()[2:]
    assert "fold 1 only: **50.75 %**" in rows[0] and "| – |" in rows[0]
    assert "not recorded yet" in rows[2] and "| – / – / – |" in rows[2]  # a new row, before its first run
    assert "**97.00 ± 4.85 %** (folds 100, 87.5, 100, 100, 97.5) | 0.970 |" in rows[1]


def test_location_overrides_are_not_part_of_the_recipe():
    assert recipe(["experiment=cnn4_strong", "dataset.source_dir=/mnt/esc50", "paths.raw=/x", "tracking.uri=y",
                   "features.sample_rate=16000"]) == ["experiment=cnn4_strong", "features.sample_rate=16000"]


@pytest.mark.parametrize("damage", ["not json", "missing field"])
def test_a_broken_record_is_named(tmp_path, damage):
    folder = tmp_path / "results"
    shutil.copytree(REPO / "reports" / "results", folder)
    victim = sorted(folder.glob("*.json"))[0]
    victim.write_text("{" if damage == "not json" else json.dumps({"title": "t"}))
    with pytest.raises(EsclabError, match=victim.name):
        load_records(folder)
