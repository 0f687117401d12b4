"""
Models fetched from the Hugging Face hub (SD3.5-Medium, the published teacher LoRAs, PickScore): what went
wrong when one cannot be loaded, and what to do about it. SD3.5-Medium is gated, so a first run's most likely
failure is a missing licence or login; diffusers re-raises the hub's errors as a plain OSError, so the cause is
found in the exception chain. Every hub id the flags take (--model, --teacher, --mar, --lora, --pickscore_reward)
may pin a revision, `ID@REVISION` (a branch, tag or commit), parsed once by split_revision.
"""
import os


class ModelUnavailableError(RuntimeError):
    """A model or adapter that could not be downloaded or read; the message names the cause and what to do."""


def split_revision(spec):
    """(hub id or path, revision or None) of a model spec: "org/name@REVISION" pins a branch, tag or commit (passed
    as `revision=` to snapshot_download and from_pretrained). A path that exists here is taken whole, '@' and all."""
    spec = os.fspath(spec)   # a pathlib.Path is a path too
    if "@" not in spec or os.path.exists(spec):
        return spec, None
    name, revision = spec.split("@", 1)   # hub ids hold no '@'; everything after the first is the revision
    if not name or not revision:
        raise ValueError(f"{spec!r} is neither a path here nor ID@REVISION: write e.g. "
                         f"stabilityai/stable-diffusion-3.5-medium@main (a branch, tag or commit after the '@')")
    return name, revision


def hub_advice(name, error):
    """One message for a hub id or folder `name` that failed to load with `error`: the cause (the first hub
    error in the exception chain, since diffusers re-raises them as OSError) and what to do about it."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    kinds = (GatedRepoError, RepositoryNotFoundError, LocalEntryNotFoundError)
    cause = next((e for kind in kinds for e in chain if isinstance(e, kind)), error)
    repo, revision = split_revision(name)
    pin = f" --revision {revision}" if revision else ""
    download = f"download it where the hub is reachable (`hf download {repo}{pin} --local-dir DIR`) and pass DIR"
    if isinstance(cause, GatedRepoError):
        fix = (f"{name} is gated: accept its licence on https://huggingface.co/{repo} while logged in, then log in "
               f"here with `hf auth login` (or set HF_TOKEN); or {download}")
    elif isinstance(cause, RepositoryNotFoundError):
        fix = (f"the hub has no repository {name} that you may see: check the id; a gated or private one needs "
               f"`hf auth login` and, for a gated one, its licence accepted on https://huggingface.co/{repo}; or {download}")
    elif isinstance(cause, LocalEntryNotFoundError):
        fix = f"the hub is unreachable (offline?) and {name} is not in the local cache: {download}"
    else:
        fix = (f"if {name} is a folder, check that it is a complete diffusers pipeline; if it is a hub id, log in "
               f"with `hf auth login` and accept the licence on its model page if it is gated; or {download}")
    detail = (str(cause).strip().splitlines() or [""])[0][:300]
    return f"{name!r} could not be loaded ({type(cause).__name__}: {detail}). Fix: {fix}"
