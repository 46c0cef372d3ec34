"""Fully sharded data parallel training (``--fsdp``, recipe field ``fsdp``) under ``torchrun``.

Each process keeps a 1/N shard of every parameter, gradient and optimiser state instead of a full
copy (DDP), so a model too large for one device trains on N of them. This is PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``): every transformer block is one unit (all-gathered just
before its forward, freed after it, gradients reduce-scattered after its backward), then the model
itself is the root unit for the parameters outside the blocks (patch embedding, tokens, position
table, final norm, head). It runs wherever the process group does: NCCL on GPUs, gloo on CPUs.

The arithmetic is that of one process with the same global batch: gradients are averaged over ranks
(reduce-scatter), the loss is the mean of the ranks' means, clipping uses the global norm. With
``amp=bf16`` the units also gather and compute in bfloat16 (gradients reduced in float32), on top of
the autocast every run uses.

What is written is what a single-process run writes: rank 0 gathers the full state dicts and saves
``model.safetensors`` (and ``model_ema.safetensors``) in the plain vitlab format, so ``eval``,
``predict``, ``finetune``, ``explain`` and ``export`` load them without FSDP. The optimiser state in
``train_state.pt`` is gathered too and stored by parameter name (:func:`optimizer_state_by_name`),
which lets ``--resume`` re-shard it exactly (also onto a different number of processes) and lets a
run continue without FSDP. The EMA copy of the weights is sharded like the model.

Not supported (refused by :func:`check_fsdp` with the reason): torch < 2.6 (FSDP2 became public in 2.6; without
it :func:`is_sharded` is False and plain runs train as usual), a single process (FSDP shards across
processes: run under torchrun with 2 or more), ``amp=fp16`` (needs a sharded gradient scaler),
``--compile``, objectives other than classification and distillation (self-supervised pre-training and
detection/segmentation call the model through other methods than ``forward`` and train extra heads),
``--time-budget`` (its throughput probe runs the unsharded model).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Containers whose elements become FSDP units: ``blocks`` (ViT, DeiT, CaiT's ``blocks_token_only``,
# Swin's ``layers.i.blocks``), else stages/layers for models without a ``*blocks*`` container.
_BLOCK_NAMES = ("blocks",)
_STAGE_NAMES = ("stages", "layers")
SUPPORTED_OBJECTIVES = ("classification", "distillation")
FSDP_MIN_TORCH = "2.6"  # torch.distributed.fsdp.fully_shard / FSDPModule / MixedPrecisionPolicy became public


def check_fsdp(*, world_size: int, amp: str = "none", compile: bool = False, objective: str | None = None,
               trains_extra_modules: bool = False, time_budget: bool = False) -> None:
    """Refuse ``fsdp`` where it cannot run, naming the option and what to do instead (a ValueError)."""
    _require_fsdp2()
    if world_size < 2:
        raise ValueError(
            "--fsdp (recipe fsdp=true) shards the model across processes: run it under torchrun with 2 or more "
            "processes (torchrun --nproc_per_node N -m vitlab.cli.main train ... --fsdp), or train without "
            "--fsdp (--set fsdp=false when resuming a sharded run in one process)")
    if compile:
        raise ValueError("--fsdp with --compile is not supported; give one of them")
    if amp == "fp16":
        raise ValueError("--fsdp with amp=fp16 is not supported (it needs a sharded gradient scaler); "
                         "use --set amp=bf16 or amp=none")
    if objective is not None and objective not in SUPPORTED_OBJECTIVES:
        raise ValueError(f"--fsdp supports the classification and distillation objectives, not {objective!r} "
                         f"(self-supervised pre-training and detection/segmentation run with DDP under torchrun)")
    if trains_extra_modules:
        raise ValueError("--fsdp: this objective trains modules besides the model; not supported with --fsdp")
    if time_budget:
        raise ValueError("--fsdp with --time-budget is not supported (the budget's throughput probe runs the "
                         "unsharded model in each process); give --steps or --epochs")


def _require_fsdp2() -> None:
    """Refuse ``--fsdp`` on a torch without FSDP2 (public in ``torch.distributed.fsdp`` from torch 2.6 on)."""
    try:
        import torch.distributed as dist

        if not dist.is_available():
            raise ImportError("this torch build has no torch.distributed")
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--fsdp (recipe fsdp=true) needs torch >= {FSDP_MIN_TORCH} with torch.distributed "
                         f"(FSDP2: torch.distributed.fsdp.fully_shard); this is torch {torch.__version__} ({e}): "
                         f"upgrade torch, or train without --fsdp (DDP under torchrun)") from e


def shard_units(model: nn.Module) -> list[str]:
    """Names of the submodules that become FSDP units: the elements of every ``*blocks*`` container
    (ModuleList / Sequential), found anywhere in the model; without any, those of ``stages`` / ``layers``.
    Deepest first, as ``fully_shard`` needs children before their parents."""
    def elements(keys: tuple[str, ...]) -> list[str]:
        found = []
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, (nn.ModuleList, nn.Sequential)) and any(k in leaf for k in keys):
                found += [f"{name}.{child}" for child, _ in module.named_children()]
        return found

    units = elements(_BLOCK_NAMES) or elements(_STAGE_NAMES)
    return sorted(dict.fromkeys(units), key=lambda n: -n.count("."))


def shard_model(model: nn.Module, *, device: torch.device, amp: str = "none") -> list[str]:
    """Shard ``model`` in place over all processes of the default group; returns the unit names.

    Every parameter becomes a DTensor holding this rank's shard, on ``device``: build the optimiser
    after this call. The model keeps its class (a subclass of it), attributes and parameter names.
    """
    import torch.distributed as dist

    _require_fsdp2()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("--fsdp: no process group; run under torchrun with 2 or more processes")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if amp == "bf16":  # gather and compute in bfloat16, reduce gradients in float32
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units = shard_units(model)
    modules = dict(model.named_modules())
    for name in units:
        fully_shard(modules[name], **kwargs)
    fully_shard(model, **kwargs)
    log.info("FSDP: %s sharded over %d processes in %d block unit(s) and the root", getattr(
        model, "model_name", type(model).__name__), dist.get_world_size(), len(units))
    return units


def is_sharded(module: nn.Module) -> bool:
    import torch.distributed as dist

    if not dist.is_available():  # a torch build without distributed support shards nothing
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2, so nothing is sharded (shard_model refuses)
        return False
    return isinstance(module, FSDPModule)


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters a forward without backward (evaluation) leaves on the root unit."""
    if is_sharded(module):
        module.reshard()


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on the CPU: gathered on rank 0 (a collective: every rank calls it; the others
    get an empty dict) for a sharded module, a detached copy for a plain one."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank holds it) into a sharded module: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state of a sharded ``module``, gathered on rank 0 (collective) and keyed by parameter
    name (the format of :func:`optimizer_state_by_name`); the other ranks get an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a by-name optimiser state (every rank holds it) into the optimiser of a sharded module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, strict=True))


