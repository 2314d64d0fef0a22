"""Readouts: nn.Modules with `loss(batch) -> scalar` and `predict(batch) -> (preds (B, targets), info dict)` over a
backbone. A new one: a class, a line in READOUTS (in the user's own file too: --readout_file)."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from backbone import add_run_lora, check_model, load_backbone
from settings import Setting
from util import UserError

# gen's decoding rules: greedy, and the Bayes rules over its answers' probabilities for squared error (their
# mean) and absolute error (their median). The median and mean of sampled answers went: expected beat both.
DECODE = ("greedy", "expected", "median")
OBJECTIVES = ("ce", "raft", "both")


def last_token_index(attention_mask):
    """Position of the last real token of each row, for left or right padding: (B, L) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def at_last_token(h, attention_mask):
    """Each row's state at its last real token: (B, L, H) -> (B, H)."""
    rows = torch.arange(h.shape[0], device=h.device)
    return h[rows, last_token_index(attention_mask)]


class Readout(nn.Module):
    """A subclass defines loss(batch) -> scalar and predict(batch) -> (preds (B, targets), info dict), and declares
    the run settings it reads in `settings`; self.cfg holds the run's (cfg.NAME). score(batch) -> (B, targets),
    differentiable, is what explain.py explains (disc and gen define one; a readout in the user's own file
    inherits theirs or defines its own). predict's info may hold values per clip (eval.py --predictions writes
    them) and the standard counts that evaluation sums: `parse_failures` (answers without a number, scored as
    some fallback) and `out_of_bounds` (answers outside the scale, before they are clipped)."""

    settings = ()
    zero_shot = False  # whether an untrained model (no LoRA, no head) can be read out (gen)

    def __init__(self, parts, cfg):
        super().__init__()
        self.backbone = parts.model
        self.tokenizer = parts.tokenizer
        self.cfg = cfg
        # what every call of the model needs: with --audio_in_video, the rope positions of interleaved audio
        self.model_kwargs = dict(use_audio_in_video=True) if cfg.audio_in_video else {}

    def param_groups(self, lr):
        """[(parameters, peak learning rate)] of what trains: by default everything at --lr."""
        return [([p for p in self.parameters() if p.requires_grad], lr)]

    def title(self):
        """What was read, as tables and plots name it."""
        return self.cfg.readout

    def text_model(self):
        """The model under the LM head (the Thinker's or a causal LM's), or an encoder itself."""
        return getattr(self.backbone, "model", self.backbone)

    def hidden_states(self, inputs, **kwargs):
        """The last layer's hidden states (B, L, H), after the final norm (a layer of one's choice: cut the model
        there, as Disc's --layer does, or ask for output_hidden_states). The LM head is never run."""
        return self.text_model()(**inputs, **self.model_kwargs, **kwargs, use_cache=False)

    def prepare(self, batches):
        """Called before each evaluation with the training batches (e.g. to refresh statistics)."""

    def start(self, labels):
        """Called once before training with the training labels (clips, targets), e.g. to start a head there."""


def grid(cfg):
    """The values gen is trained to write and the bins head's: the task's range by its decimals' step (61 on
    MOSI's [-3, 3] with one decimal)."""
    step = 10**cfg.decimals
    return torch.arange(round(cfg.low * step), round(cfg.high * step) + 1) / step


