"""Backbones: a Qwen2.5-Omni Thinker (its text decoder in 4-bit NF4), any transformers text model, a .gguf file
(dequantised by transformers, then NF4 in memory), or `tiny`, a random Thinker built offline and loaded
through the same path. transformers' model classes load here, when a model is built, never when flags are
declared: --help stays cheap."""

import dataclasses
import functools
import os
import tempfile

import torch
from torch import nn

from data import UserError
from lora import add_lora, quantize_nf4

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
    # Without a network, transformers retries the hub for a while: then the local cache alone, at once.
    local = not (os.path.exists(name) or hub_reachable())
    source = dict(trust_remote_code=trust_remote_code, local_files_only=local)
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
    if cfg["model"] == "tiny":
        return
    kind = model_config(cfg["model"], cfg["trust_remote_code"]).model_type
    if kind not in THINKER_TYPES and cfg["modalities"] != "t":
        raise UserError(
            f"--model {cfg['model']} is a text model ({kind}): only --modalities t is possible"
        )


@functools.cache
def hub_reachable():
    """Whether the Hugging Face hub (or the mirror HF_ENDPOINT names) answers within 2 s, through any proxy."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=2)
    except Exception:  # whatever the reason, only the local cache can serve
        return False
    return True


def add_run_lora(model, cfg):
    """LoRA over the layers --lora_targets names ('paper': the paper's; none: by architecture)."""
    kind = model.config.model_type
    targets = cfg["lora_targets"] or LORA_TARGETS.get(kind)
    if targets == "paper":
        targets = PAPER_TARGETS
    if targets is None:
        raise UserError(
            f"no default LoRA targets for a {kind} model: pass --lora_targets REGEX (dotted names of "
            "its linear layers, e.g. the attention and MLP projections)"
        )
    add_lora(model, targets, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"])


def tiny_processor():
    """The Omni processor of the tiny Thinker: a byte-level BPE tokenizer (512 tokens, the Omni special tokens)
    trained offline on TINY_CORPUS, Whisper features, the Qwen2-VL image and video processors."""
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tiny_tokenizer(),
    )


def tiny_tokenizer():
    """A byte-level BPE of 512 tokens with the Omni special tokens, trained in a second on TINY_CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    media = dict(
        image_token="<|IMAGE|>",
        video_token="<|VIDEO|>",
        audio_token="<|AUDIO|>",
        vision_bos_token="<|vision_bos|>",
        vision_eos_token="<|vision_eos|>",
        audio_bos_token="<|audio_bos|>",
        audio_eos_token="<|audio_eos|>",
    )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [TINY_CORPUS],
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *media.values()],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens=media,
    )


def build_tiny(folder, seed=0):
    """Write a random Qwen2.5-Omni Thinker (about 0.4 M parameters) and the tiny processor into `folder`."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    processor = tiny_processor()
    config = thinker_config(processor.tokenizer, **TINY)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
        # At the default scale (0.02) its logits over the 64-d state stay within +-1.3: no token could be likely.
        nn.init.normal_(model.lm_head.weight, std=0.5)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


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


TINY_CORPUS = (
    """system user assistant You are an expert in multimodal sentiment analysis. How positive or
negative is the speaker's opinion in this clip? Answer with a sentiment score from -3 (very negative) to 3
(very positive). Transcript: the movie the plot the acting the soundtrack the ending was is it i think well
honestly really very good great bad awful okay fine -3.0 -2.5 -2.0 -1.5 -1.0 -0.5 0.0 0.5 1.0 1.5 2.0 2.5 3.0
"""
    * 4
)
