import math
import random

import pytest
import torch

from backbone import load_backbone
from batches import prompt
from readout import READOUTS, build, last_token_index, parse_score
from settings import Settings


def test_last_token_index_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(right).tolist() == [2, 4, 0]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["disc", "mean"])
def test_pooled_state_of_a_padded_batch_equals_each_clip_alone(make_cfg, side, kind):
    torch.manual_seed(0)
    readout, parts = build(make_cfg("--modalities", "t", "--readout", kind), torch.device("cpu"))
    readout.eval()
    texts = [
        prompt(t, "t", parts)
        for t in ["ok", "the movie was really quite wonderful to watch", "bad"]
    ]

    def pooled(prompts):
        inputs = parts.processor(text=prompts, padding=True, padding_side=side, return_tensors="pt")
        with torch.no_grad():
            return readout.pooled({"inputs": dict(inputs)}), inputs["attention_mask"]

    batch, mask = pooled(texts)
    assert (mask == 0).any()  # the batch is padded
    pad_at_start = (mask[:, 0] == 0).any().item()
    assert pad_at_start == (side == "left")
    for i, text in enumerate(texts):
        alone, _ = pooled([text])
        assert torch.allclose(batch[i], alone[0], atol=1e-5), i


def test_mean_readout_averages_the_real_tokens_only(make_cfg):
    torch.manual_seed(0)
    readout, parts = build(make_cfg("--modalities", "t", "--readout", "mean"), torch.device("cpu"))
    readout.eval()
    inputs = dict(
        parts.processor(
            text=[prompt(t, "t", parts) for t in ["ok", "the plot was dull"]],
            padding=True,
            return_tensors="pt",
        )
    )
    with torch.no_grad():
        h = readout.hidden_states(inputs).last_hidden_state
        pooled = readout.pooled({"inputs": inputs})
    for i, row_mask in enumerate(inputs["attention_mask"].bool()):
        assert torch.allclose(pooled[i], h[i][row_mask].mean(0), atol=1e-5)
    # row 0 is padded: padding is left out
    assert not torch.allclose(pooled[0], h[0].mean(0), atol=1e-3)


def test_readout_never_computes_the_lm_head(make_cfg):
    readout, parts = build(make_cfg("--modalities", "t"), torch.device("cpu"))
    calls = []
    readout.backbone.lm_head.register_forward_hook(lambda *a: calls.append(1))
    inputs = parts.processor(text=[prompt("fine", "t", parts)], return_tensors="pt")
    readout.predict({"inputs": dict(inputs)})
    assert calls == []


def test_a_text_model_gets_4bit_lora_on_its_default_targets(make_cfg, bert_dir):
    import bitsandbytes as bnb

    from lora import LoRALinear

    readout, parts = build(
        make_cfg("--model", str(bert_dir), "--modalities", "t"), torch.device("cpu")
    )
    tokenizer = parts.tokenizer
    wrapped = {n: m for n, m in readout.backbone.named_modules() if isinstance(m, LoRALinear)}
    # per layer: query, key, value, attention output, intermediate, output
    assert len(wrapped) == 2 * 6
    assert all(isinstance(m.base, bnb.nn.Linear4bit) for m in wrapped.values())
    inputs = dict(tokenizer(["the plot was good", "bad"], padding=True, return_tensors="pt"))
    assert inputs["attention_mask"][1, -1] == 0  # an encoder's tokenizer pads on the right
    assert readout.predict({"inputs": inputs})[0].shape == (2, 1)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--modalities", "ta"), "only --modalities t"),
        (("--modalities", "t", "--readout", "gen"), "needs a causal LM"),
    ],
)
def test_a_text_model_refuses_what_it_cannot_do(make_cfg, bert_dir, flags, message):
    with pytest.raises(ValueError, match=message):
        build(make_cfg("--model", str(bert_dir), *flags), torch.device("cpu"))


