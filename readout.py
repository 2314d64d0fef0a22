"""Backbones (a 4-bit Qwen2.5-Omni Thinker, or any transformers text model) and readouts: nn.Modules with
`loss(batch) -> scalar` and `predict(batch) -> (preds (B,), info dict)`. A new one: a class, a line in READOUTS."""

import dataclasses
import functools
import os
import re
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from huggingface_hub.utils import get_session
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2TokenizerFast,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)
from transformers.utils import logging as hf_logging

from data import UserError
from lora import add_lora, quantize_nf4

hf_logging.disable_progress_bar()

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


def load_backbone(name, quant="nf4", device="cpu", trust_remote_code=False):
    """(model, processor): a Qwen2.5-Omni Thinker with its Omni processor, or any other model as a text
    model with its tokenizer. `tiny` is a random Thinker built offline and loaded through the same path."""
    device = torch.device(device)
    if name == "tiny":
        with tempfile.TemporaryDirectory() as folder:
            build_tiny(folder)
            return load_backbone(folder, quant, device)
    folder, source = model_source(name, trust_remote_code)
    config = model_config(name, trust_remote_code)
    thinker = config.model_type in THINKER_TYPES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    load = dict(dtype=dtype, device_map={"": device})
    if quant == "nf4" and "gguf_file" not in source:
        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=SKIP_QUANT if thinker else None,
        )
    try:
        if thinker:
            model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
                folder, **source, **load
            )
            processor = Qwen2_5OmniProcessor.from_pretrained(folder, **source)
            processor.video_processor.cap_pixels_per_frame = True  # qwen-vl-utils' pixels per frame
            return model, processor
        causal = "gguf_file" in source or any(
            a.endswith("ForCausalLM") for a in config.architectures or []
        )
        kind = AutoModelForCausalLM if causal else AutoModel
        model = kind.from_pretrained(folder, **source, **load)
        side = "left" if causal else "right"  # left padding: a causal LM generates
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side=side, **source)
    except (OSError, ValueError, ImportError) as e:
        raise cannot_load(name, e) from None  # not found, not a model, gated, a package missing
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if quant == "nf4" and "gguf_file" in source:  # llama.cpp weights, dequantised by transformers
        quantize_nf4(model, SKIP_QUANT)
    return model, tokenizer


def model_source(name, trust_remote_code=False):
    """(folder, from_pretrained's keyword arguments) of --model NAME: a hub id, a folder or a .gguf file."""
    # Without a network, transformers retries the hub for a while: then the local cache alone, at once.
    local = not (os.path.exists(name) or hub_reachable())
    source = dict(trust_remote_code=trust_remote_code, local_files_only=local)
    folder = str(name)
    if folder.endswith(".gguf"):
        folder, source["gguf_file"] = os.path.split(os.path.abspath(name))
    return folder, source


@functools.cache  # train.py reads it before decoding, build() and load_backbone() again: read once
def model_config(name, trust_remote_code=False):
    """The transformers configuration of --model NAME, read without its weights (do not change it)."""
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
    try:
        get_session().head(constants.ENDPOINT, timeout=2)
    except Exception:  # whatever the reason, only the local cache can serve
        return False
    return True


def tiny_processor():
    """The Omni processor of the tiny Thinker: a byte-level BPE tokenizer (512 tokens, the Omni special tokens)
    trained offline on TINY_CORPUS, Whisper features, the Qwen2-VL image and video processors."""
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
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens=media,
    )
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
    )


def build_tiny(folder, seed=0):
    """Write a random Qwen2.5-Omni Thinker (about 0.4 M parameters) and the tiny processor into `folder`."""
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


# gen's decoding rules (median and mean of sampled answers went: expected beat both on SmolLM2 and Qwen)
DECODE = ("greedy", "expected")


def last_token_index(attention_mask):
    """Position of the last real token of each row, for left or right padding: (B, L) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def at_last_token(h, attention_mask):
    """Each row's state at its last real token: (B, L, H) -> (B, H)."""
    rows = torch.arange(h.shape[0], device=h.device)
    return h[rows, last_token_index(attention_mask)]


