"""
--report_to tensorboard: a training stage's scalars and its probe grids written for TensorBoard as well, beside
the JSON-lines log (support/metrics.jsonl_logger), which stays the record: TensorBoard only shows it. tensorboard
is optional, imported only when asked for; a run asking for it without it installed says so in one line and goes
on with the JSON log alone. Nothing here draws random numbers: the probe grid samples from seeded noise of its own
(rollouts.sample_images), so a run's numbers are the same with or without --report_to.
"""
from support.rollouts import sample_images
from world import toy_world


class TensorBoardLog:
    """log(**fields) as jsonl_logger's, and each numeric field also a TensorBoard scalar "<stage>/<field>" at
    step `iter` (the stage's iteration; a probe's iter is the iterations done when it ran)."""

    def __init__(self, log, writer):
        self.log, self.writer = log, writer

    def __call__(self, **fields):
        self.log(**fields)
        for key, value in fields.items():
            if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{fields.get('stage', 'train')}/{key}", value, fields.get("iter"))
        self.writer.flush()   # a crashed run still shows what it logged

    def grid(self, tag, images, step):
        """images (B, 3, H, W) in [0, 1] as one row of a TensorBoard image grid."""
        self.writer.add_images(tag, images, step)
        self.writer.flush()


def tensorboard_log(log, cfg, folder):
    """`log` itself, or with --report_to tensorboard a TensorBoardLog writing to `folder` around it; `log` when
    tensorboard is not installed (said in one line) and for processes that do not log (log None)."""
    if log is None or cfg.report_to != "tensorboard":
        return log
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # torch.utils.tensorboard raises it when the tensorboard package is missing
        print("--report_to tensorboard: tensorboard is not installed (pip install tensorboard); "
              "logging to the JSON-lines log only", flush=True)
        return log
    print(f"TensorBoard: tensorboard --logdir {folder}", flush=True)
    return TensorBoardLog(log, SummaryWriter(folder))


def log_grid(log, model, probe, stage, step):
    """With a TensorBoardLog: one ODE sample of the first probe prompt of each task by the active adapter, at
    the probe's steps, guidance and seed (probe: log_probe's settings; its records, else the world's test
    prompts), as the image grid "<stage>/probe" at `step`. Without one, nothing."""
    if not isinstance(log, TensorBoardLog):
        return
    records = probe.get("records") or {task: toy_world.prompts(task, "test") for task in toy_world.TASKS}
    prompts = [recs[0]["prompt"] for recs in records.values() if recs]
    log.grid(f"{stage}/probe", sample_images(model, prompts, probe["steps"], probe["guidance_scale"], probe["seed"],
                                             probe["batch_size"]), step)