def test_an_architecture_without_default_lora_targets_asks_for_them(make_cfg, bert_dir, tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertModel(config).save_pretrained(tmp_path)
    for f in bert_dir.glob("*.txt"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="pass --lora_targets"):
        build(make_cfg("--model", str(tmp_path), "--modalities", "t"), torch.device("cpu"))


def test_tiny_backbone_is_deterministic():
    a = load_backbone("tiny", quant="none").model
    b = load_backbone("tiny", quant="none").model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_unknown_readout_is_an_error(make_cfg):
    with pytest.raises(SystemExit):  # argparse: invalid choice
        make_cfg("--readout", "nope")


PARSE_CASES = [
    ("2", 2.0),
    ("-1.4", -1.4),
    ("+0.6", 0.6),
    ("\u22122.2", -2.2),
    (".5", 0.5),
    ("-.5", -0.5),
    ("2.", 2.0),
    ("0", 0.0),
    ("-0.0", 0.0),
    ("  1.5\n", 1.5),
    ("\t-3", -3.0),
    ("7", 7.0),  # as written: the readout clips it
    ("-10", -10.0),
    ("3.01", 3.01),
    ("100 out of 100", 100.0),
    ("The sentiment score is 2.5.", 2.5),
    ("Score: **-1**", -1.0),
    ("**Answer:** 1.2", 1.2),
    ("I think 2. Final answer: -1", -1.0),
    ("rating = 0.8", 0.8),
    ("SENTIMENT: -2.4", -2.4),
    ("score 1, no wait, score 2", 2.0),
    ("The answer is: -2.0", -2.0),  # last cue wins
    ("Rating (from -3 to 3): 1.5", 1.5),
    ("On a scale of -3 to +3, it is 2", 2.0),  # the scale echoed
    ("between -3 and 3 the score would be 0.5", 0.5),
    ("[-3, 3] -> 1", 1.0),
    ("Sentiment: positive (2)", 2.0),
    ("I'd say 1.8 because it was great", 1.8),
    ("```\n-0.4\n```", -0.4),
    ("- score: 1.1", 1.1),
    ("Qwen2.5 gives 1", 1.0),
    ("3rd time, 2", 2.0),
    ("", None),
    ("   ", None),
    ("positive", None),
    ("nan", None),
    ("NaN", None),
    ("inf", None),
    ("-inf", None),
    ("no number here", None),
    ("-", None),
    (".", None),
    ("+-", None),
    ("word " * 20000 + "score: 1.3", 1.3),
    ("x" * 100000, None),
]


@pytest.mark.parametrize("text,expected", PARSE_CASES)
def test_parse_score(text, expected):
    got = parse_score(text)
    assert got == (None if expected is None else pytest.approx(expected)), text[:80]


def test_parse_score_fuzz_never_raises():
    rng = random.Random(0)
    alphabet = (
        "0123456789+-.\u2212 eE:*#\n,;()[]/"
        + "scoreanswerating"
        + "".join(map(chr, range(0x370, 0x3A0)))
    )
    for i in range(5000):
        n = rng.randrange(0, 60)
        if i % 2:
            text = "".join(rng.choice(alphabet) for _ in range(n))
        else:
            text = "".join(chr(rng.randrange(0, 0x10FFFF)) for _ in range(n))
        got = parse_score(text)
        assert got is None or (isinstance(got, float) and not math.isnan(got)), repr(text)


def test_gen_loss_is_over_the_answer_tokens_only(make_cfg):
    torch.manual_seed(0)
    readout, parts = build(
        make_cfg("--readout", "gen", "--modalities", "t", "--lora_dropout", "0"),
        torch.device("cpu"),
    )
    readout.eval()
    prompts = [prompt(t, "t", parts) for t in ["fine", "the movie was really quite wonderful"]]
    inputs = dict(parts.processor(text=prompts, padding=True, return_tensors="pt"))
    labels = torch.tensor([-1.44, 2.0])
    full, targets = readout.with_answers(inputs, labels)
    answers = [
        parts.tokenizer(a, add_special_tokens=False).input_ids
        for a in ["-1.4<|im_end|>", "2.0<|im_end|>"]
    ]
    for i, answer in enumerate(answers):
        kept = targets[i][targets[i] != -100].tolist()
        assert kept == answer and full["input_ids"][i][targets[i] != -100].tolist() == answer
        assert full["attention_mask"][i, 0] == 0 or i == 1  # left padding kept
    loss = readout.token_loss(full, targets)
    # The same loss through the model's own full forward and its labels (shifted inside transformers).
    with torch.no_grad():
        reference = readout.backbone(**full, labels=targets).loss
    assert torch.allclose(loss, reference, atol=1e-5)
    # Prompt tokens carry no label: a prompt token given one changes the loss, so -100 there matters.
    prompt_pos = int(targets[1].ne(-100).nonzero()[0]) - 3
    changed = targets.clone()
    changed[1, prompt_pos] = full["input_ids"][1, prompt_pos]
    assert not torch.allclose(readout.token_loss(full, changed), loss)


def full_forward_loglik(gen, inputs):
    """Each of the 61 answers scored by a forward pass of its own over prompt + answer (no cache)."""
    columns = []
    for v in [v / 10 for v in range(-30, 31)]:
        full, targets = gen.with_answers(inputs, torch.full((inputs["input_ids"].shape[0],), v))
        logp = torch.log_softmax(gen.backbone(**full).logits[:, :-1].float(), -1)
        kept = targets[:, 1:] != -100
        columns.append(
            (logp.gather(-1, targets[:, 1:].clamp(min=0)[..., None])[..., 0] * kept).sum(1)
        )
    return torch.stack(columns, 1)


@pytest.mark.parametrize("modalities", ["t", "ta"])
def test_expected_scores_every_answer_as_separate_forward_passes_would(make_cfg, modalities):
    from batches import make_loader
    from data import Clips

    cfg = make_cfg("--readout", "gen", "--modalities", modalities, "--decode", "expected")
    torch.manual_seed(0)
    gen, parts = build(cfg, torch.device("cpu"), lora=False)
    gen.eval()
    batch = next(iter(make_loader(cfg, Clips(cfg, "valid"), parts, batch_size=3)))
    assert (
        batch["inputs"]["attention_mask"] == 0
    ).any()  # left padding: positions must still line up
    with torch.no_grad():
        values, loglik = gen.answer_loglik(batch["inputs"])
        reference = full_forward_loglik(gen, batch["inputs"])
        preds, info = gen.predict(batch)
    assert values.tolist() == pytest.approx([v / 10 for v in range(-30, 31)]) and loglik.shape == (
        3,
        61,
    )
    assert torch.allclose(loglik, reference, atol=1e-4), (loglik - reference).abs().max()
    probs = loglik.softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(3)) and torch.allclose(
        preds[:, 0].float(), (probs @ values).float()
    )
    # nothing unparseable, nothing out of bounds
    assert info == dict(parse_failures=0, out_of_bounds=0) and not preds.isnan().any()


