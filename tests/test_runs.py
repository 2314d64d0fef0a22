import json
import subprocess
import sys
from pathlib import Path

import pytest

from ablate import folder_name
from readout import READOUTS
from runs import load_config, lock_folder, unlock_folder
from settings import Settings, run_config
from util import UserError

# a run folder of every config.json format this project wrote
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("folder", sorted(FIXTURES.iterdir()), ids=lambda f: f.name)
def test_a_run_folder_of_every_format_loads_and_reproduces_its_test_row(folder, toy_root, tmp_path):
    flags = ["--data", str(toy_root), "--device", "cpu", "--cache_dir", str(tmp_path / "cache")]
    done = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "--ckpt",
            str(folder),
            *flags,
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    saved = json.loads((folder / "metrics.json").read_text())["test"]
    again = json.loads((tmp_path / "r.json").read_text())
    assert again["n"] == saved["n"] and again["MAE"] == pytest.approx(saved["MAE"], abs=1e-4)


def test_an_older_config_is_brought_up_to_date_and_keeps_its_folder_name(capsys):
    cfg = Settings(**load_config(FIXTURES / "format1-disc", READOUTS))
    said = capsys.readouterr().out
    # every readout's flags and the retired ones dropped, the newer one filled in, each said once
    assert "format 1 -> 7" in said and "'group_by_length': False" in said and "'samples'" in said
    assert cfg.group_by_length is False and "samples" not in vars(cfg) and "decode" not in vars(cfg)
    assert run_config(cfg, READOUTS["disc"])["format"] == 7 and cfg.denoise == "none"
    # format 5: the task (MOSI's), every training clip, a head started as PyTorch starts it
    assert cfg.targets == "label" and (cfg.low, cfg.high, cfg.decimals) == (-3, 3, 1)
    assert cfg.subsample is None and cfg.head_start == "default"
    # the name ablate.py gave this run before formats (computed by that version's folder_name)
    assert folder_name(cfg, True) == "disc-t-s0-6917a2b5"
    assert folder_name(cfg.but(group_by_length=True), True) != "disc-t-s0-6917a2b5"


def test_a_config_of_a_retired_setting_or_of_a_newer_format_is_refused(tmp_path):
    saved = json.loads((FIXTURES / "format1-disc" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "standardize": True}))
    with pytest.raises(UserError, match="trained with --standardize"):
        load_config(tmp_path, READOUTS)
    (tmp_path / "config.json").write_text(json.dumps({**saved, "format": 99}))
    with pytest.raises(UserError, match="format 99, not one this version reads"):
        load_config(tmp_path, READOUTS)


def test_an_out_that_cannot_be_written_is_one_line_and_cleaning_up_never_raises(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("in the way")
    for out in (blocker, blocker / "run"):
        with pytest.raises(UserError, match="--out .*: cannot be written"):
            lock_folder(out, resume=None, overwrite=False)
    out = tmp_path / "run"
    lock = lock_folder(out, resume=None, overwrite=False)
    (out / "kept.txt").write_text("not empty")
    unlock_folder(lock, out)  # a folder that is not empty stays, silently
    assert (out / "kept.txt").exists()
    unlock_folder(lock_folder(tmp_path / "empty", resume=None, overwrite=False), tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # an empty one goes


def test_a_last_safetensors_from_before_mid_epoch_saves_goes_on_at_the_next_epoch(tmp_path):
    import torch
    from safetensors.torch import save_file

    from runs import kept_so_far, last_meta, last_progress

    old = dict(
        epoch=3, step=27, param_groups=[]
    )  # what save_last wrote until it saved within epochs
    save_file(
        {"rng.torch": torch.zeros(1)}, tmp_path / "last.safetensors", {"train": json.dumps(old)}
    )
    assert last_progress(last_meta(tmp_path / "last.safetensors")) == dict(epoch=4, step=27)
    assert "holds epoch 3 and 0 batches of the next" in kept_so_far(tmp_path, "")
