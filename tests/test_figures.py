"""
Tests for support/figures.py: PNGs have the documented pixel size, grid cells hold the images unresampled,
curves are drawn in the runs' colours, a log key gets a log axis, bars and whiskers are drawn.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_figures.py
"""
import json

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from support import figures as P


def grid_rows(n=3, h=32, w=32):
    g = torch.Generator().manual_seed(0)
    return {"base": torch.rand(n, 3, h, w, generator=g),
            "teacher/geneval with a long name": torch.rand(n, 3, h, w, generator=g)}


@pytest.mark.parametrize("labels", [None, ["a photo of a red circle left of a blue square", '"K7"', ""]])
def test_image_grid_size_and_cell_pixels(tmp_path, labels):
    rows, scale = grid_rows(), 4
    path = str(tmp_path / "grid.png")
    P.image_grid(rows, labels, scale=scale, path=path)
    img = np.asarray(Image.open(path).convert("RGB"))
    top = P.PAD + (P.HEADER_LINES * P.LINE if labels else 0)
    cell = 32 * scale
    lw = P.row_label_width(rows)
    assert lw > P.LABEL_WIDTH   # the long name is not cut: the column widens to hold it on one line
    assert img.shape == (top + 2 * (cell + P.PAD), lw + 3 * (cell + P.PAD), 3)
    for r, x in enumerate(rows.values()):
        want = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()   # (N, H, W, 3)
        for j in range(3):
            y0, x0 = top + r * (cell + P.PAD), lw + j * (cell + P.PAD)
            for i, k in [(0, 0), (5, 17), (31, 31)]:   # source pixel (i, k) fills a scale x scale block
                block = img[y0 + i * scale:y0 + (i + 1) * scale, x0 + k * scale:x0 + (k + 1) * scale]
                assert (block == want[j, i, k]).all(), (r, j, i, k)
    assert (img[top:top + cell, :lw] < 128).any()                     # a row label is written
    assert (img[top + cell + P.PAD:, P.LABEL_WIDTH:lw] < 128).any()   # the long one past the default width
    assert (img[:top, lw:] < 128).any() == bool(labels)               # column labels only when given


def test_image_grid_notes_go_under_the_grid():
    rows = grid_rows()
    plain = np.asarray(P.image_grid(rows))
    noted = np.asarray(P.image_grid(rows, notes=["every row fails: a photo of a circle", "second line"]))
    assert noted.shape[0] == plain.shape[0] + 2 * P.LINE + P.PAD and noted.shape[1] == plain.shape[1]
    assert (noted[:plain.shape[0]] == plain).all() and (noted[plain.shape[0]:] < 128).any()


def test_image_grid_rejects_ragged_rows():
    rows = {"a": torch.zeros(2, 3, 32, 32), "b": torch.zeros(3, 3, 32, 32)}
    with pytest.raises(ValueError, match="every row"):
        P.image_grid(rows)
    with pytest.raises(ValueError, match="column labels"):
        P.image_grid({"a": torch.zeros(2, 3, 32, 32)}, ["only one"])


def test_moving_average_is_a_trailing_mean():
    np.testing.assert_allclose(P.moving_average(np.array([1.0, 3, 5, 7]), 2), [1, 2, 4, 6])
    np.testing.assert_allclose(P.moving_average(np.array([2.0, 4]), 10), [2, 3])


