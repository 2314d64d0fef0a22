"""The run folder: config.json read and written (what it holds: settings.py), safetensors files (never a pickle),
log.jsonl, resume state, the lock while a run trains into it, and deferring a stop while an epoch is saved.
Every write is atomic."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from settings import checked_config, run_config, settings_hash
from util import UserError, write_atomically

RUN_FILES = ("config.json", "weights.safetensors", "last.safetensors", "log.jsonl", "metrics.json")
STOPS = (signal.SIGINT, signal.SIGTERM)  # what stops a run: Ctrl-C, SIGTERM


def load_config(folder, readouts):
    """A run folder's config.json, brought up to date and checked key by key (type, choices) -> {name: value}."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise UserError(f"{file}: not found ({folder} is not a run folder written by train.py)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: not a JSON object")
    if config.get("readout") not in readouts:
        raise UserError(unknown_readout(file, config.get("readout"), readouts))
    return checked_config(config, file, readouts[config["readout"]])


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
    # readout_file: where a fork's readout was defined, as given (or ""): a hint, never run from here
    settings = settings_hash(cfg, type(readout))
    meta = dict(readout=cfg.readout, settings=settings, readout_file=cfg.readout_file or "")
    save_tensors(Path(folder) / "weights.safetensors", trained_state(readout), meta)


def load_weights(readout, weights, file, cfg=None):
    """Load a checkpoint's tensors into `readout`, after checking that they are exactly the ones it trains
    and, given `cfg`, that the file was trained with these settings."""
    meta = metadata(file) if cfg else {}
    if "settings" in meta:  # files before format 2 carry no hash
        settings = settings_hash(cfg, type(readout))
        if meta["readout"] != cfg.readout or meta["settings"] != settings:
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
        stop_as_interrupt()
    if asked:
        raise KeyboardInterrupt


def stop_as_interrupt():
    """A Ctrl-C or a SIGTERM raises KeyboardInterrupt from here on (also where a shell started the run ignoring
    Ctrl-C), so that a stopped run says what it kept."""
    for s in STOPS:
        signal.signal(s, signal.default_int_handler)


def save_epoch(out, readout, cfg, optimizer, log, progress, loader):
    """What --resume continues from (save_last's), in this order, so that a crash anywhere leaves a folder that it
    continues; between epochs (`progress` without losses) the weights too if the epoch improved. Nothing that is
    not finite is written, and a stop waits until all is saved."""
    broken = [k for k, v in trained_state(readout).items() if not torch.isfinite(v).all()]
    if broken:
        raise FloatingPointError(f"{len(broken)} trained tensors are not finite")
    with stop_deferred():
        if "losses" not in progress and log[-1]["improved"]:
            save_weights(out, readout, cfg)
        save_json(out / "config.json", run_config(cfg, type(readout)))
        write_log(out, log)
        save_last(out / "last.safetensors", readout, optimizer, progress, loader)


def lock_folder(out, resume, overwrite):
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
        unlock_folder(lock, out)
        raise UserError(
            f"--out {out}: holds a run already ({', '.join(holds)}); --resume {out} continues it, "
            "another --out trains elsewhere, --overwrite replaces it"
        )
    if overwrite and not resume:  # the run's own files, not the folder
        for pattern in (*RUN_FILES, "*.png", "test@*.json"):
            for file in out.glob(pattern):
                file.unlink()
    return lock


def unlock_folder(lock, out):
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
    progress = last_progress(last_meta(file))
    return f"{out} holds epoch {progress['epoch'] - 1} and {len(progress.get('losses', []))} batches of the next, the last good state; {then}"


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


def save_last(file, readout, optimizer, progress, loader):
    """What continuing needs: trained tensors, optimizer state, random states (`loader`: the loader's where
    the epoch in progress began); as metadata the optimizer's parameter groups and `progress`, the Epoch record
    to go on with (train.py's: between epochs its epoch and step; within one, its batches' losses so far too)."""
    tensors = {f"model.{k}": v for k, v in trained_state(readout).items()}
    state = optimizer.state_dict()
    tensors.update({f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.loader"] = loader
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = dict(going=progress, param_groups=state["param_groups"])
    save_tensors(file, tensors, {"train": json.dumps(meta)})


def last_meta(file):
    """What save_last wrote as metadata: the optimizer's parameter groups, `progress` (under the key "going")."""
    return json.loads(metadata(file)["train"])


def last_progress(meta):
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
    return last_progress(meta)
