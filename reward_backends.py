"""
Real-image reward backends for the reward models of Flow-OPD §4 (Flow-GRPO's rewards; formulas as PAPER_NOTES.md
§6), behind the miniature world's call fn(images (B, 3, H, W) in [0, 1], prompts, metadata) -> (B,) float32 and
on its scales (rewards.REWARD_SCALE), so make_rewards(...) can swap them into a dict like rewards.REWARDS. Optional
packages are imported in the constructors; a missing one fails with its pip command.
  ocr        RapidOCRReward: PP-OCR det + rec (ONNX, offline), texts with confidence > 0 joined, rewards.ocr_score
             (Flow-GRPO's 1 - min(Levenshtein, len)/len on the quoted text); an OCR failure scores 0.
  pickscore  PickScoreReward: CLIPModel logit_scale.exp() * cos(text, image) / 26, on the training device.
  geneval    GenEvalServerReward: reward-server client; the reward is the partial "scores" (training). For
             evaluation, score_and_accuracy asks with only_strict=False and also returns "rewards", GenEval's own
             per-image `correct` (the paper's GenEval number is its mean per tag, then over tags; eval.py).
             The server fills "rewards" with 0 when only_strict is true, so training calls carry no accuracy.
  deqa       DeQAServerReward: reward-server client; raw 1-5 like rewards.REWARDS["deqa"].
Reward-server protocol: POST pickle.dumps({"images": [JPEG bytes], "meta_datas": [...], "only_strict": bool}) in
batches of 64; the answer is a pickled dict, decoded by PlainDataUnpickler, which resolves no global except
builtins.set/frozenset/bytearray/complex (protocol 3 needs them; the server pickles with the default, 4 or 5;
protocols 0-2 rebuild bytes through _codecs.encode and are refused). numpy is refused on purpose: the real servers
answer plain floats (gen_eval.py scores in Python and turns its defaultdicts into dicts, deqa.py calls .item()).
Departures from Flow-GRPO:
  1) ocr: RapidOCR's PP-OCRv4 models (a Chinese+English recogniser), not PaddleOCR(lang="en"); like PaddleOCR's
     default drop_score, lines under confidence 0.5 are dropped first; images go in as BGR (Flow-GRPO hands
     PaddleOCR RGB arrays); a prompt without quoted text raises ValueError, as the world's ocr does.
  2) deqa: reward-server's deqa.py answers model.score / 5; the client multiplies by 5 to give the raw score.
  3) geneval: samples whose metadata has no "include" are not sent and score NaN (the world's "does not apply");
     metadata without "prompt" gets the sample's prompt (the server reads it).
  4) HTTP: bounded retries (5xx and connection errors, exponential backoff), then an error naming the URL;
     Flow-GRPO retries a 500 up to 1000 times.
  5) pickscore: the CLIP runs on the training device in its mixed precision (bf16 on a GPU; Flow-GRPO: fp32);
     the cosine and the logit scale are taken in fp32.
"""
import importlib.util   # binds importlib too (import_module)
import io
import math
import os
import pickle
import time
import urllib.error
import urllib.request

import torch

import rewards

WORLD = "world"        # make_rewards: keep the miniature world's reward
RAPIDOCR = "rapidocr"  # make_rewards(ocr=...): the RapidOCR backend
SERVER = "server"      # make_rewards(geneval/deqa=...): the reward-server whose URL is in the environment
GENEVAL_URL_ENV, DEQA_URL_ENV = "FLOW_OPD_GENEVAL_URL", "FLOW_OPD_DEQA_URL"
RAPIDOCR_PIP = "rapidocr-onnxruntime==1.4.4"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # Flow-GRPO takes PickScore's processor from CLIP-H
PICKSCORE_NORM = 26.0      # Flow-GRPO's "norm to 0-1": reward = PickScore / 26
CLIP_MAX_TOKENS = 77
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")  # hub checkpoints; transformers >= 5
SERVER_BATCH = 64          # images per request, as Flow-GRPO's client


