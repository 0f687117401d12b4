"""
Provenance: every model folder we ship carries provenance.json, {"what", "command", "seed",
"iterations", "commit", "weights_sha256", "built_from": {name: {"path", "sha256"}}, "scores"}: how it was made,
from which weights, and its scores under the main evaluation protocol. `weights_sha256` is also the key of the
evaluation caches (eval.evaluate_cached), so a cached score never outlives its weights. A trained student also
gets a Hugging Face model card, README.md, made from the same record (write_model_card). A training run's
checkpoints record its sources (run_sources), and a resume from other ones is refused (changed_sources).
"""
import hashlib
import json
import os
import shlex
import subprocess
import sys

from support.hub import split_revision
from support.metrics import write_json

WEIGHT_FILES = ("adapter_model.safetensors", os.path.join("transformer", "diffusion_pytorch_model.safetensors"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights_sha256(folder):
    """sha256 (hex) of a model folder's weights: an adapter's adapter_model.safetensors, or a full model's
    transformer; None for a folder with neither (a hub id not downloaded here)."""
    path = next((os.path.join(folder, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_commit():
    """The git commit of this code, with "+uncommitted changes" when tracked Python files outside tests/ differ."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "-uno", "--", "*.py", ":!tests")
        return git("rev-parse", "HEAD") + (" +uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


# Read once, when imported: a long run records the code it imported, not what the checkout holds when it ends.
COMMIT = code_commit()


def this_command():
    """The command line of this process, as a user would type it."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec and spec.name != "__main__" else ["python", os.path.relpath(sys.argv[0], ROOT)]
    return shlex.join(head + sys.argv[1:])


def source(path):
    """{"path", "sha256"} of a model a new one is built from (sha256 None for a hub id)."""
    return {"path": path, "sha256": weights_sha256(path) if os.path.isdir(path) else None}


def stamp(folder, **fields):
    """Write or update folder/provenance.json with `fields` and the weights' sha256. Fields recorded for other
    weights (the folder was retrained since) are dropped, so a provenance never describes other weights."""
    path, sha = os.path.join(folder, "provenance.json"), weights_sha256(folder)
    old = json.load(open(path)) if os.path.isfile(path) else {}
    record = {**(old if old.get("weights_sha256") == sha else {}), **fields, "weights_sha256": sha}
    write_json(path, record)
    return record


def made_here(what, seed, iterations, built_from):
    """The provenance fields of a model this process made: what, command, seed, iterations, commit, built_from."""
    return dict(what=what, command=this_command(), seed=seed, iterations=iterations, commit=COMMIT,
                built_from=built_from)


def write_model_card(folders, record, settings, scores=None):
    """README.md in each folder: the model card of a trained LoRA from its provenance record (made_here's fields),
    with `settings` (config.describe's text) and, once evaluated, `scores` ({metric: value, "se/<metric>": se}).
    Its metadata names the base model (a hub id; none for a local folder) so the hub lists the LoRA under it."""
    # diffusers' load_or_create_model_card first asks the hub for a card of that name (offline: ~20 s of retries;
    # online: someone else's card), so the card is built here and given diffusers' fields by populate_model_card
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData
    base = record["built_from"]["base"]["path"]
    hub_id = None if os.path.exists(base) else split_revision(base)[0]
    roles = {"base": "base", "cold_start": "cold start", "anchor": "MAR anchor"}
    role = lambda name: roles.get(name, f"teacher {name}")
    rows = [f"| {role(name)} | `{s['path']}` | {s['sha256'] or 'not hashed (a hub id)'} |"
            for name, s in record["built_from"].items()]
    score_rows = [f"| {k} | {v:.4g} | {scores.get('se/' + k, float('nan')):.2g} |" for k, v in (scores or {}).items()
                  if not k.startswith("se/")]
    body = [f"# {record['what']}", "", f"A LoRA for `{base}` trained by on-policy distillation from the Flow-GRPO "
            "teachers below (Flow-OPD, arXiv 2605.08063). Load it with `StableDiffusion3Pipeline.load_lora_weights` "
            "(the `export/` folder) or PEFT (the `adapter/` folder).", "", "## Built from", "",
            "| role | source | sha256 |", "|---|---|---|", *rows, "",
            f"Command: `{record['command']}` (seed {record['seed']}, {record['iterations']} iterations, commit "
            f"{record['commit']}).", "", "## Settings", "", "```", settings, "```", "", "## Scores", "",
            *(["| metric | mean | se |", "|---|---|---|", *score_rows] if scores else ["Not evaluated."])]
    data = ModelCardData(base_model=hub_id, pipeline_tag="text-to-image", tags=["flow-opd", "lora", "sd3"])
    card = populate_model_card(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))
    for folder in folders:
        card.save(os.path.join(folder, "README.md"))
def run_sources(base, scheduler, teachers=None):
    """What a training run is made from, as its checkpoints record it: {"base": {"path", "sha256", "scheduler"},
    teacher or anchor name: {"path", "sha256"}}; scheduler: the base's T2IModel.schedule(); teachers:
    support.teachers.load_teachers' sources. A LoRA adapter records no scheduler, so the base's is the one
    that can change under a run: a copy of the pipeline with another shift trains on another time grid."""
    return {"base": {**source(base), "scheduler": scheduler}, **(teachers or {})}


def changed_sources(saved, now):
    """'name: then -> now' for each model of run_sources that differs (by sha256, by path when there is none,
    and the base's scheduler); [] when the same."""
    def key(s):
        return None if s is None else (s.get("sha256") or s.get("path"), s.get("scheduler"))
    def shown(s):
        return "absent" if s is None else f"{s['path']} (sha256 {str(s.get('sha256'))[:12]}" + (
            f", scheduler {s['scheduler']})" if "scheduler" in s else ")")
    return [f"{n}: {shown(saved.get(n))} -> {shown(now.get(n))}" for n in sorted(saved.keys() | now.keys())
            if key(saved.get(n)) != key(now.get(n))]
