import json

import numpy as np

import probe


def test_ridge_matches_the_closed_form_of_an_augmented_least_squares_problem():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=40)
    strength = 3.0
    w, b = probe.ridge(x, y, strength)
    # |x w + b - y|^2 + strength |w|^2 is least squares on [x 1; sqrt(strength) I 0] [w; b] = [y; 0]
    a = np.block([[x, np.ones((40, 1))], [np.sqrt(strength) * np.eye(5), np.zeros((5, 1))]])
    reference = np.linalg.lstsq(a, np.concatenate([y, np.zeros(5)]), rcond=None)[0]
    assert np.allclose(np.append(w, b), reference)
    assert np.allclose(
        probe.ridge(x, y, 1e-12)[0], np.linalg.lstsq(np.c_[x, np.ones(40)], y, rcond=None)[0][:5]
    )


def test_the_probe_writes_valid_and_test_mae_for_every_layer(toy_root, tmp_path):
    out = tmp_path / "probe"
    probe.main(
        ["--model", "tiny", "--data", str(toy_root), "--modalities", "t", "--device", "cpu"]
        + ["--cache_dir", str(tmp_path / "cache"), "--out", str(out)]
    )
    rows = json.loads((out / "probe.json").read_text())["rows"]
    assert set(rows) == {"last", "mean"} and [r["layer"] for r in rows["last"]] == [
        0,
        1,
        2,
    ]  # tiny: 2 layers
    assert all(
        r["strength"] in probe.STRENGTHS and r["MAE"] > 0 for r in rows["last"] + rows["mean"]
    )
    assert "(valid's choice)" in (out / "probe.md").read_text() and (out / "probe.png").exists()
