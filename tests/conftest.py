import pytest

import data
import train


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small generated toy dataset: 60 clips, 36 train / 12 valid / 12 test."""
    return data.make_toy(tmp_path_factory.mktemp("toy") / "toy60", n=60)


@pytest.fixture
def make_cfg(toy_root, tmp_path):
    """A run config for the tiny model on the toy data, as train.py would build it from flags."""
    def make(*flags):
        return train.parse_args(["--model", "tiny", "--data", str(toy_root), "--cache_dir", str(tmp_path / "cache"),
                                 "--out", str(tmp_path / "run"), "--device", "cpu", *flags])
    return make
