"""
Training checkpoints, exact resume, an EMA of the trained weights, and LoRA export for other tools.
The released Flow-GRPO/Flow-OPD code saves only the LoRA (`save_ckpt`); a resumed run there restarts its
optimizer moments and random streams, so it is not the run it continues. Here a resumed run is bit-identical
to an uninterrupted one on the same device (tests/test_checkpoint.py).

A checkpoint is one folder, run_dir/checkpoint-{step}/:
    adapter_model.safetensors, adapter_config.json   the trained LoRA in PEFT format (as models.save_adapter)
    optimizer.pt                                     optimizer.state_dict()
    ema.safetensors                                  EMA.state_dict(), when an EMA is kept
    state.json                                       {"step", "adapter", "config", "sources", "scaler"}
    rng.pt                                           torch CPU/CUDA, numpy, python `random`, named torch.Generators
It is written into run_dir/.checkpoint-{step}.tmp, fsynced, then renamed: a crash never leaves a half checkpoint
under the final name, and names starting with "." are never taken for checkpoints. Only rank 0 should save.
.pt files are read with torch.load(weights_only=True), so loading a checkpoint runs no pickled code.
A resume is refused in one line when the checkpoint cannot be read (naming the newest readable one) or was made
from other models ("sources": provenance.run_sources).

Export (`export_lora`) writes the LoRA both in PEFT format and in diffusers' SD3 LoRA format (the file that
`StableDiffusion3Pipeline.load_lora_weights` reads); infer.load_lora reads either back into a T2IModel.
"""
import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from support import distributed
from support.provenance import changed_sources

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, after each optimizer step, for a list of parameters."""

    def __init__(self, params, decay=0.999):
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - self.decay)  # s + (1 - decay)(p - s)

    def state_dict(self):
        return {f"shadow.{i}": s for i, s in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state):
        keys = list(self.state_dict())
        if sorted(state) != sorted(keys) or any(state[k].shape != s.shape for k, s in zip(keys, self.shadow)):
            raise ValueError(f"the EMA state ({len(state)} tensors) does not fit this EMA ({len(keys)} parameters); "
                             "was it made for another adapter?")
        for k, s in zip(keys, self.shadow):
            s.copy_(state[k])

    @contextmanager
    @torch.no_grad()
    def applied(self):
        """`with ema.applied(): evaluate(...)` runs with the averaged weights, then puts the trained ones back."""
        backup = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, b in zip(self.params, backup):
                p.copy_(b)


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state(generators=None):
    # numpy's global state holds a uint32 array; stored as a tensor so weights_only loading accepts it
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
            "python": random.getstate(),
            "generators": {name: g.get_state() for name, g in (generators or {}).items()}}


def set_rng_state(state, generators=None, source="rng.pt"):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"{source} has no state for generator {name!r} (saved: {sorted(state['generators'])})")
        g.set_state(state["generators"][name])


# ---------------------------------------------------------------------------------------------- save, find
def list_checkpoints(run_dir):
    """[(step, path)] of the complete checkpoints in run_dir, oldest first; temp folders are not listed."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted((int(m.group(1)), os.path.join(run_dir, name)) for name in names
                  if (m := CHECKPOINT.fullmatch(name)) and os.path.isdir(os.path.join(run_dir, name)))