def test_expected_on_a_llama_decoder_with_left_padding(make_cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    from backbone import Backbone
    from bench.common import tiny_processor
    from readout import Gen

    tokenizer = tiny_processor().tokenizer
    torch.manual_seed(0)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=end,
        )
    ).eval()
    parts = Backbone(model, tokenizer)
    gen = Gen(parts, make_cfg("--readout", "gen", "--modalities", "t"))
    inputs = dict(
        tokenizer(
            [prompt(t, "t", parts) for t in ["ok", "the plot was dull and long"]],
            padding=True,
            return_tensors="pt",
        )
    )
    with torch.no_grad():
        assert torch.allclose(
            gen.answer_loglik(inputs)[1], full_forward_loglik(gen, inputs), atol=1e-4
        )


@pytest.mark.parametrize("head", [["linear"], ["mlp"], ["bins"]])
def test_each_head_trains_beats_the_train_mean_and_its_checkpoint_reproduces(make_cfg, head):
    from eval import load_checkpoint
    from runs import load_config
    from train import train

    flags = ["--modalities", "t", "--epochs", "10", "--head", *head, "--head_lr", "3e-3"]
    out, result = train(make_cfg(*flags))
    assert result["test"]["MAE"] < result["test_mean_baseline"]["MAE"]
    cfg = make_cfg().but(**load_config(out, READOUTS))  # the run's settings, as eval.py reads them
    readout, parts = load_checkpoint(cfg, out)
    assert cfg.head == head[0] and cfg.head_lr == 3e-3
    again = evaluate_split(cfg, readout, parts)
    assert again["MAE"] == result["test"]["MAE"]


