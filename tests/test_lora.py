import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from backbone import LORA_TARGETS, load_backbone
from batches import make_loader
from data import Clips
from lora import LoRALinear, add_lora, count_parameters
from readout import build

THINKER = LORA_TARGETS["qwen2_5_omni_thinker"]


def linear_4bit(linear):
    """An NF4 copy of a float linear layer."""
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        quant_type="nf4",
    )
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantises


@pytest.mark.parametrize("four_bit", [False, True])
def test_lora_equals_base_at_init_and_trains_after_an_eval_pass(four_bit):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False))
    if four_bit:
        base = nn.Sequential(linear_4bit(base[0]), nn.GELU(), linear_4bit(base[2]))
    x = torch.randn(5, 64)
    before = base(x).detach()
    names = add_lora(base, targets=r"^\d+$", r=4, alpha=8)
    assert names == ["0", "2"] and all(isinstance(base[i], LoRALinear) for i in (0, 2))
    assert torch.equal(base(x), before)  # B = 0: the base model exactly

    base.eval()
    with torch.no_grad():  # the bitsandbytes CPU trap: an eval pass without grad, then training
        base(x)
    base.train()
    for layer in (base[0], base[2]):
        nn.init.normal_(layer.lora_B, std=0.1)  # so that A gets a gradient too
    base(x).pow(2).mean().backward()
    for name, p in base.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_backbone_lora_only_lora_and_head_get_gradients(make_cfg):
    cfg = make_cfg("--lora_dropout", "0")
    torch.manual_seed(0)
    readout, parts = build(cfg, torch.device("cpu"))
    batch = next(iter(make_loader(cfg, Clips(cfg, "train"), parts, batch_size=4)))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in readout.backbone.modules())
    readout.eval()
    readout.predict(batch)  # eval pass first
    readout.train()
    for m in readout.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.02)
    readout.loss(batch).backward()
    trained = {
        n for n, p in readout.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    expected = {n for n, _ in readout.named_parameters() if "lora_" in n or n.startswith("head.")}
    assert trained == expected
    # not the audio or vision towers
    assert all(".language_model." in n for n in expected if "lora_" in n)
    assert len(expected) == 2 * 7 * 2 + 2  # A, B for 7 projections in 2 layers; head weight, bias


def test_adapter_round_trip(tmp_path):
    torch.manual_seed(0)
    model = load_backbone("tiny", quant="nf4").model
    add_lora(model, THINKER, r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    ids = torch.randint(20, 300, (2, 12))
    model.eval()
    with torch.no_grad():
        expected = model.model(input_ids=ids).last_hidden_state
    save_file(
        {k: v for k, v in model.state_dict().items() if "lora_" in k},
        tmp_path / "adapter.safetensors",
    )

    fresh = load_backbone("tiny", quant="nf4").model
    add_lora(fresh, THINKER, r=4)
    fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.model(input_ids=ids).last_hidden_state, expected)
    missing, unexpected = fresh.load_state_dict(
        load_file(tmp_path / "adapter.safetensors"), strict=False
    )
    assert not unexpected and not [k for k in missing if "lora_" in k]
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=ids).last_hidden_state, expected)


def test_parameter_count_counts_4bit_weights_by_their_real_size():
    full = load_backbone("tiny", quant="none").model
    nf4 = load_backbone("tiny", quant="nf4").model
    assert count_parameters(nf4)["total"] == count_parameters(full)["total"]
    assert sum(p.numel() for p in nf4.parameters()) < count_parameters(nf4)["total"]  # packed bytes
    add_lora(nf4, THINKER, r=4)
    counts = count_parameters(nf4)
    # tiny text decoder: q,o 64x64; k,v 64x32; gate,up 64x128; down 128x64
    hidden, inter, kv = (
        64,
        128,
        32,
    )
    per_layer = 4 * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter))
    assert counts["trainable"] == 2 * per_layer
    assert counts["total"] == count_parameters(full)["total"] + counts["trainable"]


def test_no_target_match_is_an_error():
    with pytest.raises(ValueError, match="matches no linear layer"):
        add_lora(nn.Sequential(nn.Linear(4, 4)), targets="q_proj")
