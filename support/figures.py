"""
Pictures to look at: a labelled grid of samples (models x prompts, as the paper's qualitative figures),
training curves from the JSON-lines logs train.py writes ({"stage", "iter", "reward", "kl", ...} for
teachers; {"stage": "distill", "iter", "kl", "mar", "reward/<task>"} for students), and bars with
standard-error whiskers (tools/grpo_snr.py's kappa).

Drawn with matplotlib, the field's convention: real axes, ticks and log scales (set_yscale("log")) instead
of hand-drawn ones. Each figure is a matplotlib.figure.Figure on its own FigureCanvasAgg, never pyplot, so
no global backend or figure registry is touched and nothing needs closing: a figure is freed with its last
reference. Every function returns the picture as a PIL image (callers paste or inspect it) and saves it as
PNG when given a path. Sizes are in pixels (DPI pixels per inch); module-level constants give the layout:
  image_grid       width  row_label_width(rows) + N (scale W + PAD),
                   height PAD + (HEADER_LINES LINE if col_labels) + rows (scale H + PAD) + notes LINE (+ PAD)
  training_curves  width, (panels drawn) * panel_height; a key whose values are all 0 gets no panel
  bar_chart        width, height
Run the self-check from the repository root (writes samples_grid.png, training_curves.png and w_t.png, the
weight w(t) of the step KL against t on a log scale, to a folder):  python -m support.figures /tmp
"""
import json
import math
import os

import numpy as np
import torch
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.transforms import IdentityTransform
from PIL import Image

DPI = 100                          # pixels per inch: figure sizes below are pixels / DPI
FONT_SIZE, LINE, PAD = 8, 13, 4    # text size (points, 11 px at DPI), px per text line, px between cells
LABEL_WIDTH = 112                  # row-label column of image_grid
HEADER_LINES = 3                   # lines of a column label (longer prompts end in an ellipsis)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]   # matplotlib's tab10, 0-255
# prompts and run names are plain text: '$5' must not start mathtext
STYLE = {"font.size": FONT_SIZE, "text.parse_math": False, "axes.titlesize": FONT_SIZE}
_FONT = FontProperties(size=FONT_SIZE)
_MEASURE = RendererAgg(1, 1, DPI)   # only measures text widths (px) for wrapping and the label column


def _width(text):
    return _MEASURE.get_text_width_height_descent(text, _FONT, ismath=False)[0]


