"""Speed and memory on a fixed MOSI-like batch (5 s of video at 2 fps, its audio, 30 words of transcript), every
comparison side by side in one process: the discriminative readout against the bare text-model forward, the full
forward (LM head), the generative readout and peft's LoRA; peak memory in evaluation and in a training step (on a
GPU by batch size, with and without --grad_ckpt), the towers' share of the time, and the decoded-input cache.

    python -m bench.speed --model tiny --json bench.json                            # CPU, about a minute
    python -m bench.speed --model random-7b --device cuda --no_cache --json b.json  # GPU (or random-3b)
"""

import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from batches import QUESTION, SYSTEM, collate, make_loader, model_inputs, prompt, to_device
from bench.common import (
    build_readout,
    clips_of,
    command,
    mosi_like,
    new_tokens,
    peak_mb,
    report,
    run,
    sync,
    timed,
    train_step,
)
from data import make_toy
from lora import count_parameters, freeze
from readout import Gen
from settings import Settings
from train import checkpoint_trained_layers


def tower_share(disc, optimizer, batch, device, repeats=3):
    """The share of an evaluation batch (disc's predict) and of a training step spent in the audio and
    vision towers' forward passes (frozen under the default targets: no backward through them), timed by
    hooks that synchronise the device at each tower's entry and exit; the median over `repeats` calls."""
    inner = disc.backbone.model
    spent, hooks = [0.0], []

    def enter(*_):
        sync(device)
        spent.append(time.perf_counter())

    def leave(*_):
        sync(device)
        spent[0] += time.perf_counter() - spent.pop()

    for tower in (inner.audio_tower, inner.visual):
        hooks += [tower.register_forward_pre_hook(enter), tower.register_forward_hook(leave)]
    shares = {"eval": [], "step": []}
    try:
        for _ in range(repeats):
            for name, fn in (
                ("eval", lambda: disc.predict(batch)),
                ("step", lambda: train_step(disc, optimizer, batch)),
            ):
                spent[0] = 0.0
                total = timed({name: fn}, device, 0, 1)[name]
                shares[name].append(spent[0] / total)
    finally:
        for h in hooks:
            h.remove()
    return {f"tower_share_{k}": statistics.median(v) for k, v in shares.items()}


