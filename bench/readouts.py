"""What each readout costs, in one process: trained runs' ms per clip (gen read with each decoding rule), a RAFT
training step against a cross-entropy one, and gen's cost against disc at the tiny Thinker's prompt lengths.

    python -m bench.readouts --rules runs/x/disc-t-s0 runs/x/gen-t-s0 --clips 64
    python -m bench.readouts --prompt_lengths --model tiny --data toy --clips 64
    python -m bench.readouts --objective_steps --model $SMOL --data ../shared/data/mosi_text
"""

import resource
from collections import Counter
from pathlib import Path

import torch

from batches import make_loader, to_device
from bench.common import build_readout, command, report, run, timed
from data import Clips
from eval import load_checkpoint
from readout import DECODE, READOUTS, Gen, build, grid
from runs import load_config
from util import UserError


def rule_times(cfg, *folders):
    """Milliseconds per clip of trained runs' readouts (a gen run read with each decoding rule), the calls
    interleaved batch by batch over the first --clips test clips of the first run's data in this one process,
    and each over the first run's. A run is named by its readout, or by its folder where two share one."""
    runs = [cfg.but(**load_config(folder, READOUTS)) for folder in folders]  # this machine's kept
    loaded = [load_checkpoint(run, folder) for run, folder in zip(runs, folders)]
    kinds = [run.readout for run in runs]
    names = [k if kinds.count(k) == 1 else Path(f).name for k, f in zip(kinds, folders)]
    named = {name: readout for name, (readout, _) in zip(names, loaded)}
    return per_clip(named, runs[0], loaded[0][1], cfg.clips)


def prompt_lengths(cfg):
    """gen's cost against disc at the lengths of --data's text, text + audio and text + audio + video prompts
    (on the toy set, the Thinker's media tokens make them hundreds of tokens long): untrained readouts on one
    backbone, since timing needs no training, over the first --clips test clips of each."""
    out = {}
    for modalities in ("t", "ta", "tav"):
        run = cfg.but(modalities=modalities, readout="disc")
        torch.manual_seed(cfg.seed)
        disc, parts = build_readout(run, torch.device(cfg.device))
        gen = Gen(parts, run.but(readout="gen"))  # the same backbone and LoRA
        out[modalities] = per_clip(dict(disc=disc, gen=gen), run, parts, cfg.clips)
    return out


def per_clip(named, run, parts, n):
    """Milliseconds per clip of each named readout (gen: with each decoding rule, named gen@RULE) over the
    first n test clips of `run`'s data, the calls interleaved batch by batch, each over the first's; the
    prompts' mean length in tokens and, with a gen readout, the floor of @expected's and @median's cost."""
    for readout in named.values():
        readout.eval()
    torch.manual_seed(0)
    clips, device, total = Clips(run, "test"), torch.device(run.device), Counter()
    clips.rows = clips.rows[:n]

    def read(readout, rule, batch):  # a gen readout's predict with this rule
        def fn():
            readout.cfg.decode = rule
            return readout.predict(batch)

        return fn

    prompt_tokens = 0
    for i, batch in enumerate(make_loader(run, clips, parts)):
        batch = to_device(batch, device)
        prompt_tokens += int(batch["inputs"]["attention_mask"].sum())
        calls = {}
        for name, readout in named.items():
            if isinstance(readout, Gen):
                calls.update({f"{name}@{r}": read(readout, r, batch) for r in DECODE})
            else:
                calls[name] = lambda readout=readout, batch=batch: readout.predict(batch)
        total.update(timed(calls, device, warmup=int(i == 0), repeats=1))
    ms = {name: 1000 * t / len(clips) for name, t in total.items()}
    first = ms[next(iter(ms))]
    prompt = prompt_tokens / len(clips)
    out = dict(clips=len(clips), prompt_tokens=prompt, ms_per_clip=ms)
    out["over_first"] = {name: t / first for name, t in ms.items()}
    gens = [readout for readout in named.values() if isinstance(readout, Gen)]
    if (
        gens
    ):  # gen@expected and @median: a pass over the prompt, then one over the answers' prefixes
        prefixes = answer_prefixes(gens[0])
        out.update(answer_prefixes=prefixes, floor=(prompt + prefixes) / prompt)
    return out


def answer_prefixes(gen):
    """How many tokens gen's answer_loglik feeds after the prompt: every answer's prefixes but the empty one."""
    answers = [tuple(gen.answer(v, "cpu").tolist()) for v in grid(gen.cfg).tolist()]
    return len({a[:d] for a in answers for d in range(1, len(a))})


def objective_steps(cfg):
    """Seconds of one gen training step (loss, backward) on the first --batch_size clips of --data's train
    split with each --objective, interleaved, and the per-step peak of the process's resident memory."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    ce, parts = build(cfg.but(readout="gen", objective="ce"), device)
    raft = Gen(parts, cfg.but(readout="gen", objective="raft"))  # the same backbone and LoRA
    ce.train(), raft.train()
    clips = Clips(cfg, "train")
    batch = to_device(next(iter(make_loader(cfg, clips, parts, cfg.batch_size))), device)

    def step(readout):
        readout.zero_grad(set_to_none=True)
        readout.loss(batch).backward()

    seconds = timed(
        dict(ce=lambda: step(ce), raft=lambda: step(raft)), device, cfg.warmup, cfg.repeats
    )
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(
        **{f"{k}_step_s": v for k, v in seconds.items()},
        raft_over_ce=seconds["raft"] / seconds["ce"],
        peak_rss_mb=rss_mb,
    )


def main(argv=None):
    cmd = command(__doc__)
    p = cmd.parser
    p.add_argument(
        "--rules",
        nargs="+",
        default=None,
        metavar="RUN",
        help="ms per clip of trained runs' readouts (gen with each --decode rule), interleaved",
    )
    p.add_argument(
        "--prompt_lengths",
        action="store_true",
        default=False,
        help="gen's cost against disc at --data's t, ta and tav prompt lengths (--data toy: the toy set's)",
    )
    p.add_argument(
        "--clips", type=int, default=64, help="--rules, --prompt_lengths: this many test clips"
    )
    p.add_argument(
        "--objective_steps",
        action="store_true",
        default=False,
        help="seconds of a gen training step with --objective ce and raft, interleaved",
    )
    cfg = cmd.settings(cmd.parse(argv))
    if cfg.rules:
        result = rule_times(cfg, *cfg.rules)
    elif cfg.prompt_lengths:
        result = prompt_lengths(cfg)
    elif cfg.objective_steps:
        result = objective_steps(cfg)
    else:
        raise UserError(
            "bench.readouts measures --rules RUN [RUN ...] or --objective_steps: name one"
        )
    report(result, cfg.json)


if __name__ == "__main__":
    run(main)
