import importlib.util

import pytest
import torch
from torch import nn

from bench import attributions, common, params, pipeline, readouts, speed
from bench.common import TINY
from lora import bitsandbytes, quantize_nf4
from readout import DECODE
from settings import Settings
from train import train


def with_(cfg, **more):
    """A run's settings and a benchmark's own."""
    return Settings(**{**vars(cfg), **more})


bnb = bitsandbytes()


@pytest.mark.parametrize("size", ["random-7b", "random-3b"])
def test_thinker_counts_match_their_published_shapes(size):
    c = params.param_counts(common.SHAPES[size])
    t, a, v = (common.SHAPES[size][k] for k in ("text", "audio", "vision"))
    h, kv = (
        t["hidden_size"],
        t["hidden_size"] // t["num_attention_heads"] * t["num_key_value_heads"],
    )
    # One decoder layer: q, k, v (with biases), o, the gated MLP, two RMS norms; then the final norm.
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * t["intermediate_size"] + 2 * h
    assert c["parts"]["text decoder (layers and norm)"] == t["num_hidden_layers"] * layer + h
    assert c["parts"]["text decoder (embeddings)"] == c["parts"]["LM head"] == t["vocab_size"] * h
    # not the 3 B transformers' default vision config gives
    assert 0.6e9 < c["parts"]["vision tower"] < 0.7e9
    assert 0.6e9 < c["parts"]["audio tower"] < 0.7e9
    assert a["encoder_layers"] == v["depth"] == 32 and a["d_model"] == v["hidden_size"] == 1280
    assert c["total"] == sum(c["parts"].values())
    per_rank = t["num_hidden_layers"] * (
        2 * (h + h) + 2 * (h + kv) + 3 * (h + t["intermediate_size"])
    )
    assert c["lora_layers"] == 7 * t["num_hidden_layers"]
    for row in c["ranks"]:
        assert row["lora"] == row["rank"] * per_rank
        assert row["pct_real"] < min(row["pct_of_text_decoder"], row["pct_packed"])
    if (
        size == "random-7b"
    ):  # the paper's 1.14%: rank 32, LoRA over the text decoder's real parameters
        assert [r["rank"] for r in c["ranks"] if round(r["pct_of_text_decoder"], 2) == 1.14] == [32]


def test_quantize_nf4_replaces_linear_layers_but_not_the_skipped_ones():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)))
    model.add_module("lm_head", nn.Linear(64, 256, bias=False))
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = model(x)
    quantize_nf4(model, skip=["lm_head"])
    assert isinstance(model.body[0], bnb.nn.Linear4bit) and isinstance(
        model.body[2], bnb.nn.Linear4bit
    )
    assert type(model.lm_head) is nn.Linear
    assert model.body[0].weight.quant_state.shape == (128, 64)
    for m in model.modules():
        m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        after = model(x)
    relative = ((after - before).norm() / before.norm()).item()
    assert 0 < relative < 0.2  # NF4's error: about 0.1 relative, not zero and not garbage


