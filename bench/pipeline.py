"""The data pipeline and the batches' padding, on CPU:

python -m bench.pipeline --pipeline 20000 --num_workers 2   # clips per second, MOSEI-sized
python -m bench.pipeline --padding --model $SMOL --data ../shared/data/mosi_text --batch_size 8
python -m bench.pipeline --grouped_steps 50 --model $SMOL --data ../shared/data/mosi_text --batch_size 8
"""

import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from backbone import Backbone, model_source
from batches import autocast, make_loader, model_inputs, prompt, to_device
from bench.common import TRANSCRIPT, clips_of, command, report, run, tiny_processor
from data import Clips, make_toy
from readout import build
from util import UserError


def pipeline(cfg, n_text=20000, n_media=200):
    """Clips per second through reading, decoding and batching (the processor): a generated label.csv of
    n_text text-only clips, and n_media toy clips with audio and video, first into an empty decoded-input
    cache, then from the cache; in the main process, then with --num_workers decoding threads and loader
    worker processes."""
    processor = build(cfg.but(model="tiny", readout="disc"), torch.device("cpu"), lora=False)[1]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        text_root = Path(tmp) / "text"
        text_root.mkdir()
        words = TRANSCRIPT * 2
        rows = [
            f"v{i // 10},{i % 10},{' '.join(words[i % 30 : i % 30 + 12])},{(i % 61) / 10 - 3:.1f},train"
            for i in range(n_text)
        ]
        (text_root / "label.csv").write_text(
            "video_id,clip_id,text,label,mode\n" + "\n".join(rows) + "\n"
        )
        start = time.perf_counter()
        media_root = make_toy(Path(tmp) / "media", n_media, seed=2)
        out["media_clips_written_s"] = time.perf_counter() - start
        for name, root, modalities in (("text", text_root, "t"), ("media", media_root, "tav")):
            for workers in sorted({0, cfg.num_workers}):
                for cache in ("empty cache", "cached"):
                    run = cfg.but(num_workers=workers)
                    start = time.perf_counter()
                    clips = clips_of(root, modalities, str(Path(tmp) / f"cache{workers}"), workers)
                    batches = sum(1 for _ in make_loader(run, clips, processor, 8, shuffle=True))
                    seconds = time.perf_counter() - start
                    out[f"{name}_{cache.replace(' ', '_')}_workers{workers}"] = dict(
                        clips=len(clips),
                        batches=batches,
                        seconds=seconds,
                        clips_per_s=len(clips) / seconds,
                    )
    return out


