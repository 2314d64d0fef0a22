"""Speed and memory, every comparison side by side in one process: the discriminative readout against the bare
text-model forward, the full forward (LM head), the generative readout and peft's LoRA; the decoded-input cache;
and the Qwen2.5-Omni-7B and -3B Thinkers' parameter and LoRA counts; trained disc and gen runs, gen read with each rule.

    python bench.py --model tiny --json bench.json                     # CPU, about a minute
    python bench.py --params                                           # 7B, 3B counts on the meta device, no weights
    python bench.py --model random-7b --device cuda --json bench.json  # GPU: 7B-shaped Thinker (or random-3b)
    python bench.py --rules runs/x/disc-t-s0 runs/x/gen-t-s0 --clips 64  # ms per clip, gen with each rule

The fixed batch is MOSI-like: 5 s of video at 2 fps, its audio, 30 words of transcript. Times are medians over
--repeats after --warmup calls, the compared calls interleaved within each repeat.
"""

import argparse
import gc
import itertools
import json
import re
import resource
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration

from backbone import (
    LORA_TARGETS,
    PAPER_TARGETS,
    SKIP_QUANT,
    TINY_FILES,
    Backbone,
    model_source,
)
from batches import QUESTION, collate, make_loader, model_inputs, prompt, to_device
from data import (
    SAMPLE_RATE,
    Clips,
    UserError,
    check_denoise,
    deepfilternet,
    make_toy,
)
from eval import autocast, load_checkpoint
from flags import device_of, machine_flags, resolve, run_flags
from lora import add_lora, count_parameters, freeze, quantize_nf4
from readout import (
    DECODE,
    READOUTS,
    Gen,
    build,
)
from runs import default_config
from train import checkpoint_trained_layers

# The tiny Thinker's shapes (backbone.TINY_FILES holds the configuration this makes)
TINY = dict(
    text=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        mrope_section=[4, 6, 6],
        max_position_embeddings=4096,
    ),
    audio=dict(encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128, d_model=64),
    vision=dict(
        depth=1, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[0]
    ),
)


def tiny_processor():
    """The Omni processor of the tiny Thinker: a byte-level BPE tokenizer (512 tokens, the Omni special tokens),
    Whisper features, the Qwen2-VL image and video processors."""
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(TINY_FILES)


def thinker_config(tokenizer, text, audio, vision):
    """A Qwen2_5OmniThinkerConfig of these shapes and `tokenizer`'s special tokens. Gotchas: mrope_section sums to
    head_dim / 2; the towers' outputs have the text width; vision_start_token_id is read even for text alone."""
    from transformers import Qwen2_5OmniThinkerConfig

    ids, text = tokenizer.get_vocab(), dict(text)
    rope = dict(rope_type="default", rope_theta=1e6, mrope_section=text.pop("mrope_section"))
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=text.pop("vocab_size", len(tokenizer)),
            rope_parameters=rope,
            pad_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            **text,
        ),
        audio_config=dict(num_mel_bins=128, output_dim=text["hidden_size"], **audio),
        vision_config=dict(out_hidden_size=text["hidden_size"], **vision),
        audio_token_index=ids["<|AUDIO|>"],
        image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"],
        user_token_id=ids["<|im_start|>"],
    )


# Qwen2.5-Omni-7B's published Thinker configuration (transformers' default vision config is not: its hidden_size
# 3584 is the output width; the 7B's vision blocks are 1280 wide).
SEVEN_B = dict(
    text=dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        mrope_section=[16, 24, 24],
        vocab_size=152064,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
    audio=dict(encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280),
    vision=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
)


# Qwen2.5-Omni-3B's Thinker: its text decoder's shape as two public re-implementations quote its config.json
# (hidden 2048, 36 layers, 16 heads, 2 key-value heads, MLP 11008, vocabulary 151,936); towers as the 7B's,
# their outputs at the text width. Not read from the checkpoint itself (not reachable here), so whether its
# LM head is tied to the embeddings is not known: counted untied, as the 7B's (tied: 311 M fewer).
THREE_B = dict(
    text=dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        mrope_section=[16, 24, 24],
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
    audio=SEVEN_B["audio"],
    vision=SEVEN_B["vision"],
)
SHAPES = {"random-7b": SEVEN_B, "random-3b": THREE_B}


