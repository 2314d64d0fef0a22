import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def help_of(script, *python_flags):
    """`python [flags] SCRIPT --help` -> (its stdout, the modules it imported, from -X importtime)."""
    env = {**os.environ, "COLUMNS": "100"}
    argv = [sys.executable, *python_flags, "-X", "importtime", str(script), "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    return done.stdout, imported


def test_help_comes_from_the_saved_text_without_torch_and_follows_a_changed_source(tmp_path):
    for source in ROOT.glob("*.py"):  # a copy: its own saved help, whatever the checkout holds
        shutil.copy(source, tmp_path)
    built, imported = help_of(tmp_path / "train.py")
    assert "torch" in imported and "--head" in built  # the parser, readouts' flags and all
    assert list((tmp_path / "cache" / "help").glob("train-*.txt"))
    saved, imported = help_of(tmp_path / "train.py")
    assert saved == built
    assert not {"torch", "transformers", "numpy"} & imported
    # a readout's flag help changed in the source: the saved text no longer answers
    readout = tmp_path / "readout.py"
    readout.write_text(readout.read_text().replace("Gaussian, in bins", "Gaussian, in BINWIDTHS"))
    changed, imported = help_of(tmp_path / "train.py")
    assert "torch" in imported and "BINWIDTHS" in changed
    assert help_of(tmp_path / "train.py")[0] == changed