@dataclasses.dataclass
class Flag:
    """A run flag that a readout reads: every script shows it as --NAME, and a run saves it. `reading`: it says
    how a trained run is read rather than how it trains, so eval.py may change it (gen's --decode)."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple = None
    reading: bool = False


class Readout(nn.Module):
    """A subclass defines loss(batch) -> scalar and predict(batch) -> (preds (B,), info dict), and declares
    the run flags it reads in `flags`; self.cfg holds their values."""

    flags = ()
    # What an unanswered clip (NaN) is scored as; None: predictions are always numbers.
    fallback = None

    def __init__(self, backbone, tokenizer, cfg):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.cfg = cfg
        # what every call of the model needs: with --audio_in_video, the rope positions of interleaved audio
        self.model_kwargs = dict(use_audio_in_video=True) if cfg["audio_in_video"] else {}

    def text_model(self):
        """The model under the LM head (the Thinker's or a causal LM's), or an encoder itself."""
        return getattr(self.backbone, "model", self.backbone)

    def hidden_states(self, inputs, layer=None):
        """Hidden states (B, L, H) after decoder layer `layer` (0: the embeddings; negative: from the end;
        None: the last layer's, after the final norm). The LM head is never run."""
        model = self.text_model()
        out = model(
            **inputs,
            **self.model_kwargs,
            use_cache=False,
            output_hidden_states=layer is not None,  # every layer's states only when one is read
        )
        if layer is None:
            return out.last_hidden_state
        return out.hidden_states[layer]

    def prepare(self, batches):
        """Called before each evaluation with the training batches (e.g. to refresh statistics)."""


BINS = torch.arange(-30, 31) / 10  # the bins head's values: the 61 answers gen is trained to write


class Disc(Readout):
    """Discriminative readout: a regression head on the last non-padding token's hidden state."""

    flags = (
        Flag(
            "head",
            str,
            "linear",
            "linear; mlp (the paper's); bins (HL-Gauss)",
            ("linear", "mlp", "bins"),
        ),
        Flag("bin_sigma", float, 0.75, "bins: the width of a label's Gaussian, in bins"),
        Flag("layer", int, -1, "read the state after this decoder layer (negative: from the end)"),
        Flag("head_lr", float, None, "the head's peak learning rate (default: --lr)"),
        Flag("pool_norm", str, "none", "standardised pooled states", ("none", "batch")),
        Flag("loss", str, "mse", "linear, mlp: the regression loss", ("mse", "l1")),
    )

    def __init__(self, backbone, tokenizer, cfg):
        super().__init__(backbone, tokenizer, cfg)
        keep_layers(backbone, cfg["layer"])  # the layers after it are neither run nor kept
        hidden = backbone.config.get_text_config().hidden_size
        self.head = make_head(cfg["head"], hidden).to(backbone.device)
        self.loss_fn = dict(mse=F.mse_loss, l1=F.l1_loss)[cfg["loss"]]
        # pool_norm 'batch': pooled states that vary across clips by a few percent of their norm are too
        # alike for the head; standardise them with batch statistics in training, training-set ones after.
        self.norm = nn.Identity()
        if cfg["pool_norm"] == "batch":
            self.norm = nn.BatchNorm1d(hidden, affine=False, momentum=None, device=backbone.device)

    @torch.no_grad()
    def prepare(self, batches):
        if isinstance(self.norm, nn.BatchNorm1d):
            self.eval()
            self.norm.reset_running_stats()
            self.norm.train()  # momentum=None: the running statistics become the plain average
            for b in batches:
                self.norm(self.pooled(b))
            self.norm.eval()

    def pooled(self, batch):
        h = self.hidden_states(batch["inputs"])  # (B, L, H)
        return at_last_token(h, batch["inputs"]["attention_mask"]).float()  # (B, H)

    def forward(self, batch):
        return self.head(self.norm(self.pooled(batch)))  # (B, 1), or (B, bins)

    def loss(self, batch):
        out, labels = self(batch), batch["label"]
        if self.cfg["head"] == "bins":
            return F.cross_entropy(out, hl_gauss(labels, self.cfg["bin_sigma"] * 0.1))
        return self.loss_fn(out[:, 0], labels)

    @torch.no_grad()
    def predict(self, batch):
        out = self(batch)
        if self.cfg["head"] != "bins":
            return out[:, 0], {}
        # The predictive distribution over the bins: its mean, and its std per clip
        p = out.softmax(-1)
        values = BINS.to(p.device)
        mean = p @ values
        return mean, dict(std=(p @ values**2 - mean**2).clamp(min=0).sqrt())


def make_head(kind, hidden):
    """linear: one layer. mlp: the paper's, hidden -> 256 -> 1 with LayerNorm, ReLU and dropout 0.2.
    bins: one layer to the logits of the 61 bins."""
    if kind == "mlp":
        return nn.Sequential(
            nn.LayerNorm(hidden),
            nn.Linear(hidden, 256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 1),
        )
    return nn.Linear(hidden, len(BINS) if kind == "bins" else 1)


def hl_gauss(labels, sigma):
    """HL-Gauss targets (Farebrother et al., 2024): each label's Gaussian (std sigma) integrated over the
    bins, which end halfway between their values; the mass beyond the outer bins goes to them."""
    edges = torch.cat([BINS[:1] - 1e3, (BINS[1:] + BINS[:-1]) / 2, BINS[-1:] + 1e3]).to(
        labels.device
    )
    cdf = torch.special.ndtr((edges - labels[:, None]) / sigma)
    return cdf[:, 1:] - cdf[:, :-1]


def keep_layers(backbone, layer):
    """Cut the decoder after `layer` (0: the embeddings; negative: from the end), so that its last hidden
    state is the state output_hidden_states gives there: the later layers and the final norm go."""
    # The decoder's layers: the backbone's largest ModuleList (the towers' are smaller)
    lists = {n: m for n, m in backbone.named_modules() if isinstance(m, nn.ModuleList)}
    name = max(lists, key=lambda n: sum(p.numel() for p in lists[n].parameters()))
    count = len(lists[name])
    if not -count - 1 <= layer <= count:
        raise UserError(
            f"--layer {layer}: the model has {count} decoder layers (0 to {count}, or -1 to {-count - 1})"
        )
    keep = layer % (count + 1)
    if keep == count:
        return
    backbone.set_submodule(name, lists[name][:keep])
    decoder = backbone.get_submodule(name.rpartition(".")[0])
    if hasattr(decoder, "norm"):
        decoder.norm = nn.Identity()


class PromptCache:
    """A batch of prompts run once, their keys and values kept for what follows them (nanochat's KV cache):
    a row per prompt at first; `select` chooses which rows go on, `feed` runs tokens after each row's."""

    def __init__(self, model, inputs, model_kwargs):
        mask = inputs["attention_mask"]
        numbered = {}  # real tokens numbered from 0 past the padding, as generate() does
        if not hasattr(model, "rope_deltas"):  # (the Thinker numbers them itself)
            numbered["position_ids"] = mask.cumsum(1) - 1
        out = model(**inputs, **model_kwargs, **numbered, use_cache=True)
        self.model = model
        self.cache = out.cache
        self.mask = mask  # (rows, tokens so far)
        # (rows, 1): the next token's position, past the Thinker's rope offset
        self.position = mask.sum(1, True) + getattr(model, "rope_deltas", 0)
        self.last = out.last_hidden_state[:, -1]  # (rows, H)

    def select(self, rows):
        """Keep these rows, in this order (a row may be kept more than once)."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.position = self.position[rows]

    def feed(self, ids):
        """Run tokens (rows, n) after each row's; `last` becomes the state after the last of them (rows, H)."""
        positions = self.position + torch.arange(ids.shape[1], device=ids.device)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], 1)
        out = self.model(
            input_ids=ids,
            cache=self.cache,
            use_cache=True,
            attention_mask=self.mask,
            position_ids=positions,
        )
        self.position += ids.shape[1]
        self.last = out.last_hidden_state[:, -1]


