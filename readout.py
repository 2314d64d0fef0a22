"""Backbones and readouts: how a number is read out of a (4-bit) Qwen2.5-Omni Thinker, or of any
transformers text model (an encoder or a causal LM) given transcripts alone.

A readout is an nn.Module over the backbone with `loss(batch) -> scalar` and
`predict(batch) -> (preds (B,), info dict)`. A new one is one class and one line in READOUTS.
"""
import math
import re
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                          Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration)
from transformers.utils import logging as hf_logging

from lora import DEFAULT_TARGETS, add_lora, bnb

hf_logging.disable_progress_bar()

# Only the text decoder is 4-bit: the audio and vision towers and the LM head stay in bfloat16 (GPU) or
# float32 (CPU). Full dotted prefixes: bare names match nothing.
SKIP_QUANT = ["model.audio_tower", "model.visual", "lm_head"]


# Default LoRA targets by config.model_type: every layer's attention and MLP projections.
DECODER_TARGETS = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
LORA_TARGETS = {"qwen2_5_omni_thinker": DEFAULT_TARGETS, "llama": DECODER_TARGETS, "qwen2": DECODER_TARGETS,
                "mistral": DECODER_TARGETS,
                "bert": r"encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|"
                        r"intermediate\.dense|output\.dense)$"}
THINKER_TYPES = ("qwen2_5_omni", "qwen2_5_omni_thinker")


def load_backbone(name, quant="nf4", device="cpu", trust_remote_code=False):
    """(model, processor) from a hub id or a local folder. A Qwen2.5-Omni Thinker comes with its Omni
    processor; any other model is text-only and comes with its tokenizer as the processor, loaded as a causal
    LM when it is one; a .gguf file is a causal LM. `tiny` is a random Thinker built offline and loaded through
    the very same path; `random-7b` a 7B-shaped one with random NF4 weights, built in memory (for bench.py).
    quant: 'nf4' (double-quantised 4-bit) or 'none'. trust_remote_code: run Python code shipped with the model."""
    device = torch.device(device)
    if name == "random-7b":
        return random_thinker("7b", quant, device)
    if name == "tiny":
        with tempfile.TemporaryDirectory() as folder:
            build_tiny(folder)
            return load_backbone(folder, quant, device)
    if str(name).endswith(".gguf"):
        return load_gguf(name, quant, device)
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    thinker = config.model_type in THINKER_TYPES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = dict(dtype=dtype, device_map={"": device}, trust_remote_code=trust_remote_code)
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=SKIP_QUANT if thinker else None)
    elif quant != "none":
        raise ValueError(f"--quant must be 'nf4' or 'none', not {quant!r}")
    if thinker:
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(name, **kwargs)
        processor = Qwen2_5OmniProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        processor.video_processor.cap_pixels_per_frame = True  # qwen-vl-utils' pixel budget per frame
        return model, processor
    causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left" if causal else "right",  # left: to generate
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_gguf(path, quant="nf4", device="cpu"):
    """A causal LM from one llama.cpp GGUF file (dequantised to float by transformers, which needs the `gguf`
    package), then quantised to NF4 in memory like any other backbone."""
    import importlib.util
    import os
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"--model {path}: reading a .gguf file needs the optional package gguf (pip install gguf)")
    if not os.path.isfile(path):
        raise ValueError(f"--model {path}: no such file")
    if quant not in ("nf4", "none"):
        raise ValueError(f"--quant must be 'nf4' or 'none', not {quant!r}")
    folder, file = os.path.split(os.path.abspath(path))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (quantize_nf4(model) if quant == "nf4" else model), tokenizer


def quantize_nf4(model, skip=SKIP_QUANT):
    """Replace, in place, every nn.Linear of an already-loaded model by a double-quantised NF4 Linear4bit on
    the same device (what BitsAndBytesConfig does at load time), except those under a dotted prefix in `skip`
    (the LM head, the towers). Embeddings are not linear layers and keep their dtype. Returns the model."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        weight = module.weight.data
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=q).to(weight.device)  # .to() quantises
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def tiny_processor():
    """The Omni processor of the tiny Thinker: a byte-level BPE tokenizer (512 tokens, the Omni special tokens)
    trained offline on TINY_CORPUS, Whisper features, the Qwen2-VL image and video processors."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    media = dict(image_token="<|IMAGE|>", video_token="<|VIDEO|>", audio_token="<|AUDIO|>",
                 vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
                 audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>")
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *media.values()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TINY_CORPUS], trainer)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", extra_special_tokens=media)
    return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                                feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer)


