"""Any continuous target: a task's targets, range, decimals and question (flags, a task.json beside the labels,
--task FILE), plain CSV label files, metrics per target, several targets read by one disc head, a head that
starts where the labels are, --subsample."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from batches import prompt
from data import Clips, read_split
from readout import build, parse_score
from settings import Settings
from util import UserError

EMOBANK = Path(__file__).resolve().parents[2] / "shared" / "data" / "emobank" / "emobank.csv"
TASKS = Path(__file__).resolve().parents[1] / "tasks"


@pytest.fixture(scope="session")
def toy_csv(toy_root, tmp_path_factory):
    """The toy set's transcripts as an EmoBank-shaped plain CSV (id, split, V, A, D, text) plus a `score` on
    [0, 1]: V, A, D on [1, 5] with two decimals, centred near 3 as EmoBank's are; valid is named dev."""
    with open(toy_root / "label.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    file = tmp_path_factory.mktemp("csv") / "emobank.csv"
    with open(file, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "split", "V", "A", "D", "text", "score"])
        for r in rows:
            y, split = float(r["label"]), {"valid": "dev"}.get(r["mode"], r["mode"])
            values = [3 + y / 3, 3 - y / 6, 3 + y / 10, r["text"], (y + 3) / 6]
            shown = [f"{v:.2f}" if isinstance(v, float) else v for v in values]
            out.writerow([f"{r['video_id']}_{r['clip_id']}", split, *shown])
    return file


def run_flags(toy_csv, tmp_path, *flags):
    machine = ["--device", "cpu", "--cache_dir", str(tmp_path / "cache")]
    return ["--model", "tiny", "--data", str(toy_csv), "--modalities", "t", *machine, *flags]


def test_a_task_on_another_range_trains_disc_and_gen_end_to_end(toy_csv, tmp_path):
    task = ["--targets", "score", "--low", "0", "--high", "1", "--decimals", "2", "--no-classes"]
    for readout in ("disc", "gen"):
        out = str(tmp_path / readout)
        flags = run_flags(toy_csv, tmp_path, *task, "--readout", readout, "--decode", "expected")
        folder, result = train.main([*flags, "--epochs", "2", "--out", out])
        test = result["test"]
        assert test["n"] == 12 and 0 < test["MAE"] < 1 and "Acc7" not in test, readout
        assert result["test_mean_baseline"]["MAE"] < 0.5  # of labels in [0, 1]
        saved = json.loads((folder / "config.json").read_text())
        assert (saved["targets"], saved["low"], saved["high"], saved["decimals"]) == (
            "score",
            0,
            1,
            2,
        )


def test_gen_writes_and_reads_answers_on_the_tasks_scale(make_cfg, monkeypatch):
    cfg = make_cfg("--readout", "gen", "--modalities", "t", "--low", "0", "--high", "1")
    gen, parts = build(cfg.but(decimals=2), torch.device("cpu"), lora=False)
    assert parts.tokenizer.decode(gen.answer(0.5, "cpu")[:-1]) == "0.50"
    gen.eval()
    answers = ["0.73", "score: 1.7", "from 0 to 1", "On a scale of 0 to 1: 0.25"]
    monkeypatch.setattr(gen.tokenizer, "batch_decode", lambda *a, **k: answers)
    prompts = [prompt(t, "t", parts) for t in ["a", "b", "c", "d"]]
    batch = dict(inputs=dict(parts.processor(text=prompts, padding=True, return_tensors="pt")))
    preds, info = gen.predict(batch)
    # 1.7 is out of [0, 1] (clipped to 1); the scale echoed from the prompt is not an answer
    assert info == dict(
        out_of_bounds=1, parse_failures=1, answer=answers, parsed=[True, True, False, True]
    )
    assert preds[:, 0].tolist() == pytest.approx([0.73, 1.0, 0.0, 0.25])
    with torch.no_grad():
        values, loglik = gen.answer_loglik(batch["inputs"])
    assert len(values) == 101 and values[0] == 0 and values[-1] == 1 and loglik.shape == (4, 101)
    assert parse_score("from 1 to 5, I'd say 4.25", 1, 5) == 4.25
    assert parse_score("-3 to 3", 0, 1) == -3.0  # another task's scale is a number like any other


