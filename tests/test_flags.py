import subprocess
import sys

import pytest

from data import UserError
from flags import check_values, device_of, given_flags
from train import parser, read_flags


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


def test_given_flags_are_those_typed_and_device_auto_is_resolved_when_a_run_starts():
    assert read_flags(parser(["--model", "tiny"]), ["--model", "tiny"])["device"] in ("cpu", "cuda")
    argv = ["--model", "tiny", "--lr", "1e-3", "--no-group_by_length"]
    assert given_flags(parser(argv), argv) == dict(model="tiny", lr=1e-3, group_by_length=False)
    assert device_of("auto") in ("cpu", "cuda") and device_of("cpu") == "cpu"
    with pytest.raises(UserError, match="--device gpu: cannot be used here"):
        device_of("gpu")
    with pytest.raises(UserError, match=r"--lr -1.0 \(must be above 0\)"):
        check_values(dict(lr=-1.0))