def cache_ratio(processor, modalities, n=24):
    """Data time of a second epoch over the first, through make_loader as train.py uses it: the first decodes
    every mp4 into an empty cache (and runs the processor), the second reads the cache. With the decoded-media
    cache alone, the processor runs again in the second epoch; with --cache_processed, its output is read back."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_toy(Path(tmp) / "toy", n, seed=1)
        for processed, key in ((False, "decoded_cache"), (True, "cached")):
            cfg = Settings(
                eval_batch_size=8,
                num_workers=0,
                cache_processed=processed,
                question=QUESTION,
                system=SYSTEM,
            )
            start = time.perf_counter()
            clips = clips_of(root, modalities, str(Path(tmp) / f"cache_{key}"))
            decode = time.perf_counter() - start
            epochs = []
            for _ in range(2):
                start = time.perf_counter()
                sum(1 for _ in make_loader(cfg, clips, processor))
                epochs.append(time.perf_counter() - start)
            out.update(
                {
                    f"{key}_over_first_epoch": epochs[1] / (decode + epochs[0]),
                    f"{key}_first_epoch_data_s": decode + epochs[0],
                    f"{key}_second_epoch_data_s": epochs[1],
                }
            )
    return out


def peft_comparison(cfg, ours, batch, device, warmup, repeats):
    """Our LoRA against peft's on a second copy of the same 4-bit backbone: output difference with identical
    adapter weights (B made non-zero so that the adapters matter), then training-step time."""
    try:
        import peft
    except ImportError:
        return dict(lora_over_peft=None, lora_peft_max_abs_diff=None)
    theirs, _ = build_readout(cfg, device, lora=False)
    freeze(theirs.backbone)
    names = [
        n.removesuffix(".base") for n, m in ours.backbone.named_modules() if n.endswith(".base")
    ]
    model = peft.get_peft_model(
        theirs.backbone,
        peft.LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=names,
        ),
    )
    theirs.backbone = model.base_model.model
    theirs.head.load_state_dict(ours.head.state_dict())
    with torch.no_grad():
        for name in names:
            mine, other = ours.backbone.get_submodule(name), theirs.backbone.get_submodule(name)
            mine.lora_B.normal_(0, 0.02)
            other.lora_A.default.weight.copy_(mine.lora_A)
            other.lora_B.default.weight.copy_(mine.lora_B)
        ours.eval(), theirs.eval()
        mine = ours(batch)
        diff = (mine - theirs(batch)).abs().max().item()
        # the same model twice: the floor of any difference
        repeat = (mine - ours(batch)).abs().max().item()
    ours.train(), theirs.train()
    optimizers = [
        torch.optim.AdamW([p for p in r.parameters() if p.requires_grad], lr=1e-4)
        for r in (ours, theirs)
    ]
    t = timed(
        {
            "ours": lambda: train_step(ours, optimizers[0], batch),
            "peft": lambda: train_step(theirs, optimizers[1], batch),
        },
        device,
        warmup,
        repeats,
    )
    return dict(
        lora_over_peft=t["ours"] / t["peft"],
        lora_peft_max_abs_diff=diff,
        ours_twice_max_abs_diff=repeat,
        train_step_ms_ours=1e3 * t["ours"],
        train_step_ms_peft=1e3 * t["peft"],
        peft_version=peft.__version__,
    )


def bench(cfg):
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    disc, processor = build_readout(cfg.but(readout="disc"), device)
    gen = Gen(processor, cfg)
    items = [
        dict(
            inputs=model_inputs(
                processor,
                prompt(c["text"], cfg.modalities, processor),
                {k: c[k] for k in ("videos", "audio")},
                cfg.fps,
                cfg.max_pixels,
            ),
            label=c["label"],
        )
        for c in mosi_like(max(cfg.batch_sizes), cfg.seed)
    ]

    def batch_of(n):
        return to_device(collate(items[:n], processor.tokenizer), device)

    batch = batch_of(cfg.batch_size)
    thinker = disc.backbone
    one = items[0]["inputs"]  # what --cache_processed stores per clip
    processed_mb = sum(v.numel() * v.element_size() for v in one.values()) / 2**20
    out = dict(
        model=cfg.model,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        batch_size=cfg.batch_size,
        sequence_length=batch["inputs"]["input_ids"].shape[1],
        parameters=count_parameters(disc),
        processed_mb_per_clip=processed_mb,
    )
    peak_mb(device, reset=True)
    disc.eval()
    with torch.no_grad():
        t = timed(
            {
                "forward": lambda: thinker.model(**batch["inputs"], use_cache=False),
                "disc": lambda: disc.predict(batch),
                "full": lambda: thinker(**batch["inputs"], use_cache=False),
                "gen": lambda: gen.predict(batch),
            },
            device,
            cfg.warmup,
            cfg.repeats,
        )
        generated = new_tokens(gen, batch, cfg.max_new_tokens)
        peak_mb(device, reset=True)
        timed({"disc": lambda: disc.predict(batch)}, device, 0, 1)
    out.update(
        disc_over_forward=t["disc"] / t["forward"],
        full_forward_over_disc=t["full"] / t["disc"],
        gen_over_disc=t["gen"] / t["disc"],
        gen_mean_new_tokens=generated,
        ms_per_clip={k: 1e3 * v / cfg.batch_size for k, v in t.items()},
        peak_mem_eval_mb=peak_mb(device),
    )
    disc.train()
    optimizer = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=1e-4)
    peak_mb(device, reset=True)
    timed({"step": lambda: train_step(disc, optimizer, batch)}, device, 0, 1)
    out["peak_mem_train_mb"] = peak_mb(device)
    out.update(peft_comparison(cfg, disc, batch, device, cfg.warmup, cfg.repeats))
    gc.collect()  # peft's copy of the model is gone before the memory is measured again
    out.update(tower_share(disc, optimizer, batch, device))
    if device.type == "cuda":  # training-step peak memory by batch size and gradient checkpointing
        out["peak_mem_train_mb_by"] = {}
        for ckpt in (False, True):
            if ckpt:  # as train.py --grad_ckpt does: the layers LoRA trains
                checkpoint_trained_layers(thinker)
            for n in cfg.batch_sizes:
                b = batch_of(n)
                peak_mb(device, reset=True)
                step = timed({"step": lambda b=b: train_step(disc, optimizer, b)}, device, 1, 2)[
                    "step"
                ]
                out["peak_mem_train_mb_by"][f"batch{n}_ckpt_{'on' if ckpt else 'off'}"] = dict(
                    peak_mb=peak_mb(device),
                    step_s=step,
                    sequence_length=b["inputs"]["input_ids"].shape[1],
                    # MOSI's 1,284 training clips in complete batches, each a step of this clip's length
                    mosi_epoch_minutes=1284 // n * step / 60,
                )
            if ckpt:
                thinker.activation_checkpointing_disable()
    out.update(
        cache_ratio(processor, cfg.modalities) if cfg.cache else dict(cached_over_first_epoch=None)
    )
    return out


def parse_args(argv=None):
    cmd = command(__doc__)
    cmd.parser.set_defaults(batch_size=4)  # --batch_size: clips in the fixed batch
    cmd.parser.add_argument(
        "--batch_sizes", default="1,4", help="GPU: training-step peak memory at these batch sizes"
    )
    cmd.parser.add_argument(
        "--no_cache",
        dest="cache",
        action="store_false",
        default=True,
        help="skip the decoded-input cache check",
    )
    cfg = cmd.settings(cmd.parse(argv))
    cfg.batch_sizes = [int(n) for n in cfg.batch_sizes.split(",")] + [cfg.batch_size]
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    report(bench(cfg), cfg.json)


if __name__ == "__main__":
    run(main)