def padding(cfg, seeds=5):
    """Padded tokens over real tokens in training batches of --batch_size prompts (the --data train split,
    text alone, the run's prompt and tokenizer), in the order train.py's sampler draws them (mean over
    `seeds` epochs): shuffled, and with --group_by_length (runs of 50 batches sorted by transcript tokens);
    and sorted over the whole split (the floor). `processed` is what a forward pass runs over, padding
    included, relative to the shuffled batches'."""
    if cfg.model == "tiny":
        processor = tiny_processor()
        tokenizer = Backbone(None, processor.tokenizer, processor)
    else:
        folder, source = model_source(cfg.model, cfg.trust_remote_code)
        tokenizer = Backbone(None, AutoTokenizer.from_pretrained(folder, **source))
    text = cfg.but(modalities="t", on_bad="skip")
    clips = Clips(text, "train")
    texts = [prompt(r["text"], "t", tokenizer) for r in clips.rows]
    lengths = np.array([model_inputs(tokenizer, t, {})["input_ids"].shape[1] for t in texts])
    size = cfg.batch_size

    def cost(order):  # (padded tokens, tokens processed) over the complete batches of `order`
        batches = lengths[order[: len(order) // size * size]].reshape(-1, size)
        processed = batches.max(1).sum() * size
        return processed - batches.sum(), processed

    def drawn(grouped, seed):  # an epoch's order, as train.py's loader draws it
        run = text.but(group_by_length=grouped)
        return np.array(list(make_loader(run, clips, tokenizer, size, True, seed).sampler))

    shuffled = [cost(drawn(False, seed)) for seed in range(seeds)]
    grouped = [cost(drawn(True, seed)) for seed in range(seeds)]
    floor = cost(np.argsort(-lengths))
    real = lengths[: len(lengths) // size * size].sum()
    pad, done = np.mean(shuffled, 0)
    return dict(
        clips=len(lengths),
        tokens_per_prompt=dict(
            mean=float(lengths.mean()), min=int(lengths.min()), max=int(lengths.max())
        ),
        padded_over_real=dict(
            shuffled=float(pad / real),
            grouped=float(np.mean(grouped, 0)[0] / real),
            sorted=float(floor[0] / real),
        ),
        processed=dict(grouped=float(np.mean(grouped, 0)[1] / done), sorted=float(floor[1] / done)),
    )


def grouped_steps(cfg, steps, repeats=2):
    """Seconds of the first `steps` training steps of an epoch (forward, backward, AdamW) on --data's train
    split, drawn shuffled and with --group_by_length, alternated `repeats` times in one process with the
    epoch's seed changing: their ratio estimates a training epoch's, since the grouped order is made of runs
    of 50 batches, each sorted (steps=50: one whole run). Also each order's padding share."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    readout, processor = build(cfg, device)
    readout.train()
    groups = [dict(params=ps, lr=lr, peak=lr) for ps, lr in readout.param_groups(cfg.lr) if ps]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    clips = Clips(cfg, "train")
    seconds, padded = {False: [], True: []}, {False: [], True: []}
    for epoch in range(repeats):
        for grouped in (False, True):
            run = cfg.but(group_by_length=grouped)
            loader = make_loader(run, clips, processor, cfg.batch_size, True, epoch)
            start = time.perf_counter()
            for batch in itertools.islice(loader, steps):
                padded[grouped].append(1 - batch["inputs"]["attention_mask"].float().mean().item())
                with autocast(device):
                    loss = readout.loss(to_device(batch, device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seconds[grouped].append(time.perf_counter() - start)
            print(
                f"{'grouped' if grouped else 'shuffled'} pass {epoch + 1}: {seconds[grouped][-1]:.1f} s"
            )
    return dict(
        steps=steps,
        batch_size=cfg.batch_size,
        seconds=dict(shuffled=seconds[False], grouped=seconds[True]),
        grouped_over_shuffled=sum(seconds[True]) / sum(seconds[False]),
        padding_share=dict(
            shuffled=float(np.mean(padded[False])), grouped=float(np.mean(padded[True]))
        ),
    )


def main(argv=None):
    cmd = command(__doc__)
    p = cmd.parser
    p.add_argument(
        "--pipeline",
        type=int,
        default=None,
        metavar="N",
        help="clips per second of the data pipeline on N generated text-only clips and N / 100 toy clips with "
        "audio and video (MOSEI: N=20000), with --num_workers workers too",
    )
    p.add_argument(
        "--padding",
        action="store_true",
        default=False,
        help="the padding share of training batches, shuffled and grouped by length",
    )
    p.add_argument(
        "--grouped_steps",
        type=int,
        default=None,
        metavar="N",
        help="seconds of N training steps on --data's train split, shuffled and with --group_by_length, "
        "alternated twice in one process (N=50: one run of grouped batches)",
    )
    cfg = cmd.settings(cmd.parse(argv))
    if cfg.pipeline:
        result = pipeline(cfg, cfg.pipeline, cfg.pipeline // 100)
    elif cfg.padding:
        result = padding(cfg)
    elif cfg.grouped_steps:
        result = grouped_steps(cfg, cfg.grouped_steps)
    else:
        raise UserError(
            "bench.pipeline measures --pipeline N, --padding or --grouped_steps N: name one"
        )
    report(result, cfg.json)


if __name__ == "__main__":
    run(main)
