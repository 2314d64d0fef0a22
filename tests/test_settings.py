import json
import subprocess
import sys

import pytest

import train
from readout import Disc
from settings import Setting, Settings, check_values, device_of, readout_settings
from util import UserError


@pytest.mark.parametrize("script", ["train.py", "eval.py", "ablate.py", "probe.py"])
def test_help_loads_no_model_code(script):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", script, "--help"], capture_output=True, text=True
    )
    imported = [line.rpartition("|")[2].strip() for line in done.stderr.splitlines()]
    assert done.returncode == 0 and "--readout_file" in done.stdout
    assert not [
        m
        for m in imported
        if m.startswith(("bitsandbytes", "transformers.models", "huggingface_hub"))
    ]


def test_one_parse_gives_the_flags_typed_and_the_layers_go_in_their_order(tmp_path):
    cmd = train.command([])
    argv = ["--model", "tiny", "--lr", "1e-3", "--no-group_by_length"]
    assert cmd.parse(argv) == dict(model="tiny", lr=1e-3, group_by_length=False)
    cfg = cmd.settings(cmd.parse(argv))
    assert (cfg.lr, cfg.epochs, cfg.lora_alpha) == (1e-3, 30, 32.0)  # given, then the tiny preset
    assert cfg.device in ("cpu", "cuda")  # auto resolved
    # the recipe over the preset, a task.json over the recipe, a saved run over both, the flags given last
    task = tmp_path / "task.json"
    task.write_text(json.dumps(dict(targets="V", low=1, high=5)))
    given = cmd.parse(["--model", "tiny", "--recipe", "paper", "--task", str(task)])
    assert (cmd.settings(given).lr, cmd.settings(given).targets) == (2e-4, "V")
    saved = dict(lr=5e-4, targets="A", low=1.0, high=5.0)
    assert (cmd.settings(given, saved).lr, cmd.settings(given, saved).targets) == (5e-4, "A")
    given["lr"] = 7e-4
    assert cmd.settings(given, saved).lr == 7e-4


def test_a_misspelt_setting_fails_at_once():
    cfg = Settings(lr=1e-3)
    with pytest.raises(AttributeError):
        cfg.lrr  # noqa: B018
    with pytest.raises(AttributeError, match="no setting named lrr"):
        cfg.but(lrr=1e-2)
    assert cfg.but(lr=1e-2).lr == 1e-2 and cfg.lr == 1e-3  # a copy


def test_a_name_two_readouts_declare_differently_is_one_line():
    class A(Disc):
        settings = (Setting("width", int, 8, "the head's width"),)

    class B(Disc):
        settings = (Setting("width", float, 0.5, "a share"),)

    with pytest.raises(UserError, match="--width: declared by b unlike by"):
        readout_settings(dict(a=A, b=B))
    readout_settings(dict(a=A, also=A))  # the same setting twice: one setting
    with pytest.raises(UserError, match="--lr: declared by a unlike by"):
        readout_settings(
            dict(a=type("A", (Disc,), dict(settings=(Setting("lr", float, 1.0, "x"),))))
        )


def test_device_and_values_are_checked_before_any_work():
    assert device_of("auto") in ("cpu", "cuda") and device_of("cpu") == "cpu"
    with pytest.raises(UserError, match="--device gpu: cannot be used here"):
        device_of("gpu")
    with pytest.raises(UserError, match=r"--lr -1.0 \(must be above 0\)"):
        check_values(Settings(lr=-1.0, low=-3.0, high=3.0, lora_dropout=0.0))


def test_a_forks_help_lists_an_inherited_setting_only_where_it_reads_it():
    fork = ["--readout_file", "examples/middle.py"]
    done = subprocess.run(
        [sys.executable, "train.py", *fork, "--help"], capture_output=True, text=True
    )
    groups = done.stdout.split("\n\n")[1:]  # after the usage line
    head_lr = next(g for g in groups if "--head_lr" in g).splitlines()[0]
    read_layer = next(g for g in groups if "--read_layer" in g).splitlines()[0]
    assert head_lr.startswith("disc, mean:") and read_layer.startswith("middle:")
    layer = next(g for g in groups if "--layer " in g).splitlines()[0]
    assert layer.startswith("disc, mean, middle:")  # read through disc's __init__