def latest_checkpoint(run_dir):
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _fsync_tree(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the folder's entries (new files, a rename) durable
    finally:
        os.close(fd)


def save_checkpoint(run_dir, step, model, adapter, optimizer, config, ema=None, generators=None, keep=None, extra=None):
    """Write run_dir/checkpoint-{step} atomically; with `keep`, delete all but the newest `keep`; `extra`: more
    JSON fields of state.json (load_checkpoint returns them). Returns its path."""
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None (keep all), got {keep}")
    os.makedirs(run_dir, exist_ok=True)
    for name in os.listdir(run_dir):  # temp folders left by a save that was killed
        if name.startswith(".checkpoint-"):
            shutil.rmtree(os.path.join(run_dir, name))
    tmp, final = os.path.join(run_dir, f".checkpoint-{step}.tmp"), os.path.join(run_dir, f"checkpoint-{step}")
    try:
        model.save_adapter(adapter, tmp)  # creates tmp with the PEFT files
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                      os.path.join(tmp, "ema.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "adapter": adapter, "config": config, **(extra or {})}, f, indent=1)
        torch.save(rng_state(generators), os.path.join(tmp, "rng.pt"))
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):  # the same step saved again (e.g. right after a resume); rename can't replace a folder
        os.replace(final, os.path.join(run_dir, f".checkpoint-{step}.old"))
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    shutil.rmtree(os.path.join(run_dir, f".checkpoint-{step}.old"), ignore_errors=True)
    if keep is not None:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def resolve_resume(arg, run_dir):
    """--resume_from_checkpoint: None or "" -> None (a fresh run), "latest" -> the newest checkpoint in run_dir,
    anything else -> that checkpoint folder. Raises FileNotFoundError naming what was searched."""
    if not arg:
        return None
    if arg == "latest":
        path = latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-N folder in {run_dir!r}")
        return path
    if not os.path.isfile(os.path.join(arg, "state.json")):
        raise FileNotFoundError(f"--resume_from_checkpoint {arg!r}: no checkpoint there (expected a checkpoint-N "
                                f"folder with state.json); checkpoints in {run_dir!r}: "
                                f"{[os.path.basename(p) for _, p in list_checkpoints(run_dir)] or 'none'}")
    return arg


# ---------------------------------------------------------------------------------------------- load
def _load_into_adapter(model, adapter, path):
    """Copy the checkpoint's LoRA into the existing adapter in place, so the optimizer keeps its parameters."""
    from peft import LoraConfig, set_peft_model_state_dict
    configs = getattr(model.transformer, "peft_config", {})
    if adapter not in configs:
        raise ValueError(f"the model has no adapter {adapter!r} to load {path!r} into; create it first "
                         f"(model.add_lora) with the run's rank and targets (adapters now: {sorted(configs)})")
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    saved = {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}
    current = model.adapter_state(adapter)
    for key in sorted(saved.keys() | current.keys()):
        want, got = current.get(key), saved.get(key)
        if want is None or got is None or want.shape != got.shape:
            raise ValueError(f"checkpoint {path!r} does not fit adapter {adapter!r}: {key} has shape "
                             f"{None if got is None else tuple(got.shape)} there and "
                             f"{None if want is None else tuple(want.shape)} in the model")
    alpha = LoraConfig.from_pretrained(path).lora_alpha
    if alpha != configs[adapter].lora_alpha:
        raise ValueError(f"checkpoint {path!r} has lora_alpha {alpha}, adapter {adapter!r} has "
                         f"{configs[adapter].lora_alpha}")
    set_peft_model_state_dict(model.transformer, saved, adapter_name=adapter)


def load_checkpoint(path, model, adapter, optimizer, ema=None, generators=None):
    """Restore everything save_checkpoint wrote, in place. Returns state.json's fields but "adapter" ({"step",
    "config"} and any `extra`)."""
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise FileNotFoundError(f"no checkpoint at {path!r} (expected state.json, adapter_model.safetensors, "
                                f"adapter_config.json, optimizer.pt, rng.pt)")
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    _load_into_adapter(model, adapter, path)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
    if ema is not None:
        if not os.path.isfile(os.path.join(path, "ema.safetensors")):
            raise FileNotFoundError(f"an EMA was passed but {path!r} has no ema.safetensors (saved without one)")
        ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    rng = torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=True)
    set_rng_state(rng, generators, source=os.path.join(path, "rng.pt"))
    return {k: v for k, v in state.items() if k != "adapter"}


# what json, safetensors and torch.load raise on a missing, truncated or garbled file
UNREADABLE = (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)
READERS = {".json": lambda f: json.load(open(f)), ".safetensors": load_file,
           ".pt": lambda f: torch.load(f, map_location="cpu", weights_only=True)}


