"""Backbones: a Qwen2.5-Omni Thinker (its text decoder in 4-bit NF4), any transformers text model, a .gguf file
(dequantised by transformers, then NF4 in memory), or `tiny`, a random Thinker built offline and loaded
through the same path. transformers' model classes load here, when a model is built, never when flags are
declared: --help stays cheap."""

import dataclasses
import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lora import add_lora, quantize_nf4
from util import UserError

THINKER_TYPES = ("qwen2_5_omni", "qwen2_5_omni_thinker")
# Only the text decoder is 4-bit: the towers and the LM head stay in bfloat16 (GPU) or float32 (CPU).
# Full dotted prefixes: bare names match nothing.
SKIP_QUANT = ["model.audio_tower", "model.visual", "lm_head"]
# Default LoRA targets by config.model_type: every decoder layer's attention and MLP projections.
DECODER = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
# The paper's target names, as peft matches them: anywhere, so also in the audio and vision towers.
PAPER_TARGETS = r"(q|k|v|o|gate|up|down)_proj$"
LORA_TARGETS = {
    "qwen2_5_omni_thinker": r"language_model\." + DECODER,
    "llama": DECODER,
    "qwen2": DECODER,
    "mistral": DECODER,
    "bert": r"encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|"
    r"intermediate\.dense|output\.dense)$",
}


@dataclasses.dataclass
class Backbone:
    """A loaded model's parts: `processor` is the Omni processor of a Thinker (audio and video), None for a
    text model, which its tokenizer alone prepares."""

    model: nn.Module
    tokenizer: object
    processor: object = None


def load_backbone(name, quant="nf4", device="cpu", trust_remote_code=False):
    """The Backbone of --model NAME: a Thinker with its Omni processor, any other model as a text model."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    device = torch.device(device)
    if name == "tiny":
        with tempfile.TemporaryDirectory() as folder:
            build_tiny(folder)
            return load_backbone(folder, quant, device)
    folder, source = model_source(name, trust_remote_code)
    config = model_config(name, trust_remote_code)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    load = dict(dtype=dtype, device_map={"": device})
    thinker = config.model_type in THINKER_TYPES
    gguf = "gguf_file" in source  # llama.cpp weights: dequantised by transformers, quantised below
    if quant == "nf4" and not gguf:
        load["quantization_config"] = nf4_config(dtype, SKIP_QUANT if thinker else None)
    try:
        if thinker:
            return load_thinker(folder, source, load)
        parts = load_text_model(folder, source, load, gguf or is_causal(config))
    except (OSError, ValueError, ImportError) as e:
        raise cannot_load(name, e) from None  # not found, not a model, gated, a package missing
    if quant == "nf4" and gguf:
        quantize_nf4(parts.model, SKIP_QUANT)
    return parts


def nf4_config(dtype, skip):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    )


def load_thinker(folder, source, load):
    from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(folder, **source, **load)
    processor = Qwen2_5OmniProcessor.from_pretrained(folder, **source)
    processor.video_processor.cap_pixels_per_frame = True  # qwen-vl-utils' pixels per frame
    return Backbone(model, processor.tokenizer, processor)


def is_causal(config):
    return any(a.endswith("ForCausalLM") for a in config.architectures or [])


def load_text_model(folder, source, load, causal):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    kind = AutoModelForCausalLM if causal else AutoModel
    model = kind.from_pretrained(folder, **source, **load)
    side = "left" if causal else "right"  # left padding: a causal LM generates
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side=side, **source)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return Backbone(model, tokenizer)


def model_source(name, trust_remote_code=False):
    """(folder, from_pretrained's keyword arguments) of --model NAME: a hub id, a folder or a .gguf file."""
    # a hub id offline: HF_HUB_OFFLINE=1 reads the local cache alone
    source = dict(trust_remote_code=trust_remote_code)
    folder = str(name)
    if folder.endswith(".gguf"):
        folder, source["gguf_file"] = os.path.split(os.path.abspath(name))
    return folder, source


@functools.cache  # train.py reads it before decoding, load_backbone() again: read once
def model_config(name, trust_remote_code=False):
    """The transformers configuration of --model NAME, read without its weights (do not change it)."""
    from transformers import AutoConfig

    folder, source = model_source(name, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(folder, **source)
    except (OSError, ValueError, ImportError) as e:
        raise cannot_load(name, e) from None


def cannot_load(name, error):
    first_line = str(error).strip().partition("\n")[0]
    return UserError(
        f"--model {name}: cannot be loaded ({first_line}); --model takes a hub id, a local model folder, "
        "a .gguf file, or 'tiny' to run offline"
    )


def check_model(cfg):
    """What the model's configuration says about the run, before the clips are decoded: that it loads, and
    takes the modalities asked for."""
    if cfg.model == "tiny":
        return
    kind = model_config(cfg.model, cfg.trust_remote_code).model_type
    if kind not in THINKER_TYPES and cfg.modalities != "t":
        raise UserError(
            f"--model {cfg.model} is a text model ({kind}): only --modalities t is possible"
        )


def add_run_lora(model, cfg):
    """LoRA over the layers --lora_targets names ('paper': the paper's; none: by architecture)."""
    kind = model.config.model_type
    targets = cfg.lora_targets or LORA_TARGETS.get(kind)
    if targets == "paper":
        targets = PAPER_TARGETS
    if targets is None:
        raise UserError(
            f"no default LoRA targets for a {kind} model: pass --lora_targets REGEX (dotted names of "
            "its linear layers, e.g. the attention and MLP projections)"
        )
    add_lora(model, targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)


# The tiny Thinker's configuration and processor files (tests/test_tiny.py: the code that made them)
TINY_FILES = Path(__file__).with_name("tiny")


def build_tiny(folder, seed=0):
    """Write a random Qwen2.5-Omni Thinker of tiny/'s configuration (about 0.4 M parameters) and its processor
    into `folder`."""
    from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration

    shutil.copytree(TINY_FILES, folder, dirs_exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5OmniThinkerForConditionalGeneration(AutoConfig.from_pretrained(folder))
        # At the default scale (0.02) its logits over the 64-d state stay within +-1.3: no token could be likely.
        nn.init.normal_(model.lm_head.weight, std=0.5)
    model.save_pretrained(folder)