def random_thinker(shape, quant="nf4", device="cuda", seed=0):
    """A Thinker of `shape` (SEVEN_B, TINY) with random weights, its text decoder quantised to NF4 in memory
    (no checkpoint needed), with the tiny model's processor (whose token ids are valid for it)."""
    processor = tiny_processor()
    processor.video_processor.cap_pixels_per_frame = True
    device = torch.device(device)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)  # the same weights each time: two copies can be compared
            model = Qwen2_5OmniThinkerForConditionalGeneration(
                thinker_config(processor.tokenizer, **shape)
            )
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    return (quantize_nf4(model, SKIP_QUANT) if quant == "nf4" else model).eval(), processor


def build_readout(cfg, device, lora=True):
    """readout.build, or for --model random-7b (random-3b) the same readout over a random Thinker of that shape."""
    if cfg["model"] not in SHAPES:
        return build(cfg, device, lora)
    backbone, processor = random_thinker(SHAPES[cfg["model"]], cfg["quant"], device)
    if lora:
        add_lora(
            backbone,
            LORA_TARGETS["qwen2_5_omni_thinker"],
            cfg["lora_r"],
            cfg["lora_alpha"],
            cfg["lora_dropout"],
        )
    parts = Backbone(backbone, processor.tokenizer, processor)
    return READOUTS[cfg["readout"]](parts, cfg), parts


TRANSCRIPT = [
    "i",
    "think",
    "the",
    "movie",
    "was",
    "really",
    "good",
    "the",
    "acting",
    "was",
    "great",
    "and",
    "the",
    "plot",
    "was",
    "fine",
    "but",
    "honestly",
    "the",
    "ending",
    "was",
    "bad",
    "and",
    "the",
    "soundtrack",
    "was",
    "okay",
    "well",
    "it",
    "is",
    "fine",
][:30]