def unreadable(path):
    """Why the checkpoint folder `path` cannot be read, in a few words, or None: every file is parsed as
    load_checkpoint will, so a resume never stops halfway through restoring a checkpoint."""
    for name in ("state.json", "adapter_config.json", "adapter_model.safetensors", "ema.safetensors", "optimizer.pt",
                 "rng.pt"):
        file = os.path.join(path, name)
        try:
            if name != "ema.safetensors" or os.path.exists(file):   # ema: only where an EMA was kept
                content = READERS[os.path.splitext(name)[1]](file)
                int(content["step"]) if name == "state.json" else None
        except UNREADABLE as e:
            return f"{name}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:200]
    return None


# ---------------------------------------------------------------------------------------------- a stage's
def save_training_state(cfg, run_dir, step, model, opt, ema, gen, rank, adapter="student", sources=None, scaler=None):
    """checkpoint-<step>/ of a training stage, written atomically by rank 0: the trained adapter, optimizer, EMA,
    RNG states (every process's sampling generator), config, sources (run_sources), the fp16 loss scaler."""
    states = distributed.gather_objects(gen.get_state())
    if rank == 0:
        gens = {f"sampling_rank{r}": torch.Generator().set_state(s) for r, s in enumerate(states)}
        extra = {"sources": sources, **({"scaler": scaler.state_dict()} if scaler is not None else {})}
        save_checkpoint(run_dir, step, model, adapter, opt, dataclasses.asdict(cfg), ema, gens,
                        keep=cfg.checkpoints_total_limit or None, extra=extra)


def resume_training(cfg, run_dir, model, opt, ema, gen, rank, adapter="student", sources=None, scaler=None):
    """Restore a checkpoint (--resume_from_checkpoint latest|PATH); returns the iteration to continue from. Refused
    when unreadable or made from other `sources` (run_sources; a checkpoint saved without them is not checked)."""
    try:
        path = resolve_resume(cfg.resume_from_checkpoint, run_dir)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    problem = unreadable(path)
    if problem:
        readable = next((p for _, p in reversed(list_checkpoints(run_dir)) if p != path and not unreadable(p)), None)
        raise SystemExit(f"--resume_from_checkpoint: {path} is unreadable ({problem}); " + (
            f"the newest readable checkpoint is {readable}: pass --resume_from_checkpoint {readable}" if readable
            else f"{run_dir} holds no readable checkpoint: start afresh without --resume_from_checkpoint"))
    saved = json.load(open(os.path.join(path, "state.json"))).get("sources") or {}
    changed = changed_sources(saved, sources) if saved and sources else []
    if changed:
        raise SystemExit(f"--resume_from_checkpoint: {path} was made with other models: {'; '.join(changed)}. "
                         f"Resume with the same --model/--teacher/--mar, or start a new run (--name)")
    state = load_checkpoint(path, model, adapter, opt, ema, {f"sampling_rank{rank}": gen})
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if rank == 0:
        print(f"resumed from {path} at iteration {state['step']}")
    return state["step"]


def export_lora(model, adapter, out_dir):
    """out_dir/peft/ (PEFT) and out_dir/pytorch_lora_weights.safetensors (diffusers' SD3 LoRA format, with the
    LoraConfig as metadata so alpha/r survives: without it diffusers assumes alpha = r). Returns out_dir."""
    # the pipeline's LoRA mixin alone: importing StableDiffusion3Pipeline would load transformers' image
    # processors, which warn on machines without torchvision
    from diffusers.loaders import SD3LoraLoaderMixin
    model.save_adapter(adapter, os.path.join(out_dir, "peft"))
    state = {k: v.detach().cpu().contiguous() for k, v in model.adapter_state(adapter).items()}
    SD3LoraLoaderMixin.save_lora_weights(
        out_dir, transformer_lora_layers=state,
        transformer_lora_adapter_metadata=model.transformer.peft_config[adapter].to_dict())
    return out_dir
