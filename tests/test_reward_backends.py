"""
Tests for support/reward_backends.py and support/reward_servers.py: RapidOCR on rendered text, PickScore
against a hand computation with a tiny CLIP
saved to a temp folder, and the reward-server client against a local server on 127.0.0.1 (batching, retries,
errors, the plain-data decoder).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_reward_backends.py
"""
import http.server
import io
import math
import os
import pickle
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from support import metrics
from support import rollouts
from support import reward_backends as RB
from support import reward_servers as RS
import rewards

FAST = dict(timeout=5.0, retries=2, backoff=0.01)   # client settings for the local server


# ---------------------------------------------------------------------------------------------- rapidocr
def _text_image(word, size=32, width=128, height=128):
    """Black text centred on white, as a (1, 3, H, W) float tensor in [0, 1]. Square, because RapidOCR scales
    the short side to 736 px before detection (a wide canvas costs time)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
    draw.text(((width - x1 + x0) / 2 - x0, (height - y1 + y0) / 2 - y0), word, fill="black", font=font)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def rapidocr_reward():
    pytest.importorskip("rapidocr_onnxruntime")
    return RB.RapidOCRReward()


def test_rapidocr_reads_rendered_word_and_scores_prompts(rapidocr_reward, monkeypatch):
    image, read, recognise = _text_image("HELLO"), [], rapidocr_reward.recognise

    def spy(array):   # records what the engine read, so the test needs no extra OCR call
        read.append(recognise(array))
        return read[-1]
    monkeypatch.setattr(rapidocr_reward, "recognise", spy)
    r = rapidocr_reward(image.expand(2, -1, -1, -1), ['a sign that says "HELLO"', 'a sign that says "WORLD"'], [{}, {}])
    assert read == ["HELLO", "HELLO"] and r.dtype == torch.float32 and r.shape == (2,)
    assert r[0] > 0.8 and r[1] < r[0]
    assert r[1] == pytest.approx(1 - rewards.levenshtein("hello", "world") / 5)   # Flow-GRPO's formula


def test_rapidocr_failure_scores_zero_and_unquoted_prompt_raises(rapidocr_reward, monkeypatch):
    blank = torch.ones(1, 3, 32, 32)
    assert rapidocr_reward(blank, ['a sign that says "HI"'], [{}]).tolist() == [0.0]   # nothing read: dist = len

    def broken(*args, **kwargs):
        raise RuntimeError("engine failure")
    monkeypatch.setattr(rapidocr_reward, "engine", broken)
    assert rapidocr_reward(blank, ['a sign that says "HI"'], [{}]).tolist() == [0.0]
    monkeypatch.setattr(rapidocr_reward, "recognise", lambda image: "hi")
    with pytest.raises(ValueError, match="quoted text"):
        rapidocr_reward(blank, ["a sign without quotes"], [{}])


def test_rapidocr_missing_package_names_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)   # makes the import fail
    with pytest.raises(ImportError, match=r"pip install rapidocr-onnxruntime==1\.4\.4"):
        RB.RapidOCRReward()


# --------------------------------------------------------------------------------------------- pickscore
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIPModel + CLIPProcessor written with save_pretrained (the layout of a hub checkpoint)."""
    from tiny_sd3 import _clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    tok = _clip_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=RB.CLIP_MAX_TOKENS, **ids),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8, logit_scale_init_value=3.0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return str(path)


def test_pickscore_equals_hand_computed_scaled_cosine(tiny_clip_dir):
    from transformers import AutoProcessor, CLIPModel
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "the sunset over the sea", "a photo of the cat on a sign"]
    reward = RB.make_rewards(pickscore=tiny_clip_dir)["pickscore"](images, prompts, [{}] * 3)

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), AutoProcessor.from_pretrained(tiny_clip_dir)
    pil = [Image.fromarray(a) for a in RB.to_hwc_uint8(images)]
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    text = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(**text).pooler_output)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        expected = model.logit_scale.exp() * cos / 26
    assert reward.shape == (3,) and reward.dtype == torch.float32
    torch.testing.assert_close(reward, expected, rtol=1e-5, atol=1e-6)
    assert model.logit_scale.exp().item() == pytest.approx(math.exp(3.0))