def mosi_like(n, seed=0, seconds=5.0, fps=2.0, height=360, width=640):
    """n clips shaped like a MOSI clip: frames (T, H, W, 3) uint8, 16 kHz audio, a 30-word transcript."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return [
        dict(
            id=f"bench/{i}",
            text=" ".join(TRANSCRIPT),
            label=[float(rng.uniform(-3, 3))],
            videos=rng.integers(0, 256, (int(seconds * fps), height, width, 3), dtype=np.uint8),
            audio=(0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32),
        )
        for i in range(n)
    ]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns, device, warmup, repeats):
    """{name: median seconds} of each fn(), the fns interleaved within each repeat; bf16 autocast on CUDA,
    as in train.py and eval.py."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            with autocast(device):
                fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_mb(device, reset=False):
    """Peak memory so far in MiB: CUDA allocations on a GPU, the process's resident set on CPU (which never
    goes down, so measure the smaller workload first)."""
    if device.type == "cuda":
        if reset:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def train_step(readout, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    readout.loss(batch).backward()
    optimizer.step()


def clips_of(root, modalities, cache_dir, workers=0):
    """data.Clips of a folder's training split, with the flags' defaults but for these."""
    cfg = default_config(READOUTS["disc"], "disc")
    cfg.update(data=str(root), modalities=modalities, cache_dir=cache_dir, num_workers=workers)
    return Clips({**cfg, "on_bad": "error"}, "train")


def cache_ratio(processor, modalities, n=24):
    """Data time of a second epoch over the first, through make_loader as train.py uses it: the first decodes
    every mp4 into an empty cache (and runs the processor), the second reads the cache. With the decoded-media
    cache alone, the processor runs again in the second epoch; with --cache_processed, its output is read back."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_toy(Path(tmp) / "toy", n, seed=1)
        for processed, key in ((False, "decoded_cache"), (True, "cached")):
            cfg = dict(
                eval_batch_size=8, num_workers=0, cache_processed=processed, question=QUESTION
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
            r=cfg["lora_r"],
            lora_alpha=cfg["lora_alpha"],
            lora_dropout=cfg["lora_dropout"],
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
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    disc, processor = build_readout({**cfg, "readout": "disc"}, device)
    gen = Gen(processor, cfg)
    items = [
        dict(
            inputs=model_inputs(
                processor,
                prompt(c["text"], cfg["modalities"], processor),
                {k: c[k] for k in ("videos", "audio")},
                cfg["fps"],
                cfg["max_pixels"],
            ),
            label=c["label"],
        )
        for c in mosi_like(max(cfg["batch_sizes"]), cfg["seed"])
    ]

    def batch_of(n):
        return to_device(collate(items[:n], processor.tokenizer), device)

    batch = batch_of(cfg["batch_size"])
    thinker = disc.backbone
    one = items[0]["inputs"]  # what --cache_processed stores per clip
    processed_mb = sum(v.numel() * v.element_size() for v in one.values()) / 2**20
    out = dict(
        model=cfg["model"],
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        batch_size=cfg["batch_size"],
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
            cfg["warmup"],
            cfg["repeats"],
        )
        generated = new_tokens(gen, batch, cfg["max_new_tokens"])
        peak_mb(device, reset=True)
        timed({"disc": lambda: disc.predict(batch)}, device, 0, 1)
    out.update(
        disc_over_forward=t["disc"] / t["forward"],
        full_forward_over_disc=t["full"] / t["disc"],
        gen_over_disc=t["gen"] / t["disc"],
        gen_mean_new_tokens=generated,
        ms_per_clip={k: 1e3 * v / cfg["batch_size"] for k, v in t.items()},
        peak_mem_eval_mb=peak_mb(device),
    )
    disc.train()
    optimizer = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=1e-4)
    peak_mb(device, reset=True)
    timed({"step": lambda: train_step(disc, optimizer, batch)}, device, 0, 1)
    out["peak_mem_train_mb"] = peak_mb(device)
    out.update(peft_comparison(cfg, disc, batch, device, cfg["warmup"], cfg["repeats"]))
    gc.collect()  # peft's copy of the model is gone before the memory is measured again
    out.update(tower_share(disc, optimizer, batch, device))
    if device.type == "cuda":  # training-step peak memory by batch size and gradient checkpointing
        out["peak_mem_train_mb_by"] = {}
        for ckpt in (False, True):
            if ckpt:  # as train.py --grad_ckpt does: the layers LoRA trains
                checkpoint_trained_layers(thinker)
            for n in cfg["batch_sizes"]:
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
        cache_ratio(processor, cfg["modalities"])
        if cfg["cache"]
        else dict(cached_over_first_epoch=None)
    )
    return out


# ------------------------------------------------------------------------------ a MOSEI-sized data pipeline


def pipeline(cfg, n_text=20000, n_media=200):
    """Clips per second through reading, decoding and batching (the processor): a generated label.csv of
    n_text text-only clips, and n_media toy clips with audio and video, first into an empty decoded-input
    cache, then from the cache; in the main process, then with --num_workers decoding threads and loader
    worker processes."""
    processor = build({**cfg, "model": "tiny", "readout": "disc"}, torch.device("cpu"), lora=False)[
        1
    ]
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
            for workers in sorted({0, cfg["num_workers"]}):
                for cache in ("empty cache", "cached"):
                    run = {**cfg, "num_workers": workers}
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


def rule_times(cfg, *folders):
    """Milliseconds per clip of trained runs' readouts (a gen run read with each decoding rule), the calls
    interleaved batch by batch over the first --clips test clips of the first run's data in this one process,
    and each over the first run's. A run is named by its readout, or by its folder where two share one."""
    loaded = [load_checkpoint(folder, cfg) for folder in folders]
    kinds = [c["readout"] for c, _, _ in loaded]
    names = [k if kinds.count(k) == 1 else Path(f).name for k, f in zip(kinds, folders)]
    run, _, processor = loaded[0]
    for _, readout, _ in loaded:
        readout.eval()
    torch.manual_seed(0)
    clips, device, total = Clips(run, "test"), torch.device(run["device"]), Counter()
    clips.rows = clips.rows[: cfg["clips"]]

    def read(readout, rule, batch):  # a gen run's predict with this rule
        def fn():
            readout.cfg["decode"] = rule
            return readout.predict(batch)

        return fn

    for i, batch in enumerate(make_loader(run, clips, processor)):
        batch = to_device(batch, device)
        calls = {}
        for name, (c, readout, _) in zip(names, loaded):
            if c["readout"] == "gen":
                calls.update({f"{name}@{r}": read(readout, r, batch) for r in DECODE})
            else:
                calls[name] = lambda readout=readout, batch=batch: readout.predict(batch)
        total.update(timed(calls, device, warmup=int(i == 0), repeats=1))
    ms = {name: 1000 * t / len(clips) for name, t in total.items()}
    first = ms[next(iter(ms))]
    return dict(clips=len(clips), ms_per_clip=ms, over_first={n: t / first for n, t in ms.items()})


def padding(cfg, seeds=5):
    """Padded tokens over real tokens in training batches of --batch_size prompts (the --data train split,
    text alone, the run's prompt and tokenizer), in the order train.py's sampler draws them (mean over
    `seeds` epochs): shuffled, and with --group_by_length (runs of 50 batches sorted by transcript tokens);
    and sorted over the whole split (the floor). `processed` is what a forward pass runs over, padding
    included, relative to the shuffled batches'."""
    if cfg["model"] == "tiny":
        processor = tiny_processor()
        tokenizer = Backbone(None, processor.tokenizer, processor)
    else:
        folder, source = model_source(cfg["model"], cfg["trust_remote_code"])
        tokenizer = Backbone(None, AutoTokenizer.from_pretrained(folder, **source))
    text = {**cfg, "modalities": "t", "on_bad": "skip"}
    clips = Clips(text, "train")
    texts = [prompt(r["text"], "t", tokenizer) for r in clips.rows]
    lengths = np.array([model_inputs(tokenizer, t, {})["input_ids"].shape[1] for t in texts])
    size = cfg["batch_size"]

    def cost(order):  # (padded tokens, tokens processed) over the complete batches of `order`
        batches = lengths[order[: len(order) // size * size]].reshape(-1, size)
        processed = batches.max(1).sum() * size
        return processed - batches.sum(), processed

    def drawn(grouped, seed):  # an epoch's order, as train.py's loader draws it
        run = {**text, "group_by_length": grouped}
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
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    readout, processor = build(cfg, device)
    readout.train()
    groups = [dict(params=ps, lr=lr, peak=lr) for ps, lr in readout.param_groups(cfg["lr"]) if ps]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    clips = Clips(cfg, "train")
    seconds, padded = {False: [], True: []}, {False: [], True: []}
    for epoch in range(repeats):
        for grouped in (False, True):
            run = {**cfg, "group_by_length": grouped}
            loader = make_loader(run, clips, processor, cfg["batch_size"], True, epoch)
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
        batch_size=cfg["batch_size"],
        seconds=dict(shuffled=seconds[False], grouped=seconds[True]),
        grouped_over_shuffled=sum(seconds[True]) / sum(seconds[False]),
        padding_share=dict(
            shuffled=float(np.mean(padded[False])), grouped=float(np.mean(padded[True]))
        ),
    )


# ------------------------------------------------------------------------------ 7B counts, no weights needed


def objective_steps(cfg):
    """Seconds of one gen training step (loss, backward) on the first --batch_size clips of --data's train
    split with each --objective, interleaved, and the per-step peak of the process's resident memory."""
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    ce, parts = build({**cfg, "readout": "gen", "objective": "ce"}, device)
    raft = Gen(parts, {**cfg, "readout": "gen", "objective": "raft"})  # the same backbone and LoRA
    ce.train(), raft.train()
    clips = Clips(cfg, "train")
    batch = to_device(next(iter(make_loader(cfg, clips, parts, cfg["batch_size"]))), device)

    def step(readout):
        readout.zero_grad(set_to_none=True)
        readout.loss(batch).backward()

    seconds = timed(
        dict(ce=lambda: step(ce), raft=lambda: step(raft)), device, cfg["warmup"], cfg["repeats"]
    )
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(
        **{f"{k}_step_s": v for k, v in seconds.items()},
        raft_over_ce=seconds["raft"] / seconds["ce"],
        peak_rss_mb=rss_mb,
    )


def si_sdr(estimate, reference):
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019): the estimate's part along the
    reference against the rest."""
    target = reference * np.dot(estimate, reference) / np.dot(reference, reference)
    return float(10 * np.log10(np.sum(target**2) / np.sum((estimate - target) ** 2)))


def mixed(clean, noise, snr_db):
    """`clean` plus `noise` (cut or repeated to its length) scaled to `snr_db` below it."""
    noise = np.resize(noise, clean.shape)
    scale = np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (clean + scale * noise).astype(np.float32)


def denoising(cfg, out):
    """DeepFilterNet (--denoise deepfilternet) on each audio clip of --data's train split (16 kHz, mono) with white noise and with the next
    clip's speech (babble) at 0 and 5 dB SNR: SI-SDR of the noisy and the denoised audio against the clean
    clip, and seconds of denoising per second of audio. out/denoising.png: one clip's spectrograms."""
    import matplotlib.pyplot as plt

    check_denoise("deepfilternet")
    clips = Clips({**cfg, "modalities": "a", "on_bad": "skip"}, "train")
    waves = {r["id"]: clips.media(r)["audio"] for r in clips.rows}
    rng, result, seconds, spent, shown = np.random.default_rng(cfg["seed"]), {}, 0.0, 0.0, {}
    for i, (clip, clean) in enumerate(waves.items()):
        babble = list(waves.values())[(i + 1) % len(waves)]
        for kind, noise in (("white", rng.normal(size=clean.shape)), ("babble", babble)):
            for snr in (0, 5):
                noisy = mixed(clean, noise, snr)
                start = time.perf_counter()
                denoised = deepfilternet(noisy)
                spent += time.perf_counter() - start
                seconds += len(noisy) / SAMPLE_RATE
                key = f"{clip} {kind} {snr} dB"
                result[key] = dict(noisy=si_sdr(noisy, clean), denoised=si_sdr(denoised, clean))
                shown.setdefault(kind, (clean, noisy, denoised))
    result["seconds_per_second"] = spent / seconds
    out.mkdir(parents=True, exist_ok=True)
    clean, noisy, denoised = shown["white"]
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(7, 6))
    for ax, wave, title in zip(
        axes, (clean, noisy, denoised), ("clean", "white noise, 0 dB SNR", "denoised")
    ):
        ax.specgram(wave, Fs=SAMPLE_RATE, NFFT=512, noverlap=384, cmap="magma", vmin=-140)
        ax.set(ylabel="Hz", title=f"{next(iter(waves))}: {title}")
    axes[-1].set(xlabel="s")
    fig.savefig(out / "denoising.png", dpi=110, bbox_inches="tight")
    print(f"written: {out / 'denoising.png'}")
    return result