def _require(module, pip_spec):
    """Import an optional package, or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this reward backend needs the package '{pip_spec.split('==')[0]}': "
                          f"pip install {pip_spec}") from e


def to_uint8(images):
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 numpy, rounded as Flow-GRPO's rewards do."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ------------------------------------------------------------------------------------------------ ocr
class RapidOCRReward:
    def __init__(self, **engine_kwargs):
        """engine_kwargs go to rapidocr_onnxruntime.RapidOCR (e.g. intra_op_num_threads=2)."""
        self.engine = _require("rapidocr_onnxruntime", RAPIDOCR_PIP).RapidOCR(**engine_kwargs)

    def recognise(self, image):
        """Text read on one (H, W, 3) uint8 RGB image: the detected lines with confidence > 0, joined."""
        lines, _ = self.engine(image[:, :, ::-1].copy(), use_cls=False)   # BGR, no angle classifier (Flow-GRPO)
        return "".join(text for _box, text, confidence in lines or [] if confidence > 0)

    def __call__(self, images, prompts, metadata):
        scores = []
        for image, prompt in zip(to_uint8(images), prompts):
            try:
                text = self.recognise(image)
            except Exception:   # Flow-GRPO: any OCR failure counts as dist = len(target), reward 0
                scores.append(0.0)
                continue
            scores.append(rewards.ocr_score(text, prompt))
        return torch.tensor(scores, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ pickscore
class PickScoreReward:
    def __init__(self, model_path=PICKSCORE_MODEL, processor_path=None, device="cpu", dtype=torch.float32):
        """model_path: a local folder or hub id of a transformers CLIPModel. processor_path defaults to the model's
        own folder, except for the hub PickScore_v1, whose processor Flow-GRPO loads from CLIP-H. A local folder
        needs config.json, the weights (model.safetensors or pytorch_model.bin) and CLIP's tokenizer files
        (tokenizer.json, or vocab.json + merges.txt, with tokenizer_config.json); without a processor config
        (preprocessor_config.json, or transformers 5's processor_config.json), CLIP's standard image
        preprocessing at the model's image size is used.
        device, dtype: where the CLIP runs (the training GPU in bf16, not Flow-GRPO's fp32: the towers' outputs
        are compared in fp32, so the score moves by ~1e-3 of its value)."""
        transformers = _require("transformers", "transformers")
        if processor_path is None:
            processor_path = PICKSCORE_PROCESSOR if model_path == PICKSCORE_MODEL else model_path
        self.model = transformers.CLIPModel.from_pretrained(model_path).eval().to(device, dtype)
        self.processor = clip_processor(processor_path, self.model.config.vision_config.image_size)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        from PIL import Image
        pixels = self.processor(images=[Image.fromarray(a) for a in to_uint8(images)], return_tensors="pt")
        text = self.processor(text=list(prompts), padding=True, truncation=True, max_length=CLIP_MAX_TOKENS,
                              return_tensors="pt")
        m = self.model
        image = m.visual_projection(m.vision_model(
            pixel_values=pixels["pixel_values"].to(self.device, self.dtype)).pooler_output).float()   # (B, E)
        words = m.text_projection(m.text_model(input_ids=text["input_ids"].to(self.device),
                                               attention_mask=text["attention_mask"].to(self.device)).pooler_output)
        cos = torch.nn.functional.cosine_similarity(image, words.float(), dim=-1)                      # (B,)
        return (m.logit_scale.float().exp() * cos / PICKSCORE_NORM).cpu()   # = CLIP's logits_per_text diagonal


def clip_processor(path, image_size):
    """A CLIPProcessor from `path`; when the folder has the tokenizer but no processor config, the image
    side is CLIP's standard one (resize the short side to image_size, bicubic, centre crop, CLIP mean/std), which
    is also CLIP-H's preprocessor_config that Flow-GRPO loads for PickScore."""
    from transformers import AutoProcessor, AutoTokenizer, CLIPImageProcessor, CLIPProcessor
    if not os.path.isdir(path) or any(os.path.isfile(os.path.join(path, f)) for f in PROCESSOR_CONFIGS):
        return AutoProcessor.from_pretrained(path)
    has = lambda *names: all(os.path.isfile(os.path.join(path, n)) for n in names)
    if not (has("tokenizer.json") or has("vocab.json", "merges.txt")):  # transformers 5 would build an empty one
        raise FileNotFoundError(
            f"PickScore folder {path!r} has no CLIP tokenizer. Fix: put tokenizer.json (or vocab.json + merges.txt) "
            f"and tokenizer_config.json in it, e.g. `hf download {PICKSCORE_PROCESSOR} tokenizer.json "
            f"tokenizer_config.json special_tokens_map.json --local-dir {path}`")
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------- reward-server
class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dict, list, tuple, str, bytes, numbers, bool, None, sets): any other global,
    a function to call included, is refused before anything runs."""
    ALLOWED = {("builtins", name) for name in ("set", "frozenset", "bytearray", "complex")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} from a reward-server response: only plain "
                                     "data (dict, list, str, numbers, ...) is accepted")


def decode_response(body):
    """A reward-server answer (pickled dict of plain data) -> dict."""
    data = PlainDataUnpickler(io.BytesIO(body)).load()
    if not isinstance(data, dict):
        raise pickle.UnpicklingError(f"a reward-server response must be a dict, got {type(data).__name__}")
    return data


def jpeg_bytes(image):
    """(H, W, 3) uint8 -> JPEG bytes at PIL's default quality (75), as Flow-GRPO's client sends them."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    return buffer.getvalue()


