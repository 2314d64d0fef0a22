"""explain.py against known truths: exact Shapley values of value functions with known answers, the transcript's
words found among a prompt's tokens, and on a toy disc run trained on transcripts (whose label's text part is
carried by one sentiment word, the last), the word attributions that find that word and integrated gradients
that add up to the score's change."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import explain
import train
from backbone import load_backbone
from batches import prompt
from util import UserError


def test_shapley_values_of_an_additive_game_are_its_parts():
    parts = dict(t=1.5, a=-0.25, v=0.5)
    value = {}
    for n in range(8):
        kept = "".join(m for i, m in enumerate("tav") if n >> i & 1)
        value["".join(m for m in "tav" if m in kept)] = 0.1 + sum(parts[m] for m in kept)
    assert explain.shapley_values(value, "tav") == pytest.approx(parts)


def test_shapley_values_split_an_interaction_equally_and_sum_to_the_whole():
    value = {"": 0.0, "t": 0.0, "a": 0.0, "ta": 1.0}  # only both together count
    phi = explain.shapley_values(value, "ta")
    assert phi == pytest.approx(dict(t=0.5, a=0.5))
    assert sum(phi.values()) == pytest.approx(value["ta"] - value[""])


@pytest.fixture(scope="module")
def tiny_parts():
    return load_backbone("tiny", "nf4", "cpu")


def test_each_word_of_the_transcript_is_found_after_the_media_placeholders(tiny_parts, toy_root):
    from batches import model_inputs

    text = "i think  the plot was wonderful"
    line = prompt(text, "tav", tiny_parts)
    clips = data.Clips(train.settings_from(["--model", "tiny", "--data", str(toy_root)]), "test")
    media = clips.media(clips.rows[0])
    ids = model_inputs(tiny_parts, line, media)["input_ids"][0]
    words = explain.word_positions(tiny_parts, line, text, ids)
    assert len(words) == len(text.split()) and all(words)
    decoded = [tiny_parts.tokenizer.decode(ids[w]).strip() for w in words]
    assert decoded == text.split()
    video = tiny_parts.tokenizer.convert_tokens_to_ids("<|VIDEO|>")
    assert min(words[0]) > max(torch.nonzero(ids == video)[:, 0])  # the media come first


def test_an_encoders_words_are_found_with_its_special_tokens(bert_dir):
    parts = load_backbone(str(bert_dir), "none", "cpu")
    text = "honestly the cast was awful"
    line = prompt(text, "t", parts)
    ids = parts.tokenizer([line], return_tensors="pt")["input_ids"][0]
    words = explain.word_positions(parts, line, text, ids)
    assert [parts.tokenizer.decode(ids[w]) for w in words] == text.split()


def test_a_stopped_explanation_keeps_its_complete_lines(tmp_path):
    settings = dict(steps=4)
    assert explain.done_lines(tmp_path, settings) == []
    lines = [dict(id="a"), dict(id="b")]
    file = tmp_path / "explanations.jsonl"
    file.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"id": "c", "wor')
    assert explain.done_lines(tmp_path, settings) == lines
    assert explain.done_lines(tmp_path, dict(steps=8)) == []  # other settings: started over
    assert file.read_text() == ""


@pytest.fixture(scope="module")
def toy_text_run(tmp_path_factory):
    """A disc run on the transcripts of 120 toy clips (72 for training), trained until it reads the words."""
    folder = tmp_path_factory.mktemp("explain")
    root = data.make_toy(folder / "toy120", n=120)
    flags = ["--model", "tiny", "--data", str(root), "--modalities", "t", "--epochs", "30"]
    flags += ["--out", str(folder / "run"), "--cache_dir", str(folder / "cache"), "--device", "cpu"]
    train.main(flags)
    return folder / "run", flags


def test_the_toy_runs_sentiment_word_carries_its_score(toy_text_run, capsys):
    run, flags = toy_text_run
    explain.main(["--ckpt", str(run), "--steps", "16", "--draws", "2", "--cache_dir", flags[-3]])
    folder = run / "explain-test"
    lines = [json.loads(x) for x in (folder / "explanations.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and all(x["words"]["grad_x_input"] for x in lines)
    chance = np.mean([1 / len(x["words"]["grad_x_input"]) for x in lines])
    for method in explain.METHODS:
        # the sentiment word is each toy transcript's last word
        top = [np.argmax([abs(a) for _, a in x["words"][method]]) for x in lines]
        hits = np.mean([t == len(x["words"][method]) - 1 for t, x in zip(top, lines)])
        print(f"{method}: top word the sentiment word on {hits:.0%} of clips (chance {chance:.0%})")
        assert hits >= 0.7 > 2 * chance
    # integrated gradients add up to the score minus the padded transcript's score
    assert max(x["ig_error"] for x in lines) <= 0.05
    result = json.loads((folder / "faithfulness.json").read_text())
    ig = result["faithfulness"]["integrated_gradients@20%"]["comprehensiveness"]
    assert (
        ig["difference_ci95"][0] > 0
    )  # deleting IG's top words moves the score more than random words
    assert result["shapley_shares"]["shapley"] == {"t": 1.0}
    assert (folder / "explain.png").stat().st_size > 0
    page = (folder / "explanations.html").read_text()
    assert lines[0]["id"] in page and "http" not in page  # self-contained
    assert "faithfulness.md" in capsys.readouterr().out
    same = explain.agreement([folder / "explanations.jsonl"] * 2, "integrated_gradients")
    assert (
        same["clips"] == 24
        and same["top_overlap"] == 1.0 > same["chance_overlap"] > 0
        and same["spearman"] == pytest.approx(1.0)
    )


def test_bad_requests_get_one_line(toy_text_run):
    run, flags = toy_text_run
    cache = ["--cache_dir", flags[-3]]
    with pytest.raises(UserError, match="not in the test split"):
        explain.main(["--ckpt", str(run), "--ids", "toy000_1,nothing", *cache])
    with pytest.raises(UserError, match="no transcripts"):
        explain.main(["--ckpt", str(run), "--modalities", "a", *cache])


def test_a_readout_without_a_score_says_so(toy_text_run, monkeypatch):
    from readout import Disc

    run, flags = toy_text_run
    monkeypatch.delattr(Disc, "score")
    with pytest.raises(UserError, match="the disc readout has no score"):
        explain.main(["--ckpt", str(run), "--cache_dir", flags[-3]])


def test_gens_expected_answer_is_explained_at_its_prompt(make_cfg, tmp_path):
    """Gen's score runs the decoder twice (the prompt, then its answers' prefixes): the attributions are the
    prompt's, and integrated gradients still add up."""
    cfg = make_cfg("--readout", "gen", "--modalities", "t", "--epochs", "1")
    train.train(cfg)
    explain.main(
        [
            "--ckpt",
            cfg.out,
            "--n",
            "2",
            "--steps",
            "32",
            "--draws",
            "1",
            "--cache_dir",
            cfg.cache_dir,
        ]
    )
    lines = (tmp_path / "run" / "explain-test" / "explanations.jsonl").read_text().splitlines()
    for x in map(json.loads, lines):
        words = x["words"]["integrated_gradients"]
        assert [w for w, _ in words] == [w for w, _ in x["words"]["grad_x_input"]]
        assert len(words) == len(x["words"]["grad_x_input"]) > 1 and x["ig_error"] < 0.05


def test_an_encoders_layers_take_their_mask_positionally_and_are_explained(make_cfg, bert_dir):
    cfg = make_cfg("--model", str(bert_dir), "--modalities", "t", "--epochs", "1")
    train.train(cfg)
    explain.main(["--ckpt", cfg.out, "--n", "2", "--steps", "32", "--cache_dir", cfg.cache_dir])
    lines = (Path(cfg.out) / "explain-test" / "explanations.jsonl").read_text().splitlines()
    for x in map(json.loads, lines):
        assert len(x["words"]["grad_x_input"]) > 1 and x["ig_error"] < 0.05