def test_pickscore_folder_without_processor_config_scores_the_same(tiny_clip_dir, tmp_path):
    """A local PickScore folder needs the model and CLIP's tokenizer; preprocessor_config.json is optional."""
    import shutil
    bare = tmp_path / "pickscore"
    shutil.copytree(tiny_clip_dir, bare)
    for name in RB.PROCESSOR_CONFIGS:
        if (bare / name).exists():
            os.remove(bare / name)
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    prompts, meta = ["a cat", "the sunset"], [{}] * 2
    full = RB.make_rewards(pickscore=tiny_clip_dir)["pickscore"](images, prompts, meta)
    torch.testing.assert_close(RB.make_rewards(pickscore=str(bare))["pickscore"](images, prompts, meta), full,
                               rtol=1e-5, atol=1e-6)
    half = RB.make_rewards(pickscore=tiny_clip_dir, dtype=torch.bfloat16)["pickscore"](images, prompts, meta)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=3e-2, atol=0)   # bf16 towers, fp32 cosine: within bf16's precision
    for name in os.listdir(bare):
        if "token" in name or name in ("vocab.json", "merges.txt"):
            os.remove(bare / name)
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer.*tokenizer.json"):
        RB.make_rewards(pickscore=str(bare))


def test_pickscore_follows_training_device_and_precision(monkeypatch):
    from support import config, resolve
    made = []
    monkeypatch.setattr(RB, "PickScoreReward", lambda path, **kw: made.append((path, kw)))
    for device, precision, dtype in [("cuda", "bf16", torch.bfloat16), ("cuda:1", "fp16", torch.float16),
                                     ("cuda", "no", torch.float32), ("cpu", "bf16", torch.float32)]:
        resolve.reward_registry(config.Config(device=device, mixed_precision=precision, pickscore_reward="/ps"))
        assert made.pop() == ("/ps", {"device": device, "dtype": dtype})


def test_pickscore_processor_defaults_follow_flow_grpo():
    assert RB.PICKSCORE_MODEL == "yuvalkirstain/PickScore_v1"
    assert RB.PICKSCORE_PROCESSOR == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" and RB.PICKSCORE_NORM == 26.0


# ------------------------------------------------------------------------------------ reward-server
class _Server:
    """A reward-server on 127.0.0.1 (port 0) that speaks the protocol: GenEval answers score = mean brightness
    of each decoded JPEG, DeQA answers outputs = (1 + 4 * brightness) / 5. `fail` lists status codes to answer
    (with a traceback-like body) before the next successes; `raw` replaces the answer's bytes."""

    def __init__(self, kind):
        self.kind, self.fail, self.raw, self.requests = kind, [], None, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append(pickle.loads(body))   # the test trusts its own client's pickles
                status, answer = server.answer(server.requests[-1])
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()

    def answer(self, data):
        if self.fail:
            return self.fail.pop(0), b"Traceback (most recent call last): CUDA out of memory"
        if self.raw is not None:
            return 200, self.raw
        bright = [float(np.asarray(Image.open(io.BytesIO(j), formats=["jpeg"])).mean() / 255) for j in data["images"]]
        if self.kind == "deqa":
            return 200, pickle.dumps({"outputs": [(1 + 4 * b) / 5 for b in bright]})
        tags = [m["tag"] for m in data["meta_datas"]]
        group = {t: [1.0 if t == tag else -10.0 for tag in tags] for t in ("single_object", "counting")}
        n = len(bright)
        correct = 0.0 if data["only_strict"] else 1.0   # the real server skips GenEval's check when only_strict
        return 200, pickle.dumps({"scores": bright, "rewards": [correct] * n, "strict_rewards": [0.0] * n,
                                  "group_rewards": group, "group_strict_rewards": group})


def _serving(kind):
    s = _Server(kind)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def geneval_server():
    yield from _serving("geneval")


@pytest.fixture
def deqa_server():
    yield from _serving("deqa")