class RewardServerClient:
    def __init__(self, url, timeout=120.0, retries=5, backoff=1.0, batch_size=SERVER_BATCH):
        self.url, self.timeout, self.retries, self.backoff, self.batch_size = url, timeout, retries, backoff, batch_size

    def post(self, payload):
        """One pickled request; retries 5xx answers and connection errors, sleeping backoff * 2^k."""
        body, last = pickle.dumps(payload), None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/octet-stream"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return decode_response(response.read())
            except urllib.error.HTTPError as e:   # the server answered: a 4xx will not get better by retrying
                last = f"HTTP {e.code}: {e.read()[-500:].decode('utf-8', 'replace')}"
                if e.code < 500:
                    raise RuntimeError(f"reward server at {self.url} refused the request ({last})") from e
            except OSError as e:                  # refused / reset connections and timeouts
                last = repr(e)
        raise ConnectionError(f"reward server at {self.url} failed {self.retries + 1} tries; last error: {last}")

    def score(self, images, meta_datas, only_strict):
        """All answers for images (B, 3, H, W), in batches of batch_size: a list of response dicts."""
        arrays = to_uint8(images)
        return [self.post({"images": [jpeg_bytes(a) for a in arrays[i:i + self.batch_size]],
                           "meta_datas": list(meta_datas[i:i + self.batch_size]), "only_strict": only_strict})
                for i in range(0, len(arrays), self.batch_size)]


def _server_url(url, env_name):
    url = url or os.environ.get(env_name)
    if not url:
        raise ValueError(f"no reward-server URL: pass url= or set {env_name}=http://host:port")
    return url


def _field(response, key, url):
    if key not in response:
        raise KeyError(f"reward server at {url} answered without '{key}' (keys: {sorted(response)})")
    return response[key]


def _scores(responses, key, n, url):
    """The per-image list `key` of every batch's answer, concatenated; one value per image sent."""
    values = [float(x) for r in responses for x in _field(r, key, url)]
    if len(values) != n:
        raise ValueError(f"reward server at {url} answered {len(values)} '{key}' for {n} images")
    return values


