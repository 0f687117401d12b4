"""
The floor of one Flow-OPD distill iteration: its transformer passes alone, so that tools/bench.py can say how
much of an iteration's time is anything else (routing, adapter switches, the loss, bookkeeping, decoding).

train.opd_iteration with N samples in micro-batches of m, T SDE steps and K trained steps runs, per micro-batch:
  sampling   T no-grad forwards (the student's rollout);
  training   at each of the K trained steps, a no-grad forward of the routed teacher (of every teacher under
             soft routing), one of the MAR anchor (none with --mar_anchor none), and the student's forward +
             backward;
every forward with classifier-free guidance, i.e. on a batch of 2m (cond and uncond). The floor runs exactly
these passes, on the same model (the same adapters, one active), on tensors of the same shapes, under the same
autocast and gradient checkpointing: the batch is not split by teacher, no adapter is switched, the student's
backward starts from a fixed output gradient instead of a loss, and nothing is encoded, decoded or stored.
Its inputs are built once, outside the timed region. tools/bench.py runs it after every iteration of each
variant, on that variant's model, and reports the iteration's time as a ratio to it.
"""
import torch

from support.rollouts import amp, micro_batch_conds


def floor_inputs(model, records, cfg):
    """Per micro-batch: the transformer's keyword arguments for the batch of 2m (m with guidance 1) that
    model.velocity builds, and a fixed gradient for the student's backward."""
    g = torch.Generator().manual_seed(cfg.seed)
    dtype, dev = model.transformer.dtype, cfg.device
    out = []
    for (cond, pooled), (uncond, upooled), scale in micro_batch_conds(model, records, cfg):
        guided = scale != 1.0
        embeds, pool = (torch.cat([uncond, cond]), torch.cat([upooled, pooled])) if guided else (cond, pooled)
        x = torch.randn(len(embeds), *model.latent_shape, generator=g)
        kw = dict(hidden_states=x.to(dev, dtype), encoder_hidden_states=embeds.to(dev, dtype),
                  pooled_projections=pool.to(dev, dtype), timestep=torch.full((len(embeds),), 500.0, device=dev),
                  return_dict=False)
        out.append((kw, torch.randn(x.shape, generator=g).to(dev, dtype)))
    return out


def floor_passes(model, inputs, cfg, teachers=1):
    """One iteration's transformer passes (module docstring) on floor_inputs; teachers: the teacher forwards
    per trained step (1 under hard routing). Returns the number of passes (forwards; backwards counted apart)."""
    t, n = model.transformer, 0
    trained = min(cfg.train_timesteps, cfg.num_steps - 1)   # rollouts.trained_steps draws from the first T - 1
    no_grad = teachers + (cfg.mar_anchor != "none")
    with amp(cfg):
        for kw, _ in inputs:
            with torch.no_grad():
                for _ in range(cfg.num_steps):
                    t(**kw)
        for _ in range(trained):
            for kw, grad in inputs:
                with torch.no_grad():
                    for _ in range(no_grad):
                        t(**kw)
                t(**kw)[0].backward(grad)
                n += no_grad + 1
    return n + len(inputs) * cfg.num_steps
