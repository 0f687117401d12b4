"""
Pictures to look at: a labelled grid of samples (models x prompts, as the paper's qualitative figures) and
training curves from the JSON-lines logs train.py writes ({"stage", "iter", "reward", "kl", ...} for
teachers; {"stage": "distill", "iter", "kl", "mar", "reward/<task>"} for students).

PIL only, no matplotlib: the curves are a few lines per panel, PIL is already pinned for the world and
the rewards, and one fewer dependency keeps the CPU install small; the price is plain axes (min, middle
and max ticks; a log scale draws log10 of the values and labels the ticks with the values). Layout
constants are module-level so a caller (or a test) knows the size:
  image_grid       width  row_label_width(rows) + N (scale W + PAD),
                   height PAD + (HEADER_LINES LINE if col_labels) + rows (scale H + PAD) + notes LINE (+ PAD)
  training_curves  width, (panels drawn) * panel_height; a key whose values are all 0 gets no panel
  bar_chart        width, height
Run the self-check (writes samples_grid.png, training_curves.png and w_t.png, the weight w(t) of the step
KL against t on a log scale, to a folder):  python plots.py /tmp
"""
import json
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE, LINE, PAD = 11, 13, 4   # text size, px per text line, px between cells
LABEL_WIDTH = 112                  # row-label column of image_grid
HEADER_LINES = 3                   # lines of a column label (longer prompts end in an ellipsis)
MARGIN = (48, LINE + PAD, 12, LINE + PAD)   # curve panel: left (y ticks), top (title), right, bottom (x ticks)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font():
    return ImageFont.load_default(size=FONT_SIZE)


def _truncate(draw, text, font, width):
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _fit(draw, text, font, width, max_lines):
    """Greedy word wrap into at most max_lines lines of `width` px; what does not fit ends in '…'."""
    lines, words = [], text.split()
    while words:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [_truncate(draw, s, font, width) for s in lines]


def _draw_lines(draw, xy, lines, font, fill=(0, 0, 0)):
    for k, s in enumerate(lines):
        draw.text((xy[0], xy[1] + k * LINE), s, fill=fill, font=font)


