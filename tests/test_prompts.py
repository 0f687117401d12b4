"""
Tests for prompts.py: every format round-trips, every malformed line is named by its 1-based number.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_prompts.py
"""
import json

import pytest

from world import toy_world as tw
from support.prompts import PromptFileError, read_prompts, write_prompts


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("task", tw.TASKS)
def test_our_jsonl_round_trips_every_split(tmp_path, task):
    for split in ("train", "test"):
        recs = tw.prompts(task, split)
        path = str(tmp_path / f"{task}_{split}.jsonl")
        write_prompts(path, recs)
        assert read_prompts(path) == recs
        assert read_prompts(path, task=task) == recs


def test_flow_grpo_ocr_txt_round_trips_with_blank_lines(tmp_path):
    recs = tw.prompts("ocr", "test")
    lines = [r["prompt"] for r in recs]
    path = write_lines(tmp_path / "ocr" / "test.txt", lines[:3] + ["", "   "] + lines[3:])
    assert read_prompts(path) == recs             # task from the folder name, metadata {"text": ...}
    assert read_prompts(path, task="ocr") == recs


def test_flow_grpo_pickscore_txt(tmp_path):
    recs = tw.prompts("pickscore", "test")
    path = write_lines(tmp_path / "prompts.txt", [r["prompt"] for r in recs])
    got = read_prompts(path, task="pickscore")
    assert got == [{"prompt": r["prompt"], "task": "pickscore", "metadata": {}} for r in recs]


def test_geneval_metadata_jsonl_round_trips(tmp_path):
    recs = tw.prompts("geneval", "test")   # toy metadata = GenEval's line, "prompt" included
    path = write_lines(tmp_path / "test_metadata.jsonl", [json.dumps(r["metadata"]) for r in recs])
    assert read_prompts(path) == recs
    line = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}],
            "prompt": "a photo of a dog left of a bench"}   # real GenEval classes are accepted
    path = write_lines(tmp_path / "real.jsonl", [json.dumps(line)])
    assert read_prompts(path) == [{"prompt": line["prompt"], "task": "geneval", "metadata": line}]


def test_mixed_tasks_in_one_jsonl(tmp_path):
    recs = tw.prompts("ocr", "test")[:2] + tw.prompts("geneval", "test")[:2] + tw.prompts("pickscore", "test")[:2]
    path = str(tmp_path / "mixed.jsonl")
    write_prompts(path, recs)
    assert read_prompts(path) == recs
    with pytest.raises(PromptFileError, match=r"line 3: task 'geneval' in a file read as task 'ocr'"):
        read_prompts(path, task="ocr")


GOOD_OCR = json.dumps({"prompt": 'a sign that says "AB"', "task": "ocr", "metadata": {"text": "AB"}})
GOOD_GEN = json.dumps(tw.prompts("geneval", "test")[0]["metadata"])
BAD_JSONL = [   # (bad line, words the message must contain)
    ('{"prompt": "a sign", "task": "ocr",', "invalid JSON"),
    ('["a list"]', "not an object"),
    ('{"task": "pickscore", "metadata": {}}', 'missing or empty "prompt"'),
    ('{"prompt": "a photo", "task": "drawbench"}', "unknown task 'drawbench'"),
    ('{"prompt": "a sunset", "task": "pickscore", "metadata": ["scene"]}', '"metadata" is a list'),
    ('{"prompt": "a sign that says hi", "task": "ocr"}', "OCR prompt without quoted text"),
    ('{"prompt": "a sign that says \\"AB\\"", "task": "ocr", "metadata": {"text": "XY"}}', "differs from the quoted"),
    ('{"prompt": "a photo of a circle"}', 'neither "task"'),
    ('{"prompt": "a photo", "tag": "single_object", "include": []}', 'non-empty "include"'),
    ('{"prompt": "a photo", "include": [{"class": "circle", "count": "1"}]}', "include clause 0 is malformed"),
    ('{"prompt": "p", "include": [{"class": "circle", "count": 1, "position": ["above", 0]}]}', "clause 0"),
    ('{"prompt": "a photo of a circle", "include": [{"class": "circle", "count": 1}]}', 'without "tag"'),
]


@pytest.mark.parametrize("bad,words", BAD_JSONL)
def test_malformed_jsonl_line_is_named(tmp_path, bad, words):
    path = write_lines(tmp_path / "p.jsonl", [GOOD_OCR, "", GOOD_GEN, bad, GOOD_OCR])
    with pytest.raises(PromptFileError) as e:
        read_prompts(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}, line 4: ") and words in msg, msg
    assert e.value.line == 4 and isinstance(e.value, ValueError)


def test_ocr_txt_line_without_quotes_is_named(tmp_path):
    path = write_lines(tmp_path / "ocr" / "train.txt", ['a sign that says "K7"', 'a poster with the text ""',
                                                        'a board reading "Q"'])
    with pytest.raises(PromptFileError, match=r"train.txt, line 2: OCR prompt without quoted text"):
        read_prompts(path)


def test_file_level_errors(tmp_path):
    empty = write_lines(tmp_path / "ocr" / "empty.txt", ["", "  "])
    with pytest.raises(PromptFileError, match="empty file"):
        read_prompts(empty)
    unknown_folder = write_lines(tmp_path / "drawbench" / "test.txt", ["a cat"])
    with pytest.raises(PromptFileError, match="pass task="):
        read_prompts(unknown_folder)
    with pytest.raises(PromptFileError, match=r"line 1: geneval prompts need GenEval metadata"):
        read_prompts(unknown_folder, task="geneval")
    with pytest.raises(ValueError, match="unknown task"):
        read_prompts(unknown_folder, task="deqa")


def test_write_refuses_a_bad_record_and_leaves_input_unchanged(tmp_path):
    rec = {"prompt": 'a sign that says "K7"', "task": "ocr", "metadata": {}}
    write_prompts(str(tmp_path / "ok.jsonl"), [rec])
    assert rec["metadata"] == {}                                  # not filled in place
    assert read_prompts(str(tmp_path / "ok.jsonl"))[0]["metadata"] == {"text": "K7"}
    with pytest.raises(PromptFileError, match=r"line 2: unknown task 'scenes'"):
        write_prompts(str(tmp_path / "bad.jsonl"), [rec, {**rec, "task": "scenes"}])
    with pytest.raises(PromptFileError, match="no records"):
        write_prompts(str(tmp_path / "none.jsonl"), [])
    assert not (tmp_path / "bad.jsonl").exists() and not (tmp_path / "none.jsonl").exists()
