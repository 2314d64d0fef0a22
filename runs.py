"""The run folder: config.json (the settings that define a run, with its format version and the steps that bring
an older one up to date), safetensors files (never a pickle), log.jsonl, resume state, the lock while a run
trains into it, and deferring a stop while an epoch is saved. Every write is atomic."""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from batches import QUESTION
from data import UserError, write_atomically
from flags import TRAINING_FLAGS, reading_flags, resolve, value_problem

RUN_FILES = ("config.json", "weights.safetensors", "last.safetensors", "log.jsonl", "metrics.json")
FORMAT = 5  # config.json's format; upgrade() brings an older one to it, a step a format
STOPS = (signal.SIGINT, signal.SIGTERM)  # what stops a run: Ctrl-C, SIGTERM
# What each step of upgrade() fills in (by the format it brings a config to), at the value the runs before it
# trained with: a run's settings at these values hash as before (ablate.py's folder names stay the same).
FILLS = {
    2: dict(group_by_length=False),
    3: dict(denoise="none"),
    4: dict(objective="ce", raft_weight=1.0),  # gen's, where the run is gen's
    # the task (MOSI's sentiment), all training clips, disc's head as PyTorch starts it
    5: dict(
        targets="label",
        low=-3.0,
        high=3.0,
        decimals=1,
        question=QUESTION,
        classes=True,
        subsample=None,
        head_start="default",
    ),
}
FILLED = {k: v for fills in FILLS.values() for k, v in fills.items()}


def run_flags_of(readout, names=None):
    """{name: Flag} of the settings a run of the readout class `readout` saves: the generic ones and its
    own; `names`: the readouts --readout may name."""
    generic = reading_flags(names) + TRAINING_FLAGS
    return {f.name: f for f in generic + tuple(readout.flags)}


def run_config(cfg, readout):
    """The settings that define the run `cfg` describes, as config.json holds them (its format first)."""
    return dict(format=FORMAT, **{k: cfg[k] for k in run_flags_of(readout)})


def default_config(readout, name):
    """Every run setting of the readout class `readout` (registered as `name`) at its default, tiny model."""
    flags = run_flags_of(readout)
    return resolve(dict({k: f.default for k, f in flags.items()}, model="tiny", readout=name))


def settings_key(cfg):
    """Run settings (a run_config) as they compare across formats: less the format, and less what upgrade()
    filled in, at the value it fills in."""
    return {k: v for k, v in cfg.items() if k != "format" and not (k in FILLED and FILLED[k] == v)}


def settings_hash(cfg):
    return hashlib.sha1(json.dumps(settings_key(cfg), sort_keys=True).encode()).hexdigest()


def upgrade(cfg, file, readouts):
    """An older config.json brought to FORMAT, a step a format, each key a step fills in or drops said once."""
    dropped, own = [], run_flags_of(readouts[cfg["readout"]]).keys()
    if not isinstance(cfg.get("format", 1), int) or cfg.get("format", 1) > FORMAT:
        raise UserError(
            f"{file}: format {cfg['format']!r}, not one this version reads (1 to {FORMAT})"
        )
    if cfg.get("format", 1) == 1:  # before formats: every readout's flags, and retired ones
        if cfg.get("standardize"):
            raise UserError(
                f"{file}: trained with --standardize, which this version no longer reads"
            )
        dropped = sorted(cfg.keys() - own)
        cfg = {k: v for k, v in cfg.items() if k in own}
    for step in range(cfg.get("format", 1) + 1, FORMAT + 1):
        filled = {k: v for k, v in FILLS[step].items() if k in own and k not in cfg}
        said = f"filled in {filled or 'nothing'}, dropped {dropped or 'nothing'}"
        print(f"{file}: format {step - 1} -> {step}: {said}")
        cfg = {**filled, **cfg, "format": step}
        dropped = []
    return cfg


