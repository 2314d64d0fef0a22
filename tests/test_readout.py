import pytest
import torch

from data import build_prompt
from readout import build, last_token_index, load_backbone


def test_last_token_index_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(right).tolist() == [2, 4, 0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooled_state_of_a_padded_batch_equals_each_clip_alone(make_cfg, side):
    torch.manual_seed(0)
    readout, processor = build(make_cfg("--modalities", "t"), torch.device("cpu"))
    readout.eval()
    texts = [build_prompt(t, "t") for t in ["ok", "the movie was really quite wonderful to watch", "bad"]]

    def pooled(prompts):
        inputs = processor(text=prompts, padding=True, padding_side=side, return_tensors="pt")
        with torch.no_grad():
            return readout.pooled({"inputs": dict(inputs)}), inputs["attention_mask"]

    batch, mask = pooled(texts)
    assert (mask == 0).any()  # the batch is padded
    pad_at_start = (mask[:, 0] == 0).any().item()
    assert pad_at_start == (side == "left")
    for i, text in enumerate(texts):
        alone, _ = pooled([text])
        assert torch.allclose(batch[i], alone[0], atol=1e-5), i


def test_readout_never_computes_the_lm_head(make_cfg):
    readout, processor = build(make_cfg("--modalities", "t"), torch.device("cpu"))
    calls = []
    readout.backbone.lm_head.register_forward_hook(lambda *a: calls.append(1))
    inputs = processor(text=[build_prompt("fine", "t")], return_tensors="pt")
    readout.predict({"inputs": dict(inputs)})
    assert calls == []


def test_tiny_backbone_is_deterministic():
    a, _ = load_backbone("tiny", quant="none")
    b, _ = load_backbone("tiny", quant="none")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_unknown_readout_is_an_error(make_cfg):
    with pytest.raises(ValueError, match="--readout must be one of"):
        build(make_cfg("--readout", "nope"), torch.device("cpu"))
