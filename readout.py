"""Backbones (a 4-bit Qwen2.5-Omni Thinker, or any transformers text model) and readouts: nn.Modules with
`loss(batch) -> scalar` and `predict(batch) -> (preds (B,), info dict)`. A new one: a class, a line in READOUTS."""

import functools
import math
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
SKIP_QUANT = [
    "model.audio_tower",
    "model.visual",
    "lm_head",
]  # full dotted prefixes: bare names match nothing
# Default LoRA targets by config.model_type: every decoder layer's attention and MLP projections.
DECODER = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
LORA_TARGETS = {
    "qwen2_5_omni_thinker": r"language_model\." + DECODER,
    "llama": DECODER,
    "qwen2": DECODER,
    "mistral": DECODER,
    "bert": r"encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|"
    r"intermediate\.dense|output\.dense)$",
}


def load_backbone(name, quant="nf4", device="cpu", trust_remote_code=False):
    """(model, processor): a Qwen2.5-Omni Thinker with its Omni processor, or any other model as a text model with
    its tokenizer. `tiny` is a random Thinker built offline and loaded through the very same path."""
    device, folder = torch.device(device), str(name)
    if name == "tiny":
        with tempfile.TemporaryDirectory() as folder:
            build_tiny(folder)
            return load_backbone(folder, quant, device)
    # Without a network, transformers retries the hub for a while: then look in the local cache alone, at once.
    source = dict(
        trust_remote_code=trust_remote_code,
        local_files_only=not (os.path.exists(name) or hub_reachable()),
    )
    if folder.endswith(
        ".gguf"
    ):  # llama.cpp weights: dequantised to float by transformers, then quantised in memory
        folder, source["gguf_file"] = os.path.split(os.path.abspath(name))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        config = AutoConfig.from_pretrained(folder, **source)
        thinker, load = (
            config.model_type in THINKER_TYPES,
            dict(dtype=dtype, device_map={"": device}),
        )
        if quant == "nf4" and "gguf_file" not in source:
            load["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=SKIP_QUANT if thinker else None,
            )
        if thinker:
            model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
                folder, **source, **load
            )
            processor = Qwen2_5OmniProcessor.from_pretrained(folder, **source)
            processor.video_processor.cap_pixels_per_frame = (
                True  # qwen-vl-utils' pixel budget per frame
            )
            return model, processor
        causal = "gguf_file" in source or any(
            a.endswith("ForCausalLM") for a in config.architectures or []
        )
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(
            folder, **source, **load
        )
        tokenizer = AutoTokenizer.from_pretrained(
            folder, padding_side="left" if causal else "right", **source
        )
    except (
        OSError,
        ValueError,
        ImportError,
    ) as e:  # not found, not a model, gated, a package missing
        raise UserError(
            f"--model {name}: cannot be loaded ({str(e).strip().partition(chr(10))[0]}); --model takes a "
            "hub id, a local model folder, a .gguf file, or 'tiny' to run offline"
        ) from None
    tokenizer.pad_token = (
        tokenizer.pad_token or tokenizer.eos_token
    )  # left padding: a causal LM generates
    return (
        quantize_nf4(model, SKIP_QUANT) if quant == "nf4" and "gguf_file" in source else model
    ), tokenizer


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