def row_label_width(names):
    """Width of image_grid's row-label column: LABEL_WIDTH, or wider so the longest name fits on one line."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return max(LABEL_WIDTH, max(math.ceil(draw.textlength(n, font=_font())) for n in names) + 2 * PAD)


def image_grid(rows, col_labels=None, scale=4, path=None, notes=()):
    """A PIL image of rows {name: (N, 3, H, W) in [0, 1]}, names on the left in full, col_labels (N strings,
    e.g. prompts) on top, each image upscaled `scale` times by nearest neighbour (32 px samples stay crisp),
    and `notes` (lines of text, e.g. which prompts every row fails) under the grid. Saved as PNG when path
    is given."""
    names = list(rows)
    n, _, h, w = rows[names[0]].shape
    if any(rows[k].shape[0] != n or tuple(rows[k].shape[2:]) != (h, w) for k in names):
        raise ValueError(f"every row needs {n} images of {h}x{w}: {[tuple(rows[k].shape) for k in names]}")
    if col_labels is not None and len(col_labels) != n:
        raise ValueError(f"{len(col_labels)} column labels for {n} columns")
    cw, ch, lw = w * scale, h * scale, row_label_width(names)
    top = PAD + (HEADER_LINES * LINE if col_labels is not None else 0)
    bottom = top + len(names) * (ch + PAD)
    canvas = Image.new("RGB", (lw + n * (cw + PAD), bottom + len(notes) * LINE + (PAD if notes else 0)), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for j, label in enumerate(col_labels or []):
        _draw_lines(draw, (lw + j * (cw + PAD), PAD), _fit(draw, label, font, cw, HEADER_LINES), font)
    for i, name in enumerate(names):
        y = top + i * (ch + PAD)
        draw.text((PAD, y + (ch - LINE) // 2), name, fill=(0, 0, 0), font=font)
        pixels = (rows[name].detach().float().clamp(0, 1) * 255).round().to(torch.uint8)   # (N, 3, H, W)
        for j, img in enumerate(pixels.permute(0, 2, 3, 1).cpu().numpy()):
            canvas.paste(Image.fromarray(img).resize((cw, ch), Image.NEAREST), (lw + j * (cw + PAD), y))
    _draw_lines(draw, (PAD, bottom), [_truncate(draw, s, font, canvas.width - 2 * PAD) for s in notes], font)
    if path:
        canvas.save(path)
    return canvas


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


def _log10(p):
    """(x, log10 y) of the points with y > 0 (a log axis has no place for the others)."""
    p = p[p[:, 1] > 0]
    return np.stack([p[:, 0], np.log10(p[:, 1])], 1)


def _panel(draw, box, key, series, colours, smooth, font, log=False):
    """One key: faint raw curves, bold moving averages, min/middle/max ticks (log: of log10 y, labelled with
    y), title and legend."""
    x0, y0, x1, y1 = box[0] + MARGIN[0], box[1] + MARGIN[1], box[2] - MARGIN[2], box[3] - MARGIN[3]
    pts = np.concatenate(list(series.values()))
    (xlo, ylo), (xhi, yhi) = pts.min(0), pts.max(0)
    xhi = xhi if xhi > xlo else xlo + 1                  # a single point or a flat curve still has a scale
    yhi = yhi if yhi > ylo else ylo + 1e-6
    to_px = lambda x, y: list(zip(x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)))
    for f in (0, 0.5, 1):
        yy = y1 - f * (y1 - y0)
        draw.line([(x0, yy), (x1, yy)], fill=(225, 225, 225))
        y = ylo + f * (yhi - ylo)
        draw.text((box[0] + 2, yy - LINE // 2), f"{10 ** y if log else y:.3g}", fill=(0, 0, 0), font=font)
        tick = f"{xlo + f * (xhi - xlo):.4g}"
        x_tick = x0 + f * (x1 - x0) - f * draw.textlength(tick, font=font)   # the last one ends at the axis
        draw.text((x_tick, y1 + 2), tick, fill=(0, 0, 0), font=font)
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    title = f"{key} (log scale)" if log else key
    x_text = x0 + draw.textlength(title, font=font) + 12
    draw.text((x0, box[1] + 2), title, fill=(0, 0, 0), font=font)
    for label, p in series.items():   # every raw curve first, so no faint line hides a bold one
        faint = tuple(int(255 - 0.3 * (255 - v)) for v in colours[label])   # 30 % of the colour on white
        draw.line(to_px(p[:, 0], p[:, 1]), fill=faint, width=1)
    for label, p in series.items():
        draw.line(to_px(p[:, 0], moving_average(p[:, 1], smooth)), fill=colours[label], width=2)
        draw.text((x_text, box[1] + 2), label, fill=colours[label], font=font)
        x_text += draw.textlength(label, font=font) + 10


def training_curves(logs, keys, path=None, smooth=10, width=640, panel_height=200, x_key="iter", log_keys=()):
    """A PIL image of one panel per key (stacked), one line per run: logs is {name: jsonl path or list of
    dicts} or a list of paths; a log holding several stages or reruns gives one line each. Raw values are
    drawn faint, their trailing `smooth`-point mean bold, against x_key (e.g. "images": images sampled);
    keys in log_keys on a log scale. A key whose values are all 0 (the teachers' KL at beta = 0) gets no
    panel. Saved as PNG when path is given."""
    runs = _load(logs)
    colours = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(runs)}
    panels = []
    for key in keys:
        series = {lbl: p for lbl, run in runs.items() if len(p := _points(run, key, x_key))}
        if not series:
            seen = sorted({name for run in runs.values() for e in run for name in e})
            raise ValueError(f"no log has numeric values of {key!r} against {x_key!r}; keys seen: {seen}")
        if any(np.any(p[:, 1] != 0) for p in series.values()):
            log = key in log_keys
            if log:
                series = {lbl: q for lbl, p in series.items() if len(q := _log10(p))}
            panels.append((key, series, log))
    canvas = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for k, (key, series, log) in enumerate(panels):
        _panel(draw, (0, k * panel_height, width, (k + 1) * panel_height), key, series, colours, smooth, font, log)
    if path:
        canvas.save(path)
    return canvas


def bar_chart(bars, title, path=None, width=480, height=240):
    """A PIL image of one bar per label with a ±1 standard-error whisker: bars is {label: (mean, se)}; the
    value axis spans 0 and every whisker, with a line at 0. Saved as PNG when path is given."""
    canvas = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    x0, y0, x1, y1 = MARGIN[0], MARGIN[1], width - MARGIN[2], height - MARGIN[3]
    lo = min([0.0] + [m - s for m, s in bars.values()])
    hi = max([0.0] + [m + s for m, s in bars.values()])
    hi = max(hi, lo + 1e-12)
    to_y = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)
    for f in (0, 0.5, 1):
        v = lo + f * (hi - lo)
        draw.line([(x0, to_y(v)), (x1, to_y(v))], fill=(225, 225, 225))
        draw.text((2, to_y(v) - LINE // 2), f"{v:.3g}", fill=(0, 0, 0), font=font)
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.line([(x0, to_y(0)), (x1, to_y(0))], fill=(0, 0, 0))
    draw.text((x0, 2), title, fill=(0, 0, 0), font=font)
    slot = (x1 - x0) / max(1, len(bars))
    for i, (label, (m, s)) in enumerate(bars.items()):
        cx = x0 + (i + 0.5) * slot
        draw.rectangle([cx - slot * 0.3, min(to_y(m), to_y(0)), cx + slot * 0.3, max(to_y(m), to_y(0))],
                       fill=COLOURS[i % len(COLOURS)])
        draw.line([(cx, to_y(m - s)), (cx, to_y(m + s))], fill=(0, 0, 0), width=2)
        for v in (m - s, m + s):
            draw.line([(cx - 4, to_y(v)), (cx + 4, to_y(v))], fill=(0, 0, 0), width=2)
        text = _truncate(draw, label, font, slot)
        draw.text((cx - draw.textlength(text, font=font) / 2, y1 + 2), text, fill=(0, 0, 0), font=font)
    if path:
        canvas.save(path)
    return canvas


if __name__ == "__main__":
    import sys

    from world import toy_world
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    recs = [r for t in toy_world.TASKS for r in toy_world.prompts(t, "test")[:3]]
    rows = {f"ground truth, seed {s}": toy_world.to_tensor([toy_world.render(r, np.random.default_rng(s))
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
    print("wrote samples_grid.png, training_curves.png and w_t.png to", out)