class Disc(Readout):
    """Discriminative readout: a regression head on the last non-padding token's hidden state."""

    settings = (
        Setting(
            "head",
            str,
            "linear",
            "linear; mlp (the paper's); bins (HL-Gauss)",
            ("linear", "mlp", "bins"),
        ),
        Setting("bin_sigma", float, 0.75, "bins: the width of a label's Gaussian, in bins"),
        Setting(
            "layer", int, -1, "read the state after this decoder layer (negative: from the end)"
        ),
        Setting("head_lr", float, None, "the head's peak learning rate (default: --lr)"),
        Setting(
            "pool_norm",
            str,
            "auto",
            "batch: standardise the pooled states (batch statistics in training, the training set's after); "
            "auto: the head's need (bins: batch, which it needs to learn; linear, mlp: none)",
            ("auto", "none", "batch"),
        ),
        Setting("loss", str, "mse", "linear, mlp: the regression loss", ("mse", "l1")),
        Setting(
            "head_start",
            str,
            "labels",
            "labels: at the training labels (their mean; linear, mlp: last weights scaled by their std; bins: "
            "their distribution); mean: exactly at their mean (linear, mlp: last weights at zero; bins: as "
            "labels); bias: PyTorch's initialisation but each output's bias at its target's mean (bins: as "
            "labels); default: PyTorch's initialisation",
            ("labels", "mean", "bias", "default"),
            older=(5, "default"),
        ),
    )

    def __init__(self, parts, cfg):
        super().__init__(parts, cfg)
        backbone = parts.model
        keep_layers(backbone, cfg.layer)  # the layers after it are neither run nor kept
        hidden = backbone.config.get_text_config().hidden_size
        self.head = HEADS[cfg.head](hidden, cfg).to(backbone.device)  # an output per target
        # pool_norm 'batch': pooled states that vary across clips by a few percent of their norm are too
        # alike for the head; standardise them with batch statistics in training, training-set ones after.
        norm = cfg.pool_norm
        if norm == "auto":
            norm = self.head.pool_norm
        self.norm = nn.Identity()
        if norm == "batch":
            self.norm = nn.BatchNorm1d(hidden, affine=False, momentum=None, device=backbone.device)

    def param_groups(self, lr):
        head = list(self.head.parameters())
        lora = [p for p in self.backbone.parameters() if p.requires_grad]
        return [(lora, lr), (head, self.cfg.head_lr or lr)]

    @torch.no_grad()
    def prepare(self, batches):
        if isinstance(self.norm, nn.BatchNorm1d):
            self.eval()
            self.norm.reset_running_stats()
            self.norm.train()  # momentum=None: the running statistics become the plain average
            for b in batches:
                self.norm(self.pooled(b))
            self.norm.eval()

    @torch.no_grad()
    def start(self, labels):
        if self.cfg.head_start != "default":
            self.head.start(labels.to(self.backbone.device), self.cfg.head_start)

    def pooled(self, batch):
        h = self.hidden_states(batch["inputs"]).last_hidden_state  # (B, L, H)
        return at_last_token(h, batch["inputs"]["attention_mask"]).float()  # (B, H)

    def forward(self, batch):
        return self.head(self.norm(self.pooled(batch)))  # (B, targets), or (B, targets x bins)

    def loss(self, batch):
        return self.head.loss(self(batch), batch["label"])

    def score(self, batch):
        return self.head.predict(self(batch))[0]

    @torch.no_grad()
    def predict(self, batch):
        preds, info = self.head.predict(self(batch))
        # scored in the task's range, as gen's answers are (score() is the head's own output)
        return preds.clamp(self.cfg.low, self.cfg.high), info


LOSSES = dict(mse=F.mse_loss, l1=F.l1_loss)


class Score:
    """A head whose outputs are the targets' scores, trained with --loss summed over the targets."""

    pool_norm = "none"  # what --pool_norm auto gives it

    def start(self, labels, how):
        """Start at the training labels: each output's bias at its target's mean, the last layer's weights scaled
        by its std (labels), at zero (mean: every clip starts at the mean; the weights' gradient is not zero, but
        nothing below the head gets one until they move) or left as PyTorch's (bias)."""
        last = self[-1] if isinstance(self, nn.Sequential) else self
        scale = dict(labels=labels.std(0)[:, None], mean=0.0, bias=1.0)[how]
        last.weight.mul_(scale)
        last.bias.copy_(labels.mean(0))

    def loss(self, out, labels):
        return LOSSES[self.loss_name](out, labels) * labels.shape[1]

    def predict(self, out):
        return out, {}