def last_token_index(attention_mask):
    """Position of the last real token of each row, for left or right padding: (B, L) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class Readout(nn.Module):
    """A subclass defines loss(batch) -> scalar and predict(batch) -> (preds (B,), info dict)."""

    unused_flags = ()  # run flags this readout never reads: a finished run stands for any value of them

    def __init__(self, backbone, tokenizer, cfg):
        super().__init__()
        self.backbone, self.tokenizer, self.cfg = backbone, tokenizer, cfg
        self.model_kwargs = (
            dict(use_audio_in_video=True) if cfg["audio_in_video"] else {}
        )  # for the rope positions

    def hidden_states(self, inputs):
        """Last-layer hidden states (B, L, H): the model under the LM head, which is never run."""
        model = getattr(self.backbone, "model", self.backbone)
        return model(**inputs, **self.model_kwargs, use_cache=False).last_hidden_state

    def prepare(self, batches):
        """Called before each evaluation with the training batches (e.g. to refresh statistics)."""


class Disc(Readout):
    """Discriminative readout: a linear head on the last non-padding token's hidden state."""

    unused_flags = ("decode", "samples", "temperature", "max_new_tokens", "parse_fallback")  # gen's

    def __init__(self, backbone, tokenizer, cfg):
        super().__init__(backbone, tokenizer, cfg)
        hidden = backbone.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1, device=backbone.device)
        self.loss_fn = dict(mse=F.mse_loss, l1=F.l1_loss)[cfg["loss"]]
        # pool_norm 'batch': pooled states that vary across clips by a few percent of their norm are too alike for
        # the head; standardise them with batch statistics in training, training-set ones (prepare()) after.
        self.norm = (
            nn.BatchNorm1d(hidden, affine=False, momentum=None, device=backbone.device)
            if cfg["pool_norm"] == "batch"
            else nn.Identity()
        )

    @torch.no_grad()
    def prepare(self, batches):
        if isinstance(self.norm, nn.BatchNorm1d):
            self.eval()
            self.norm.reset_running_stats()
            self.norm.train()  # momentum=None: the running statistics become the plain average over batches
            for b in batches:
                self.norm(self.pooled(b))
            self.norm.eval()

    def pooled(self, batch):
        h = self.hidden_states(batch["inputs"])  # (B, L, H)
        last = last_token_index(batch["inputs"]["attention_mask"])  # (B,)
        return h[torch.arange(h.shape[0], device=h.device), last].float()  # (B, H)

    def forward(self, batch):
        return self.head(self.norm(self.pooled(batch))).squeeze(-1)  # (B,)

    def loss(self, batch):
        return self.loss_fn(self(batch), batch["label"])

    @torch.no_grad()
    def predict(self, batch):
        return self(batch), {}


