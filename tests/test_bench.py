"""The benchmarks run end to end and write their JSON: a smoke test at toy sizes, no timing asserted.

Their numbers belong in the notes and the README (`make bench`); this only keeps
the scripts from rotting between the sessions that have time to run them in full.
"""

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
    return json.loads(out.read_text())


def test_features_bench_compares_the_stage_with_a_naive_loop(tmp_path):
    result = bench("features", tmp_path / "features.json", "--clips-per-class", "5")
    assert result["clips"] == 250 and result["stage_clips_per_s"] > 0 and result["naive_librosa_clips_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["stage_clips_per_s"] / result["naive_librosa_clips_per_s"], rel=0.01)


def test_train_step_bench_times_both_loops_for_each_variant(tmp_path):
    result = bench("train_step", tmp_path / "train_step.json", "--n-mels", "32", "--frames", "32", "--classes", "5",
                   "--batch-size", "4", "--warmup", "1", "--steps", "2", "--variants", "fp32,bf16-mixed", "--threads", "1")
    assert result["input"] == [1, 32, 32] and result["timed_steps"] == 2
    assert [row["variant"] for row in result["variants"]] == ["fp32", "bf16-mixed"]
    for row in result["variants"]:
        assert row["plain_samples_per_s"] > 0 and row["lightning_samples_per_s"] > 0
    assert result["variants"][0]["lightning_over_fp32"] == 1.0


@pytest.mark.slow
def test_cv_wallclock_bench_extrapolates_a_reduced_run_to_the_full_one(tmp_path):
    """1 fold x 2 epochs of 250 clips, shrunk further by overrides: 1 s of each clip and a tiny network."""
    result = bench("cv_wallclock", tmp_path / "cv.json", "--clips-per-class", "5", "--folds", "1", "--epochs", "2",
                   "--threads", "1", "features.duration=1.0",
                   "model.channels=[4,4,4,4]", "model.fc_dim=8")
    assert result["input"] == [1, 128, 87] and result["measured_clips"] == 250
    assert result["full_run_extrapolated"] is True and result["measured_steady_epoch_s"] > 0
    assert result["full_run_s"] > result["measured_wall_s"] and "train_gflop_per_clip" in result


def test_embed_bench_times_each_backbone(tmp_path):
    result = bench("embed", tmp_path / "embed.json", "--clips-per-class", "5")
    assert result["clips"] == 250 and [row["backbone"] for row in result["backbones"]] == ["yamnet", "aisfx"]
    assert all(row["clips_per_s"] > 0 and row["peak_rss_mb"] > 0 for row in result["backbones"])