def new_tokens(gen, batch, max_new_tokens):
    """Tokens gen writes per clip, greedily, up to and with the end token."""
    inputs = batch["inputs"]
    out = gen.backbone.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    eos = torch.tensor(gen.backbone.generation_config.eos_token_id, device=new.device).view(-1)
    ended = torch.isin(new, eos)
    return (
        torch.where(ended.any(-1), ended.int().argmax(-1) + 1, new.shape[1]).float().mean().item()
    )


def param_counts(
    shape=SEVEN_B,
    ranks=(8, 16, 32, 64),
    targets=LORA_TARGETS["qwen2_5_omni_thinker"],
    head="linear",
):
    """The Qwen2.5-Omni-7B Thinker built on the meta device: parameters per part, LoRA parameters at each rank
    for the default targets, and the trainable share (LoRA + a linear head) under two conventions: real
    parameters, and packed storage elements (an NF4 weight of n parameters is n / 2 uint8 elements, which is
    what summing numel() over a loaded 4-bit model gives); and, the one reading we found that gives the paper's
    1.14%, LoRA alone over the text decoder's real parameters (embeddings and layers: no towers, no LM head)."""
    config = thinker_config(tiny_processor().tokenizer, **shape)
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    inner = model.model
    parts = {
        "text decoder (embeddings)": inner.language_model.embed_tokens,
        "text decoder (layers and norm)": None,
        "audio tower": inner.audio_tower,
        "vision tower": inner.visual,
        "LM head": model.lm_head,
    }
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m is not None}
    language = sum(p.numel() for p in inner.language_model.parameters())
    counts["text decoder (layers and norm)"] = language - counts["text decoder (embeddings)"]
    total = sum(p.numel() for p in model.parameters())
    # Quantised: every linear layer outside the towers and the LM head (readout.SKIP_QUANT).
    quantised = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and not re.match(r"(model\.(audio_tower|visual)|lm_head)", n)
    )
    targets_in_out = [
        (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.search(targets, n)
    ]
    hidden = config.text_config.hidden_size
    size = hidden + 1
    if head == "mlp":  # LayerNorm, hidden -> 256, 256 -> 1
        size = 2 * hidden + (hidden + 1) * 256 + 257
    rows = []
    for r in ranks:
        lora = sum(r * (i + o) for i, o in targets_in_out)
        rows.append(
            dict(
                rank=r,
                lora=lora,
                trainable=lora + size,
                pct_real=100 * (lora + size) / (total + lora + size),
                pct_packed=100 * (lora + size) / (total - quantised // 2 + lora + size),
                pct_of_text_decoder=100 * lora / language,
            )
        )
    return dict(
        parts=counts,
        total=total,
        quantised_linear=quantised,
        lora_layers=len(targets_in_out),
        ranks=rows,
    )


def params_table(c):
    lines = ["| part | parameters |", "|---|---|"] + [
        f"| {k} | {v:,} |" for k, v in c["parts"].items()
    ]
    lines += [
        f"| **total** | **{c['total']:,}** |",
        "",
        f"LoRA on the {c['lora_layers']} target layers, plus the head "
        f"({c['ranks'][0]['trainable'] - c['ranks'][0]['lora']:,}):",
        "",
        "| rank | LoRA parameters | trainable % (real parameters) | trainable % (packed 4-bit elements) "
        "| LoRA % of the text decoder |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['rank']} | {r['lora']:,} | {r['pct_real']:.2f} | {r['pct_packed']:.2f} | "
        f"{r['pct_of_text_decoder']:.2f} |"
        for r in c["ranks"]
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run_flags(p, READOUTS)
    machine_flags(p)
    p.set_defaults(batch_size=4)  # --batch_size: clips in the fixed batch
    p.add_argument(
        "--batch_sizes", default="1,4", help="GPU: training-step peak memory at these batch sizes"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    p.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported")
    p.add_argument(
        "--no_cache", dest="cache", action="store_false", help="skip the decoded-input cache check"
    )
    p.add_argument(
        "--params",
        action="store_true",
        help="print the 7B and 3B Thinkers' parameter and LoRA counts, exit",
    )
    p.add_argument(
        "--pipeline",
        type=int,
        default=None,
        metavar="N",
        help="instead: clips per second of the data pipeline on N generated text-only clips and N / 100 "
        "toy clips with audio and video (MOSEI: N=20000), with --num_workers workers too",
    )
    p.add_argument(
        "--rules",
        nargs="+",
        default=None,
        metavar="RUN",
        help="instead: ms per clip of trained runs' readouts (gen with each --decode rule), interleaved",
    )
    p.add_argument("--clips", type=int, default=64, help="--rules: on this many test clips")
    p.add_argument(
        "--padding",
        action="store_true",
        help="instead: the padding share of training batches, shuffled and grouped by length",
    )
    p.add_argument(
        "--grouped_steps",
        type=int,
        default=None,
        metavar="N",
        help="instead: seconds of N training steps on --data's train split, shuffled and with "
        "--group_by_length, alternated twice in one process (N=50: one run of grouped batches)",
    )
    p.add_argument(
        "--objective_steps",
        action="store_true",
        help="instead: seconds of a gen training step with --objective ce and raft, interleaved",
    )
    p.add_argument(
        "--denoising",
        metavar="DIR",
        help="instead: SI-SDR of --denoise on --data's clips mixed with white noise and with another clip's "
        "speech (babble) at 0 and 5 dB SNR, seconds per second of audio; a spectrogram picture in DIR",
    )
    p.add_argument("--json", default=None, help="write the results here")
    cfg = resolve(vars(p.parse_args(argv)))  # train.py's presets
    cfg["device"] = device_of(cfg["device"])
    cfg["batch_sizes"] = [int(n) for n in cfg["batch_sizes"].split(",")] + [cfg["batch_size"]]
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    # --params: each size with the default targets and a linear head, then the paper's with its MLP head
    if cfg["params"]:
        result = {}
        for size, shape in SHAPES.items():
            result[size] = dict(
                default=param_counts(shape),
                paper=param_counts(shape, targets=PAPER_TARGETS, head="mlp"),
            )
            for name, counts in result[size].items():
                where = "the text decoder" if name == "default" else "matched anywhere"
                print(f"\n{size}, {name} targets ({where}):")
                print(params_table(counts))
    else:
        if cfg["pipeline"]:
            result = pipeline(cfg, cfg["pipeline"], cfg["pipeline"] // 100)
        elif cfg["rules"]:
            result = rule_times(cfg, *cfg["rules"])
        elif cfg["padding"]:
            result = padding(cfg)
        elif cfg["grouped_steps"]:
            result = grouped_steps(cfg, cfg["grouped_steps"])
        elif cfg["objective_steps"]:
            result = objective_steps(cfg)
        elif cfg["denoising"]:
            result = denoising(cfg, Path(cfg["denoising"]))
        else:
            result = bench(cfg)
        for k, v in result.items():
            print(f"{k:28s} {json.dumps(v) if isinstance(v, dict) else v}")
    if cfg["json"]:
        Path(cfg["json"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
