"""The model across processes: FSDP2 sharding, loading a checkpoint read by rank 0 alone into every rank's
shards or replicas, generation on a sharded model, the gathered state dict.

- `shard(policy)`: FSDP2, one unit per vision block and per decoder layer, then the root (made the root at once:
  `init_fsdp_root`); `from_rank0=True` fills the shards from rank 0's weights one tensor at a time.
- `place_replica(module, device, from_rank0)`: a whole copy per rank (one process, DDP, eval).
- `gathered_for_generation(policy)`: run `generate` on a sharded model with no collective per token.
- `full_state_dict(policy)`: the HF model's full state dict on CPU (every rank calls; rank 0 saves).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from transformers import Qwen2_5_VLForConditionalGeneration

from model import is_gradient_checkpointing, set_gradient_checkpointing
from policy import Policy


def shard(
    policy: Policy,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    from_rank0: bool = False,
) -> Policy:
    """FSDP2: one unit per vision block and per decoder layer, then the root (the Policy, which owns the
    embeddings, the vision patch embed/merger and lm_head). With `param_dtype=bf16` the compute runs in bf16
    while the sharded master weights, gradients and optimizer state stay fp32 (PITFALLS: at lr 1e-6 a bf16
    weight update is lost) and gradients are reduced in fp32.

    `from_rank0`: rank 0 holds the loaded weights (on the host), every other rank the same architecture on the
    meta device (`load_model(..., on_meta=True)`). The model is sharded first (each rank keeps only its shard,
    on its device; no unsharded model is ever moved to a device), then rank 0's weights are scattered into
    the shards one tensor at a time (`_fill_shards_from_rank0`; verl and torchtitan use
    `set_model_state_dict(..., broadcast_from_rank0=True)`, which holds a second copy of the shards at its
    peak), then the buffers (rotary frequencies, not in the state dict). Host memory: rank 0 one full
    copy while it loads; every other rank its shard plus the largest single tensor in flight."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = policy.state_dict() if from_rank0 and dist.get_rank() == 0 else {}  # references, not copies
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mp_policy": mp} if mp else {}
    for block in policy.model.model.visual.blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    for layer in policy.model.model.language_model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(policy, **kw)
    if from_rank0:
        _fill_shards_from_rank0(policy, full)
    del full
    init_fsdp_root(policy)
    policy.always_run_vision = True
    policy.reshard_after_forward = reshard_after_forward
    return policy


def place_replica(module: nn.Module, device: torch.device, from_rank0: bool = False) -> nn.Module:
    """A whole copy of the model on `device` (one process, or a DDP replica). `from_rank0`: the ranks that built
    on the meta device allocate their copy on the device and receive every parameter and buffer from rank 0."""
    if not from_rank0:
        return module.to(device)
    import torch.distributed as dist

    if next(module.parameters()).device.type == "meta":
        module.to_empty(device=device)
    else:
        module.to(device)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
    _retie_rotary(module)
    return module


def _retie_rotary(module: nn.Module) -> None:
    for m in module.modules():  # HF rotary modules keep a second reference to their frequencies
        if hasattr(m, "original_inv_freq") and hasattr(m, "inv_freq"):
            m.original_inv_freq = m.inv_freq


def _fill_shards_from_rank0(policy: Policy, full: dict[str, torch.Tensor]) -> None:
    """Rank 0's full tensors (`full`, empty elsewhere) into every rank's shards, one tensor at a time:
    `distribute_tensor(..., src_data_rank=0)` scatters rank 0's data, and each rank copies its piece into its
    shard at once. (`set_model_state_dict(broadcast_from_rank0=True)` does the same but keeps every new shard
    until the end, a second copy of the shards at its peak.)"""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    device = next(p for p in policy.parameters()).device
    if device.type == "meta":  # the ranks that built on meta: allocate their shards (values follow)
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        policy.to_empty(device=device)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if isinstance(param, DTensor):
                src = (
                    full[name].to(device)
                    if dist.get_rank() == 0
                    else torch.empty(param.shape, dtype=param.dtype, device=device)
                )
                piece = distribute_tensor(src, param.device_mesh, param.placements, src_data_rank=0)
                param.to_local().copy_(piece.to_local())
                full.pop(name, None)  # rank 0: the full tensor is released as soon as it is scattered
                del src, piece
            else:
                param.copy_(full[name]) if dist.get_rank() == 0 else None
                dist.broadcast(param.data, src=0)
        for _, buf in policy.named_buffers():
            dist.broadcast(buf, src=0)
    _retie_rotary(policy)


def init_fsdp_root(root: nn.Module) -> None:
    """Make `root` FSDP2's root now, not at its first forward.

    FSDP2 decides lazily which unit is the root: the first one whose forward runs. A rollout calls the inner HF
    model (`generate`) before the Policy has ever run, so every inner unit would become a root of its own and
    the Policy's first forward then fails ("FSDP state has already been lazily initialized for ..."), after a
    whole rollout step (PITFALLS.md). The root's lazy init is local bookkeeping (no collective), so it runs
    here, right after sharding, whatever the order of later calls. torch exposes no public call for it."""
    state = root._get_fsdp_state()
    state._lazy_init()
    if not state._is_root:
        raise RuntimeError("FSDP2 root initialisation failed: the Policy is not the root")


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_for_generation(policy: nn.Module) -> Iterator[Qwen2_5_VLForConditionalGeneration]:
    """Yield the HF model ready for `generate`: eval mode, gradient checkpointing off, and, when sharded,
    every FSDP unit's weights gathered once (`unshard` is per module, not recursive) and kept gathered
    through every forward, so no collective runs per token. Restores everything on exit."""
    model = policy.model if isinstance(policy, Policy) else policy
    was_training, was_ckpt = policy.training, is_gradient_checkpointing(model)
    units = _fsdp_modules(policy)
    inner = [u for u in units if u is not policy]  # the root keeps its own reshard setting
    for unit in units:
        unit.unshard()
    for unit in inner:
        unit.set_reshard_after_forward(False)
    if was_ckpt:
        set_gradient_checkpointing(model, False)
    policy.eval()
    try:
        yield model
    finally:
        for unit in inner:
            unit.set_reshard_after_forward(getattr(policy, "reshard_after_forward", True))
        for unit in units:
            unit.reshard()
        if was_ckpt:
            set_gradient_checkpointing(model, True)
        policy.train(was_training)


def full_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The HF model's full state dict on CPU, gathered from shards when sharded (every rank must call)."""
    model = policy.model if isinstance(policy, Policy) else policy
    if not _fsdp_modules(policy):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}
