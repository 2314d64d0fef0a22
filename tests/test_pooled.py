import json
import subprocess
import sys

import numpy as np
import pytest

from pooled import main, paired, pooled


def comparison(folder, name, shift, noise_seed):
    """A file as pooled.py --compare --json writes it: A's errors `shift` larger than B's on average."""
    rng = np.random.default_rng(noise_seed)
    labels = rng.uniform(-3, 3, 300)
    b = labels + rng.normal(0, 0.5, 300)
    a = labels + (np.abs(b - labels) + shift + rng.normal(0, 0.05, 300)) * np.sign(b - labels)
    file = folder / f"{name}.json"
    file.write_text(json.dumps(dict(paired=paired(a, b, labels, n=2000), checkpoints=[name, "b"])))
    return file


def test_seeds_that_agree_give_a_narrow_interval_and_seeds_that_disagree_a_wide_one(tmp_path):
    agree = [comparison(tmp_path, f"agree{s}", -0.1, s) for s in range(3)]
    result = main([str(f) for f in agree])
    every = [json.loads(f.read_text())["paired"]["per_clip"] for f in agree]
    assert result["ci95"][1] < 0 and result["mean_abs_error_diff"] == pytest.approx(np.mean(every))
    assert result["significantly_ahead"] == {"A": 3, "B": 0, "neither": 0}
    disagree = [comparison(tmp_path, f"dis{s}", shift, s) for s, shift in enumerate((-0.2, 0.2, 0))]
    wide = main([str(f) for f in disagree])
    # two seeds' own intervals exclude 0, on opposite sides: the pooled one does not
    assert wide["ci95"][0] < 0 < wide["ci95"][1]
    assert wide["significantly_ahead"] == {"A": 1, "B": 1, "neither": 1}
    # the same clips' differences as if they were one seed's: the clip-only interval is far narrower
    clips_only = pooled(
        np.concatenate([json.loads(f.read_text())["paired"]["per_clip"] for f in disagree])[None]
    )
    assert clips_only["ci95"][1] - clips_only["ci95"][0] < (wide["ci95"][1] - wide["ci95"][0]) / 3


def test_a_file_without_per_clip_differences_is_one_line_naming_it(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps(dict(paired=dict(p_value=0.5, mean_abs_error_diff=0.1))))
    done = subprocess.run([sys.executable, "pooled.py", str(old)], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{old}: not a comparison with per-clip differences" in done.stderr


def test_a_comparison_of_other_readouts_or_clips_is_refused_naming_its_file(tmp_path, capsys):
    def saved(name, names, ids):
        file = comparison(tmp_path, name, -0.1, 0)
        c = json.loads(file.read_text())
        file.write_text(json.dumps({**c, "names": names, "ids": ids}))
        return str(file)

    pair, ids = ["disc (t, test)", "gen@expected (t, test)"], [f"clip{i}" for i in range(300)]
    same = [saved(f"s{s}", pair, ids) for s in range(2)]
    assert main(same)["seeds"] == 2 and "note" not in capsys.readouterr().out
    greedy = saved("greedy", ["disc (t, test)", "gen@greedy (t, test)"], ids)
    with pytest.raises(SystemExit, match=f"{greedy} and {same[0]} differ in what A and B are"):
        main([*same, greedy])
    reordered = saved("reordered", pair, ids[1:] + ids[:1])
    with pytest.raises(SystemExit, match=f"{reordered} and {same[0]} differ in the clips"):
        main([*same, reordered])
    old = str(comparison(tmp_path, "old", -0.1, 1))  # written before the names and ids were saved
    assert main([*same, old])["seeds"] == 3
    assert f"note: {old} hold no clip ids" in capsys.readouterr().out
