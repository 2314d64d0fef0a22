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
        return train.settings_from(
            [
                "--model",
                "tiny",
                "--data",
                str(toy_root),
                "--cache_dir",
                str(tmp_path / "cache"),
                "--out",
                str(tmp_path / "run"),
                "--device",
                "cpu",
                *flags,
            ]
        )

    return make


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A random 2-layer BERT encoder with a word-level vocabulary, saved as a transformers folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert")
    words = sorted(
        {w for ws in data.TOY_WORDS for w in " ".join(ws).split()}
        | set(" ".join(data.TOY_SUBJECTS + data.TOY_OPENERS).split())
        | {"was"}
    )
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=5 + len(words),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(folder)
    return folder