def _grey_images(n, seed=0):
    levels = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    return levels.reshape(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous()


def test_server_geneval_batches_of_64_and_fields(geneval_server):
    n = 70
    images = _grey_images(n)
    metadata = [{"tag": "counting" if i % 2 else "single_object", "include": [{"class": "cat", "count": 1}]}
                for i in range(n)]
    prompts = [f"prompt {i}" for i in range(n)]
    reward = RB.GenEvalServerReward(geneval_server.url, **FAST)
    score = reward(images, prompts, metadata)
    assert [len(r["images"]) for r in geneval_server.requests] == [64, 6]
    first = geneval_server.requests[0]
    assert set(first) == {"images", "meta_datas", "only_strict"} and first["only_strict"] is True
    assert first["images"][0][:2] == b"\xff\xd8"                                    # JPEG bytes
    assert first["meta_datas"][3]["prompt"] == "prompt 3" and "prompt" not in metadata[3]
    assert score.dtype == torch.float32
    torch.testing.assert_close(score, images[:, 0, 0, 0], atol=2 / 255, rtol=0)   # JPEG of a flat grey
    d = reward.details(images, prompts, metadata)
    assert len(d["scores"]) == len(d["strict_rewards"]) == n
    assert d["group_rewards"]["counting"] == [1.0 if i % 2 else -10.0 for i in range(n)]   # merged over batches


def test_server_geneval_accuracy_for_evaluation(geneval_server):
    """Evaluation asks with only_strict=False and reads GenEval's `correct` ("rewards") per tag; training keeps
    the partial score from only_strict=True requests."""
    import eval as E
    tags = ["single_object", "counting", "counting", "colors"]
    recs = [{"prompt": f"p{i}", "metadata": {"tag": t, "include": [{"class": "cat", "count": 1}]}}
            for i, t in enumerate(tags)]
    images = rollouts.to_uint8(_grey_images(4))
    reward_fns = RB.make_rewards(geneval=geneval_server.url)
    reward_fns["geneval"].client.retries = 0
    scores = E.score_task("geneval", images, recs, reward_fns)
    assert [r["only_strict"] for r in geneval_server.requests] == [False]
    torch.testing.assert_close(scores["geneval"], rollouts.to_float(images)[:, 0, 0, 0], atol=2 / 255, rtol=0)
    assert scores["geneval_acc"].tolist() == [1.0] * 4
    per_prompt = {"geneval": {"index": [0, 1, 2, 3], "tag": tags,
                              **{k: v.tolist() for k, v in scores.items()}}}
    m = metrics.summarise_prompts(per_prompt)
    assert m["geneval_acc"] == 1.0 and set(k for k in m if k.startswith("geneval_acc/")) == {
        "geneval_acc/single_object", "geneval_acc/counting", "geneval_acc/colors"}
    reward_fns["geneval"](rollouts.to_float(images), [r["prompt"] for r in recs], [r["metadata"] for r in recs])
    assert geneval_server.requests[-1]["only_strict"] is True      # the training reward


def test_server_geneval_skips_records_without_include(geneval_server):
    metadata = [{"scene": "a sunset over the sea"}, {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}]
    score = RB.GenEvalServerReward(geneval_server.url, **FAST)(_grey_images(2), ["a", "b"], metadata)
    assert math.isnan(score[0]) and not math.isnan(score[1])
    assert len(geneval_server.requests) == 1 and len(geneval_server.requests[0]["images"]) == 1


def test_server_deqa_returns_raw_1_to_5(deqa_server, monkeypatch):
    monkeypatch.setenv(RB.DEQA_URL_ENV, deqa_server.url)
    images = _grey_images(5)
    raw = RB.make_rewards(deqa="server")["deqa"](images, [""] * 5, [{}] * 5)
    torch.testing.assert_close(raw, 1 + 4 * images[:, 0, 0, 0], atol=8 / 255, rtol=0)
    assert rewards.REWARD_SCALE["deqa"] == 5.0   # raw like the world's deqa, so the same scale applies


def test_server_retries_after_500_then_succeeds(deqa_server):
    deqa_server.fail = [500, 503]
    out = RB.DeQAServerReward(deqa_server.url, **FAST)(_grey_images(2), ["", ""], [{}, {}])
    assert len(deqa_server.requests) == 3 and out.shape == (2,)


def test_server_gives_clear_error_after_last_try(deqa_server):
    deqa_server.fail = [500] * 10
    with pytest.raises(ConnectionError, match=f"{deqa_server.url} failed 3 tries.*CUDA out of memory"):
        RB.DeQAServerReward(deqa_server.url, **FAST)(_grey_images(1), [""], [{}])
    assert len(deqa_server.requests) == 3


def test_server_client_error_is_not_retried(deqa_server):
    deqa_server.fail = [400]
    with pytest.raises(RuntimeError, match="refused the request.*HTTP 400"):
        RB.DeQAServerReward(deqa_server.url, **FAST)(_grey_images(1), [""], [{}])
    assert len(deqa_server.requests) == 1


def test_server_answer_of_wrong_length_is_clear(deqa_server):
    deqa_server.raw = pickle.dumps({"outputs": [0.9]})
    with pytest.raises(ValueError, match="answered 1 'outputs' for 2 images"):
        RB.DeQAServerReward(deqa_server.url, **FAST)(_grey_images(2), ["", ""], [{}, {}])


def test_server_connection_refused_names_url():
    with socket.socket() as s:   # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ConnectionError, match=f"{url} failed 2 tries"):
        RB.GenEvalServerReward(url, timeout=2.0, retries=1, backoff=0.01)(
            _grey_images(1), ["a"], [{"tag": "single_object", "include": []}])


def test_server_url_missing_names_environment_variable(monkeypatch):
    monkeypatch.delenv(RB.GENEVAL_URL_ENV, raising=False)
    with pytest.raises(ValueError, match=RB.GENEVAL_URL_ENV):
        RB.make_rewards(geneval="server")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_server_decoder_refuses_malicious_pickle(tmp_path, deqa_server):
    marker = tmp_path / "ran"   # os.system would create it; nothing may run
    for protocol in (0, 3, 5):
        with pytest.raises(pickle.UnpicklingError, match=r"refused to load (os|posix)\.system"):
            RS.decode_response(pickle.dumps({"outputs": [_Evil(marker)]}, protocol=protocol))
    eval_call = b"cbuiltins\neval\n(S'__import__(\"os\").system(\"touch " + str(marker).encode() + b"\")'\ntR."
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load builtins\.eval"):
        RS.decode_response(eval_call)
    deqa_server.raw = pickle.dumps({"outputs": [_Evil(marker)]})   # through the client: refused, not retried
    with pytest.raises(pickle.UnpicklingError, match="only plain data"):
        RB.DeQAServerReward(deqa_server.url, **FAST)(_grey_images(1), [""], [{}])
    assert len(deqa_server.requests) == 1 and not marker.exists()


def test_server_decoder_accepts_plain_data_in_python3_protocols():
    data = {"scores": [0.5, 1, -0.25], "group": {"counting": [1.0, -10.0]}, "tags": ("a", "b"), "s": {1, 2},
            "f": frozenset({"x"}), "b": b"\x00", "ba": bytearray(b"ab"), "c": 1 + 2j, "none": None, "ok": True}
    for protocol in range(3, pickle.HIGHEST_PROTOCOL + 1):
        assert RS.decode_response(pickle.dumps(data, protocol=protocol)) == data
    with pytest.raises(pickle.UnpicklingError, match="must be a dict"):
        RS.decode_response(pickle.dumps([1.0]))


# ---------------------------------------------------------------------------------- registry, check
def test_server_make_rewards_defaults_to_world_and_swaps_by_flag(geneval_server):
    assert RB.make_rewards() == rewards.REWARDS
    mixed = RB.make_rewards(geneval=geneval_server.url)
    assert isinstance(mixed["geneval"], RB.GenEvalServerReward) and mixed["ocr"] is rewards.REWARDS["ocr"]
    assert mixed["geneval"].client.url == geneval_server.url
    with pytest.raises(ValueError, match="rapidocr"):
        RB.make_rewards(ocr="paddle")


@pytest.mark.slow   # a subprocess: the command line as a user runs it
def test_server_check_reports_every_backend_from_the_cli(monkeypatch):
    env = dict(os.environ, **{RB.GENEVAL_URL_ENV: "http://127.0.0.1:18085"})
    env.pop(RB.DEQA_URL_ENV, None)
    out = subprocess.run([sys.executable, "-m", "support.reward_backends"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == {"ocr", "pickscore", "geneval", "deqa"}
    assert "usable" in lines["geneval"] and "http://127.0.0.1:18085" in lines["geneval"]
    assert "missing" in lines["deqa"] and RB.DEQA_URL_ENV in lines["deqa"]
    monkeypatch.setattr(RB.importlib.util, "find_spec", lambda name: None)
    rows = {name: (usable, note) for name, _, usable, note in RB.check()}
    assert rows["ocr"] == (False, "missing: pip install rapidocr-onnxruntime==1.4.4")
    assert rows["pickscore"] == (False, "missing: pip install transformers")