def _truncate(text, width):
    if _width(text) <= width:
        return text
    while text and _width(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _fit(text, width, max_lines):
    """Greedy word wrap into at most max_lines lines of `width` px; what does not fit ends in '…'."""
    lines, words = [], text.split()
    while words:
        line = words.pop(0)
        while words and _width(f"{line} {words[0]}") <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [_truncate(s, width) for s in lines]


def _render(fig, path):
    """The figure's pixels as a PIL RGB image, saved as PNG when path is given (the saved file is exactly
    the returned image: both come from one Agg draw at the figure's DPI)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    img = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    if path:
        img.save(path)
    return img


def _rgb(c):
    return tuple(v / 255 for v in c)


def row_label_width(names):
    """Width of image_grid's row-label column: LABEL_WIDTH, or wider so the longest name fits on one line."""
    return max(LABEL_WIDTH, max(math.ceil(_width(n)) for n in names) + 2 * PAD)


def image_grid(rows, col_labels=None, scale=4, path=None, notes=()):
    """A PIL image of rows {name: (N, 3, H, W) in [0, 1]}, names on the left in full, col_labels (N strings,
    e.g. prompts) on top, each image upscaled `scale` times by nearest neighbour (32 px samples stay crisp),
    and `notes` (lines of text, e.g. which prompts every row fails) under the grid. Saved as PNG when path
    is given. The samples are placed with figimage at whole-pixel offsets, never resampled by an axes."""
    names = list(rows)
    n, _, h, w = rows[names[0]].shape
    if any(rows[k].shape[0] != n or tuple(rows[k].shape[2:]) != (h, w) for k in names):
        raise ValueError(f"every row needs {n} images of {h}x{w}: {[tuple(rows[k].shape) for k in names]}")
    if col_labels is not None and len(col_labels) != n:
        raise ValueError(f"{len(col_labels)} column labels for {n} columns")
    cw, ch, lw = w * scale, h * scale, row_label_width(names)
    top = PAD + (HEADER_LINES * LINE if col_labels is not None else 0)
    bottom = top + len(names) * (ch + PAD)
    width, height = lw + n * (cw + PAD), bottom + len(notes) * LINE + (PAD if notes else 0)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    # positions are px from the top-left, as the layout above; matplotlib's display y runs up from the bottom
    text = lambda x, y, s, va="top": fig.text(x, height - y, s, transform=IdentityTransform(), va=va,
                                              fontsize=FONT_SIZE, parse_math=False)
    for j, label in enumerate(col_labels or []):
        for k, s in enumerate(_fit(label, cw, HEADER_LINES)):
            text(lw + j * (cw + PAD), PAD + k * LINE, s)
    for i, name in enumerate(names):
        y = top + i * (ch + PAD)
        text(PAD, y + ch / 2, name, va="center")
        pixels = (rows[name].detach().float().clamp(0, 1) * 255).round().to(torch.uint8)   # (N, 3, H, W)
        for j, img in enumerate(pixels.permute(0, 2, 3, 1).cpu().numpy()):
            big = img.repeat(scale, 0).repeat(scale, 1)   # nearest-neighbour upscale
            fig.figimage(big, xo=lw + j * (cw + PAD), yo=height - y - ch, origin="upper")
    for k, s in enumerate(notes):
        text(PAD, bottom + k * LINE, _truncate(s, width - 2 * PAD))
    return _render(fig, path)


def moving_average(y, window):
    """Trailing mean over the last `window` values (fewer at the start), same length as y."""
    c = np.concatenate([[0.0], np.cumsum(y, dtype=float)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def _series(name, entries):
    """{label: entries} split by stage and by restarts (iter not increasing: a rerun appended to the log); a
    stage's run resumed after other stages' lines (iter going on from its last) stays one run."""
    runs, current = [], None
    for e in entries:
        if "iter" not in e:          # summary lines such as {"stage", "minutes"} have no x
            continue
        if current is None or e.get("stage") != current[0] or e["iter"] <= current[1][-1]["iter"]:
            # a stage seen before whose run ends below this iter was resumed after other stages: continue it
            resumed = [r for r in runs if r[0] == e.get("stage") and r[1][-1]["iter"] < e["iter"]]
            current = resumed[-1] if resumed else (e.get("stage"), [])
            if not resumed:
                runs.append(current)
        current[1].append(e)
    out = {}
    for stage, run in runs:
        label = name if len(runs) == 1 else f"{name}:{stage}"
        k = sum(lbl == label or lbl.startswith(label + " #") for lbl in out)
        out[label if k == 0 else f"{label} #{k + 1}"] = run
    return out


def _load(logs):
    """{name: path or list of dicts} or [paths] -> {label: entries}."""
    logs = logs if isinstance(logs, dict) else {str(p): p for p in logs}
    out = {}
    for name, src in logs.items():
        if isinstance(src, (str, os.PathLike)):
            with open(src) as f:
                src = [json.loads(s) for s in f if s.strip()]
        out.update(_series(name, src))
    return out


def _points(run, key, x_key="iter"):
    """(n, 2) array of (x, y) for the entries holding both, finite."""
    num = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    return np.array([(e[x_key], e[key]) for e in run if num(e.get(x_key)) and num(e.get(key))],
                    dtype=float).reshape(-1, 2)


def _curves_figure(logs, keys, smooth=10, width=640, panel_height=200, x_key="iter", log_keys=()):
    """training_curves' matplotlib Figure (one axes per panel drawn), before rasterising."""
    runs = _load(logs)
    colours = {label: _rgb(COLOURS[i % len(COLOURS)]) for i, label in enumerate(runs)}
    panels = []
    for key in keys:
        series = {lbl: p for lbl, run in runs.items() if len(p := _points(run, key, x_key))}
        if not series:
            seen = sorted({name for run in runs.values() for e in run for name in e})
            raise ValueError(f"no log has numeric values of {key!r} against {x_key!r}; keys seen: {seen}")
        if any(np.any(p[:, 1] != 0) for p in series.values()):
            if key in log_keys:   # a log axis has no place for values <= 0
                series = {lbl: q for lbl, p in series.items() if len(q := p[p[:, 1] > 0])}
            panels.append((key, series, key in log_keys))
    if not panels:
        raise ValueError(f"every key of {list(keys)} is 0 throughout: no panel to draw")
    with rc_context(STYLE):   # rcParams are read when artists are made, so only inside this block
        fig = Figure(figsize=(width / DPI, panel_height * len(panels) / DPI), dpi=DPI, layout="constrained")
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
        axes[-1].set_xlabel(x_key)   # every panel shares the x key: named once, under the last
        for ax, (key, series, log) in zip(axes, panels):
            for label, p in series.items():   # every raw curve first, so no faint line hides a bold one
                ax.plot(p[:, 0], p[:, 1], color=colours[label], alpha=0.3, lw=0.8)
            for label, p in series.items():
                ax.plot(p[:, 0], moving_average(p[:, 1], smooth), color=colours[label], lw=1.6, label=label)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{key} (log scale)" if log else key, loc="left")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=FONT_SIZE - 1, frameon=False, ncols=min(3, len(series)))
    return fig


def training_curves(logs, keys, path=None, smooth=10, width=640, panel_height=200, x_key="iter", log_keys=()):
    """A PIL image of one panel per key (stacked), one line per run: logs is {name: jsonl path or list of
    dicts} or a list of paths; a log holding several stages or reruns gives one line each. Raw values are
    drawn faint, their trailing `smooth`-point mean bold, against x_key (e.g. "images": images sampled);
    keys in log_keys on a log scale. A key whose values are all 0 (the teachers' KL at beta = 0) gets no
    panel. Saved as PNG when path is given."""
    return _render(_curves_figure(logs, keys, smooth, width, panel_height, x_key, log_keys), path)


def bar_chart(bars, title, path=None, width=480, height=240):
    """A PIL image of one bar per label with a ±1 standard-error whisker: bars is {label: (mean, se)}; the
    value axis spans 0 and every whisker, with a line at 0. Saved as PNG when path is given."""
    labels, values = list(bars), list(bars.values())
    with rc_context(STYLE):
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
        ax.bar(range(len(bars)), [m for m, _ in values], yerr=[s for _, s in values], width=0.6, capsize=4,
               color=[_rgb(COLOURS[i % len(COLOURS)]) for i in range(len(bars))], error_kw={"lw": 1.5})
        slot = 0.9 * width / max(1, len(bars))   # long names end in '…' rather than run into the next bar's
        ax.set_xticks(range(len(bars)), [_truncate(s, slot) for s in labels])
        ax.axhline(0, color="black", lw=0.8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title("\n".join(_fit(title, width - 60, 2)), loc="left")   # 60 px: the value axis' ticks
    return _render(fig, path)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


if __name__ == "__main__":
    import sys

    from world import renderer, toy_world
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    recs = [r for t in toy_world.TASKS for r in toy_world.prompts(t, "test")[:3]]
    rows = {f"ground truth, seed {s}": renderer.to_tensor([renderer.render(r, np.random.default_rng(s))
                                                            for r in recs]) for s in (0, 1)}
    image_grid(rows, [r["prompt"] for r in recs], path=os.path.join(out, "samples_grid.png"))
    logs = {"teachers": "checkpoints/teachers/train_log.jsonl",
            "student": "checkpoints/students/merge/train_log.jsonl"}   # after `python train.py --stage distill`
    logs = {k: p for k, p in logs.items() if os.path.isfile(p)}
    training_curves(logs, ["reward", "kl", "mar"] if "student" in logs else ["reward"],
                    os.path.join(out, "training_curves.png"), log_keys=("kl",))
    # w(t), the step KL's weight (opd_loss.kl_weight), on the 10 training steps of the world's time grid
    # (shift 1) and of SD3.5's (shift 3), a = 0.7
    from flow_matching import time_grid
    from opd_loss import kl_weight
    curves = {}
    for shift in (1.0, 3.0):
        grid = time_grid(10, shift)
        curves[f"shift {shift:g}"] = [{"iter": k, "t": float(t), "w(t)": float(w)} for k, (t, w)
                                       in enumerate(zip(grid[:-1], kl_weight(grid[:-1], grid[1:], 0.7)))]
    training_curves(curves, ["w(t)"], os.path.join(out, "w_t.png"), smooth=1, x_key="t", log_keys=("w(t)",))
    names = ["samples_grid.png", "training_curves.png", "w_t.png"]
    paths = [os.path.join(out, n) for n in names]
    bad = [p for p in paths if not (os.path.isfile(p) and os.path.getsize(p) and _is_png(p))]
    if bad:
        sys.exit(f"not written as non-empty PNGs in {out}: {bad}")
    print("wrote", ", ".join(f"{n} ({os.path.getsize(p)} bytes)" for n, p in zip(names, paths)), "to", out)
