"""
Prompt files: read the flow_grpo prompt formats and our own, write ours (Flow-OPD §4 "Data" uses flow_grpo's
dataset/ folders; PAPER_NOTES.md §3). Every prompt becomes a record {"prompt", "task", "metadata"}, the
shape toy_world.prompts(task, split) returns, so eval and train take a file where they take a split.

Formats, chosen by extension:
  .txt    flow_grpo plain text (dataset/ocr/train.txt, dataset/pickscore/train.txt): one prompt per line.
          The task is the `task` argument, or else the parent folder's name when that is "ocr" or
          "pickscore". OCR lines must quote their target text (flow_grpo's target = prompt.split('"')[1]);
          metadata = {"text": target}, as toy_world's OCR records. Pickscore metadata = {}.
  .jsonl  each line either our record {"prompt", "task", "metadata"} (metadata may be left out: {}), or a
          flow_grpo/GenEval metadata line {"tag", "include": [{"class", "count", "color"?, "position"?}],
          "exclude"?, "prompt"} (task "geneval", metadata = the line's dict; "tag", the sub-task, is required:
          the reward server reads it).
Departures from flow_grpo: blank lines are skipped (its TextPromptDataset keeps them as empty prompts);
a line that a reward could not score (no quoted text, no "include") is an error here, where flow_grpo
scores it 0 during training; geneval prompts cannot come from .txt, since GenEval needs their metadata.
Every error is a PromptFileError naming the file, the 1-based line and the fix.
"""
import json
import os
import re

from world.toy_world import GENEVAL_TAGS, TASKS

TXT_TASKS = ("ocr", "pickscore")        # tasks whose prompts need no metadata, so plain text suffices
QUOTED = re.compile(r'"([^"]*)"')        # flow_grpo's OCR convention: the target is the first quoted text


class PromptFileError(ValueError):
    def __init__(self, path, line, problem, fix):
        self.path, self.line = path, line
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}. Fix: {fix}")


def read_prompts(path, task=None):
    """Records {"prompt", "task", "metadata"} of a .txt or .jsonl prompt file, in file order."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks with prompts are {TASKS}")
    ext = os.path.splitext(path)[1]
    if ext not in (".txt", ".jsonl"):
        raise PromptFileError(path, None, f"unknown extension {ext!r}",
                              "name it .txt (one prompt per line) or .jsonl")
    with open(path, encoding="utf-8-sig") as f:   # -sig: a byte-order mark from a Windows editor is not text
        lines = [(n, s.strip()) for n, s in enumerate(f, start=1) if s.strip()]
    if not lines:
        raise PromptFileError(path, None, "empty file (no prompts)", "write one prompt per line")
    if ext == ".txt":
        task = task or _task_from_folder(path)
        return [_txt_record(path, n, s, task) for n, s in lines]
    return [_jsonl_record(path, n, s, task) for n, s in lines]


def write_prompts(path, records):
    """Write records as our jsonl (one {"prompt", "task", "metadata"} per line); read_prompts reads it back."""
    if not records:   # refuse to write what read_prompts would reject
        raise PromptFileError(path, None, "no records to write", "pass at least one record")
    for i, r in enumerate(records, start=1):
        _check_record(path, i, r)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"prompt": r["prompt"], "task": r["task"], "metadata": r["metadata"]},
                               ensure_ascii=False) + "\n")


def _task_from_folder(path):
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if folder not in TXT_TASKS:
        raise PromptFileError(path, None, f"no task given and the folder name {folder!r} is not one of {TXT_TASKS}",
                              "pass task='ocr' or task='pickscore'")
    return folder


def _txt_record(path, n, prompt, task):
    if task == "geneval":
        raise PromptFileError(path, n, "geneval prompts need GenEval metadata, which a .txt line cannot carry",
                              "use a GenEval metadata .jsonl (dataset/geneval/*_metadata.jsonl)")
    return _check_record(path, n, {"prompt": prompt, "task": task, "metadata": {}})


def _jsonl_record(path, n, line, task):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptFileError(path, n, f"invalid JSON at column {e.colno}: {e.msg}",
                              "write one JSON object per line") from None
    if not isinstance(obj, dict):
        raise PromptFileError(path, n, f"a JSON {type(obj).__name__}, not an object", "write one {...} per line")
    if "task" in obj:
        rec = {"prompt": obj.get("prompt"), "task": obj["task"], "metadata": obj.get("metadata", {})}
    elif "include" in obj:
        rec = {"prompt": obj.get("prompt"), "task": "geneval", "metadata": obj}
    else:
        raise PromptFileError(path, n, 'neither "task" (our records) nor "include" (GenEval metadata)',
                              'add "task": "ocr"/"pickscore"/"geneval", or GenEval\'s "include" list')
    if task is not None and rec["task"] != task:
        raise PromptFileError(path, n, f"task {rec['task']!r} in a file read as task {task!r}",
                              "read the file with task=None or split it by task")
    return _check_record(path, n, rec)


def _check_record(path, n, rec):
    """rec, once its task's reward can score it; an OCR record gets metadata["text"] if it lacks it."""
    prompt, task, meta = rec.get("prompt"), rec.get("task"), rec.get("metadata")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(path, n, 'missing or empty "prompt"', 'add "prompt": "<text>"')
    if task not in TASKS:
        raise PromptFileError(path, n, f"unknown task {task!r}", f"use one of {TASKS}")
    if not isinstance(meta, dict):
        raise PromptFileError(path, n, f'"metadata" is a {type(meta).__name__}, not an object',
                              'write "metadata": {...} or leave it out')
    if task == "geneval":
        _check_geneval(path, n, meta)
    if task == "ocr":   # a new dict: the caller's metadata is never modified
        return {**rec, "metadata": {"text": _ocr_target(path, n, prompt, meta), **meta}}
    return rec