def build_tiny(folder, seed=0):
    """Write a random Qwen2.5-Omni Thinker (about 0.4 M parameters) with the tiny processor into `folder`,
    deterministically in `seed`."""
    processor = tiny_processor()
    config = thinker_config(processor.tokenizer, "tiny")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
        # At the default init scale (0.02) the LM head's logits stay within about +-1.3 of each other over the
        # normed 64-d state, so no token can be made likely (cross-entropy stays above 5): give it a scale at
        # which a trained LM head works.
        nn.init.normal_(model.lm_head.weight, std=0.5)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# Thinker shapes. "7b" is Qwen2.5-Omni-7B's published Thinker configuration (transformers' default vision
# config is not: its hidden_size 3584 is the output width; the 7B's vision blocks are 1280 wide).
THINKER_SHAPES = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, mrope_section=[4, 6, 6], max_position_embeddings=4096),
                 audio=dict(encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128, d_model=64),
                 vision=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[0])),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, mrope_section=[16, 24, 24], vocab_size=152064,
                         max_position_embeddings=32768, tie_word_embeddings=False),
               audio=dict(encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           fullatt_block_indexes=[7, 15, 23, 31]))}


def thinker_config(tokenizer, shape="tiny"):
    """A Qwen2_5OmniThinkerConfig of one of THINKER_SHAPES whose special token ids are `tokenizer`'s."""
    from transformers import Qwen2_5OmniThinkerConfig
    ids, s = tokenizer.get_vocab(), THINKER_SHAPES[shape]
    text = {**s["text"]}
    mrope_section = text.pop("mrope_section")
    # Gotchas: mrope_section sums to head_dim / 2; the towers' outputs match the text hidden size;
    # vision_start_token_id is read by the rope code even for text-only input.
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=text.pop("vocab_size", len(tokenizer)),
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=mrope_section),
                         pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], **text),
        audio_config=dict(num_mel_bins=128, output_dim=text["hidden_size"], **s["audio"]),
        vision_config=dict(out_hidden_size=text["hidden_size"], **s["vision"]),
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        user_token_id=ids["<|im_start|>"])


def random_thinker(shape="7b", quant="nf4", device="cuda", seed=0):
    """A Thinker of one of THINKER_SHAPES with random weights, its text decoder quantised to NF4 in memory (no
    checkpoint needed), with the tiny model's processor (whose token ids are valid for it): for benchmarks."""
    processor = tiny_processor()
    processor.video_processor.cap_pixels_per_frame = True
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    default, device = torch.get_default_dtype(), torch.device(device)
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)  # the same weights each time: two copies can be compared
            model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(processor.tokenizer, shape))
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    if quant == "nf4":
        quantize_nf4(model)
    return model.eval(), processor


TINY_CORPUS = """system user assistant You are an expert in multimodal sentiment analysis. How positive or
negative is the speaker's opinion in this clip? Answer with a sentiment score from -3 (very negative) to 3
(very positive). Transcript: the movie the plot the acting the soundtrack the ending was is it i think well
honestly really very good great bad awful okay fine -3.0 -2.5 -2.0 -1.5 -1.0 -0.5 0.0 0.5 1.0 1.5 2.0 2.5 3.0
""" * 4