def load_config(folder, readouts):
    """A run folder's config.json, brought up to date and checked key by key (type, choices); a flag of its
    readout that is newer than the run takes its default."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise UserError(f"{file}: not found ({folder} is not a run folder written by train.py)")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{file}: not a JSON object")
    if cfg.get("readout") not in readouts:
        raise UserError(unknown_readout(file, cfg.get("readout"), readouts))
    cfg = upgrade(cfg, file, readouts)
    del cfg["format"]
    readout = readouts[cfg["readout"]]
    flags = run_flags_of(readout, tuple(readouts))
    cfg = {**{f.name: f.default for f in readout.flags}, **cfg}
    problems = [f"unknown key {k!r}" for k in cfg.keys() - flags.keys()]
    problems += [f"missing key {k!r}" for k in flags.keys() - cfg.keys()]
    problems += [value_problem(flags[k], cfg[k]) for k in cfg.keys() & flags.keys()]
    problems = sorted(p for p in problems if p)
    if problems:
        raise UserError(f"{file}: {'; '.join(problems)}")
    return cfg


def unknown_readout(file, name, readouts):
    """The one line for a run whose readout is not registered: which file its weights say to name."""
    weights = Path(file).with_name("weights.safetensors")
    source = metadata(weights).get("readout_file") if weights.is_file() else None
    hint = f"--readout_file {source}" if source else "--readout_file FILE, the file that defines it"
    return f"{file}: its readout {name!r} is not one of {', '.join(readouts)}: pass {hint}"


def trained_state(readout):
    """What a checkpoint holds: the readout's own tensors and the LoRA ones, never the base weights."""
    state = readout.state_dict().items()
    return {k: v for k, v in state if not k.startswith("backbone.") or "lora_" in k}


def save_tensors(file, tensors, meta=None):
    write_atomically(
        file, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta)
    )


def save_json(file, value):
    write_atomically(file, (json.dumps(value, indent=2) + "\n").encode())


def read_tensors(file, device="cpu"):
    """Tensors of a safetensors file (never a pickle), or a UserError naming the file."""
    if not Path(file).is_file():
        raise UserError(f"{file}: not found")
    try:
        return load_file(file, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: not a complete safetensors file ({e})") from None


def metadata(file):
    """A safetensors file's metadata (strings), {} where it has none."""
    with safe_open(file, framework="pt") as f:
        return f.metadata() or {}


def save_weights(folder, readout, cfg):
    """weights.safetensors: the trained tensors, named by the readout and the hash of the run's settings."""
    meta = dict(readout=cfg["readout"], settings=settings_hash(run_config(cfg, type(readout))))
    if cfg.get("readout_file"):  # where a fork's readout was defined: a hint, never run from here
        meta["readout_file"] = str(Path(cfg["readout_file"]).resolve())
    save_tensors(Path(folder) / "weights.safetensors", trained_state(readout), meta)


def load_weights(readout, weights, file, cfg=None):
    """Load a checkpoint's tensors into `readout`, after checking that they are exactly the ones it trains
    and, given `cfg`, that the file was trained with these settings."""
    meta = metadata(file) if cfg else {}
    if "settings" in meta:  # files before format 2 carry no hash
        settings = settings_hash(run_config(cfg, type(readout)))
        if meta["readout"] != cfg["readout"] or meta["settings"] != settings:
            raise UserError(
                f"{file}: was trained by a {meta['readout']} run with other settings than config.json's "
                f"(edited after training?): train again, or restore the run's config.json"
            )
    expected = {n: tuple(t.shape) for n, t in trained_state(readout).items()}
    found = {n: tuple(t.shape) for n, t in weights.items()}
    if found != expected:
        wrong = sorted(n for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))
        raise UserError(
            f"{file}: does not fit the run its config.json describes ({len(wrong)} tensors missing, "
            f"unexpected or of another shape, e.g. {wrong[0]}: {found.get(wrong[0])} in the file, "
            f"{expected.get(wrong[0])} expected)"
        )
    readout.load_state_dict(weights, strict=False)


def read_log(folder):
    """A run's log.jsonl: one record an epoch (runs before format 2 began with the data's counts: left out)."""
    lines = (Path(folder) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "epoch" in r]


def write_log(folder, records):
    write_atomically(
        Path(folder) / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode()
    )


@contextlib.contextmanager
def stop_deferred():
    """A Ctrl-C or SIGTERM inside waits until the block is done, then stops the run (KeyboardInterrupt)."""
    asked = []
    for s in STOPS:
        signal.signal(s, lambda *_: asked.append(1))
    try:
        yield
    finally:
        for s in STOPS:  # a SIGTERM stops as Ctrl-C does
            signal.signal(s, signal.default_int_handler)
    if asked:
        raise KeyboardInterrupt


