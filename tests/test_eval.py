import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pooled
from eval import METRIC_KEYS, metrics, run_split
from pooled import bootstrap, paired
from util import UserError


def reference(preds, labels):
    """The MMSA conventions written out a second way, clip by clip."""
    n = len(labels)

    def acc(pairs):
        return sum(p == t for p, t in pairs) / len(pairs)

    def weighted_f1(pairs):  # sklearn's average='weighted', labels as truth
        total = 0.0
        for c in {t for _, t in pairs}:
            tp = sum(p == c and t == c for p, t in pairs)
            pred_c, true_c = sum(p == c for p, _ in pairs), sum(t == c for _, t in pairs)
            precision = tp / pred_c if pred_c else 0.0
            recall = tp / true_c
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            total += f1 * true_c / len(pairs)
        return total

    def clipped_round(x, b):
        return round(min(max(x, -b), b))  # Python's round: half to even, like np.round

    mp, ml = sum(preds) / n, sum(labels) / n
    cov = sum((p - mp) * (t - ml) for p, t in zip(preds, labels))
    corr = cov / math.sqrt(sum((p - mp) ** 2 for p in preds) * sum((t - ml) ** 2 for t in labels))
    has0 = [(p >= 0, t >= 0) for p, t in zip(preds, labels)]
    non0 = [(p > 0, t > 0) for p, t in zip(preds, labels) if t != 0]
    return dict(
        MAE=sum(abs(p - t) for p, t in zip(preds, labels)) / n,
        Corr=corr,
        Acc2_has0=acc(has0),
        F1_has0=weighted_f1(has0),
        Acc2_non0=acc(non0),
        F1_non0=weighted_f1(non0),
        Acc5=acc([(clipped_round(p, 2), clipped_round(t, 2)) for p, t in zip(preds, labels)]),
        Acc7=acc([(clipped_round(p, 3), clipped_round(t, 3)) for p, t in zip(preds, labels)]),
    )


def test_hand_checked_rounding_and_zero_labels():
    m = metrics([0.5, -0.5, 2.5, -1.5], [0.0, -1.0, 3.0, -2.0])
    assert m["MAE"] == 0.5
    # round half to even: 0.5 -> 0 (= 0), -0.5 -> -0 (!= -1), 2.5 -> 2 (!= 3), -1.5 -> -2 (= -2)
    assert m["Acc7"] == 0.5
    assert m["Acc5"] == 0.75  # 2.5 and 3 are both clipped to 2: a hit; -0.5 still misses
    assert m["Acc2_has0"] == 1.0 and m["F1_has0"] == 1.0
    assert m["Acc2_non0"] == 1.0  # the label-0 clip is dropped: three clips, all right


