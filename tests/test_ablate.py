import json
import subprocess
import sys


def run(*args):
    return subprocess.run(
        [sys.executable, "ablate.py", *args], check=True, capture_output=True, text=True
    ).stdout


def test_ablation_table_over_subsets_and_seeds(toy_root, tmp_path):
    common = [
        "--model",
        "tiny",
        "--data",
        str(toy_root),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
    ]
    out = run(
        "--subsets",
        "t,tv",
        "--seeds",
        "0,1",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "abl"),
        *common,
    )
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert table.strip() in out
    rows = [line for line in table.splitlines() if line.startswith("| t")]
    assert [r.split("|")[1].strip() for r in rows] == ["t", "tv"]
    assert all("±" in r and r.rstrip(" |").endswith("2") for r in rows)  # mean ± std over 2 seeds
    results = json.loads((tmp_path / "abl" / "ablation.json").read_text())["results"]
    assert len(results["tv"]) == 2 and results["tv"][0]["n"] == 12
    assert (tmp_path / "abl" / "tv-s1" / "metrics.json").exists()


def test_readout_comparison_with_zero_shot_row_and_reuse_of_finished_runs(toy_root, tmp_path):
    args = [
        "--model",
        "tiny",
        "--data",
        str(toy_root),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
        "--subsets",
        "t",
        "--readouts",
        "gen0,gen,disc",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "cmp"),
    ]
    out = run(*args)
    results = json.loads((tmp_path / "cmp" / "ablation.json").read_text())["results"]
    assert list(results) == ["gen0", "gen", "disc"]
    assert "parse_fail_rate" in results["gen"][0] and "parse_fail_rate" not in results["disc"][0]
    header = next(line for line in out.splitlines() if line.startswith("| readout"))
    assert "parse_fail_rate" in header and "ms_per_clip" in header
    assert "reusing" not in out
    disc_folder = tmp_path / "cmp" / "disc-t-s0"
    stamp = (disc_folder / "metrics.json").stat().st_mtime_ns
    again = run(
        *args, "--cache_dir", str(tmp_path / "other"), "--eval_batch_size", "2"
    )  # another machine's flags:
    assert (
        again.count("reusing") == 3 and (disc_folder / "metrics.json").stat().st_mtime_ns == stamp
    )  # the same runs
    assert json.loads((tmp_path / "cmp" / "ablation.json").read_text())["results"] == results
    changed = run(*[a if a != "gen0,gen,disc" else "disc" for a in args], "--lr", "1e-3")
    assert (
        "reusing" not in changed and (disc_folder / "metrics.json").stat().st_mtime_ns != stamp
    )  # trained again
    gen_stamp = (tmp_path / "cmp" / "gen-t-s0" / "metrics.json").stat().st_mtime_ns
    head_flags = run(
        *[a if a != "gen0,gen,disc" else "gen" for a in args],
        "--pool_norm",
        "batch",
        "--loss",
        "l1",
    )
    assert head_flags.count("reusing") == 1  # gen has no head: its run stands for any head flags
    assert (tmp_path / "cmp" / "gen-t-s0" / "metrics.json").stat().st_mtime_ns == gen_stamp


def test_gen_read_with_other_decoding_rules_reuses_the_trained_run(toy_root, tmp_path):
    args = [
        "--model",
        "tiny",
        "--data",
        str(toy_root),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
        "--subsets",
        "t",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "cmp"),
        "--samples",
        "3",
    ]
    run(*args, "--readouts", "gen")
    stamp = (tmp_path / "cmp" / "gen-t-s0" / "metrics.json").stat().st_mtime_ns
    out = run(*args, "--readouts", "gen,gen@expected,gen@median,gen0@expected")
    results = json.loads((tmp_path / "cmp" / "ablation.json").read_text())["results"]
    assert (
        list(results) == ["gen", "gen@expected", "gen@median", "gen0@expected"]
        and out.count("reusing") == 3
    )
    assert (
        tmp_path / "cmp" / "gen-t-s0" / "metrics.json"
    ).stat().st_mtime_ns == stamp  # not trained again
    for rule in ("expected", "median"):
        assert (tmp_path / "cmp" / "gen-t-s0" / f"test@{rule}.json").exists()
    assert (
        results["gen@expected"][0]["parse_fail_rate"] == 0.0
        and results["gen@expected"][0]["tokens_per_clip"] == 0
    )
    assert results["gen@expected"][0]["MAE"] != results["gen"][0]["MAE"]
    assert (
        json.loads((tmp_path / "cmp" / "gen0@expected-t.json").read_text())["settings"]["decode"]
        == "expected"
    )
