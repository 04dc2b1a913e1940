"""The benchmarks run end to end and write their JSON: a smoke test at toy sizes, no timing asserted.

Their numbers belong in the notes and the README (`make bench`); this only keeps
the scripts from rotting between the sessions that have time to run them in full.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO


def bench(name: str, out, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *args, "--out", str(out)],
                            cwd=out.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
    written = json.loads(out.read_text())
    # What README's Benchmarks table shows of it (esclab/results.py): a title, a headline and what made it.
    assert written["title"] and written["headline"], written
    assert {"command", "machine", "commit", "dirty", "code_sha256", "date"} <= set(written["provenance"])
    assert written["provenance"]["command"].startswith(f"python {REPO / 'bench' / name}.py")
    return written


def test_features_bench_compares_the_stage_with_a_naive_loop(tmp_path):
    result = bench("features", tmp_path / "features.json", "--clips-per-class", "5", "--repeats", "1")
    assert result["clips"] == 250 and result["stage_clips_per_s"] > 0 and result["naive_librosa_clips_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["stage_clips_per_s"] / result["naive_librosa_clips_per_s"],
                                              rel=0.01)  # one round: its ratio is the ratio of the rates
    assert result["rounds"] == 1 and result["speedup_verdict"] == "inconclusive"  # too few rounds to judge
    assert result["peak_worker_rss_mb"] > 0 or sys.platform != "linux"  # the stage's forked workers, Linux's


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_ratios_conclude_only_when_their_spread_is_narrow_and_on_one_side_of_one():
    paired_ratio = bench_module("report").paired_ratio
    slow = [10.0, 10.1, 9.9, 10.0, 10.2]
    fast = [12.0, 12.5, 13.0, 12.2, 12.8]
    win = paired_ratio(fast, slow)
    assert win["verdict"] == ">1" and win["iqr"][0] <= win["median"] <= win["iqr"][1]
    assert win["median"] == pytest.approx(12.5 / 10.1, abs=1e-3)
    assert paired_ratio(slow, fast)["verdict"] == "<1"
    assert paired_ratio([0.95, 1.05, 0.98, 1.03, 1.0], [1.0] * 5)["verdict"] == "inconclusive"  # straddles 1.0
    wide = [1.1, 1.5, 1.3, 1.9, 1.2]  # interquartile range [1.2, 1.5]: 0.3 > 20 % of the median, 1.3
    assert paired_ratio(wide, [1.0] * 5)["verdict"] == "inconclusive"
    assert paired_ratio(wide, [1.0] * 5, limit=0.5)["verdict"] == ">1"
    assert paired_ratio(fast[:2], slow[:2])["verdict"] == "inconclusive"  # too few rounds to see a spread


def test_train_step_bench_times_both_loops_for_each_variant_in_repeated_rounds(tmp_path):
    result = bench("train_step", tmp_path / "train_step.json", "--n-mels", "32", "--frames", "32", "--classes", "5",
                   "--batch-size", "4", "--warmup", "1", "--steps", "2", "--variants", "fp32,bf16-mixed",
                   "--threads", "1", "--repeats", "3")
    assert result["input"] == [1, 32, 32] and result["timed_steps"] == 2 and result["rounds"] == 3
    assert [row["variant"] for row in result["variants"]] == ["fp32", "bf16-mixed"]
    for row in result["variants"]:
        for kind in ("plain", "lightning"):
            low, high = row[f"{kind}_iqr"]
            assert 0 < low <= row[f"{kind}_samples_per_s"] <= high
        assert row["lightning_over_plain_verdict"] in {">1", "<1", "inconclusive"}
    fp32 = result["variants"][0]
    # fp32 against itself: every round's ratio is 1.0, which no verdict may call a difference
    assert fp32["lightning_over_fp32"] == 1.0 and fp32["lightning_over_fp32_verdict"] == "inconclusive"


@pytest.mark.slow
def test_cv_wallclock_bench_extrapolates_a_reduced_run_to_the_full_one(tmp_path):
    """1 fold x 2 epochs of 250 clips, shrunk further by overrides: 1 s of each clip and a tiny network."""
    result = bench("cv_wallclock", tmp_path / "cv.json", "--clips-per-class", "5", "--folds", "1", "--epochs", "2",
                   "--threads", "1", "features.duration=1.0",
                   "model.channels=[4,4,4,4]", "model.fc_dim=8")
    assert result["input"] == [1, 128, 87] and result["measured_clips"] == 250
    assert result["full_run_extrapolated"] is True and result["measured_steady_epoch_s"] > 0
    assert result["full_run_s"] > result["measured_wall_s"] and "train_gflop_per_clip" in result


@pytest.mark.slow
def test_ddp_bench_times_one_process_and_gloo_processes_on_the_same_fold(tmp_path):
    """One round of each set-up, 5 classes of 1-s clips and a tiny network: ~30 s of real train.py runs."""
    tiny = ["dataset.synthetic.n_classes=5", "dataset.synthetic.duration=1.0", "dataset.synthetic.sample_rate=16000",
            "features.sample_rate=16000", "features.duration=1.0", "features.n_fft=512", "features.hop_length=128",
            "features.n_mels=32", "model.channels=[4,4,4,4]", "model.fc_dim=8"]
    result = bench("ddp", tmp_path / "ddp.json", "--threads", "1", "--clips-per-class", "5", "--repeats", "1",
                   "--epochs", "2", *tiny)
    assert result["devices"] == 2 and result["threads"] == {"one_process": 2, "ddp": 1}
    assert result["train_clips"] == 15 and result["epochs"] == 2  # 25 clips less fold 1's test and validation rows
    assert result["one_process_clips_per_s"]["median"] > 0 and result["ddp_clips_per_s"]["median"] > 0
    assert result["ddp_over_one_process"]["verdict"] == "inconclusive"  # one round decides nothing


def test_embed_bench_times_each_backbone(tmp_path):
    result = bench("embed", tmp_path / "embed.json", "--clips-per-class", "5")
    assert result["clips"] == 250 and [row["backbone"] for row in result["backbones"]] == ["yamnet", "aisfx"]
    assert all(row["clips_per_s"] > 0 and row["peak_rss_mb"] > 0 for row in result["backbones"])


def test_isa_bench_runs_the_same_pipeline_under_each_instruction_set(tmp_path):
    """At a toy size: the reference run against itself changes nothing; AVX2's run is the same pipeline, compared
    value for value, whatever it moves on this processor."""
    result = bench("isa", tmp_path / "isa.json", "--capabilities", "default,avx2", "experiment=demo",
                   "dataset.synthetic.n_classes=3", "dataset.synthetic.clips_per_class=5",
                   "dataset.synthetic.duration=1.0", "trainer.max_epochs=1")
    reference, avx2 = result["runs"]
    assert (reference["capability"], avx2["capability"]) == ("default", "avx2")
    assert reference["answers_changed"] == reference["cache_values_changed"] == 0
    assert avx2["cache_values"] == reference["cache_values"] == 15 * 40 * 63  # clips x mels x frames
    assert 0 <= avx2["cache_values_changed"] <= avx2["cache_values"] and 0 <= avx2["answers_changed"] <= 15
