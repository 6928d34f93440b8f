"""The training optimiser: one ``step()`` / ``zero_grad()`` / ``state_dict()`` over the ID rows and
the dense parameters (encoder, adapters).

- ``torchrec`` backend: TorchRec's fused optimiser of the sharded tables (``model.fused_optimizer``,
  applied in backward; the ID table's optimiser is chosen by ``train.id_optimizer``) and Adam over
  the trainable parameters without an in-backward optimiser (``in_backward_optimizer_filter``; a
  replicated frozen table is not trained), combined by TorchRec's ``CombinedOptimizer``; with the
  data-parallel plan the ID table has no fused optimiser and gets the ID optimiser here
  (:func:`data_parallel_tables`).
- ``torch`` backend: Adam over the dense parameters and the ID optimiser over the item module's ID
  tables (its ``id_modules``), combined by :class:`OptimizerGroup`.

State keys are names, never positions, so a checkpoint's optimiser state loads by name.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import RunConfig
from ..errors import choose


def _rowwise_adagrad(lr: float) -> tuple[type, dict]:
    from torchrec.optim import RowWiseAdagrad

    return RowWiseAdagrad, {"lr": lr, "eps": 1e-8}


# train.id_optimizer -> lr -> (torch optimiser class, kwargs); TorchRec maps the classes to its fused
# kernels. No weight decay on ID rows (train.weight_decay is the dense parameters'), on either backend.
ID_OPTIMIZERS = {
    "sgd": lambda lr: (torch.optim.SGD, {"lr": lr}),
    "adagrad": lambda lr: (torch.optim.Adagrad, {"lr": lr, "eps": 1e-8}),
    "rowwise_adagrad": _rowwise_adagrad,
    "adam": lambda lr: (torch.optim.Adam, {"lr": lr}),
}


def id_optimizer(name: str, lr: float) -> tuple[type, dict]:
    """The torch optimiser class + kwargs of the ID rows for ``train.id_optimizer=name``."""
    return choose(ID_OPTIMIZERS, name, "train.id_optimizer")(lr)


def with_adam_state(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``opt`` with the state Adam would create at its first step (zero moments, step 0), so that a
    checkpoint can be loaded into it before any step; other optimisers are returned as they are."""
    if isinstance(opt, torch.optim.Adam):
        for group in opt.param_groups:
            for p in group["params"]:
                if p not in opt.state:
                    opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                    "exp_avg_sq": torch.zeros_like(p)}
    return opt


class OptimizerGroup:
    """Named torch optimisers behind one ``step()`` / ``zero_grad()``; ``state_dict()`` keys each
    parameter's state as ``"<optimiser>.<parameter name>"``.

    Args:
        parts: optimiser name -> (the optimiser, names of its parameters in its own order).
    """

    def __init__(self, parts: dict[str, tuple[torch.optim.Optimizer, list[str]]]):
        self.parts = parts

    def step(self) -> None:
        for opt, _ in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt, _ in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state = {}
        for key, (opt, names) in self.parts.items():
            for index, entry in opt.state_dict()["state"].items():
                state[f"{key}.{names[index]}"] = entry
        return {"state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        for key, (opt, names) in self.parts.items():
            own = opt.state_dict()
            own["state"] = {i: state_dict["state"][f"{key}.{name}"] for i, name in enumerate(names)
                            if f"{key}.{name}" in state_dict["state"]}
            opt.load_state_dict(own)


def trainable_parameters(net: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(dense, ID) trainable parameters of an unwrapped recommender, by name.

    ID: the parameters of the item module's ID tables (``items.id_modules``); dense: every other
    parameter that needs a gradient (encoder, adapters). Frozen tables are in neither.
    """
    ids = {id(p) for name in net.items.id_modules for p in getattr(net.items, name).parameters()}
    dense, id_params = {}, {}
    for name, p in net.named_parameters():
        if id(p) in ids:
            id_params[name] = p
        elif p.requires_grad:
            dense[name] = p
    return dense, id_params


def _storage(p: torch.Tensor) -> int:
    return p.untyped_storage().data_ptr()


def data_parallel_tables(model: nn.Module, specs: list) -> tuple[dict[str, nn.Parameter], set[int]]:
    """The tables of a DMP ``model`` that TorchRec's data-parallel plan holds (each rank a full copy,
    gradients all-reduced by DDP, no in-backward optimiser): ({name: weight} of the trainable ones,
    the storages of all of them).

    TorchRec exposes such a table twice among the parameters: as the table's weight (a view) and as
    its kernel's buffer. The ID table's view gets the ID optimiser, as with ``train.backend=torch``;
    nothing else may update either (a frozen table's lookups run under ``no_grad``).
    """
    named = dict(model.named_parameters())
    ids, storages = {}, set()
    for spec in specs:
        suffix = f"items.{spec.module}.embeddings.{spec.table}.weight"
        found = [(n, p) for n, p in named.items() if n.endswith(suffix)]
        if len(found) != 1:
            raise RuntimeError(f"TorchRec table {spec.module}.{spec.table}: expected one parameter named "
                               f"*{suffix}, found {[n for n, _ in found]}")
        name, weight = found[0]
        if hasattr(weight, "_in_backward_optimizers"):
            continue  # sharded: the fused optimiser trains it
        storages.add(_storage(weight))
        if not spec.frozen:
            ids[name] = weight
    return ids, storages


def _id_rows_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``train.id_optimizer`` over ID tables that no fused kernel trains, with the kernels torch
    picks for plain tensors on every backend: multi-tensor (foreach) on CUDA, one-tensor on the CPU.
    Left to itself torch takes the one-tensor kernels for TorchRec's data-parallel table (a
    ``Parameter`` subclass), and the two round differently (Adagrad: ``p + (-lr * g) / s`` against
    ``p + -lr * (g / s)``), which two epochs of bf16 training grow past 1e-5."""
    cls, kwargs = id_optimizer(cfg.train.id_optimizer, cfg.train.id_lr)
    return with_adam_state(cls(params, **kwargs, foreach=all(p.device.type == "cuda" for p in params)))


def build_optimizer(cfg: RunConfig, model: nn.Module, net: nn.Module):
    """The run's optimiser (see the module docstring).

    Args:
        model: the module that is trained (the DMP wrapper with the torchrec backend).
        net: the unwrapped recommender.
    """
    t = cfg.train

    def adam(params):
        return with_adam_state(torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay))

    if t.backend == "torchrec":
        from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        ids, skip = data_parallel_tables(model, net.items.torchrec_tables())
        # frozen parameters (a replicated frozen table) take no Adam state
        dense = KeyedOptimizerWrapper({n: p for n, p in in_backward_optimizer_filter(model.named_parameters())
                                       if p.requires_grad and not (skip and _storage(p) in skip)}, adam)
        parts = [("tables", model.fused_optimizer), ("dense", dense)]
        if ids:
            parts.append(("ids", KeyedOptimizerWrapper(ids, lambda params: _id_rows_optimizer(cfg, list(params)))))
        return CombinedOptimizer(parts)
    dense, ids = trainable_parameters(net)
    parts = {"dense": (adam(list(dense.values())), list(dense))}
    if ids:
        parts["ids"] = (_id_rows_optimizer(cfg, list(ids.values())), list(ids))
    return OptimizerGroup(parts)