def test_several_targets_in_one_head_save_reload_and_compare_per_target(toy_csv, tmp_path):
    flags = run_flags(
        toy_csv, tmp_path, "--low", "1", "--high", "5", "--no-classes", "--epochs", "2"
    )
    joint, result = train.main([*flags, "--targets", "V,A,D", "--out", str(tmp_path / "vad")])
    test = result["test"]
    assert {"MAE_V", "MAE_A", "MAE_D", "Corr_V"} <= test.keys()
    assert test["MAE"] == pytest.approx(np.mean([test["MAE_V"], test["MAE_A"], test["MAE_D"]]))
    single, _ = train.main([*flags, "--targets", "V", "--out", str(tmp_path / "v")])
    machine = ["--device", "cpu", "--cache_dir", str(tmp_path / "cache")]
    again = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "--ckpt",
            str(joint),
            *machine,
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    reloaded = json.loads((tmp_path / "r.json").read_text())
    assert reloaded["MAE_A"] == pytest.approx(test["MAE_A"], abs=1e-5)
    compared = subprocess.run(
        [
            sys.executable,
            "pooled.py",
            "--compare",
            str(joint),
            str(single),
            "--target",
            "V",
            *machine,
        ]
        + ["--json", str(tmp_path / "c.json")],
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stderr
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["names"][0].endswith(" V") and len(c["paired"]["per_clip"]) == 12
    assert c["a"]["MAE"] == pytest.approx(test["MAE_V"], abs=1e-5)
    # the disc head is one layer with an output per target
    from runs import read_tensors

    assert read_tensors(joint / "weights.safetensors")["head.weight"].shape[0] == 3
    wrong = subprocess.run(
        [sys.executable, "eval.py", "--ckpt", str(joint), "--target", "X", *machine],
        capture_output=True,
        text=True,
    )
    assert (
        wrong.returncode == 1 and "--target X: not one of the run's targets (V,A,D)" in wrong.stderr
    )


def test_gen_reads_one_target_a_run(toy_csv, tmp_path):
    flags = run_flags(toy_csv, tmp_path, "--readout", "gen", "--targets", "V,A", "--low", "1")
    with pytest.raises(UserError, match="gen writes one number, not --targets V,A"):
        train.main([*flags, "--high", "5", "--out", str(tmp_path / "g")])


def test_the_head_starts_where_the_labels_are(toy_csv, tmp_path):
    """EmoBank-like labels near 3: from the start disc predicts near their mean, and after a short run it
    beats the train-mean baseline, where a head started as PyTorch starts it stays near 0 for long."""
    flags = run_flags(
        toy_csv, tmp_path, "--targets", "V", "--low", "1", "--high", "5", "--no-classes"
    )
    cfg = train.settings_from([*flags, "--out", str(tmp_path / "x")])
    rows = Clips(cfg, "train").rows
    labels = torch.tensor([r["label"] for r in rows])
    for start, near in (("labels", float(labels.mean())), ("default", 0.0)):
        torch.manual_seed(0)
        readout, parts = build(cfg.but(head_start=start), torch.device("cpu"))
        readout.start(labels)
        readout.eval()
        texts = [prompt(r["text"], "t", parts) for r in rows[:8]]
        inputs = dict(parts.processor(text=texts, padding=True, return_tensors="pt"))
        with torch.no_grad():  # the head's own output: predict() clips it to the task's range
            preds = readout.score(dict(inputs=inputs))
        assert abs(float(preds.mean()) - near) < 0.5, start
        assert readout.predict(dict(inputs=inputs))[0].min() >= 1  # scored in [1, 5]
    # mean: every clip exactly at the mean, and the zero weights still get a gradient
    torch.manual_seed(0)
    readout, parts = build(cfg.but(head_start="mean"), torch.device("cpu"))
    readout.start(labels)
    batch = dict(inputs=inputs, label=labels[:8])
    assert torch.allclose(readout.predict(batch)[0], labels.mean().expand(8, 1), atol=1e-5)
    readout.train()
    readout.loss(batch).backward()
    assert readout.head.weight.grad.abs().sum() > 0
    lora = [p for n, p in readout.backbone.named_parameters() if "lora_B" in n]
    assert all(p.grad is None or not p.grad.any() for p in lora)  # nothing below the head, yet
    # bias: PyTorch's weights (the same seed's), each output's bias at its target's mean; LoRA learns at once
    torch.manual_seed(0)
    untouched = build(cfg.but(head_start="default"), torch.device("cpu"))[0].head.weight
    torch.manual_seed(0)
    readout = build(cfg.but(head_start="bias"), torch.device("cpu"))[0]
    readout.start(labels)
    assert torch.equal(readout.head.weight, untouched)
    assert torch.allclose(readout.head.bias, labels.mean(0))
    readout.train()
    readout.loss(batch).backward()
    assert any(p.grad.any() for n, p in readout.backbone.named_parameters() if "lora_B" in n)
    _, result = train.main([*flags, "--epochs", "3", "--out", str(tmp_path / "short")])
    assert result["test"]["MAE"] < result["test_mean_baseline"]["MAE"]


@pytest.mark.parametrize(
    "line,message",
    [
        ("x9,train,3.1,2.9,3.0,fine,0.5", None),
        ("x2,train,7,2.9,3.0,too high,0.5", "the V '7' is not a number in [1, 5]"),
        ("x3,holdout,3.1,2.9,3.0,no split,0.5", "the split 'holdout' is not one of train, valid"),
        ("x4,train,3.1,2.9", "not as many fields as the header"),
        ("x1,train,3.1,2.9,3.0,again,0.5", "the clip id is also on line 2"),
    ],
)
def test_a_bad_row_of_a_plain_csv_is_one_line_naming_file_and_line(tmp_path, line, message):
    file = tmp_path / "emobank.csv"
    file.write_text("id,split,V,A,D,text,score\nx1,train,3.1,2.9,3.0,fine,0.5\n" + line + "\n")
    cfg = Settings(data=str(file), targets="V", low=1.0, high=5.0)
    if message is None:
        assert len(read_split(cfg, "train", "error")[0]) == 2
        return
    with pytest.raises(UserError) as e:
        read_split(cfg, "train", "error")
    said = str(e.value)
    assert said.startswith(f"{file}, line 3") and message in said and "\n" not in said
    assert "--on_bad skip" in said


def test_a_missing_column_names_the_file_and_what_is_needed(tmp_path):
    file = tmp_path / "emobank.csv"
    file.write_text("id,split,V,text\nx1,train,3.1,fine\n")
    with pytest.raises(
        UserError,
        match=r"emobank.csv: missing column\(s\) A \(needed: id, split, text.*it has id, split, V, text\)",
    ):
        read_split(Settings(data=str(file), targets="V,A", low=1.0, high=5.0), "train")


def test_a_task_json_beside_the_labels_sets_the_defaults_and_a_flag_wins(toy_csv, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "emobank.csv").write_bytes(toy_csv.read_bytes())
    (folder / "task.json").write_text(json.dumps(dict(targets="A", low=1, high=5, decimals=2)))
    flags = ["--model", "tiny", "--data", str(folder / "emobank.csv"), "--out", str(tmp_path / "o")]
    cfg = train.settings_from(flags)
    assert (cfg.targets, cfg.low, cfg.high, cfg.decimals) == ("A", 1, 5, 2)
    assert f"task: {folder / 'task.json'}" in capsys.readouterr().out  # which file, said
    assert train.settings_from([*flags, "--targets", "D"]).targets == "D"
    vad = train.settings_from([*flags, "--task", str(TASKS / "emobank-vad.json")])
    assert vad.targets == "V,A,D" and "arousal" in vad.question
    (folder / "task.json").write_text(json.dumps(dict(target="A", low="one")))
    with pytest.raises(UserError) as e:
        train.settings_from(flags)
    assert (
        "task.json" in str(e.value)
        and "target" in str(e.value)
        and "'low' is 'one'" in str(e.value)
    )


def test_subsample_draws_that_many_training_clips_by_the_seed(toy_csv, tmp_path):
    flags = run_flags(toy_csv, tmp_path, "--targets", "V", "--low", "1", "--high", "5")
    drawn = {}
    for seed in (0, 0, 1):
        cfg = train.settings_from([*flags, "--subsample", "10", "--seed", str(seed), "--out", "x"])
        drawn.setdefault(seed, []).append([r["id"] for r in Clips(cfg, "train").rows])
        assert len(Clips(cfg, "valid")) == 12  # the other splits whole
    assert len(drawn[0][0]) == 10 and drawn[0][0] == drawn[0][1] != drawn[1][0]
    with pytest.raises(UserError, match="--subsample 0 \\(must be above 0\\)"):
        train.settings_from([*flags, "--subsample", "0"])
    cfg = train.settings_from([*flags, "--eval_clips", "5", "--out", "x"])  # valid and test ones
    assert [len(Clips(cfg, split)) for split in ("train", "valid", "test")] == [36, 5, 5]


@pytest.mark.skipif(not EMOBANK.exists(), reason="../shared/data/emobank is not here")
def test_emobank_as_published_reads_with_its_task_file():
    cfg = Settings(**json.loads((TASKS / "emobank-vad.json").read_text()), data=str(EMOBANK))
    sizes = {split: len(read_split(cfg, split, "error")[0]) for split in ("train", "valid", "test")}
    assert sizes == dict(train=8062, valid=1000, test=1000)
    values = np.array([r["label"] for r in read_split(cfg, "train", "error")[0]])
    assert values.shape == (8062, 3) and (values >= 1).all() and (values <= 5).all()


def test_a_task_may_set_the_system_prompt_and_runs_without_one_keep_their_folders(
    toy_csv, tmp_path
):
    from batches import SYSTEM, make_loader
    from readout import Disc
    from settings import settings_key

    task = tmp_path / "task.json"
    task.write_text(json.dumps(dict(targets="V", low=1, high=5, system="You rate emotions.")))
    cfg = train.settings_from(run_flags(toy_csv, tmp_path, "--task", str(task)))
    assert cfg.system == "You rate emotions." and "system" in settings_key(cfg, Disc)
    readout, parts = build(cfg, torch.device("cpu"))
    batch = next(iter(make_loader(cfg, Clips(cfg, "test"), parts)))
    assert "system\nYou rate emotions.<|im_end|>" in parts.tokenizer.decode(
        batch["inputs"]["input_ids"][0]
    )
    # without one, today's system prompt, which a run's settings leave out as older runs had it
    default = train.settings_from(
        run_flags(toy_csv, tmp_path, "--targets", "V", "--low", "1", "--high", "5")
    )
    assert default.system == SYSTEM and "system" not in settings_key(default, Disc)