def last_token_index(attention_mask):
    """Position of the last real token of each row, for left or right padding: (B, L) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class Readout(nn.Module):
    unused_flags = ()  # run flags this readout never reads: a finished run stands for any value of them

    def __init__(self, backbone, tokenizer, cfg):
        super().__init__()
        self.backbone, self.tokenizer = backbone, tokenizer

    def hidden_states(self, inputs):
        """Last-layer hidden states (B, L, H): the model under the LM head (if any); the head is never run."""
        return getattr(self.backbone, "model", self.backbone)(**inputs, use_cache=False).last_hidden_state

    def prepare(self, batches):
        """Called before each evaluation with the training batches (e.g. to refresh statistics)."""

    def loss(self, batch):
        raise NotImplementedError

    def predict(self, batch):
        raise NotImplementedError


class Disc(Readout):
    """Discriminative readout: a regression head on the last non-padding token's hidden state."""

    def __init__(self, backbone, tokenizer, cfg):
        super().__init__(backbone, tokenizer, cfg)
        hidden = backbone.config.get_text_config().hidden_size
        if cfg["head"] == "linear":
            head = nn.Linear(hidden, 1)
        elif cfg["head"] == "mlp":
            head = nn.Sequential(nn.Linear(hidden, hidden // 4), nn.GELU(), nn.Linear(hidden // 4, 1))
        else:
            raise ValueError(f"--head must be 'linear' or 'mlp', not {cfg['head']!r}")
        self.head = head.to(backbone.device)
        self.loss_fn = dict(mse=F.mse_loss, l1=F.l1_loss)[cfg["loss"]]
        # pool_norm 'batch': the pooled states can vary across clips by a few percent of their norm (audio-only
        # prompts on the tiny model), too little for the head to see; standardise them with batch statistics
        # in training and with training-set statistics, recomputed by prepare(), when predicting.
        self.norm = nn.BatchNorm1d(hidden, affine=False, momentum=None, device=backbone.device) \
            if cfg["pool_norm"] == "batch" else nn.Identity()

    @torch.no_grad()
    def prepare(self, batches):
        """Recompute the normalisation's statistics over the training batches with the current weights."""
        if isinstance(self.norm, nn.BatchNorm1d):
            self.eval()
            self.norm.reset_running_stats()
            self.norm.train()  # momentum=None: running statistics become the plain average over batches
            for b in batches:
                self.norm(self.pooled(b))
            self.norm.eval()

    def pooled(self, batch):
        h = self.hidden_states(batch["inputs"])                          # (B, L, H)
        last = last_token_index(batch["inputs"]["attention_mask"])       # (B,)
        return h[torch.arange(h.shape[0], device=h.device), last].float()  # (B, H)

    def forward(self, batch):
        return self.head(self.norm(self.pooled(batch))).squeeze(-1)  # (B,)

    def loss(self, batch):
        return self.loss_fn(self(batch), batch["label"])

    @torch.no_grad()
    def predict(self, batch):
        return self(batch), {}


class Gen(Readout):
    """Generative readout: the model writes the score as text (greedy decoding), which parse_score reads.
    Trained with next-token cross-entropy on the answer alone: the label with one decimal, then the end token.
    An unparseable answer is NaN in preds (eval.py scores it with --parse_fallback and counts it)."""
    unused_flags = ("head", "pool_norm", "loss")  # the regression head's

    def __init__(self, backbone, tokenizer, cfg):
        super().__init__(backbone, tokenizer, cfg)
        if not backbone.can_generate():
            raise ValueError(f"--readout gen needs a causal LM; {cfg['model']} is a {backbone.config.model_type} "
                             "model that cannot generate")
        self.max_new_tokens = cfg["max_new_tokens"]
        # The answer ends with the token that stops generation (<|im_end|> for Qwen and SmolLM2 chat models).
        eos = backbone.generation_config.eos_token_id
        self.end_id = eos[0] if isinstance(eos, list) else eos
        if self.end_id is None:
            raise ValueError(f"--readout gen: {cfg['model']} has no eos_token_id in its generation config")

    def with_answers(self, inputs, labels):
        """Each prompt followed by its answer, left-padded again -> (inputs, targets (B, L)); targets hold
        the answer's token ids where they are to be predicted and -100 (ignored) on prompt and padding."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        end = ids.new_tensor([self.end_id])
        answers = [torch.cat([self.tokenizer(f"{round(y, 1) + 0.0:.1f}", add_special_tokens=False,
                                             return_tensors="pt").input_ids[0].to(ids.device), end])
                   for y in labels.tolist()]
        rows = [torch.cat([ids[i][mask[i].bool()], a]) for i, a in enumerate(answers)]
        length = max(len(r) for r in rows)
        new_ids = ids.new_full((len(rows), length), self.tokenizer.pad_token_id)
        new_mask, targets = torch.zeros_like(new_ids), torch.full_like(new_ids, -100)
        for i, (row, answer) in enumerate(zip(rows, answers)):
            new_ids[i, length - len(row):], new_mask[i, length - len(row):] = row, 1
            targets[i, length - len(answer):] = answer
        return {**inputs, "input_ids": new_ids, "attention_mask": new_mask}, targets

    def token_loss(self, inputs, targets):
        """Cross-entropy of the tokens where targets != -100; the LM head runs on those positions only."""
        h = self.hidden_states(inputs)[:, :-1]          # position t predicts token t + 1
        targets = targets[:, 1:]
        keep = targets != -100
        return F.cross_entropy(self.backbone.lm_head(h[keep]).float(), targets[keep])

    def loss(self, batch):
        return self.token_loss(*self.with_answers(batch["inputs"], batch["label"]))

    @torch.no_grad()
    def predict(self, batch):
        inputs = batch["inputs"]
        out = self.backbone.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]     # the generated tokens only: (B, <= max_new_tokens)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        scores = [parse_score(t) for t in texts]
        preds = torch.tensor([math.nan if s is None else s for s in scores])
        # Tokens generated per clip: up to and including the first end token (rows that end early are padded).
        ended = torch.isin(new, torch.tensor(self.backbone.generation_config.eos_token_id, device=new.device))
        lengths = torch.where(ended.any(-1), ended.int().argmax(-1) + 1, new.shape[1])
        return preds, dict(parse_failures=scores.count(None), generated_tokens=int(lengths.sum()))


class Mean(Disc):
    """Disc with mean pooling: the average last-layer state over the real tokens, not the last token's."""

    def pooled(self, batch):
        h = self.hidden_states(batch["inputs"])                                # (B, L, H)
        mask = batch["inputs"]["attention_mask"].unsqueeze(-1).to(h.dtype)     # (B, L, 1)
        return ((h * mask).sum(1) / mask.sum(1)).float()                       # (B, H)


READOUTS = {"disc": Disc, "gen": Gen, "mean": Mean}


# A number: optional sign (+, -, or the Unicode minus, replaced first), then 3, 3., 3.5 or .5; not part of a
# word or a longer number ("Qwen2.5", "v2", "3rd" are not numbers).
_NUMBER = r"(?<![\w.])[+-]?(?:\d+\.?\d*|\.\d+)(?!\w)"
_CUED = re.compile(r"\b(?:score|sentiment|rating|answer)\b[^\w+.-]*(?:(?:is|of|=|would be|be)\b[^\w+.-]*)?("
                   + _NUMBER + ")", re.IGNORECASE)
# The scale as models echo it from the prompt ("from -3 to 3", "[-3, +3]", "-3 and 3"): not an answer.
_SCALE = re.compile(r"-\s*3(?:\.0+)?\s*(?:to|and|-|–|—|\.\.\.?|,)\s*\+?3(?:\.0+)?(?![\w.])", re.IGNORECASE)


def parse_score(text):
    """The score in a generated text, clipped to [-3, 3], or None. The number after the last cue word
    (score, sentiment, rating, answer) wins, else the first number. Never raises on a string."""
    text = _SCALE.sub(" ", text.replace("\u2212", "-"))
    cued = _CUED.findall(text)
    number = cued[-1] if cued else next(iter(re.findall(_NUMBER, text)), None)
    if number is None:
        return None
    return min(max(float(number), -3.0), 3.0)


def build(cfg, device, lora=True):
    """The run a config describes: backbone, LoRA over it (unless lora=False: zero-shot), readout on top
    -> (readout, processor)."""
    if cfg["readout"] not in READOUTS:
        raise ValueError(f"--readout must be one of {', '.join(READOUTS)}, not {cfg['readout']!r}")
    backbone, processor = load_backbone(cfg["model"], cfg["quant"], device, cfg["trust_remote_code"])
    kind = backbone.config.model_type
    if kind not in THINKER_TYPES and cfg["modalities"] != "t":
        raise ValueError(f"{cfg['model']} is a text model ({kind}): only --modalities t is possible")
    if lora:
        targets = cfg["lora_targets"] or LORA_TARGETS.get(kind)
        if targets is None:
            raise ValueError(f"no default LoRA targets for a {kind} model: pass --lora_targets REGEX (dotted "
                             "names of its linear layers, e.g. the attention and MLP projections)")
        add_lora(backbone, targets, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"])
    tokenizer = getattr(processor, "tokenizer", processor)
    return READOUTS[cfg["readout"]](backbone, tokenizer, cfg), processor