class Gen(Readout):
    """Generative readout: the model writes the score as text, which parse_score reads (an unparseable answer
    is NaN). Trained with cross-entropy on the answer (the label with one decimal, then the end token).
    --decode: greedy, or the expected answer under the model's probabilities."""

    flags = (
        Flag("decode", str, "greedy", "how answers become a prediction", DECODE, reading=True),
        Flag("max_new_tokens", int, 8, "at most this many tokens are generated", reading=True),
        Flag("parse_fallback", float, 0.0, "the prediction of an unparseable answer", reading=True),
    )

    def __init__(self, backbone, tokenizer, cfg):
        super().__init__(backbone, tokenizer, cfg)
        if not backbone.can_generate():
            raise UserError(
                f"--readout gen needs a causal LM; {cfg['model']} is a "
                f"{backbone.config.model_type} model that cannot generate"
            )
        eos = backbone.generation_config.eos_token_id  # the answer ends with the token that stops
        self.end_id = eos[0] if isinstance(eos, list) else eos
        if self.end_id is None:
            raise UserError(
                f"--readout gen: {cfg['model']} has no eos_token_id in its generation config"
            )
        self.fallback = cfg["parse_fallback"]

    def answer(self, label, device):
        """The token ids of the answer a label is trained as: its value with one decimal, the end token."""
        text = f"{round(label, 1) + 0.0:.1f}"  # + 0.0: no -0.0
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return torch.tensor([*ids, self.end_id], device=device)

    def with_answers(self, inputs, labels):
        """Each prompt followed by its answer (padded on the right, after every real token, so that it
        changes none of them) -> (inputs, targets: the answers' ids, else -100)."""
        answers = [self.answer(y, labels.device) for y in labels.tolist()]
        ids = pad_sequence(answers, batch_first=True, padding_value=self.tokenizer.pad_token_id)
        real = pad_sequence([torch.ones_like(a) for a in answers], batch_first=True)
        prompt = torch.full_like(inputs["input_ids"], -100)
        targets = torch.cat([prompt, ids.masked_fill(real == 0, -100)], 1)
        mask = torch.cat([inputs["attention_mask"], real], 1)
        return dict(
            inputs, input_ids=torch.cat([inputs["input_ids"], ids], 1), attention_mask=mask
        ), targets

    def token_loss(self, inputs, targets):
        """Cross-entropy of the tokens where targets != -100; the LM head runs on those positions only."""
        h = self.hidden_states(inputs)[:, :-1]  # position t predicts token t + 1
        keep = targets[:, 1:] != -100
        return F.cross_entropy(self.backbone.lm_head(h[keep]).float(), targets[:, 1:][keep])

    def loss(self, batch):
        return self.token_loss(*self.with_answers(batch["inputs"], batch["label"]))

    @torch.no_grad()
    def predict(self, batch):
        inputs = batch["inputs"]
        if self.cfg["decode"] == "expected":  # never unparseable, never out of bounds
            values, loglik = self.answer_loglik(inputs)
            return loglik.softmax(-1) @ values, {}
        out = self.backbone.generate(
            **inputs,
            **self.model_kwargs,
            max_new_tokens=self.cfg["max_new_tokens"],
            do_sample=False,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        written = np.array([parse_score(t) for t in texts], dtype=float)  # None (no number): NaN
        # out_of_bounds: the paper's count of answers outside [-3, 3], before they are clipped
        info = dict(out_of_bounds=int((np.abs(written) > 3).sum()))
        return torch.tensor(written.clip(-3, 3)), info

    def answer_loglik(self, inputs):
        """(values (C,), log-likelihoods (B, C)) of the C = 61 answers gen is trained to write, -3.0 to 3.0
        by 0.1. The prompt runs once; then each prefix the answers share is fed once, level by level."""
        device, B = inputs["input_ids"].device, inputs["input_ids"].shape[0]
        values = BINS.to(device)
        answers = [tuple(self.answer(v, device).tolist()) for v in values.tolist()]
        cache = PromptCache(self.text_model(), inputs, self.model_kwargs)
        loglik = torch.zeros(B, len(answers), device=device)
        prefixes = [()]  # the answers' prefixes in the cache: clip b's prefix j on row b * len + j
        for depth in range(max(map(len, answers))):
            logp = F.log_softmax(self.backbone.lm_head(cache.last).float(), -1)
            logp = logp.view(B, len(prefixes), -1)
            for c, a in enumerate(answers):
                if depth < len(a):
                    loglik[:, c] += logp[:, prefixes.index(a[:depth]), a[depth]]
            longer = sorted({a[: depth + 1] for a in answers if len(a) > depth + 1})
            if not longer:
                break
            parents = [prefixes.index(p[:-1]) for p in longer]  # each goes on from its parent
            cache.select([b * len(prefixes) + j for b in range(B) for j in parents])
            cache.feed(torch.tensor([p[-1] for p in longer] * B, device=device)[:, None])
            prefixes = longer
        return values, loglik


class Mean(Disc):
    """Disc with mean pooling: the average last-layer state over the real tokens, not the last token's."""

    def pooled(self, batch):
        h = self.hidden_states(batch["inputs"])  # (B, L, H)
        mask = batch["inputs"]["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return ((h * mask).sum(1) / mask.sum(1)).float()  # (B, H)


READOUTS = {"disc": Disc, "gen": Gen, "mean": Mean}


# A number: optional sign (+, -, or the Unicode minus, replaced first), then 3, 3., 3.5 or .5; not part of a
# word or a longer number ("Qwen2.5", "v2", "3rd" are not numbers).
NUMBER = r"(?<![\w.])[+-]?(?:\d+\.?\d*|\.\d+)(?!\w)"
CUED = re.compile(
    r"\b(?:score|sentiment|rating|answer)\b[^\w+.-]*(?:(?:is|of|=|would be|be)\b[^\w+.-]*)?("
    + NUMBER
    + ")",
    re.IGNORECASE,
)
# The scale as models echo it from the prompt ("from -3 to 3", "[-3, +3]", "-3 and 3"): not an answer.
SCALE = re.compile(
    r"-\s*3(?:\.0+)?\s*(?:to|and|-|–|—|\.\.\.?|,)\s*\+?3(?:\.0+)?(?![\w.])", re.IGNORECASE
)


def parse_score(text):
    """The score in a text as written (the readout clips it to [-3, 3]), or None: the number after the
    last cue word (score, sentiment, rating, answer), else the first number. Never raises on a string."""
    text = SCALE.sub(" ", text.replace("\u2212", "-"))
    cued = CUED.findall(text)
    number = cued[-1] if cued else next(iter(re.findall(NUMBER, text)), None)
    if number is None:
        return None
    return float(number)


def build(cfg, device, lora=True):
    """(readout, processor) of the run `cfg` describes: backbone, LoRA over it (lora=False: none), readout."""
    check_model(cfg)
    backbone, processor = load_backbone(
        cfg["model"], cfg["quant"], device, cfg["trust_remote_code"]
    )
    kind = backbone.config.model_type
    if lora:
        targets = cfg["lora_targets"] or LORA_TARGETS.get(kind)
        if targets == "paper":
            targets = PAPER_TARGETS
        if targets is None:
            raise UserError(
                f"no default LoRA targets for a {kind} model: pass --lora_targets REGEX (dotted names of "
                "its linear layers, e.g. the attention and MLP projections)"
            )
        add_lora(backbone, targets, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"])
    tokenizer = getattr(processor, "tokenizer", processor)
    return READOUTS[cfg["readout"]](backbone, tokenizer, cfg), processor
