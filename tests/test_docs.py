"""
Every command the documents show still parses: each `python train.py ...`, `python eval.py ...` and
`python -m tools.NAME ...` line of README.md, PAPER_NOTES.md, exercises/, results/RESULTS.md and
tools/BENCHMARKS.md (code blocks and inline code, continuations joined) goes through its entry point's own
flag parser, which stops the command there. A renamed or removed flag, or a tool that moved, fails here.
Lines with placeholders (<...>, ..., S, DIR, FLAGS) or cut by the prose after a flag are skipped; prompt files
they name are created empty in a tmp folder. tools.memory_check is a worker bench spawns, with flags of its own.
"""
import importlib
import os
import re
import shlex

import pytest

from helpers import ROOT
from support import config

DOCS = ["README.md", "PAPER_NOTES.md", "exercises/EXERCISES.md", "exercises/ANSWERS.md", "results/RESULTS.md",
        "tools/BENCHMARKS.md"]
FIELDS = {f.name for f in config.dataclasses.fields(config.Config)}
COMMAND = re.compile(r"python (train\.py|eval\.py|-m tools\.[a-z_]+)((?: [^`\n|]*)?)")


def documented_commands():
    """(document, entry point, argv) for every command line of the documents."""
    out = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read().replace("\\\n", " ")
        for entry, rest in COMMAND.findall(text):
            rest = rest.split("  #")[0].split(" # ")[0].strip()
            if "<" in rest or "..." in rest or " && " in rest or rest.endswith(("(", ",")):
                continue
            try:
                argv = shlex.split(rest)
            except ValueError:   # a line cut by the prose around it
                continue
            name = entry.removeprefix("-m ").removesuffix(".py")
            placeholder = any(re.fullmatch(r"[A-Z_]+|\S*seedS", w) for w in argv)
            cut = bool(argv) and argv[-1].removeprefix("--") in FIELDS
            if not (placeholder or cut or name == "tools.memory_check"):
                out.append((doc, name, argv))
    return out


class Parsed(Exception):
    pass


@pytest.mark.parametrize("doc, entry, argv", documented_commands())
def test_documented_command_parses(doc, entry, argv, tmp_path, monkeypatch):
    for spec in (argv[i + 1] for i, w in enumerate(argv[:-1]) if w in ("--prompts", "--eval_prompts")):
        path = tmp_path / spec.split("=", 1)[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    if any(w in ("--init_from", "--resume_from_checkpoint") for w in argv):
        monkeypatch.setattr(config, "_check_paths", lambda cfg: None)   # folders a long run makes first
    monkeypatch.chdir(tmp_path)
    real = config.parse_args

    def parse_and_stop(argv=None, description="", extra=None):
        real(argv, description, extra)   # a bad flag ends in SystemExit(2) here
        raise Parsed

    module = importlib.import_module(entry)
    monkeypatch.setattr(module, "parse_args", parse_and_stop, raising=False)
    monkeypatch.setattr(module, "parse_config", lambda argv=None, description="": parse_and_stop(argv), raising=False)
    with pytest.raises((Parsed, SystemExit)) as e:
        module.main(argv)
    assert e.type is Parsed or e.value.code == 0, f"{doc}: python {entry} {' '.join(argv)}"   # 0: --help


def test_the_documents_show_the_commands():
    entries = {entry for _, entry, _ in documented_commands()}
    assert {"train", "eval", "tools.paper_tables", "tools.grpo_snr", "tools.bench", "tools.infer"} <= entries


def test_generated_tables_match_their_results():
    """Every table between <!-- table NAME --> markers is what tools/doc_tables.py writes from results/*.json
    (fix: python -m tools.doc_tables), and RESULTS.md has no table that is not generated."""
    from tools import doc_tables
    for doc in doc_tables.DOCS:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        assert doc_tables.render(text) == text, f"{doc}: a generated table differs from its results file: " \
                                                f"run `python -m tools.doc_tables`"
    results = open(os.path.join(ROOT, "results", "RESULTS.md"), encoding="utf-8").read()
    outside = re.sub(r"<!-- table \S+ -->\n.*?<!-- /table -->", "", results, flags=re.S)
    assert not [line for line in outside.splitlines() if line.startswith("|")], "a typed table in RESULTS.md"
