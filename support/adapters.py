"""
What a LoRA adapter must satisfy to load onto a transformer (teachers, MAR anchor, cold start, student; PEFT
folders and diffusers files alike): every factor names a linear layer of this transformer with matching
features, and every layer its config targets carries both factors. PEFT itself checks neither: a key it does
not know is skipped with a warning, and a targeted layer whose lora_B is missing keeps B = 0, so a damaged
teacher file silently switches its teacher off on that layer and distils the base there instead.
"""
import torch.nn as nn


def check_adapter_fits(transformer, state, source, config=None):
    """Teacher and student must share an architecture (paper §6): every LoRA factor must name a linear
    layer of this transformer with matching in/out features, and, given the adapter's LoraConfig, every
    linear layer it targets must have both factors: PEFT would leave a missing lora_B at zero (the adapter
    silently off on that layer) and a missing lora_A at its random init. Raises naming the layer and `source`."""
    modules = dict(transformer.named_modules())
    for key, w in state.items():
        path, kind = key.rsplit(".lora_", 1)
        layer = modules.get(path)
        if layer is None:
            raise ValueError(f"adapter {source!r} does not fit this model: it has weights for {path!r}, which "
                             f"this transformer lacks (was it trained on another base model?)")
        base = getattr(layer, "base_layer", layer)
        want = base.in_features if kind.startswith("A") else base.out_features
        got = w.shape[1] if kind.startswith("A") else w.shape[0]
        if want != got:
            raise ValueError(f"adapter {source!r} does not fit this model: {path} has "
                             f"{'in' if kind.startswith('A') else 'out'}_features={want}, the adapter's "
                             f"lora_{kind} expects {got} (teacher and student must share one architecture)")
    from peft.tuners.tuners_utils import check_target_module_exists
    targeted = [p for p, m in modules.items() if config is not None and
                isinstance(getattr(m, "base_layer", m), nn.Linear) and check_target_module_exists(config, p)]
    for path, kind in ((p, k) for p in targeted for k in "AB" if f"{p}.lora_{k}.weight" not in state):
        raise ValueError(f"adapter {source!r} lacks lora_{kind} of {path}, a layer its config targets (PEFT would "
                         f"{'zero it, switching the adapter off there' if kind == 'B' else 'leave it random'}): "
                         f"the file is incomplete; download or export it again")