class GenEvalServerReward:
    """GenEval via reward-server's app_geneval.py. details() returns every field the server sends."""
    FIELDS = ("scores", "rewards", "strict_rewards")
    GROUP_FIELDS = ("group_rewards", "group_strict_rewards")   # tag -> list, -10.0 where the tag differs (server's)

    def __init__(self, url=None, only_strict=True, **client_kwargs):
        self.client = RewardServerClient(_server_url(url, GENEVAL_URL_ENV), **client_kwargs)
        self.only_strict = only_strict   # Flow-GRPO's training calls skip GenEval's non-strict check

    def details(self, images, prompts, metadata, only_strict=None):
        """{"index": sent sample positions, FIELDS: lists over them, GROUP_FIELDS: merged dicts}; only_strict:
        self.only_strict unless given."""
        index = [i for i, m in enumerate(metadata) if "include" in m]
        metas = [dict(metadata[i], prompt=metadata[i].get("prompt", prompts[i])) for i in index]
        strict = self.only_strict if only_strict is None else only_strict
        responses, url = self.client.score(images[index], metas, strict), self.client.url   # [] if none
        out = {"index": index, **{k: _scores(responses, k, len(index), url) for k in self.FIELDS},
               **{k: {} for k in self.GROUP_FIELDS}}
        for response in responses:
            for k in self.GROUP_FIELDS:
                for tag, values in _field(response, k, url).items():
                    out[k].setdefault(tag, []).extend(values)
        return out

    def __call__(self, images, prompts, metadata):
        return self._per_sample(self.details(images, prompts, metadata), "scores", len(metadata))

    def score_and_accuracy(self, images, prompts, metadata):
        """(partial score, GenEval accuracy), each (B,) float32 and NaN where not sent, from one pass with
        only_strict=False: accuracy = "rewards" (GenEval's `correct`: at least `count` objects, colours,
        positions, no excluded class), not "strict_rewards" (exact counts, the reward-server's own addition)."""
        d = self.details(images, prompts, metadata, only_strict=False)
        return self._per_sample(d, "scores", len(metadata)), self._per_sample(d, "rewards", len(metadata))

    @staticmethod
    def _per_sample(details, key, n):
        out = torch.full((n,), math.nan)
        out[details["index"]] = torch.tensor(details[key], dtype=torch.float32)
        return out


class DeQAServerReward:
    """DeQA-Score via reward-server's app_deqa.py, on the raw 1-5 scale (the server answers score / 5)."""
    DEQA_MAX = 5.0

    def __init__(self, url=None, **client_kwargs):
        self.client = RewardServerClient(_server_url(url, DEQA_URL_ENV), **client_kwargs)

    def __call__(self, images, prompts, metadata):
        outputs = _scores(self.client.score(images, metadata, False), "outputs", len(images), self.client.url)
        return torch.tensor(outputs, dtype=torch.float32) * self.DEQA_MAX


# ---------------------------------------------------------------------------------- registry, check
def make_rewards(ocr=WORLD, pickscore=WORLD, geneval=WORLD, deqa=WORLD, device="cpu", dtype=torch.float32):
    """A dict like rewards.REWARDS with some names served by real backends:
    ocr "world" | "rapidocr"; pickscore "world" | a CLIPModel folder or hub id (run on device in dtype);
    geneval, deqa "world" | "server" (the URL in FLOW_OPD_GENEVAL_URL / FLOW_OPD_DEQA_URL) | a URL."""
    out = dict(rewards.REWARDS)
    if ocr != WORLD:
        if ocr != RAPIDOCR:
            raise ValueError(f"ocr backend must be '{WORLD}' or '{RAPIDOCR}', got {ocr!r}")
        out["ocr"] = RapidOCRReward()
    if pickscore != WORLD:
        out["pickscore"] = PickScoreReward(pickscore, device=device, dtype=dtype)
    if geneval != WORLD:
        out["geneval"] = GenEvalServerReward(None if geneval == SERVER else geneval)
    if deqa != WORLD:
        out["deqa"] = DeQAServerReward(None if deqa == SERVER else deqa)
    return out


def check():
    """Which real backends are usable here: rows (reward, backend, usable, what it uses or how to get it)."""
    def package(module, pip_spec, uses):
        found = importlib.util.find_spec(module) is not None
        return found, uses if found else f"missing: pip install {pip_spec}"

    def server(env_name, app):
        url = os.environ.get(env_name)
        return bool(url), (f"{url} (configured, not contacted)" if url else
                           f"not configured: run reward-server's {app}, then export {env_name}=http://host:port")

    return [("ocr", "rapidocr", *package("rapidocr_onnxruntime", RAPIDOCR_PIP, "PP-OCRv4 ONNX models in the package")),
            ("pickscore", "clip", *package("transformers", "transformers",
                                           f"{PICKSCORE_MODEL} from the hub or a local CLIPModel folder")),
            ("geneval", "server", *server(GENEVAL_URL_ENV, "app_geneval.py")),
            ("deqa", "server", *server(DEQA_URL_ENV, "app_deqa.py"))]


if __name__ == "__main__":  # python reward_backends.py: which real-image reward backends are usable here
    for name, backend, usable, note in check():
        print(f"{name:9s} {backend:8s} {'usable' if usable else 'missing':7s} {note}")