def test_bench_measures_every_key_on_the_tiny_model(tmp_path):
    cfg = speed.parse_args(
        [
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    out = speed.bench(cfg)
    for key in (
        "disc_over_forward",
        "full_forward_over_disc",
        "gen_over_disc",
        "cached_over_first_epoch",
        "peak_mem_train_mb",
        "peak_mem_eval_mb",
    ):
        assert out[key] > 0, key
    assert 1 <= out["gen_mean_new_tokens"] <= cfg.max_new_tokens
    assert (
        0 < out["tower_share_eval"] < 1 and 0 < out["tower_share_step"] < 1
    )  # tav: both towers run
    for key in (
        "decoded_cache",
        "cached",
    ):  # either cache makes the second epoch cheaper than the first
        assert out[f"{key}_second_epoch_data_s"] < out[f"{key}_first_epoch_data_s"]
    assert out["decoded_cache_over_first_epoch"] > 0
    if importlib.util.find_spec("peft") is None:
        assert out["lora_over_peft"] is None
    else:  # the same adapter weights give exactly the same outputs
        assert out["lora_peft_max_abs_diff"] == 0.0 and out["lora_over_peft"] > 0


def test_a_random_thinker_is_built_in_memory_with_a_4bit_text_decoder():
    model, processor = common.random_thinker(TINY, "nf4", "cpu")
    layers = model.model.language_model.layers
    assert isinstance(layers[0].mlp.up_proj, bnb.nn.Linear4bit) and type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.visual.modules())
    inputs = processor.tokenizer(["the movie was great"], return_tensors="pt")
    with torch.no_grad():
        h = model.model(**inputs).last_hidden_state
    assert h.shape == (1, inputs["input_ids"].shape[1], TINY["text"]["hidden_size"])
    assert torch.isfinite(h).all()


def test_rule_times_reads_both_runs_with_every_rule_on_the_first_clips(make_cfg, tmp_path):
    runs = [
        train(
            make_cfg("--epochs", "1", "--modalities", "t", "--readout", r).but(
                out=str(tmp_path / r)
            )
        )[0]
        for r in ("disc", "gen")
    ]
    out = readouts.rule_times(with_(make_cfg(), clips=5, eval_batch_size=2), *runs)
    assert out["clips"] == 5 and set(out["ms_per_clip"]) == {"disc", *(f"gen@{r}" for r in DECODE)}
    assert all(t > 0 for t in out["ms_per_clip"].values()) and out["over_first"]["disc"] == 1.0
    # two runs of one readout (a layer against the last): named by their folders
    cfg = make_cfg("--epochs", "1", "--modalities", "t", "--layer", "1")
    layer = train(cfg.but(out=str(tmp_path / "disc-layer1")))[0]
    both = readouts.rule_times(with_(make_cfg(), clips=4, eval_batch_size=2), runs[0], layer)
    assert set(both["ms_per_clip"]) == {"disc", "disc-layer1"}


def test_padding_of_batches_grouped_by_length_is_at_most_that_of_shuffled_ones(make_cfg):
    out = pipeline.padding(make_cfg("--batch_size", "4"))
    share = out["padded_over_real"]
    assert out["clips"] > 0 and 0 <= share["sorted"] <= share["grouped"] <= share["shuffled"]
    assert 0 < out["processed"]["sorted"] <= out["processed"]["grouped"] <= 1.0


def test_a_raft_step_is_timed_beside_a_cross_entropy_step_on_the_same_batch(make_cfg):
    cfg = with_(make_cfg("--modalities", "t", "--batch_size", "4"), warmup=0, repeats=1)
    out = readouts.objective_steps(cfg)
    assert out["ce_step_s"] > 0 and out["raft_step_s"] > 0 and out["peak_rss_mb"] > 0
    assert out["raft_over_ce"] == out["raft_step_s"] / out["ce_step_s"]


def test_gens_cost_beside_discs_is_measured_at_each_prompt_length(make_cfg):
    out = readouts.prompt_lengths(with_(make_cfg(), clips=4, eval_batch_size=2))
    assert list(out) == ["t", "ta", "tav"]
    lengths = [out[m]["prompt_tokens"] for m in out]
    assert lengths[0] < lengths[1] < lengths[2]  # the media's tokens lengthen the prompt
    for m in out:
        assert set(out[m]["ms_per_clip"]) == {"disc", *(f"gen@{r}" for r in DECODE)}
        floor = (out[m]["prompt_tokens"] + out[m]["answer_prefixes"]) / out[m]["prompt_tokens"]
        assert out[m]["floor"] == floor and out[m]["over_first"]["disc"] == 1.0


def test_explanations_cost_is_measured_per_step_beside_the_prediction(make_cfg):
    out = attributions.costs(with_(make_cfg("--modalities", "ta"), clips=1, steps=2))
    assert set(out["ms_per_clip"]) == {"predict", "grad_x_input", "integrated_gradients"}
    ms = out["ms_per_clip"]
    assert out["grad_x_input_over_predict"] == ms["grad_x_input"] / ms["predict"] > 0
    assert out["clips"] == 1 and out["peak_mb"] > 0
