import json
import subprocess
import sys
from pathlib import Path

import torch

from readout import READOUTS, build


def run(*args):
    done = subprocess.run([sys.executable, "ablate.py", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def common(toy_root, tmp_path):
    return [
        "--model",
        "tiny",
        "--data",
        str(toy_root),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
    ]


def written(stdout):
    """The comparison's JSON that ablate.py says it wrote."""
    line = [line for line in stdout.splitlines() if line.startswith("written: ")][-1]
    return json.loads(open(line.rpartition(", ")[2]).read())


def folder(parent, prefix):
    """The one run folder named PREFIX-HASH under `parent`."""
    (found,) = parent.glob(f"{prefix}-*")
    return found


def test_ablation_table_over_subsets_and_seeds(toy_root, tmp_path):
    args = [
        "--modalities",
        "t,tv",
        "--seeds",
        "0,1",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "abl"),
    ]
    out = run(*args, *common(toy_root, tmp_path))
    table = (tmp_path / "abl" / "ablation_disc_t+tv_s0-1.md").read_text()
    assert table.strip() in out
    rows = [line for line in table.splitlines() if line.startswith("| t")]
    assert [r.split("|")[1].strip() for r in rows] == ["t", "tv", "train mean"]
    two_seeds = rows[:2]  # mean ± std over 2 seeds
    assert all("±" in r and r.rstrip(" |").endswith("2") for r in two_seeds)
    results = written(out)["results"]
    assert len(results["tv"]) == 2 and results["tv"][0]["n"] == 12
    assert list(results) == ["t", "tv", "train mean"] and "| train mean |" in table
    assert (
        f"run: {folder(tmp_path / 'abl', 'tv-s1')}" in out
    )  # the folders, for pooled.py --compare
    assert (folder(tmp_path / "abl", "tv-s1") / "metrics.json").exists()


def test_readout_comparison_with_zero_shot_row_and_reuse_of_finished_runs(toy_root, tmp_path):
    base = [
        *common(toy_root, tmp_path),
        "--modalities",
        "t",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "cmp"),
    ]
    # --readouts alone: the runs' --modalities, one subset
    out = run(*base, "--readouts", "gen0,gen,disc")
    results = written(out)["results"]
    assert list(results) == ["gen0", "gen", "disc", "train mean"]
    assert "parse_fail_rate" in results["gen"][0] and "parse_fail_rate" not in results["disc"][0]
    header = next(line for line in out.splitlines() if line.startswith("| readout"))
    assert "parse_fail_rate" in header and "ms_per_clip" in header
    assert "reusing" not in out
    disc = folder(tmp_path / "cmp", "disc-t-s0")
    stamp = (disc / "metrics.json").stat().st_mtime_ns
    # another machine's flags: the same runs
    again = run(
        *base,
        "--readouts",
        "gen0,gen,disc",
        "--cache_dir",
        str(tmp_path / "other"),
        "--eval_batch_size",
        "2",
    )
    assert again.count("reusing") == 3 and (disc / "metrics.json").stat().st_mtime_ns == stamp
    assert written(again)["results"] == results
    # other run settings: another folder, the finished run untouched; another comparison, another table
    changed = run(*base, "--readouts", "disc", "--lr", "1e-3")
    assert (tmp_path / "cmp" / "ablation_gen0+gen+disc_t_s0.md").exists()
    assert (tmp_path / "cmp" / "ablation_disc_t_s0.md").exists()
    assert "reusing" not in changed and (disc / "metrics.json").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "cmp").glob("disc-t-s0-*"))) == 2
    gen_stamp = (folder(tmp_path / "cmp", "gen-t-s0") / "metrics.json").stat().st_mtime_ns
    head_flags = run(*base, "--readouts", "gen", "--pool_norm", "batch", "--loss", "l1")
    # gen reads no head flags: its run stands for any of them
    assert head_flags.count("reusing") == 1
    assert (folder(tmp_path / "cmp", "gen-t-s0") / "metrics.json").stat().st_mtime_ns == gen_stamp


def test_gen_read_with_other_decoding_rules_reuses_the_trained_run(toy_root, tmp_path):
    args = [
        *common(toy_root, tmp_path),
        "--modalities",
        "t",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "cmp"),
    ]
    run(*args, "--readouts", "gen")
    gen = folder(tmp_path / "cmp", "gen-t-s0")
    stamp = (gen / "metrics.json").stat().st_mtime_ns
    out = run(*args, "--readouts", "gen,gen@expected,gen0@expected")
    results = written(out)["results"]
    assert list(results) == ["gen", "gen@expected", "gen0@expected", "train mean"]
    assert out.count("reusing") == 2  # the gen run, twice
    assert (gen / "metrics.json").stat().st_mtime_ns == stamp  # not trained again
    assert (gen / "test@expected.json").exists()
    expected = results["gen@expected"][0]
    assert expected["parse_fail_rate"] == 0.0 and expected["out_of_bounds_rate"] == 0
    assert expected["MAE"] != results["gen"][0]["MAE"]
    assert (
        json.loads((tmp_path / "cmp" / "gen0@expected-t.json").read_text())["settings"]["decode"]
        == "expected"
    )