def write_log(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(path)


def test_training_curves_from_logs(tmp_path):
    teachers = [{"stage": s, "iter": i, "reward": 0.3 + 0.01 * i, "kl": 0.0} for s in ("geneval", "ocr")
                for i in range(30)] + [{"stage": "ocr", "minutes": 1.5}]
    distill = [{"stage": "distill", "iter": i, "kl": 9 - 0.1 * i, "mar": 0.003, "reward/geneval": 0.4}
               for i in range(40)]
    logs = {"teachers": write_log(tmp_path / "t.jsonl", teachers), "student": distill}
    path = str(tmp_path / "curves.png")
    P.training_curves(logs, ["reward", "kl", "reward/geneval"], path, width=500, panel_height=150)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (450, 500, 3)
    colour_in = lambda panel, c: (img[panel * 150:(panel + 1) * 150] == c).all(-1).any()
    # labels in order teachers:geneval, teachers:ocr, student -> COLOURS 0, 1, 2
    assert colour_in(0, P.COLOURS[0]) and colour_in(0, P.COLOURS[1]) and not colour_in(0, P.COLOURS[2])
    assert colour_in(1, P.COLOURS[2]) and colour_in(2, P.COLOURS[2]) and not colour_in(2, P.COLOURS[0])


def test_training_curves_splits_reruns_and_rejects_unknown_keys(tmp_path):
    rerun = [{"stage": "distill", "iter": i % 5, "kl": float(i)} for i in range(10)]   # iter restarts at 0
    img = np.asarray(P.training_curves({"student": rerun}, ["kl"]))
    assert (img == P.COLOURS[0]).all(-1).any() and (img == P.COLOURS[1]).all(-1).any()
    with pytest.raises(ValueError, match="no log has numeric values of 'rewrad'"):
        P.training_curves({"student": rerun}, ["rewrad"])


def test_training_curves_log_scale_zero_panels_and_another_x(tmp_path):
    distill = [{"stage": "distill", "iter": i, "images": 16 * i, "kl": 10.0 ** (-i / 10), "mar": 0.0}
               for i in range(40)] + [{"stage": "distill", "iter": 40, "images": 640, "kl": 0.0}]
    kw = dict(panel_height=150, width=400, log_keys=("kl",), x_key="images", smooth=1)
    # mar is 0 throughout: no panel, so the image is one panel high
    img = P.training_curves({"student": distill}, ["kl", "mar"], **kw)
    assert img.size == (400, 150) and (np.asarray(img) == P.COLOURS[0]).all(-1).any()
    fig = P._curves_figure({"student": distill}, ["kl", "mar"], **kw)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "images"
    # the kl of 0 has no place on a log axis: dropped; the bold curve is the raw kl (smooth=1) against images
    (bold,) = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    np.testing.assert_allclose(bold.get_xdata(), 16 * np.arange(40))
    np.testing.assert_allclose(bold.get_ydata(), 10.0 ** (-np.arange(40) / 10), rtol=1e-9)
    # on the log axis a geometric decay is a straight line: its drawn height falls by the same px every step
    FigureCanvasAgg(fig).draw()
    y_px = ax.transData.transform(np.stack([bold.get_xdata(), bold.get_ydata()], 1))[:, 1]
    steps = np.diff(y_px)
    assert np.all(steps < 0) and np.ptp(steps) < 1e-6 * abs(steps.mean())
    with pytest.raises(ValueError, match="against 'tokens'"):
        P.training_curves({"student": distill}, ["kl"], x_key="tokens")
    with pytest.raises(ValueError, match="0 throughout"):
        P.training_curves({"student": distill}, ["mar"])


def test_bar_chart_bars_and_whiskers():
    bars = {"geneval": (0.004, 0.017), "brightness": (0.014, 0.004), "negative": (-0.01, 0.002)}
    img = np.asarray(P.bar_chart(bars, "kappa", width=300, height=200))
    assert img.shape == (200, 300, 3)
    for i in range(3):
        assert (img == P.COLOURS[i]).all(-1).any()


def test_a_stage_resumed_after_other_stages_stays_one_run():
    log = ([{"stage": "geneval", "iter": i, "reward": 0.5} for i in range(3)]
           + [{"stage": "ocr", "iter": i, "reward": 0.2} for i in range(3)]
           + [{"stage": "geneval", "iter": i, "reward": 0.6} for i in range(3, 6)]    # resumed at 3
           + [{"stage": "geneval", "iter": i, "reward": 0.7} for i in range(2)])      # a rerun from 0
    runs = P._series("t", log)
    assert {k: [e["iter"] for e in v] for k, v in runs.items()} == {
        "t:geneval": [0, 1, 2, 3, 4, 5], "t:ocr": [0, 1, 2], "t:geneval #2": [0, 1]}
