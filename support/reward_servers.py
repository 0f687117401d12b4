"""
The reward-server clients of support/reward_backends.py: GenEval and DeQA scored by flow_grpo's reward servers
over HTTP, behind the world's reward call fn(images (B, 3, H, W) in [0, 1], prompts, metadata) -> (B,).
Protocol: POST pickle.dumps({"images": [JPEG bytes], "meta_datas": [...], "only_strict": bool}) in batches of
64; the answer is a pickled dict, decoded by PlainDataUnpickler, which resolves no global except
builtins.set/frozenset/bytearray/complex (protocol 3 needs them); numpy is refused on purpose: the real
servers answer plain floats. Departures from Flow-GRPO are listed in support/reward_backends.py (3 and 4).
"""
import io
import math
import os
import pickle
import time
import urllib.error
import urllib.request

import torch

from support.rollouts import to_uint8

SERVER = "server"      # make_rewards(geneval/deqa=...): the reward-server whose URL is in the environment
GENEVAL_URL_ENV, DEQA_URL_ENV = "FLOW_OPD_GENEVAL_URL", "FLOW_OPD_DEQA_URL"
SERVER_BATCH = 64          # images per request, as Flow-GRPO's client


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
        arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
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