def _ocr_target(path, n, prompt, meta):
    m = QUOTED.search(prompt)
    if m is None or not m.group(1).replace(" ", ""):   # the OCR reward divides by the target's length
        raise PromptFileError(path, n, f"OCR prompt without quoted text: {prompt!r}",
                              'quote the text to render, e.g. a sign that says "K7"')
    if meta.get("text", m.group(1)) != m.group(1):
        raise PromptFileError(path, n, f'metadata text {meta["text"]!r} differs from the quoted {m.group(1)!r}',
                              "make them agree (the OCR reward reads the prompt's quote)")
    return m.group(1)


def _check_geneval(path, n, meta):
    """GenEval's schema as rewards.geneval_details reads it: include clauses with class, count, and
    optional color and position [relation, index of an earlier clause]."""
    fix = 'follow GenEval: "include": [{"class": "circle", "count": 1, "color"?: "red", "position"?: ["left of", 0]}]'
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        raise PromptFileError(path, n, 'geneval metadata without a non-empty "include" list', fix)
    for i, c in enumerate(include):
        ok = (isinstance(c, dict) and isinstance(c.get("class"), str) and type(c.get("count")) is int
              and c["count"] >= 1 and isinstance(c.get("color", ""), str))
        pos = c.get("position") if isinstance(c, dict) else None
        if pos is not None:
            ok &= (isinstance(pos, list) and len(pos) == 2 and isinstance(pos[0], str)
                   and type(pos[1]) is int and 0 <= pos[1] < i)
        if not ok:
            raise PromptFileError(path, n, f"include clause {i} is malformed: {c!r}", fix)
    if not isinstance(meta.get("exclude", []), list):
        raise PromptFileError(path, n, '"exclude" is not a list', fix)
    if not isinstance(meta.get("tag"), str) or not meta["tag"].strip():   # the server groups its rewards by tag
        raise PromptFileError(path, n, 'geneval metadata without "tag" (the GenEval reward server reads it)',
                              f'add "tag": one of GenEval\'s sub-tasks {", ".join(GENEVAL_TAGS)}')
