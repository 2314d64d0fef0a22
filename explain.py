"""Why this score: word and modality attributions of a trained run's score, and whether they are faithful. Every
readout is explained through its score(batch) alone (disc: the head's output; gen: the expected answer), so a
readout in the user's own file is explained as the built-in ones are.

    python explain.py --ckpt runs/toy-disc-tav-s0-HASH [--split test] [--n 100 | --ids A,B] [--steps 20]
    python explain.py --ckpt RUN --data new.csv        # clips without labels too (eval.py --predictions' input)

For each clip:
- words: gradient x input at the decoder's input, after the media are merged in (so audio and video positions
  get attributions too; their share of |attribution| is `shares`), summed per transcript word; and captum's
  integrated gradients (LayerIntegratedGradients at the input embeddings, from the prompt with the transcript's
  tokens padded out: media positions, the same in both, get none). --ig_clips: on the first N clips only.
- shapley: exact Shapley values of the run's modalities over the 2^m coalitions, a coalition being the prompt
  with the other modalities absent (the empty one: the question alone); `shapley_neutral`: the others present
  but neutral (an empty transcript, silence, grey frames).
- faithfulness, as ERASER measures it, for a number: comprehensiveness (how far the score moves when the top
  k% of the words are deleted) and sufficiency (how far it moves when only they are kept), at k = 10% and 20%,
  both signed toward the training mean (positive: the score lost what set the clip apart from the mean), for
  each method and for random words (--draws draws), paired clip by clip with bootstrap intervals.

`python explain.py --agree A/explain-test/explanations.jsonl B/... [METHOD]`: how two runs' word attributions agree
(their top 20% of the words' overlap, Spearman's correlation; a clip's mean over those both explain).

Files, under RUN/explain-SPLIT (printed): explanations.jsonl (a line per clip, written as each clip is done: a
stopped run goes on where it stopped; `prediction`: the score explained, disc's before clipping), faithfulness.json and .md, explain.png (the most positive and negative
clips' words and modality bars) and explanations.html (every clip, self-contained).
"""

import html
import itertools
import json
import math
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from batches import autocast, model_inputs, prompt
from data import Clips, read_split
from eval import OWN, checkpoint_settings, command, load_checkpoint
from readout import READOUTS
from runs import load_config, save_json
from settings import Setting, grouped
from util import UserError, write_atomically

KS = (0.1, 0.2)  # the shares of a clip's words that faithfulness deletes or keeps
METHODS = ("grad_x_input", "integrated_gradients")
EXPLAIN = grouped(
    "this command",
    Setting("n", int, None, "explain the first N clips of the split (default: all)"),
    Setting("ids", str, None, "explain these clips (comma-separated ids of the split)"),
    Setting("steps", int, 20, "integrated gradients' steps"),
    Setting("ig_clips", int, None, "integrated gradients on the first N clips only (default: all)"),
    Setting("draws", int, 3, "random word sets per clip and k, faithfulness's baseline"),
)