class LinearHead(Score, nn.Linear):
    """One layer to the scores."""

    def __init__(self, hidden, cfg):
        super().__init__(hidden, len(cfg.targets.split(",")))
        self.loss_name = cfg.loss


class MLPHead(Score, nn.Sequential):
    """The paper's: hidden -> 256 -> a score per target, with LayerNorm, ReLU and dropout 0.2."""

    def __init__(self, hidden, cfg):
        layers = [nn.LayerNorm(hidden), nn.Linear(hidden, 256), nn.ReLU(), nn.Dropout(0.2)]
        super().__init__(*layers, nn.Linear(256, len(cfg.targets.split(","))))
        self.loss_name = cfg.loss


class BinsHead(nn.Linear):
    """One layer to the logits of each target's bins (the grid gen writes), trained with HL-Gauss targets; it
    predicts the mean of the distribution over the bins, and reports its std per clip. Cross-entropy over bins
    learns nothing from states as alike as a causal LM's last ones (SmolLM2, MOSI: valid MAE 1.42, the train
    mean's level, with the head started at the labels or not): it needs them standardised."""

    pool_norm = "batch"

    def __init__(self, hidden, cfg):
        values = grid(cfg)
        super().__init__(hidden, len(cfg.targets.split(",")) * len(values))
        self.register_buffer("values", values, persistent=False)
        self.sigma = cfg.bin_sigma * 10**-cfg.decimals  # in bins

    def start(self, labels, how):
        """Start at each target's training labels' distribution (any `how`): a Gaussian of their mean and std."""
        start = hl_gauss(labels.mean(0), labels.std(0)[:, None], self.values)
        self.bias.copy_(start.clamp(min=1e-6).log().flatten())

    def loss(self, out, labels):
        logits = out.view(-1, len(self.values))
        return (
            F.cross_entropy(logits, hl_gauss(labels.flatten(), self.sigma, self.values))
            * labels.shape[1]
        )

    def predict(self, out):
        p = out.view(len(out), -1, len(self.values)).softmax(-1)
        mean = p @ self.values
        std = (p @ self.values**2 - mean**2).clamp(min=0).sqrt()
        return mean, dict(std=std, median=median(p, self.values))


HEADS = dict(linear=LinearHead, mlp=MLPHead, bins=BinsHead)


def hl_gauss(labels, sigma, values):
    """HL-Gauss targets (Farebrother et al., 2024): each label's Gaussian (std sigma) integrated over the
    bins of `values`, which end halfway between them; the mass beyond the outer bins goes to them."""
    edges = torch.cat([values[:1] - 1e3, (values[1:] + values[:-1]) / 2, values[-1:] + 1e3])
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


