"""One statement over several paired comparisons of the same two readouts, one a seed: the mean difference of
absolute errors over all of them, with a 95% interval that accounts for both the seeds and the clips, and how
many comparisons on their own put each side significantly ahead (p < 0.05).

    python eval.py --compare DISC_S0 GEN_S0 --decode expected --json compare-s0.json   # and so on, per seed
    python pooled.py compare-s0.json compare-s1.json compare-s2.json [--json pooled.json]

The interval: a bootstrap that draws the seeds with replacement and the clips with replacement, the same clips
for every seed drawn (a clip that is hard for one seed's runs is hard for the others'). With three seeds the
seed level is coarse; the interval is no narrower than the seeds' disagreement allows.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def pooled(per_seed, n=10000, seed=0):
    """per_seed: (seeds, clips) of d = |error of A| - |error of B| -> the mean of d, its 95% interval."""
    d = np.asarray(per_seed, dtype=np.float64)
    seeds, clips = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for i in range(n):
        drawn = d[rng.integers(0, seeds, seeds)]
        means[i] = drawn[:, rng.integers(0, clips, clips)].mean()
    ci = [float(np.percentile(means, q)) for q in (2.5, 97.5)]
    return dict(
        mean_abs_error_diff=float(d.mean()), ci95=ci, seeds=seeds, clips=clips, resamplings=n
    )


def verdict(paired):
    """Which side one comparison puts significantly ahead: 'A', 'B' or 'neither'."""
    if paired["p_value"] >= 0.05:
        return "neither"
    if paired["mean_abs_error_diff"] < 0:
        return "A"
    return "B"


def read(file):
    """A file eval.py --compare --json wrote, with the per-clip differences, or SystemExit naming the problem."""
    try:
        comparison = json.loads(Path(file).read_text())
        comparison["paired"]["per_clip"]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {file}: cannot be read ({e})") from None
    except (KeyError, TypeError):
        raise SystemExit(
            f"error: {file}: not a comparison with per-clip differences (eval.py --compare A B --json "
            "FILE writes one; files written before it saved them: run the comparison again)"
        ) from None
    return comparison


def check_same(files, comparisons):
    """The comparisons must be of the same A and B, read the same way, on the same clips in the same order,
    or SystemExit names the file that differs from the first. Files written before eval.py saved what was
    read and the clip ids (`names`, `ids`) are checked by their number of clips alone, and a note says so."""
    sizes = {len(c["paired"]["per_clip"]) for c in comparisons}
    if len(sizes) > 1:
        raise SystemExit(
            f"error: the comparisons are over different numbers of clips ({sorted(sizes)})"
        )
    for key, what in (("names", "what A and B are"), ("ids", "the clips or their order")):
        saved = [(f, c[key]) for f, c in zip(files, comparisons) if key in c]
        for file, value in saved[1:]:
            if value != saved[0][1]:
                shown = f" ({value} against {saved[0][1]})" if key == "names" else ""
                raise SystemExit(
                    f"error: {file} and {saved[0][0]} differ in {what}{shown}: one statement pools "
                    "the same comparison over seeds"
                )
    old = [f for f, c in zip(files, comparisons) if "ids" not in c or "names" not in c]
    if old:
        print(
            f"note: {', '.join(old)} hold no clip ids or readout names (written before eval.py saved "
            "them): the same A, B and clip order are assumed in every file"
        )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("files", nargs="+", help="eval.py --compare --json files, one a seed")
    p.add_argument(
        "--json", default=None, metavar="FILE", help="write the statement as JSON to this file"
    )
    args = p.parse_args(argv)
    comparisons = [read(f) for f in args.files]
    check_same(args.files, comparisons)
    for file, c in zip(args.files, comparisons):
        s = c["paired"]
        print(
            f"{file}: A {c['checkpoints'][0]}, B {c['checkpoints'][1]}: d {s['mean_abs_error_diff']:+.4f} "
            f"[{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}], p = {s['p_value']:.4f}: ahead {verdict(s)}"
        )
    result = pooled([c["paired"]["per_clip"] for c in comparisons])
    ahead = [verdict(c["paired"]) for c in comparisons]
    result["significantly_ahead"] = {side: ahead.count(side) for side in ("A", "B", "neither")}
    lo, hi = result["ci95"]
    print(
        f"pooled over {result['seeds']} seeds x {result['clips']} clips: |error of A| - |error of B| "
        f"{result['mean_abs_error_diff']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] (bootstrap over seeds and "
        f"clips); significantly ahead: A on {ahead.count('A')}, B on {ahead.count('B')}, neither on "
        f"{ahead.count('neither')} of {len(ahead)}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
