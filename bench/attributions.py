"""What explaining a score costs, in one process: disc's prediction, gradient x input and integrated gradients
(explain.py's Explainer) per clip, on an untrained disc readout over --model (tiny, random-7b, random-3b: a
random Thinker of that shape), the first --clips test clips of --data with the run's --modalities, and the peak
memory.

    python -m bench.attributions --model tiny --data toy --clips 8 --steps 20
    python -m bench.attributions --model random-7b --data toy --device cuda --clips 8 --steps 20
"""

import statistics

import torch

from bench.common import build_readout, command, peak_mb, report, run
from data import Clips
from explain import Explainer


def costs(cfg):
    """{ms per clip of each step (the median over clips, the first left out), their ratios, peak MB}."""
    device = torch.device(cfg.device)
    readout, parts = build_readout(cfg.but(readout="disc"), device)
    readout.eval()
    clips = Clips(cfg, "test")
    explainer = Explainer(cfg, readout, parts, clips, target=0)
    peak_mb(device, reset=True)
    laps = []
    for row in clips.rows[: cfg.clips + 1]:
        laps.append(explainer.attributions(row["text"], clips.media(row), integrated=True)[-1])
    laps = laps[1:] or laps  # the first pays for warming up
    ms = {k: statistics.median(lap[k] for lap in laps) for k in laps[0]}
    return dict(
        model=cfg.model,
        modalities=cfg.modalities,
        clips=len(laps),
        steps=cfg.steps,
        ms_per_clip=ms,
        grad_x_input_over_predict=ms["grad_x_input"] / ms["predict"],
        integrated_gradients_over_predict=ms["integrated_gradients"] / ms["predict"],
        peak_mb=peak_mb(device),
    )


def main(argv=None):
    cmd = command(__doc__)
    cmd.parser.add_argument("--clips", type=int, default=8, help="this many test clips")
    cmd.parser.add_argument("--steps", type=int, default=20, help="integrated gradients' steps")
    cfg = cmd.settings(cmd.parse(argv))
    report(costs(cfg), cfg.json)


if __name__ == "__main__":
    run(main)
