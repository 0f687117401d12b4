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
import os

import torch

import rewards
from support.hub import split_revision
from support.reward_servers import DEQA_URL_ENV, GENEVAL_URL_ENV, SERVER, DeQAServerReward, GenEvalServerReward
from support.rollouts import to_uint8

WORLD = "world"        # make_rewards: keep the miniature world's reward
RAPIDOCR = "rapidocr"  # make_rewards(ocr=...): the RapidOCR backend
RAPIDOCR_PIP = "rapidocr-onnxruntime==1.4.4"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # Flow-GRPO takes PickScore's processor from CLIP-H
PICKSCORE_NORM = 26.0      # Flow-GRPO's "norm to 0-1": reward = PickScore / 26
CLIP_MAX_TOKENS = 77
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")  # hub checkpoints; transformers >= 5


def _require(module, pip_spec):
    """Import an optional package, or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this reward backend needs the package '{pip_spec.split('==')[0]}': "
                          f"pip install {pip_spec}") from e


def to_hwc_uint8(images):
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 numpy (rollouts.to_uint8's rounding, channels last):
    what OCR engines and JPEG encoders take."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


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
        for image, prompt in zip(to_hwc_uint8(images), prompts):
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
        repo, revision = split_revision(model_path)   # ID@REVISION pins a hub checkpoint (support/hub.py)
        if processor_path is None:
            processor_path = PICKSCORE_PROCESSOR if repo == PICKSCORE_MODEL else model_path
        self.model = transformers.CLIPModel.from_pretrained(repo, revision=revision).eval().to(device, dtype)
        self.processor = clip_processor(processor_path, self.model.config.vision_config.image_size)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        from PIL import Image
        pixels = self.processor(images=[Image.fromarray(a) for a in to_hwc_uint8(images)], return_tensors="pt")
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
        repo, revision = split_revision(path)
        return AutoProcessor.from_pretrained(repo, revision=revision)
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


if __name__ == "__main__":  # python -m support.reward_backends: which real-image reward backends are usable here
    for name, backend, usable, note in check():
        print(f"{name:9s} {backend:8s} {'usable' if usable else 'missing':7s} {note}")