# the README's fork, a file of its own
FORK = str(Path(__file__).parents[1] / "examples" / "middle.py")


def test_a_readout_in_the_users_own_file_trains_beside_disc_and_is_evaluated_and_compared(
    toy_root, tmp_path
):
    args = [
        *common(toy_root, tmp_path),
        "--modalities",
        "t",
        "--epochs",
        "2",
        "--out",
        str(tmp_path / "fork"),
    ]
    args += ["--readout_file", FORK, "--readouts", "disc,middle"]
    first = run(*args, "--read_layer", "1")
    results = written(first)["results"]
    assert list(results) == ["disc", "middle", "train mean"] and "reusing" not in first
    middle = folder(tmp_path / "fork", "middle-t-s0")
    saved = json.loads((middle / "config.json").read_text())
    assert saved["read_layer"] == 1 and saved["middle_head_lr"] == 1e-2  # saved with the run
    disc = folder(tmp_path / "fork", "disc-t-s0")
    # disc does not read it
    assert "read_layer" not in json.loads((disc / "config.json").read_text())
    assert results["middle"][0]["MAE"] != results["disc"][0]["MAE"]
    stamp = (disc / "metrics.json").stat().st_mtime_ns

    second = run(*args, "--read_layer", "0")  # the fork's flag changed: disc's run stands
    assert second.count("reusing") == 1 and f"reusing {disc}" in second
    assert (disc / "metrics.json").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "fork").glob("middle-t-s0-*"))) == 2

    machine = ["--device", "cpu", "--cache_dir", str(tmp_path / "cache")]
    # a run folder never makes code run: without the file, one line that names it
    refused = subprocess.run(
        [sys.executable, "eval.py", "--ckpt", str(middle), *machine], capture_output=True, text=True
    )
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert (
        f"its readout 'middle' is not one of disc, gen, mean: pass --readout_file {FORK}"
        in refused.stderr
    )
    compared = subprocess.run(
        [
            sys.executable,
            "pooled.py",
            "--readout_file",
            FORK,
            "--compare",
            str(disc),
            str(middle),
            *machine,
        ],
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stderr
    assert (
        "B: middle (t, test)" in compared.stdout
        and f"{results['middle'][0]['MAE']:.4f}" in compared.stdout
    )


def test_a_forks_own_parameter_group_trains_its_head_at_its_own_rate(make_cfg):
    from readout import load_readout_file

    load_readout_file(FORK)
    try:
        cfg = make_cfg("--modalities", "t", "--readout", "middle")
        readout, _ = build(cfg, torch.device("cpu"))
        (lora, lora_lr), (head, head_lr) = readout.param_groups(cfg.lr)
        assert lora_lr == cfg.lr and head_lr == 1e-2 and head == list(readout.head.parameters())
    finally:
        del READOUTS["middle"]


def test_hidden_states_of_a_layer_are_the_full_models_states_there(make_cfg):
    readout, parts = build(make_cfg("--modalities", "t"), torch.device("cpu"))
    inputs = dict(
        parts.processor(text=["the movie was good", "bad"], return_tensors="pt", padding=True)
    )
    model = readout.text_model()
    full = model(**inputs, output_hidden_states=True, use_cache=False)
    every = readout.hidden_states(inputs, output_hidden_states=True).hidden_states
    assert torch.equal(every[1], full.hidden_states[1])
    assert torch.equal(readout.hidden_states(inputs).last_hidden_state, full.last_hidden_state)


def test_each_script_shows_its_own_help_and_out_is_a_folder_everywhere():
    def run(*argv):
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True)

    helped = run("ablate.py", "--help")
    assert helped.returncode == 0 and "Controlled comparisons" in helped.stdout
    assert "Train a readout with QLoRA" not in helped.stdout  # train.py's description
    bad = run("ablate.py", "--model", "tiny", "--seeds", "0", "1")  # space-separated seeds
    assert bad.returncode == 2 and bad.stderr.startswith("usage: ablate.py")
    assert "--seeds SEEDS" in bad.stderr and "unrecognized arguments: 1" in bad.stderr
    # --out names a folder (train.py, ablate.py, probe.py); eval.py writes its JSON with --json FILE
    for script in ("train.py", "ablate.py", "probe.py"):
        assert "--out OUT" in run(script, "--help").stdout
    refused = run("eval.py", "--ckpt", "runs/x", "--out", "r.json")
    assert refused.returncode == 2 and "unrecognized arguments: --out" in refused.stderr
    assert "--json FILE" in run("eval.py", "--help").stdout