class FirstCall(torch.nn.Module):
    """Stands in for a module of the model: a score's first call goes through `tap`, the module attributions
    hook; later calls in the same score (gen's pass over its answers' prefixes, after the prompt's) go to the
    module itself, so that an attribution is always the prompt's."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.tap, self.calls = inner, Tap(inner), 0

    def forward(self, x, *args, **kwargs):
        self.calls += 1
        if self.calls > 1:
            return self.inner(x, *args, **kwargs)
        return self.tap(x, rest=args, **kwargs)


class Tap(torch.nn.Module):
    """The module attributions hook: its one positional input is the tensor attributed (an encoder's layer takes
    its mask positionally too: passed on by keyword, out of the hooks' sight)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, rest=(), **kwargs):
        return self.inner(x, *rest, **kwargs)


class Explainer:
    """A trained readout, its clips, and the score of one target for inputs built like training's."""

    def __init__(self, cfg, readout, parts, clips, target):
        self.cfg, self.readout, self.parts, self.clips = cfg, readout, parts, clips
        self.target, self.device = target, torch.device(cfg.device)
        layers = decoder_layers(parts.model)
        layers[0] = self.first_layer = FirstCall(layers[0])  # where gradient x input is taken
        self.embeddings = FirstCall(parts.model.get_input_embeddings())  # integrated gradients'
        parts.model.set_input_embeddings(self.embeddings)
        media_ids = dict(a="<|AUDIO|>", v="<|VIDEO|>") if parts.processor else {}
        self.media_ids = {m: parts.tokenizer.convert_tokens_to_ids(t) for m, t in media_ids.items()}

    def inputs(self, text, media, modalities):
        """A batch of one clip's model inputs: its transcript `text` and `media` with `modalities`."""
        c = self.clips
        line = prompt(
            text, modalities, self.parts, c.audio_in_video, self.cfg.question, self.cfg.system
        )
        inputs = model_inputs(
            self.parts, line, media, c.video["fps"], c.video["max_pixels"], c.audio_in_video
        )
        return {k: v.to(self.device) for k, v in inputs.items()}, line

    def score_of(self, inputs):
        """The forward function attributions differentiate: input ids (B, L) -> the target's score (B,)."""

        def score(input_ids):
            self.first_layer.calls = self.embeddings.calls = (
                0  # a new score: its first calls are the prompt's
            )
            with autocast(self.device):
                batch = dict(inputs=dict(inputs, input_ids=input_ids))
                return self.readout.score(batch)[:, self.target].float()

        return score

    @torch.no_grad()
    def score(self, text, media, modalities):
        inputs, _ = self.inputs(text, media, modalities)
        return float(self.score_of(inputs)(inputs["input_ids"])[0])

    def attributions(self, text, media, integrated):
        """(score, {method: attribution per word}, modality shares of |gradient x input|, IG's completeness
        error: |sum of attributions - (score - baseline's score)| over |score - baseline's score|, and each
        step's milliseconds: predict (the score alone), grad_x_input, integrated_gradients)."""
        from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

        inputs, line = self.inputs(text, media, self.cfg.modalities)
        ids = inputs["input_ids"]
        words = word_positions(self.parts, line, text, ids[0])
        forward = self.score_of(inputs)
        clock = Clock(self.device)
        with torch.no_grad():
            score = float(forward(ids)[0])
        clock.lap("predict")
        gxi = LayerGradientXActivation(forward, self.first_layer.tap, multiply_by_inputs=True)
        per_token = gxi.attribute(ids, attribute_to_layer_input=True)[0].sum(-1).detach()
        clock.lap("grad_x_input")
        out = dict(grad_x_input=per_word(per_token, words))
        shares = self.shares(per_token.abs(), ids[0], words)
        error = None
        if integrated and words:
            baseline = ids.clone()
            baseline[0, [p for w in words for p in w]] = self.parts.tokenizer.pad_token_id
            ig = LayerIntegratedGradients(forward, self.embeddings.tap)
            attr, delta = ig.attribute(
                ids,
                baseline,
                n_steps=self.cfg.steps,
                internal_batch_size=1,
                return_convergence_delta=True,
            )
            clock.lap("integrated_gradients")
            out["integrated_gradients"] = per_word(attr[0].sum(-1).detach(), words)
            with torch.no_grad():
                moved = score - float(forward(baseline)[0])
            error = abs(float(delta[0])) / max(abs(moved), 1e-8)
        return score, out, shares, error, clock.ms

    def shares(self, magnitude, ids, words):
        """Each modality's share of |attribution| over the transcript's, audio's and video's positions."""
        where = {m: ids == token for m, token in self.media_ids.items() if m in self.cfg.modalities}
        if "t" in self.cfg.modalities:
            where["t"] = torch.zeros_like(ids, dtype=torch.bool)
            where["t"][[p for w in words for p in w]] = True
        total = {m: float(magnitude[mask].sum()) for m, mask in where.items()}
        whole = sum(total.values()) or 1.0
        return {m: v / whole for m, v in total.items()}

    def shapley(self, text, media, neutral):
        """Exact Shapley values of the run's modalities: a coalition's value is the score with the others absent
        (neutral: present, but an empty transcript, silence, grey frames)."""
        modalities = self.cfg.modalities
        value = {}
        for size in range(len(modalities) + 1):
            for coalition in itertools.combinations(modalities, size):
                kept = "".join(coalition)
                if neutral:
                    value[kept] = self.score(*neutralised(text, media, kept), modalities)
                else:
                    present = {k: v for k, v in media.items() if MEDIA[k] in kept}
                    value[kept] = self.score(text if "t" in kept else "", present, kept)
        return shapley_values(value, modalities)


class Clock:
    """Milliseconds between laps, a GPU's queued work included."""

    def __init__(self, device):
        self.device, self.ms, self.last = device, {}, time.perf_counter()

    def lap(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.ms[name] = 1000 * (now - self.last)
        self.last = now


MEDIA = dict(audio="a", videos="v")  # Clips.media()'s keys


def neutralised(text, media, kept):
    """A clip's transcript and media with the modalities not `kept` made neutral."""
    neutral = dict(audio=np.zeros_like, videos=lambda v: np.full_like(v, 128))
    media = {k: v if MEDIA[k] in kept else neutral[k](v) for k, v in media.items()}
    return (text if "t" in kept else ""), media


def shapley_values(value, modalities):
    """{modality: Shapley value} from the value of every coalition (a string of modalities, in their order)."""
    m = len(modalities)
    out = {}
    for i in modalities:
        total = 0.0
        for coalition, v in value.items():
            if i in coalition:
                continue
            joined = "".join(x for x in modalities if x in coalition or x == i)
            weight = (
                math.factorial(len(coalition))
                * math.factorial(m - len(coalition) - 1)
                / math.factorial(m)
            )
            total += weight * (value[joined] - v)
        out[i] = total
    return out


def decoder_layers(model):
    """The decoder's (or encoder's) layers: the model's largest ModuleList (the towers' are smaller), the rule
    readout.keep_layers cuts by (kept apart: the core has no room for a shared helper)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    layers = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    if not len(layers):
        raise UserError(
            "the run reads the embeddings (--layer 0): no decoder layer to attribute at"
        )
    return layers


def word_positions(parts, line, text, ids):
    """The input positions of each whitespace-separated word of the transcript `text` in the prompt `line`
    whose input ids are `ids`: the prompt's own tokenisation's character offsets, moved by the tokens the
    processor's media placeholders expanded into (all before the transcript)."""
    if not text.strip():
        return []
    encoder = parts.processor is None and parts.tokenizer.chat_template is None
    own = parts.tokenizer(line, return_offsets_mapping=True, add_special_tokens=encoder)
    shift = len(ids) - len(own["input_ids"])
    marker = 'Transcript: "'
    at = line.find(marker + text)
    start = at + len(marker) if at >= 0 else line.find(text)
    spans = [(m.start() + start, m.end() + start) for m in re.finditer(r"\S+", text)]
    words = [[] for _ in spans]
    for i, (a, b) in enumerate(own["offset_mapping"]):
        hit = next((j for j, (c, d) in enumerate(spans) if a < d and c < b), None)
        if hit is not None:
            words[hit].append(i + shift)
    moved = [p for w in words for p in w]
    if ids[moved].tolist() != [own["input_ids"][p - shift] for p in moved]:
        raise UserError(f"cannot find the transcript's tokens in the prompt of {text!r}")
    return words


def per_word(per_token, words):
    return [float(per_token[w].sum()) for w in words]


def ranked(attribution, sign):
    """Word indices, most important first: the attribution toward the side of the mean the score is on."""
    return list(np.argsort(-sign * np.asarray(attribution), kind="stable"))


def faithfulness(explainer, text, media, score, attributions, mean, rng, draws):
    """{f"{method}@{k}": [comprehensiveness, sufficiency]} of one clip, random's averaged over `draws`."""
    words = text.split()
    sign = 1.0 if score >= mean else -1.0
    modalities = explainer.cfg.modalities

    def moved(chosen):
        deleted = " ".join(w for i, w in enumerate(words) if i not in chosen)
        kept = " ".join(w for i, w in enumerate(words) if i in chosen)
        comp = sign * (score - explainer.score(deleted, media, modalities))
        suff = sign * (score - explainer.score(kept, media, modalities))
        return [comp, suff]

    out = {}
    for k in KS:
        size = max(1, math.ceil(k * len(words)))
        for method, attribution in attributions.items():
            out[f"{method}@{k:.0%}"] = moved(set(ranked(attribution, sign)[:size]))
        random = [
            moved(set(rng.choice(len(words), size, replace=False).tolist())) for _ in range(draws)
        ]
        out[f"random@{k:.0%}"] = np.mean(random, 0).tolist()
    return out


def explain_clip(explainer, row, mean, integrated):
    """One clip's line of explanations.jsonl."""
    media = explainer.clips.media(row)
    text, cfg = row["text"], explainer.cfg
    score, words, shares, error, ms = explainer.attributions(text, media, integrated)
    rng = np.random.default_rng(cfg.seed)
    faithful = {}
    if text.split():
        faithful = faithfulness(explainer, text, media, score, words, mean, rng, cfg.draws)
    label = np.reshape(row["label"], -1)[explainer.target]
    return dict(
        id=row["id"],
        label=float(label),
        prediction=score,
        words={m: [[w, a] for w, a in zip(text.split(), attr)] for m, attr in words.items()},
        shapley=explainer.shapley(text, media, neutral=False),
        shapley_neutral=explainer.shapley(text, media, neutral=True),
        shares=shares,
        ig_error=error,
        faithfulness=faithful,
        ms=ms,
    )


def no_transcripts(cfg):
    return UserError(
        f"{cfg.data} ({cfg.split}, --modalities {cfg.modalities}): no transcripts, which word "
        "attributions need"
    )


def selected(cfg, clips):
    """The split's clips to explain: --ids (in the split's order), else all, then the first --n."""
    rows = clips.rows
    if not any(r["text"].strip() for r in rows):
        raise no_transcripts(cfg)
    if cfg.ids:
        wanted = cfg.ids.split(",")
        missing = sorted(set(wanted) - {r["id"] for r in rows})
        if missing:
            raise UserError(
                f"--ids: {', '.join(missing[:5])} not in the {cfg.split} split of {cfg.data}"
            )
        rows = [r for r in rows if r["id"] in wanted]
    return rows[: cfg.n] if cfg.n else rows


def done_lines(folder, settings):
    """The lines of a stopped explanation with the same settings (a torn last line dropped), else none."""
    file, saved = folder / "explanations.jsonl", folder / "settings.json"
    if not (file.exists() and saved.exists() and json.loads(saved.read_text()) == settings):
        write_atomically(file, b"")
        save_json(saved, settings)
        return []
    lines = []
    for text in file.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:  # a line the stop cut
            break
    write_atomically(file, "".join(json.dumps(x) + "\n" for x in lines).encode())
    return lines


def explain(cfg):
    """Explain the run `cfg` describes on its split -> (folder, lines, summary), the files written."""
    # what can be refused from the settings alone, before the model loads and the clips are decoded
    if cfg.audio_in_video:
        raise UserError(
            "--audio_in_video: modality Shapley values need the audio apart from the video"
        )
    if not hasattr(READOUTS[cfg.readout], "score"):
        raise UserError(
            f"the {cfg.readout} readout has no score(batch) to explain: define one (readout.py)"
        )
    targets = cfg.targets.split(",")
    if cfg.target not in (None, *targets):
        raise UserError(f"--target {cfg.target}: not one of the run's targets ({cfg.targets})")
    target = targets.index(cfg.target) if cfg.target else 0
    if "t" not in cfg.modalities:
        raise no_transcripts(cfg)
    readout, parts = load_checkpoint(cfg, cfg.ckpt)
    readout.eval()
    clips = Clips(cfg, cfg.split, labelled=False)  # new clips, without labels, are explained too
    rows = selected(cfg, clips)
    # the run's own training data, whatever --data says
    trained = cfg.but(**load_config(cfg.ckpt, READOUTS))
    train = read_split(trained, "train")[0]
    mean = float(np.mean([np.reshape(r["label"], -1)[target] for r in train]))
    explainer = Explainer(cfg, readout, parts, clips, target)
    folder = Path(cfg.ckpt) / f"explain-{cfg.split}"
    folder.mkdir(exist_ok=True)
    keys = ("modalities", "steps", "ig_clips", "draws", "seed", "target", "question", "system")
    settings = {k: getattr(cfg, k) for k in keys}
    lines = done_lines(folder, settings)
    done = {x["id"] for x in lines}
    ig_clips = len(rows) if cfg.ig_clips is None else cfg.ig_clips
    with open(folder / "explanations.jsonl", "a") as out:
        for i, row in enumerate(tqdm(rows, desc="explaining", disable=None)):
            if row["id"] in done:
                continue
            lines.append(explain_clip(explainer, row, mean, integrated=i < ig_clips))
            out.write(json.dumps(lines[-1]) + "\n")
            out.flush()
    order = {r["id"]: i for i, r in enumerate(rows)}
    lines = sorted((x for x in lines if x["id"] in order), key=lambda x: order[x["id"]])
    result = summarise(lines, mean, cfg)
    return folder, lines, result


def summarise(lines, mean, cfg):
    """faithfulness.json's content: per method and k, comprehensiveness and sufficiency against random's (paired
    clip by clip, bootstrap 95% intervals), the modalities' shares, IG's completeness and the costs."""
    faith = {}
    for key in lines[0]["faithfulness"]:
        method, k = key.split("@")
        if method == "random":
            continue
        both = [x["faithfulness"] for x in lines if key in x["faithfulness"]]
        faith[key] = {
            name: versus_random([f[key][i] for f in both], [f[f"random@{k}"][i] for f in both])
            for i, name in enumerate(("comprehensiveness", "sufficiency"))
        }
    errors = [x["ig_error"] for x in lines if x["ig_error"] is not None]
    ms = {m: float(np.mean([x["ms"][m] for x in lines if m in x["ms"]])) for m in lines[0]["ms"]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return dict(
        ckpt=str(cfg.ckpt),
        split=cfg.split,
        clips=len(lines),
        train_mean=mean,
        faithfulness=faith,
        shapley_shares={k: variance_shares(lines, k) for k in ("shapley", "shapley_neutral")},
        attribution_shares={
            m: float(np.mean([x["shares"][m] for x in lines])) for m in lines[0]["shares"]
        },
        ig_completeness_error=dict(median=float(np.median(errors)), max=float(np.max(errors)))
        if errors
        else None,
        ms_per_clip=ms,
        grad_x_input_over_predict=ms["grad_x_input"] / ms["predict"],
        peak_memory_gb=dict(
            process=peak,
            cuda=torch.cuda.max_memory_allocated() / 2**30 if cfg.device == "cuda" else None,
        ),
        settings={k: getattr(cfg, k) for k in ("steps", "ig_clips", "draws", "seed", "target")},
    )


def versus_random(method, random):
    """A measure's mean over clips against random words', with the paired difference: means, 95% intervals."""
    method, random = np.asarray(method), np.asarray(random)
    return dict(
        mean=float(method.mean()),
        ci95=interval(method),
        random=float(random.mean()),
        difference=float((method - random).mean()),
        difference_ci95=interval(method - random),
        clips=len(method),
    )


def interval(values, n=10000, seed=0):
    """A bootstrap 95% percentile interval of the mean over clips (pooled.py's, for one run)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return [float(np.percentile(means, q)) for q in (2.5, 97.5)]


def variance_shares(lines, key):
    """Each modality's share of the variance of its Shapley values over the clips."""
    spread = {m: float(np.var([x[key][m] for x in lines])) for m in lines[0][key]}
    whole = sum(spread.values()) or 1.0
    return {m: v / whole for m, v in spread.items()}


def markdown(result):
    """faithfulness.md: a row per method and k."""
    head = "| method@k | comprehensiveness [95%] | random | difference [95%] | sufficiency [95%] | random | difference [95%] | clips |"
    rows = [head, "|---" * 8 + "|"]
    for key, m in result["faithfulness"].items():
        c, s = m["comprehensiveness"], m["sufficiency"]
        cells = [key]
        for x in (c, s):
            cells += [
                f"{x['mean']:+.4f} [{x['ci95'][0]:+.4f}, {x['ci95'][1]:+.4f}]",
                f"{x['random']:+.4f}",
                f"{x['difference']:+.4f} [{x['difference_ci95'][0]:+.4f}, {x['difference_ci95'][1]:+.4f}]",
            ]
        rows.append("| " + " | ".join(cells + [str(c["clips"])]) + " |")
    notes = [
        f"\n{result['clips']} clips of {result['ckpt']} ({result['split']}); signed toward the training mean "
        f"{result['train_mean']:.3f}: comprehensiveness, higher is more faithful; sufficiency, lower.",
        f"Shapley variance shares (absent): {fmt(result['shapley_shares']['shapley'])}; (neutral): "
        f"{fmt(result['shapley_shares']['shapley_neutral'])}; |gradient x input| shares: {fmt(result['attribution_shares'])}.",
        f"ms per clip: {fmt(result['ms_per_clip'], '.1f')}; gradient x input / predict "
        f"{result['grad_x_input_over_predict']:.2f}; IG completeness error: {result['ig_completeness_error']}.",
    ]
    return "\n".join(rows + notes) + "\n"


def fmt(values, f=".3f"):
    return ", ".join(f"{k} {v:{f}}" for k, v in values.items())


def shown_words(x):
    """A clip's words as the figure and the page colour them: by integrated gradients where the clip has them (the
    method that measured faithful), else by gradient x input."""
    return x["words"].get("integrated_gradients") or x["words"]["grad_x_input"]


def colour(a, scale):
    """A word's background: green toward a higher score, red toward a lower, by |a| over the clip's largest."""
    alpha = min(abs(a) / scale, 1.0) if scale else 0.0
    rgb = (0, 160, 0) if a > 0 else (200, 0, 0)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f})"


def page(lines, result):
    """explanations.html: every clip, its words coloured (shown_words), self-contained."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>explanations</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}span.w{padding:1px 2px}"
        "div.c{border-bottom:1px solid #ddd;padding:.5em 0}</style>",
        f"<h1>{html.escape(result['ckpt'])} ({result['split']})</h1><pre>{html.escape(markdown(result))}</pre>",
    ]
    for x in lines:
        words = shown_words(x)
        scale = max((abs(a) for _, a in words), default=0.0)
        spans = " ".join(
            f"<span class='w' style='background:{colour(a, scale)}' title='{a:+.4f}'>{html.escape(w)}</span>"
            for w, a in words
        )
        bars = " ".join(f"{m}: {v:+.3f}" for m, v in x["shapley"].items())
        parts.append(
            f"<div class='c'><b>{html.escape(x['id'])}</b> label {x['label']:+.2f}, score "
            f"{x['prediction']:+.2f}, Shapley {bars}<br>{spans}</div>"
        )
    return "\n".join(parts) + "\n"


def figure(lines, file, shown=2):
    """explain.png: the `shown` most positive and most negative clips, words coloured, with modality bars."""
    import matplotlib.pyplot as plt

    chosen = sorted(lines, key=lambda x: x["prediction"])
    chosen = chosen[-shown:][::-1] + chosen[:shown]
    fig, axes = plt.subplots(
        len(chosen), 2, figsize=(11, 1.2 * len(chosen) + 0.5), width_ratios=[4, 1]
    )
    for (text_ax, bar_ax), x in zip(np.atleast_2d(axes), chosen):
        words = shown_words(x)
        scale = max((abs(a) for _, a in words), default=0.0)
        text_ax.axis("off")
        text_ax.set_title(
            f"{x['id']}: score {x['prediction']:+.2f}, label {x['label']:+.2f}",
            loc="left",
            fontsize=9,
        )
        at = 0.0
        for w, a in words[:30]:  # a monospace font: a character's width is known
            rgba = [float(v) for v in re.findall(r"[\d.]+", colour(a, scale))]
            face = (rgba[0] / 255, rgba[1] / 255, rgba[2] / 255, rgba[3])
            text_ax.text(
                at,
                0.4,
                w,
                family="monospace",
                fontsize=9,
                bbox=dict(facecolor=face, edgecolor="none", pad=1),
            )
            at += (len(w) + 1) * 0.0125
        names = list(x["shapley"])
        bar_ax.barh(names, [x["shapley"][m] for m in names], color="grey")
        bar_ax.axvline(0, color="k", lw=0.5)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def agreement(files, method="grad_x_input", k=0.2):
    """How two runs' explanations of the same clips agree, per method: the overlap of their top k of the words
    (the share of one's top words among the other's) and the Spearman correlation of the words' attributions,
    each the mean over the clips both explain (and where a clip's attributions vary); `chance_overlap`: the overlap
    two random rankings of each clip's words would have on average (top k / words)."""
    runs = [{x["id"]: x for x in map(json.loads, Path(f).read_text().splitlines())} for f in files]
    common = [i for i in runs[0] if i in runs[1]]
    overlap, chance, rho = [], [], []
    for i in common:
        a, b = (np.array([v for _, v in run[i]["words"].get(method, [])]) for run in runs)
        if len(a) < 2 or len(a) != len(b):
            continue
        size = max(1, math.ceil(k * len(a)))
        top = [set(np.argsort(-np.abs(x), kind="stable")[:size].tolist()) for x in (a, b)]
        overlap.append(len(top[0] & top[1]) / size)
        chance.append(size / len(a))
        ranks = [np.argsort(np.argsort(x)) for x in (a, b)]
        if ranks[0].std() and ranks[1].std():
            rho.append(float(np.corrcoef(*ranks)[0, 1]))
    return dict(
        files=[str(f) for f in files],
        method=method,
        clips=len(overlap),
        top_overlap=float(np.mean(overlap)) if overlap else None,
        chance_overlap=float(np.mean(chance)) if chance else None,
        spearman=float(np.mean(rho)) if rho else None,
    )


def main(argv=None):
    if argv and argv[0] == "--agree":  # explain.py --agree A.jsonl B.jsonl [METHOD]
        print(json.dumps(agreement(argv[1:3], *argv[3:4]), indent=2))
        return
    own = tuple(
        s for s in OWN if s.name in ("ckpt", "split", "target")
    )  # eval.py's that apply here
    cmd = command(argv, __doc__, own + EXPLAIN)
    given = cmd.parse(argv)
    if "ckpt" not in given:
        raise UserError("--ckpt RUN: the trained run to explain")
    cfg = checkpoint_settings(cmd, given, given["ckpt"])
    folder, lines, result = explain(cfg)
    files = [folder / "faithfulness.json", folder / "faithfulness.md", folder / "explanations.html"]
    save_json(files[0], result)
    write_atomically(files[1], markdown(result).encode())
    write_atomically(files[2], page(lines, result).encode())
    figure(lines, folder / "explain.png")
    print(markdown(result))
    print(
        "files:",
        ", ".join(map(str, [folder / "explanations.jsonl", *files, folder / "explain.png"])),
    )


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UserError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