def test_pool_norm_auto_gives_each_head_what_it_needs(make_cfg):
    wanted = dict(linear=torch.nn.Identity, mlp=torch.nn.Identity, bins=torch.nn.BatchNorm1d)
    for head, norm in wanted.items():
        readout, _ = build(make_cfg("--modalities", "t", "--head", head), torch.device("cpu"))
        assert type(readout.norm) is norm, head
    flags = ("--modalities", "t", "--head", "bins", "--pool_norm", "none")  # a flag given wins
    readout, _ = build(make_cfg(*flags), torch.device("cpu"))
    assert type(readout.norm) is torch.nn.Identity


def evaluate_split(cfg, readout, parts, split="test"):
    from batches import make_loader
    from data import Clips
    from eval import evaluate

    loader = make_loader(cfg, Clips(cfg, split), parts)
    return evaluate(readout, loader, torch.device("cpu"))[0]


def test_bins_put_their_mass_where_a_one_value_training_set_puts_it(make_cfg):
    from readout import grid, hl_gauss

    values = grid(Settings(low=-3.0, high=3.0, decimals=1))
    targets = hl_gauss(torch.tensor([1.0, -3.0]), 0.075, values)
    assert torch.allclose(targets.sum(-1), torch.ones(2)) and targets[0].argmax() == 40  # bin 1.0
    assert targets[1, 0] > 0.5  # the mass beyond -3 goes to the outer bin
    torch.manual_seed(0)
    flags = ("--modalities", "t", "--head", "bins", "--pool_norm", "none")  # the head alone
    readout, parts = build(make_cfg(*flags), torch.device("cpu"))
    prompts = [prompt(t, "t", parts) for t in ["good", "the plot was bad", "okay"]]
    batch = dict(inputs=dict(parts.processor(text=prompts, padding=True, return_tensors="pt")))
    batch["label"] = torch.full((3, 1), 1.0)  # every training label is 1.0
    optimizer = torch.optim.Adam([p for p in readout.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        readout.loss(batch).backward()
        optimizer.step()
    readout.eval()
    preds, info = readout.predict(batch)
    p = readout(batch).softmax(-1)
    assert (values[p.argmax(-1)] == 1.0).all() and torch.allclose(
        preds, torch.ones(3, 1), atol=0.05
    )
    assert (info["std"] < 0.2).all()


@pytest.mark.parametrize("layer", [0, 1, -2])
def test_a_layer_reads_the_full_models_state_there_and_runs_only_the_layers_before(make_cfg, layer):
    torch.manual_seed(0)
    full, parts = build(make_cfg("--modalities", "t", "--lora_dropout", "0"), torch.device("cpu"))
    torch.manual_seed(0)
    cut, _ = build(
        make_cfg("--modalities", "t", "--lora_dropout", "0", "--layer", str(layer)),
        torch.device("cpu"),
    )
    inputs = dict(
        parts.processor(
            text=[prompt("fine", "t", parts), prompt("bad", "t", parts)],
            padding=True,
            return_tensors="pt",
        )
    )
    called = []
    for block in cut.text_model().language_model.layers:
        block.register_forward_hook(lambda *_: called.append(1))
    with torch.no_grad():
        states = full.text_model()(
            **inputs, output_hidden_states=True, use_cache=False
        ).hidden_states
        assert torch.allclose(cut.hidden_states(inputs).last_hidden_state, states[layer], atol=1e-6)
    assert len(called) == layer % 3 and len(cut.text_model().language_model.layers) == layer % 3


def test_the_papers_target_names_reach_into_the_towers_and_the_default_ones_do_not(make_cfg):
    default, _ = build(make_cfg("--modalities", "t"), torch.device("cpu"))
    paper, _ = build(make_cfg("--modalities", "t", "--lora_targets", "paper"), torch.device("cpu"))

    def adapted(readout):
        return {
            n.rpartition(".lora_A")[0]
            for n, _ in readout.backbone.named_parameters()
            if "lora_A" in n
        }

    towers = {n for n in adapted(paper) if "audio_tower" in n or "visual" in n}
    assert towers and not {n for n in adapted(default) if "audio_tower" in n or "visual" in n}
    assert adapted(default) < adapted(paper)  # the decoder's layers in both


def test_out_of_bounds_answers_are_counted_before_they_are_clipped(make_cfg, monkeypatch):
    gen, parts = build(make_cfg("--readout", "gen", "--modalities", "t"), torch.device("cpu"))
    gen.eval()
    answers = ["4.5", "score: -7", "0.5", "none"]
    # what the model wrote
    monkeypatch.setattr(gen.tokenizer, "batch_decode", lambda *a, **k: answers)
    prompts = [prompt(t, "t", parts) for t in ["a", "b", "c", "d"]]
    batch = dict(inputs=dict(parts.processor(text=prompts, padding=True, return_tensors="pt")))
    preds, info = gen.predict(batch)
    # the unanswered clip is scored as --parse_fallback (0.0) and counted
    assert info == dict(
        out_of_bounds=2, parse_failures=1, answer=answers, parsed=[True, True, True, False]
    )
    assert preds.tolist() == [[3.0], [-3.0], [0.5], [0.0]]


def test_raft_is_the_squared_error_of_the_expected_answer_and_its_gradient_reaches_lora(make_cfg):
    from batches import make_loader
    from data import Clips
    from lora import LoRALinear

    def loss_of(objective, weight="0.5"):
        cfg = make_cfg(
            "--readout",
            "gen",
            "--modalities",
            "t",
            "--objective",
            objective,
            "--raft_weight",
            weight,
        )
        torch.manual_seed(0)  # the same LoRA each time
        gen, parts = build(cfg, torch.device("cpu"))
        gen.eval()  # no dropout: the same forward each time
        for m in gen.modules():  # B away from zero: the adapters matter
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B, std=0.1)
        batch = next(iter(make_loader(cfg, Clips(cfg, "train"), parts, batch_size=3)))
        return gen, batch, gen.loss(batch)

    gen, batch, raft = loss_of("raft")
    with torch.no_grad():
        expected = full_forward_loglik(gen, batch["inputs"]).softmax(-1) @ (
            torch.arange(-30, 31) / 10
        )
    squared = (expected - batch["label"][:, 0]) ** 2
    assert raft.item() == pytest.approx(squared.mean().item(), abs=1e-4)
    raft.backward()
    adapters = [m for m in gen.modules() if isinstance(m, LoRALinear)]
    assert all(m.lora_A.grad.abs().sum() > 0 and m.lora_B.grad.abs().sum() > 0 for m in adapters)
    ce, both = loss_of("ce")[2], loss_of("both")[2]
    assert both.item() == pytest.approx(ce.item() + 0.5 * raft.item(), rel=1e-5)


def test_the_median_rule_takes_the_first_value_whose_cumulative_probability_reaches_a_half():
    from readout import median

    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0]])
    assert median(probs, torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [1.0, -1.0, 2.0]
