"""
Multi-process training with torchrun: one process per GPU (or several on a CPU, for tests), gloo or NCCL.

    torchrun --nproc_per_node=N train.py --stage distill ...

What is shared and what is not (Flow-OPD and Flow-GRPO train the same way on 8-32 GPUs):
  * prompts are sharded: each process draws its own prompts and noise (its generator is seeded seed + rank);
    GRPO groups never straddle processes, so group advantages stay local;
  * the LoRA gradients are averaged over processes after every backward pass of an iteration, before the
    optimizer step, which is what DistributedDataParallel does. It is done by hand on the trainable adapter
    only, because the one backbone also carries the frozen teacher and anchor adapters, which are switched
    between forward passes (DDP's hooks assume one fixed forward graph per step);
  * logged metrics are means over processes; only rank 0 writes logs, checkpoints and evaluations.
Without torchrun's environment every function here is a no-op for a single process.
"""
import os

import torch
import torch.distributed as dist


def init(device):
    """(rank, world size, device) from torchrun's environment variables; (0, 1, device) without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def broadcast_parameters(params):
    """Start every process from rank 0's weights (the cold start is deterministic, but this costs nothing)."""
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params):
    """p.grad <- mean over processes of p.grad, for the trainable parameters (one flat all-reduce)."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def mean_over_processes(metrics):
    """{name: float} averaged over processes (every process must pass the same names, in the same order)."""
    if not dist.is_initialized():
        return metrics
    x = torch.tensor(list(metrics.values()), dtype=torch.float64)
    dist.all_reduce(x)
    return dict(zip(metrics, (x / dist.get_world_size()).tolist()))


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process ([obj] alone)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def max_parameter_spread(params):
    """max |p_rank - p_rank0| over processes and parameters: 0 when the replicas are in sync."""
    if not dist.is_initialized():
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    spread = (flat - ref).abs().max()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return spread.item()


def world_size():
    """Processes in the run (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
