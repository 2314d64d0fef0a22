"""What every benchmark shares: the tiny and the 7B- and 3B-shaped random Thinkers, a MOSI-like clip, timing
(medians over --repeats after --warmup calls, the compared calls interleaved within each repeat), peak memory,
and the command line (a run's settings and this machine's, as train.py reads them; --warmup, --repeats, --json).
Each benchmark is a script of its own in this folder, run from the project's root:

    python -m bench.speed --model tiny                # disc against the forward, the LM head, gen, peft; memory
    python -m bench.params                            # the 7B and 3B Thinkers' parameter and LoRA counts
    python -m bench.readouts --rules RUN RUN          # ms per clip of trained runs, gen read with each rule
    python -m bench.readouts --prompt_lengths         # gen's cost against disc at the tiny Thinker's t, ta, tav
    python -m bench.pipeline --pipeline 20000         # the data pipeline; --padding, --grouped_steps N
    python -m bench.denoise --denoising DIR           # SI-SDR of --denoise
"""

import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from backbone import LORA_TARGETS, SKIP_QUANT, TINY_FILES, Backbone
from batches import autocast
from data import SAMPLE_RATE, Clips
from lora import add_lora, quantize_nf4
from readout import READOUTS, build
from settings import Command
from util import UserError

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
    if cfg.model not in SHAPES:
        return build(cfg, device, lora)
    backbone, processor = random_thinker(SHAPES[cfg.model], cfg.quant, device)
    if lora:
        add_lora(
            backbone,
            LORA_TARGETS["qwen2_5_omni_thinker"],
            cfg.lora_r,
            cfg.lora_alpha,
            cfg.lora_dropout,
        )
    parts = Backbone(backbone, processor.tokenizer, processor)
    return READOUTS[cfg.readout](parts, cfg), parts


WORDS = "i think the movie was really good the acting was great and the plot was fine but honestly the ending"
TRANSCRIPT = (WORDS + " was bad and the soundtrack was okay well it is").split(" ")  # 30 words


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


def train_step(readout, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    readout.loss(batch).backward()
    optimizer.step()


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


def clips_of(root, modalities, cache_dir, workers=0):
    """data.Clips of a folder's training split, with the flags' defaults but for these."""
    cfg = Command(None, READOUTS).settings(dict(model="tiny"))
    run = cfg.but(data=str(root), modalities=modalities, cache_dir=cache_dir, num_workers=workers)
    return Clips(run, "train")


def command(doc):
    """A benchmark's command line: a run's settings and this machine's, --warmup, --repeats and --json; the
    script adds its own to command.parser."""
    cmd = Command(doc, READOUTS)
    p = cmd.parser
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    p.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results here")
    return cmd


def report(result, file=None):
    """Print a benchmark's result a key a line, and write it as JSON to `file` where given."""
    for k, v in result.items():
        print(f"{k:28s} {json.dumps(v) if isinstance(v, dict) else v}")
    if file:
        Path(file).write_text(json.dumps(result, indent=2))


def run(main):
    """A benchmark's main(), its UserError one line."""
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
