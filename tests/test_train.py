import json
import subprocess
import sys

import pytest
import torch

from data import make_loader
from eval import evaluate, load_checkpoint, metrics, summarize
from readout import build
from train import lr_at, train


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, total=100, warmup=10, peak=1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 0.001


def test_training_lowers_valid_mae_and_the_checkpoint_reproduces(make_cfg, tmp_path):
    cfg = make_cfg("--epochs", "8", "--batch_size", "4")
    torch.manual_seed(cfg["seed"])
    untrained, processor = build(cfg, torch.device("cpu"))
    before = metrics(*evaluate(untrained, make_loader(cfg, "valid", processor), torch.device("cpu"))[:2])

    out, result = train(cfg)
    assert result["valid"]["MAE"] < 0.8 * before["MAE"]
    assert result["test"]["MAE"] < result["test_mean_baseline"]["MAE"]
    assert {p.name for p in out.iterdir()} == {"config.json", "weights.safetensors", "log.jsonl", "metrics.json"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 9))
    assert min(r["valid_MAE"] for r in log) == pytest.approx(result["valid"]["MAE"])  # the best epoch is kept

    # eval.py, in a fresh process, rebuilds the run from the folder alone and prints the same test figures.
    subprocess.run([sys.executable, "eval.py", "--ckpt", str(out), "--out", str(tmp_path / "test.json"),
                    "--device", "cpu"], check=True, capture_output=True)
    again = json.loads((tmp_path / "test.json").read_text())
    for k in ("MAE", "Corr", "Acc2_non0", "Acc7", "n"):
        assert again[k] == result["test"][k], k


def test_same_seed_same_metrics_on_cpu(make_cfg, tmp_path):
    runs = [train({**make_cfg("--epochs", "2", "--modalities", "t"), "out": str(tmp_path / f"run{i}")})[1]
            for i in range(2)]
    assert runs[0]["test"]["MAE"] == runs[1]["test"]["MAE"]
    assert runs[0]["valid"] == {**runs[1]["valid"], "ms_per_clip": runs[0]["valid"]["ms_per_clip"]}


def test_checkpoint_with_other_weights_is_refused(make_cfg, tmp_path):
    out, _ = train(make_cfg("--epochs", "1", "--modalities", "t"))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "lora_r": 4}))
    with pytest.raises(Exception, match="weights.safetensors"):
        load_checkpoint(out, torch.device("cpu"))


def test_pool_norm_statistics_travel_with_the_checkpoint(make_cfg):
    out, result = train(make_cfg("--epochs", "2", "--modalities", "t", "--pool_norm", "batch"))
    cfg, readout, processor = load_checkpoint(out, torch.device("cpu"))
    assert readout.norm.running_var.mean() != 1.0  # recomputed, saved and loaded, not the defaults
    preds, labels, _ = evaluate(readout, make_loader(cfg, "test", processor), torch.device("cpu"))
    assert metrics(preds, labels)["MAE"] == result["test"]["MAE"]


def test_training_gen_makes_its_answers_parseable(make_cfg):
    cfg = make_cfg("--readout", "gen", "--modalities", "t", "--epochs", "2", "--batch_size", "4")
    zero_shot, processor = build(cfg, torch.device("cpu"), lora=False)
    preds, labels, info = evaluate(zero_shot, make_loader(cfg, "valid", processor), torch.device("cpu"))
    before = summarize(preds, labels, info)["parse_fail_rate"]
    out, result = train(cfg)
    after = [json.loads(line)["valid_parse_fail_rate"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert before >= 0.3 and after[-1] <= 0.1, (before, after)
    assert result["test"]["tokens_per_clip"] <= cfg["max_new_tokens"]
    assert set(result["test"]) >= {"parse_failures", "parse_fail_rate", "parsed", "ms_per_clip"}


def test_gradient_checkpointing_changes_no_number(make_cfg, tmp_path):
    runs = [train({**make_cfg("--epochs", "1", "--modalities", "ta", *flags), "out": str(tmp_path / str(i))})[1]
            for i, flags in enumerate([[], ["--grad_ckpt"]])]
    assert runs[1]["valid"]["MAE"] == pytest.approx(runs[0]["valid"]["MAE"], abs=1e-6)