def test_hand_checked_weighted_f1():
    # has0 truth [T, T, T, F], preds [T, F, T, T]: F1(T) = 2*2 / (2*2 + 1 + 1) = 2/3, F1(F) = 0; weights 3/4, 1/4
    m = metrics([1.0, -1.0, 2.0, 1.0], [1.0, 2.0, 3.0, -1.0])
    assert m["Acc2_has0"] == 0.5
    assert m["F1_has0"] == pytest.approx(0.5)
    # zero labels: non0 and has0 differ; truth 0 is non-negative but not positive
    m = metrics([-0.1, 0.2, 0.3], [0.0, 0.0, 1.0])
    assert m["Acc2_has0"] == pytest.approx(2 / 3) and m["Acc2_non0"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_an_independent_implementation(seed):
    rng = np.random.default_rng(seed)
    labels = np.round(rng.uniform(-3, 3, 200) * 5) / 5  # MOSI-like steps, many exact zeros and ties
    labels[:20] = 0.0
    # halves: ties
    preds = np.concatenate([np.round(rng.normal(0, 2, 150) * 2) / 2, rng.normal(0, 2, 50)])
    ours, ref = metrics(preds, labels), reference(preds.tolist(), labels.tolist())
    assert set(ours) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


def test_constant_predictions_have_no_correlation():
    m = metrics([0.3, 0.3, 0.3], [1.0, -1.0, 2.0])
    assert math.isnan(m["Corr"]) and m["MAE"] == pytest.approx((0.7 + 1.3 + 1.7) / 3)


def noisy(n, noise, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.round(rng.uniform(-3, 3, n), 1)
    return labels + rng.normal(0, noise, n), labels


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_clips():
    widths = []
    for n in (60, 600):
        preds, labels = noisy(n, 0.8)
        point, ci = metrics(preds, labels), bootstrap(preds, labels, n=500)
        for k in ("MAE", "Corr", "Acc2_non0", "Acc7"):
            assert ci[k][0] <= point[k] <= ci[k][1], (n, k)
        widths.append(ci["MAE"][1] - ci["MAE"][0])
    assert widths[1] < 0.5 * widths[0]  # about 1/sqrt(10)
    preds, labels = noisy(60, 0.8)
    assert bootstrap(preds, labels, n=200) == bootstrap(preds, labels, n=200)  # a fixed seed


def test_paired_test_separates_a_better_predictor_from_an_identical_one():
    good, labels = noisy(100, 0.3)
    bad = noisy(100, 1.2, seed=1)[0]
    c = paired(good, bad, labels, n=2000)
    assert (
        c["p_value"] < 0.01
        and c["mean_abs_error_diff"] < 0
        and c["ci95"][1] < 0
        and c["a_closer"] > 0.6
    )
    same = paired(good, good.copy(), labels, n=2000)
    assert same["p_value"] == 1.0 and same["a_closer"] == same["b_closer"] == 0.0
    close = paired(good, good + np.random.default_rng(2).normal(0, 0.01, 100), labels, n=2000)
    assert close["p_value"] > 0.05 and close["ci95"][0] < 0 < close["ci95"][1]


def test_compare_bootstrap_and_plots_from_the_command_line(make_cfg, toy_root, tmp_path):
    import shutil

    from train import train

    a, _ = train(make_cfg("--epochs", "1", "--modalities", "t").but(out=str(tmp_path / "a")))
    b, _ = train(
        make_cfg("--epochs", "1", "--modalities", "t", "--seed", "1").but(out=str(tmp_path / "b"))
    )
    run = [sys.executable, "eval.py", "--device", "cpu"]
    stats = [sys.executable, "pooled.py", "--device", "cpu"]
    done = subprocess.run(
        stats + ["--compare", str(a), str(b), "--json", str(tmp_path / "c.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "A: disc (t, test)" in done.stdout and "permutation test p =" in done.stdout
    c = json.loads((tmp_path / "c.json").read_text())
    assert len(c["paired"]["per_clip"]) == c["a"]["n"] == 12 and 0 < c["paired"]["p_value"] <= 1
    d = c["paired"]["per_clip"]  # each clip's |error of A| - |error of B|, for pooled.py
    assert len(d) == 12 and np.mean(d) == pytest.approx(c["paired"]["mean_abs_error_diff"])
    # what pooled.py checks files against each other by: what was read, on which clips in which order
    assert c["names"] == ["disc (t, test)", "disc (t, test)"] and len(set(c["ids"])) == 12

    shutil.copytree(toy_root, tmp_path / "other")  # the same clip ids with other labels
    labels = (tmp_path / "other" / "label.csv").read_text().splitlines()
    rows = [r.split(",") for r in labels[1:]]
    other = [",".join([*r[:3], str(-float(r[3])), r[4]]) for r in rows]
    (tmp_path / "other" / "label.csv").write_text("\n".join([labels[0], *other]) + "\n")
    cfg = make_cfg("--epochs", "1", "--modalities", "t")
    other, _ = train(cfg.but(data=str(tmp_path / "other"), out=str(tmp_path / "o")))
    refused = subprocess.run(
        stats + ["--compare", str(a), str(other)], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "not evaluated on the same clips" in refused.stderr
    assert "Traceback" not in refused.stderr
    # a config.json edited after training no longer matches its weights
    saved = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**saved, "lr": 0.5}))
    edited = subprocess.run(run + ["--ckpt", str(b)], capture_output=True, text=True)
    assert edited.returncode != 0 and edited.stderr.count("\n") == 1
    assert "other settings than config.json's" in edited.stderr
    missing = subprocess.run(
        stats + ["--compare", str(a), str(tmp_path / "c")], capture_output=True, text=True
    )
    assert missing.returncode != 0 and "c/config.json: not found" in missing.stderr
    assert "evaluating" not in missing.stderr  # before A was evaluated

    done = subprocess.run(
        stats + ["--ckpt", str(a), "--bootstrap", "200", "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ci = json.loads((tmp_path / "r.json").read_text())["ci95"]
    assert set(ci) == {"MAE", "Corr", "Acc2_non0", "Acc7"} and "[" in done.stdout
    plot = [sys.executable, "pooled.py", "--plot", "--device", "cpu", "--ckpt", str(a)]
    done = subprocess.run(plot, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    written = [a / "disc-t-test_scatter.png", a / "learning_curve.png"]  # named by what was read
    assert f"plots: {', '.join(map(str, written))}" in done.stdout
    for png in written:
        image = np.asarray(Image.open(png).convert("L"), dtype=float)
        assert image.shape[0] > 200 and image.std() > 10, png  # drawn, not blank


def test_a_checkpoint_is_tested_with_modalities_left_out(make_cfg, tmp_path):
    from train import train

    out, result = train(make_cfg("--epochs", "1", "--modalities", "tv"))
    machine = ["--device", "cpu", "--cache_dir", str(tmp_path / "cache")]

    def test_with(*flags):
        done = subprocess.run(
            [
                sys.executable,
                "eval.py",
                "--ckpt",
                str(out),
                "--json",
                str(tmp_path / "r.json"),
                *machine,
                *flags,
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout, json.loads((tmp_path / "r.json").read_text())

    stdout, text_only = test_with("--modalities", "t")
    assert "disc (t, test)" in stdout and text_only["n"] == result["test"]["n"]
    for flags in (["--modalities", "t"], []):  # the run's own modalities' plot is another file
        pooled.main(["--plot", "--ckpt", str(out), *machine, *flags])
    assert (out / "disc-t-test_scatter.png").exists() and (
        out / "disc-tv-test_scatter.png"
    ).exists()
    assert text_only["MAE"] != result["test"]["MAE"]  # the model saw no video
    assert (
        test_with("--modalities", "tv")[1]["MAE"] == test_with()[1]["MAE"] == result["test"]["MAE"]
    )


def test_a_row_names_gen_with_its_decoding_rule(make_cfg):
    cfg = make_cfg("--modalities", "t", "--readout", "gen", "--decode", "expected")
    scored = run_split(cfg, None, "test")
    assert scored.name == "gen@expected zero-shot (t, test)"
    assert scored.result["parse_failures"] == 0  # expected always answers


CLIPS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "mosi_clips"
)  # two real MOSI clips


@pytest.mark.skipif(not CLIPS.exists(), reason=f"needs {CLIPS}")
def test_unlabelled_clips_are_scored_from_a_media_column_and_from_a_single_file(make_cfg, tmp_path):
    import csv

    import eval as evaluation
    import train

    cfg = make_cfg("--modalities", "av", "--epochs", "1")
    train.train(cfg)
    (tmp_path / "clips").symlink_to(CLIPS)
    # no labels, no split, empty transcripts; a path relative to the file, one absolute
    table, mp4 = tmp_path / "new.csv", CLIPS / "Raw/Oz06ZWiO20M/6.mp4"
    table.write_text(f"id,text,media\nreal mp4,,{mp4}\nwav,,clips/Raw/03bSnISJMiM/1.wav\n")
    out = tmp_path / "predictions.csv"
    common = ["--ckpt", cfg.out, "--cache_dir", cfg.cache_dir, "--predictions", str(out)]
    common += [
        "--low",
        "-0.5",
        "--high",
        "0.5",
    ]  # a narrower range than the run's: its predictions clipped
    evaluation.main([*common, "--data", str(table), "--modalities", "a"])  # the wav has no video
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["real mp4", "wav"]
    assert all(
        -0.5 <= float(r["predicted_label"]) <= 0.5 for r in rows
    )  # clipped to the task's range
    evaluation.main([*common, "--data", str(CLIPS / "Raw/Oz06ZWiO20M/6.mp4")])  # audio and video
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["6"] and -0.5 <= float(rows[0]["predicted_label"]) <= 0.5
    zero_shot = ["--model", "tiny", "--readout", "gen", "--cache_dir", cfg.cache_dir]
    evaluation.main(
        [*zero_shot, "--data", str(table), "--modalities", "a", "--predictions", str(out)]
    )
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and set(rows[0]) == {"id", "predicted_label", "answer", "parsed"}
    with pytest.raises(UserError, match="no transcripts, but --modalities tav reads them"):
        evaluation.main([*common, "--data", str(mp4), "--modalities", "tav"])
    with pytest.raises(UserError, match="media files without labels"):
        train.main(["--model", "tiny", "--data", str(CLIPS / "Raw")])


def test_runs_that_differ_in_a_setting_get_different_default_folders(toy_root):
    import train

    base = ["--model", "tiny", "--data", str(toy_root)]
    outs = [train.settings_from([*base, "--lr", lr]).out for lr in ("1e-3", "2e-3")]
    assert outs[0] != outs[1] and all(o.startswith("runs/toy60-disc-tav-s0-") for o in outs)
    named = train.settings_from(["--model", "tiny", "--data", str(toy_root / "label.csv")]).out
    assert named.startswith("runs/label-disc-tav-s0-")  # the file's name, less its extension