def is_by_name(state: dict[str, Any]) -> bool:
    """Whether an optimiser state dict refers to parameters by name (FSDP) rather than by index (torch)."""
    groups = state.get("param_groups") or []
    return any(isinstance(p, str) for g in groups for p in g.get("params", []))


def optimizer_state_by_name(state: dict[str, Any]) -> dict[str, Any]:
    """torch's optimiser state (parameters by index) -> the same state keyed by parameter name.

    The names come from the ``names`` list that :func:`vitlab.train.optim.build_optimizer` keeps beside
    each group's ``params``."""
    ids_to_name: dict[int, str] = {}
    groups = []
    for g in state["param_groups"]:
        if "names" not in g or len(g["names"]) != len(g["params"]):
            raise ValueError("optimizer state: a parameter group has no parameter names; it was not built by "
                             "vitlab.train.optim.build_optimizer")
        ids_to_name.update(zip(g["params"], g["names"]))
        groups.append({**g, "params": list(g["names"])})
    return {"state": {ids_to_name[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_index(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A by-name optimiser state -> torch's by-index form for ``optimizer`` (whose groups carry names)."""
    name_to_id: dict[str, int] = {}
    groups = []
    mine = optimizer.state_dict()["param_groups"]
    if len(mine) != len(state["param_groups"]):
        raise ValueError(f"optimizer state: {len(state['param_groups'])} parameter groups saved, this optimiser "
                         f"has {len(mine)}")
    for cur, saved in zip(mine, state["param_groups"]):
        if list(saved["params"]) != list(cur["names"]):
            raise ValueError("optimizer state: the saved parameter groups hold other parameters than this "
                             "optimiser's")
        name_to_id.update(zip(cur["names"], cur["params"]))
        groups.append({**saved, "params": list(cur["params"])})
    return {"state": {name_to_id[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimiser state of either form into a sharded or plain run."""
    if is_sharded(module):
        load_full_optimizer_state(module, optimizer, state if is_by_name(state) else optimizer_state_by_name(state))
    else:
        optimizer.load_state_dict(optimizer_state_by_index(state, optimizer) if is_by_name(state) else state)


__all__ = ["check_fsdp", "full_model_state", "full_optimizer_state", "load_full_model_state",
           "load_optimizer_state", "optimizer_state_by_index", "optimizer_state_by_name", "reshard", "shard_model",
           "shard_units"]