def save_epoch(out, readout, cfg, optimizer, log, going, loader):
    """What --resume continues from (save_last's), in this order, so that a crash anywhere leaves a folder that it
    continues; between epochs (`going` without losses) the weights too if the epoch improved. Nothing that is
    not finite is written, and a stop waits until all is saved."""
    broken = [k for k, v in trained_state(readout).items() if not torch.isfinite(v).all()]
    if broken:
        raise FloatingPointError(f"{len(broken)} trained tensors are not finite")
    with stop_deferred():
        if "losses" not in going and log[-1]["improved"]:
            save_weights(out, readout, cfg)
        save_json(out / "config.json", run_config(cfg, type(readout)))
        write_log(out, log)
        save_last(out / "last.safetensors", readout, optimizer, going, loader)


def hold(out, resume, overwrite):
    """Lock the run's folder (made here) for this process, after checking that training into it is what the
    user asked for -> the lock."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = os.open(out, os.O_RDONLY)  # the folder itself is locked: nothing is left in it
        probe = out / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot be written ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise UserError(f"--out {out}: another process is training into this folder now") from None
    holds = [f for f in RUN_FILES if (out / f).exists()]
    if holds and not (resume or overwrite):
        release(lock, out)
        raise UserError(
            f"--out {out}: holds a run already ({', '.join(holds)}); --resume {out} continues it, "
            "another --out trains elsewhere, --overwrite replaces it"
        )
    if overwrite and not resume:  # the run's own files, not the folder
        for pattern in (*RUN_FILES, "*.png", "test@*.json"):
            for file in out.glob(pattern):
                file.unlink()
    return lock


def release(lock, out):
    """Unlock the folder; an empty one goes (a run that ends before its first epoch leaves nothing), where it
    can: a mount point or a read-only parent keeps it."""
    if lock is None:
        return
    os.close(lock)
    with contextlib.suppress(OSError):
        out.rmdir()  # only an empty folder


def kept_so_far(out, then):
    """What a stopped run leaves, in words, and `then`: what to do with it, if it is anything."""
    file = out / "last.safetensors"
    if not file.exists():
        return "nothing was saved yet"
    going = last_going(last_meta(file))
    return f"{out} holds epoch {going['epoch'] - 1} and {len(going.get('losses', []))} batches of the next, the last good state; {then}"


def check_space(out, trainable):
    """Stop before training where the checkpoint files would not fit on the disk."""
    # float32: the weights (4 bytes a value) and last.safetensors (with AdamW's two moments, 12),
    # twice while replaced
    need = 28 * trainable + 2**20
    free = shutil.disk_usage(out).free
    if need > free:
        raise UserError(
            f"{out}: the checkpoint files need about {need / 2**20:.1f} MiB, {free / 2**20:.1f} free"
        )


def save_last(file, readout, optimizer, going, loader):
    """What continuing needs: trained tensors, optimizer state, random states (`loader`: the loader's where
    the epoch in progress began); as metadata the optimizer's parameter groups and `going`, the Epoch record
    to go on with (train.py's: between epochs its epoch and step; within one, its batches' losses so far too)."""
    tensors = {f"model.{k}": v for k, v in trained_state(readout).items()}
    state = optimizer.state_dict()
    tensors.update({f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.loader"] = loader
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = dict(going=going, param_groups=state["param_groups"])
    save_tensors(file, tensors, {"train": json.dumps(meta)})


def last_meta(file):
    """What save_last wrote as metadata: the optimizer's parameter groups, `going`."""
    return json.loads(metadata(file)["train"])


def last_going(meta):
    """The Epoch record in save_last's metadata (before it wrote one: the epoch after the one it held)."""
    return meta.get("going") or dict(epoch=meta["epoch"] + 1, step=meta["step"])


def load_last(file, readout, optimizer, generator):
    """Restore what save_last wrote -> the Epoch record to go on with."""
    tensors = read_tensors(file)  # a clear error for a missing, truncated or foreign file
    meta = last_meta(file)
    load_weights(readout, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, file)
    state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):  # optim.<parameter index>.<state name>
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict(dict(state=state, param_groups=meta["param_groups"]))
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.loader"])
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return last_going(meta)