class Gen(Readout):
    """Generative readout: the model writes the score as text, which parse_score reads (an unparseable answer
    is counted and scored as --parse_fallback). Trained with cross-entropy on the answer (the label with --decimals, then the end token), or
    regression-aware (RAFT, Lukasik et al., ICLR 2025: the squared error of the expected answer), or both.
    --decode: greedy, or the mean or median answer under the model's probabilities."""

    settings = (
        Setting("decode", str, "greedy", "how answers become a prediction", DECODE, reading=True),
        Setting("max_new_tokens", int, 8, "at most this many tokens are generated", reading=True),
        Setting(
            "parse_fallback", float, 0.0, "the prediction of an unparseable answer", reading=True
        ),
        Setting(
            "objective",
            str,
            "ce",
            "ce on the answer, raft, or both: ce + raft_weight x raft",
            OBJECTIVES,
            older=(4, "ce"),
        ),
        Setting(
            "raft_weight", float, 1.0, "both: RAFT's weight beside cross-entropy", older=(4, 1.0)
        ),
    )

    zero_shot = True

    def __init__(self, parts, cfg):
        super().__init__(parts, cfg)
        backbone = parts.model
        if not backbone.can_generate():
            raise UserError(
                f"--readout gen needs a causal LM; {cfg.model} is a "
                f"{backbone.config.model_type} model that cannot generate"
            )
        eos = backbone.generation_config.eos_token_id  # the answer ends with the token that stops
        self.end_id = eos[0] if isinstance(eos, list) else eos
        if self.end_id is None:
            raise UserError(
                f"--readout gen: {cfg.model} has no eos_token_id in its generation config"
            )
        if "," in cfg.targets:
            raise UserError(
                f"--readout gen writes one number, not --targets {cfg.targets}: a gen run per target"
            )

    def title(self):
        return f"{self.cfg.readout}@{self.cfg.decode}"  # how its answers became predictions

    def answer(self, label, device):
        """The token ids of the answer a label is trained as: its value with --decimals, the end token."""
        decimals = self.cfg.decimals
        text = f"{round(label, decimals) + 0.0:.{decimals}f}"  # + 0.0: no -0.0
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
        h = self.hidden_states(inputs).last_hidden_state[:, :-1]  # position t predicts token t + 1
        keep = targets[:, 1:] != -100
        return F.cross_entropy(self.backbone.lm_head(h[keep]).float(), targets[:, 1:][keep])

    def loss(self, batch):
        objective, labels = self.cfg.objective, batch["label"][:, 0]
        loss = 0.0
        if objective != "raft":
            loss = self.token_loss(*self.with_answers(batch["inputs"], labels))
        # gradients reach every answer's log-likelihood through the prompt's states
        if objective != "ce":
            raft = ((self.score(batch)[:, 0] - labels) ** 2).mean()
            loss = loss + raft * (self.cfg.raft_weight if objective == "both" else 1.0)
        return loss

    def score(self, batch):
        """The expected answer under the model's probabilities (decode expected): differentiable, as RAFT's is."""
        values, loglik = self.answer_loglik(batch["inputs"])
        return (loglik.softmax(-1) @ values)[:, None]

    @torch.no_grad()
    def predict(self, batch):
        inputs = batch["inputs"]
        if self.cfg.decode != "greedy":  # never unparseable, never out of bounds
            values, loglik = self.answer_loglik(inputs)
            probs = loglik.softmax(-1)
            rule = dict(expected=probs @ values, median=median(probs, values))[self.cfg.decode]
            return rule[:, None], dict(parse_failures=0, out_of_bounds=0)
        out = self.backbone.generate(
            **inputs,
            **self.model_kwargs,
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=False,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        low, high = self.cfg.low, self.cfg.high
        # None (no number): NaN
        written = np.array([parse_score(t, low, high) for t in texts], dtype=float)
        unanswered = np.isnan(written)
        # out_of_bounds: the paper's count of answers outside the scale, before they are clipped
        outside = (written < low) | (written > high)
        info = dict(parse_failures=int(unanswered.sum()), out_of_bounds=int(outside.sum()))
        info.update(answer=texts, parsed=(~unanswered).tolist())  # per clip
        scored = np.where(unanswered, self.cfg.parse_fallback, written).clip(low, high)
        return torch.tensor(scored)[:, None], info

    def answer_loglik(self, inputs):
        """(values (C,), log-likelihoods (B, C)) of the C answers gen is trained to write (grid(): 61 on
        [-3, 3]): each answer's first token after the prompt, each next one after its prefix."""
        device = inputs["input_ids"].device
        values = grid(self.cfg).to(device)
        answers = [tuple(self.answer(v, device).tolist()) for v in values.tolist()]
        # what follows the prompt: every prefix but the empty one
        prefixes = sorted({a[:d] for a in answers for d in range(1, len(a))})
        logp = self.next_token_logp(inputs, prefixes)  # (B, 1 + prefixes, V)
        row = {p: i for i, p in enumerate([(), *prefixes])}  # (): the prompt alone
        # every answer's tokens, each after its prefix, in one gather: autograd then fills one gradient of
        # logp's size, not one per token (with a large vocabulary, most of a RAFT step's time)
        steps = torch.tensor([(row[a[:d]], a[d]) for a in answers for d in range(len(a))])
        taken = logp[:, steps[:, 0], steps[:, 1]].split([len(a) for a in answers], 1)
        return values, torch.stack([t.sum(1) for t in taken], 1)

    def next_token_logp(self, inputs, prefixes):
        """Log-probabilities of the token after each prompt and after each prompt + prefix, (B, 1 + P, V), in
        two passes: the prompts, then every prefix's last token at once (a tree attention mask over the cache)."""
        model, mask = self.text_model(), inputs["attention_mask"]
        numbered = {}  # real tokens numbered from 0 past the padding, as generate() does
        if not hasattr(model, "rope_deltas"):  # (the Thinker numbers them itself)
            numbered["position_ids"] = mask.cumsum(1) - 1
        prompt = model(**inputs, **self.model_kwargs, **numbered, use_cache=True)
        shape = (mask.shape[0], len(prefixes))
        ids = torch.tensor([p[-1] for p in prefixes], device=mask.device).expand(shape)
        # a prefix's last token sits past the prompt's by its depth (and the Thinker's rope offset)
        depth = torch.tensor([len(p) - 1 for p in prefixes], device=mask.device)
        positions = mask.sum(1, True) + getattr(model, "rope_deltas", 0) + depth
        # it sees the prompt's real tokens and its own prefix's: (B, 1, P, prompt + P)
        own = torch.tensor(
            [[p[: len(q)] == q for q in prefixes] for p in prefixes], device=mask.device
        )
        seen = torch.cat([mask.bool()[:, None].expand(*shape, -1), own.expand(*shape, -1)], -1)
        cache = prompt.cache
        fed = model(
            input_ids=ids,
            cache=cache,
            use_cache=True,
            attention_mask=seen[:, None],
            position_ids=positions,
        )
        logits = self.backbone.lm_head(
            torch.cat([prompt.last_hidden_state[:, -1:], fed.last_hidden_state], 1)
        )
        return F.log_softmax(logits.float(), -1)


def median(probs, values):
    """The median of distributions (B, C) over sorted values (C,): the first value whose cumulative
    probability reaches 1/2."""
    return values[(probs.cumsum(-1) >= 0.5).float().argmax(-1)]


class Mean(Disc):
    """Disc with mean pooling: the average last-layer state over the real tokens, not the last token's."""

    def pooled(self, batch):
        h = self.hidden_states(batch["inputs"]).last_hidden_state  # (B, L, H)
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


def echoed(value):
    """A pattern of a scale's end as a model may echo it: -3, - 3, -3.0, +3."""
    sign = r"-\s*" if value < 0 else r"\+?"
    return sign + re.escape(f"{abs(value):g}") + r"(?:\.0+)?"


def parse_score(text, low=-3.0, high=3.0):
    """The score in a text as written (the readout clips it to [low, high]), or None: the number after the
    last cue word (score, sentiment, rating, answer), else the first number; the scale echoed from the
    prompt ("from -3 to 3", "[-3, +3]", "-3 and 3") is not an answer. Never raises on a string."""
    scale = echoed(low) + r"\s*(?:to|and|-|–|—|\.\.\.?|,)\s*" + echoed(high) + r"(?![\w.])"
    text = re.sub(scale, " ", text.replace("\u2212", "-"), flags=re.IGNORECASE)
    cued = CUED.findall(text)
    number = cued[-1] if cued else next(iter(re.findall(NUMBER, text)), None)
    if number is None:
        return None
    return float(number)


def build(cfg, device, lora=True):
    """(readout, Backbone) of the run `cfg` describes: backbone, LoRA over it (lora=False: none), readout."""
    check_model(cfg)
    parts = load_backbone(cfg.model, cfg.quant, device, cfg.trust_remote_code)
    if lora:
        add_run_lora(parts.model, cfg)
    return READOUTS[cfg.readout](parts, cfg), parts


def load_readout_file(path):
    """Run a user's file that adds readouts to READOUTS (--readout_file): named on the command line only,
    never because a run folder names it."""
    if not (path.endswith(".py") and Path(path).is_file()):
        raise UserError(f"--readout_file {path}: not a Python file")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