class Gen(Readout):
    """Generative readout: the model writes the score as text, which parse_score reads (an unparseable answer is NaN).
    Trained with cross-entropy on the answer (the label with one decimal, then the end token). --decode: greedy, the
    median or mean of --samples answers that parse, or the expected answer under the model's probabilities."""

    unused_flags = ("pool_norm", "loss")  # the regression head's

    def __init__(self, backbone, tokenizer, cfg):
        super().__init__(backbone, tokenizer, cfg)
        if not backbone.can_generate():
            raise UserError(
                f"--readout gen needs a causal LM; {cfg['model']} is a {backbone.config.model_type} "
                "model that cannot generate"
            )
        eos = (
            backbone.generation_config.eos_token_id
        )  # the answer ends with the token that stops generation
        self.end_id = eos[0] if isinstance(eos, list) else eos
        if self.end_id is None:
            raise UserError(
                f"--readout gen: {cfg['model']} has no eos_token_id in its generation config"
            )

    def answer(self, label, device):
        """The token ids of the answer a label is trained as: its value with one decimal, then the end token."""
        ids = self.tokenizer(
            f"{round(label, 1) + 0.0:.1f}", add_special_tokens=False
        ).input_ids  # + 0.0: no -0.0
        return torch.tensor([*ids, self.end_id], device=device)

    def with_answers(self, inputs, labels):
        """Each prompt followed by its answer, left-padded again -> (inputs, targets: the answer's ids, else -100)."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        answers = [self.answer(y, ids.device) for y in labels.tolist()]
        rows = [torch.cat([ids[i][mask[i].bool()], a]) for i, a in enumerate(answers)]
        targets = [
            torch.cat([torch.full_like(r[: -len(a)], -100), a]) for r, a in zip(rows, answers)
        ]
        pad = functools.partial(pad_sequence, batch_first=True, padding_side="left")
        return (
            {
                **inputs,
                "input_ids": pad(rows, padding_value=self.tokenizer.pad_token_id),
                "attention_mask": pad([torch.ones_like(r) for r in rows]),
            },
            pad(targets, padding_value=-100),
        )

    def token_loss(self, inputs, targets):
        """Cross-entropy of the tokens where targets != -100; the LM head runs on those positions only."""
        h = self.hidden_states(inputs)[:, :-1]  # position t predicts token t + 1
        keep = targets[:, 1:] != -100
        return F.cross_entropy(self.backbone.lm_head(h[keep]).float(), targets[:, 1:][keep])

    def loss(self, batch):
        return self.token_loss(*self.with_answers(batch["inputs"], batch["label"]))

    @torch.no_grad()
    def predict(self, batch):
        rule, inputs = self.cfg["decode"], batch["inputs"]
        if rule == "expected":
            values, loglik = self.answer_loglik(inputs)
            return loglik.softmax(-1) @ values, dict(parse_failures=0, generated_tokens=0)
        k = 1 if rule == "greedy" else self.cfg["samples"]
        new = (
            self.sample(inputs, k)
            if k > 1
            else self.backbone.generate(  # greedy: as generate() does it
                **inputs,
                **self.model_kwargs,
                max_new_tokens=self.cfg["max_new_tokens"],
                do_sample=False,
            )[:, inputs["input_ids"].shape[1] :]
        )  # (B * k, <= max_new_tokens): clip i's answers: rows i * k to i * k + k-1
        scores = [
            parse_score(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)
        ]
        preds = combine(
            np.array([math.nan if s is None else s for s in scores]).reshape(-1, k), rule
        )
        ended = torch.isin(
            new, torch.tensor(self.backbone.generation_config.eos_token_id, device=new.device)
        )
        generated = torch.where(
            ended.any(-1), ended.int().argmax(-1) + 1, new.shape[1]
        ).sum()  # up to the end token
        return torch.tensor(preds), dict(
            parse_failures=int(np.isnan(preds).sum()), generated_tokens=int(generated)
        )

    def sample(self, inputs, k):
        """k answers per clip, drawn at --temperature from one run of the prompt -> their tokens (B * k, T)."""
        h, step = self.after_prompt(inputs, k)
        eos, tokens = (
            torch.tensor(self.backbone.generation_config.eos_token_id, device=h.device).view(-1),
            [],
        )
        ended = torch.zeros(len(h), dtype=torch.bool, device=h.device)
        while len(tokens) < self.cfg["max_new_tokens"] and not ended.all():
            logits = self.backbone.lm_head(
                h if not tokens else step(tokens[-1][:, None])[:, -1]
            ).float()
            token = (logits / self.cfg["temperature"]).softmax(-1).multinomial(1)[:, 0]
            tokens.append(
                torch.where(ended, self.end_id, token)
            )  # an ended answer is padded with the end token
            ended |= torch.isin(token, eos)
        return torch.stack(tokens, 1)

    def after_prompt(self, inputs, k):
        """Run the prompt once, keeping k copies of each clip's keys and values -> (the last state (B * k, H), step:
        tokens (rows, n) after those fed so far -> their states; `rows`: which row each continues (default: its own)."""
        model, mask = getattr(self.backbone, "model", self.backbone), inputs["attention_mask"]
        # Real tokens are numbered from 0 past the padding, as generate() does (the Thinker numbers them itself)
        numbered = {} if hasattr(model, "rope_deltas") else dict(position_ids=mask.cumsum(1) - 1)
        out = model(**inputs, **self.model_kwargs, **numbered, use_cache=True)
        out.cache.batch_repeat_interleave(k)
        start = mask.sum(1, True) + getattr(
            model, "rope_deltas", 0
        )  # the Thinker's rope offset for what follows
        fed = dict(mask=mask.repeat_interleave(k, 0), start=start.repeat_interleave(k, 0))

        def step(ids, rows=None):
            if rows is not None:
                out.cache.batch_select_indices(rows)
                fed.update(mask=fed["mask"][rows], start=fed["start"][rows])
            after = fed["mask"].shape[1] - mask.shape[1]  # tokens fed after the prompt so far
            positions = fed["start"] + after + torch.arange(ids.shape[1], device=ids.device)
            fed["mask"] = torch.cat([fed["mask"], torch.ones_like(ids)], 1)
            return model(
                input_ids=ids,
                cache=out.cache,
                use_cache=True,
                attention_mask=fed["mask"],
                position_ids=positions,
            ).last_hidden_state

        return out.last_hidden_state[:, -1].repeat_interleave(k, 0), step

    def answer_loglik(self, inputs):
        """(values (C,), log-likelihoods (B, C)) of the C = 61 answers gen is trained to write, -3.0 to 3.0 by 0.1.
        The prompt runs once; then each prefix the answers share is fed once, level by level, on cached keys."""
        device, B = inputs["input_ids"].device, inputs["input_ids"].shape[0]
        values = torch.arange(-30, 31, device=device) / 10
        answers = [tuple(self.answer(v, device).tolist()) for v in values.tolist()]
        h, step = self.after_prompt(inputs, 1)
        loglik, level = (
            torch.zeros(B, len(answers), device=device),
            [()],
        )  # level: the prefixes whose states h holds
        for depth in range(max(map(len, answers))):
            logp = F.log_softmax(self.backbone.lm_head(h).float(), -1).view(B, len(level), -1)
            for c, a in enumerate(answers):
                if depth < len(a):
                    loglik[:, c] += logp[:, level.index(a[:depth]), a[depth]]
            nodes = sorted({a[: depth + 1] for a in answers if len(a) > depth + 1})
            if nodes:  # each next prefix continues its parent's row
                rows = [b * len(level) + level.index(n[:-1]) for b in range(B) for n in nodes]
                h = step(torch.tensor([n[-1] for n in nodes] * B, device=device)[:, None], rows)[
                    :, -1
                ]
            level = nodes
        return values, loglik


def combine(scores, rule):
    """(B, k) parsed answers (NaN: unparseable) -> (B,): their median or mean; NaN where none parsed."""
    reduce = np.mean if rule == "mean" else np.median  # greedy: k = 1
    return np.array(
        [reduce(row[~np.isnan(row)]) if (~np.isnan(row)).any() else math.nan for row in scores]
    )


class Mean(Disc):
    """Disc with mean pooling: the average last-layer state over the real tokens, not the last token's."""

    def pooled(self, batch):
        h = self.hidden_states(batch["inputs"])  # (B, L, H)
        mask = batch["inputs"]["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return ((h * mask).sum(1) / mask.sum(1)).float()  # (B, H)


READOUTS = {"disc": Disc, "gen": Gen, "mean": Mean}
DECODE = ("greedy", "median", "mean", "expected")  # gen's decoding rules


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
    """The score in a text, clipped to [-3, 3], or None: the number after the last cue word (score, sentiment,
    rating, answer), else the first number. Never raises on a string."""
    text = SCALE.sub(" ", text.replace("\u2212", "-"))
    cued = CUED.findall(text)
    number = cued[-1] if cued else next(iter(re.findall(NUMBER, text)), None)
    return None if number is None else min(max(float(number), -3.0), 3.0)


def build(cfg, device, lora=True):
    """(readout, processor) of the run `cfg` describes: backbone, LoRA over it (lora=False: none), readout."""
    backbone, processor = load_backbone(
        cfg["model"], cfg["quant"], device, cfg["trust_remote_code"]
    )
    kind = backbone.config.model_type
    if kind not in THINKER_TYPES and cfg["modalities"] != "t":
        raise UserError(
            f"--model {cfg['model']} is a text model ({kind}): only --modalities t is possible"
        )
    if lora:
        targets = cfg["lora_targets"] or LORA_TARGETS.get(kind)
        if targets is None:
            raise UserError(
                f"no default LoRA targets for a {kind} model: pass --lora_targets REGEX (dotted names "
                "of its linear layers, e.g. the attention and MLP projections)"
            )
        add_lora(backbone, targets, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"])
    return READOUTS[cfg["readout"]](
        backbone, getattr(processor, "tokenizer", processor), cfg
    ), processor
