"""Delta Gradient Descent as the outer optimizer of linear layers (HOPE_SPEC.md Sec. 1).

For a linear map y = W x trained on an L2 objective, one step over the tokens x_t of a batch is

    W <- W (I - lr gamma C) - lr u ,    C = mean_t x^_t x^_t^T ,   x^_t = x_t / ||x_t||      (arXiv Eq. 57)

u = grad L(W) (the usual batch gradient), gamma = optim.dgd_strength. The decay along the
inputs' directions is what DGD adds to plain gradient descent. The inputs are observed by
forward pre-hooks on the nn.Linear modules whose weights use the rule; C is summed over the
micro-batches of the step and over ranks (each rank sees different tokens), then divided by
the global token count, so it equals a single process's C on the same global batch. Under FSDP
the weight's rows are sharded and C is whole, so W_local C needs no gather.

C is accumulated and applied in float32 whatever the weight's dtype (bf16 activations under
mixed precision). Forward passes without grad (evaluation) and activation-checkpoint recomputations (which run
inside backward) are not counted: each token is seen once per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from nl.optim.base import NLOptimizer, local


class DGD(NLOptimizer):
    """Groups with rule 'main' hold nn.Linear weights (see `linear_modules`); rule 'adamw' groups
    use AdamW. The per-layer input statistics are transient: reset at every step."""

    def __init__(self, params, linear_modules: dict[int, nn.Linear], lr: float = 1e-3, strength: float = 1.0,
                 betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "strength": strength, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})
        self._stats: dict[int, list] = {}  # id(weight) -> [sum_t x^ x^^T, token count]
        self._hooks = []
        main = {id(p) for g in self.param_groups if g["rule"] == "main" for p in g["params"]}
        for pid in main:
            if pid not in linear_modules:
                raise ValueError("DGD's main rule needs every parameter to be an nn.Linear weight")
            self._hooks.append(linear_modules[pid].register_forward_pre_hook(self._observer(pid)))

    def _observer(self, pid: int):
        def observe(module: nn.Linear, args) -> None:
            # Count training forwards only: no eval passes, no recomputation inside backward.
            if not (module.training and torch.is_grad_enabled()) or torch._C._current_graph_task_id() != -1:
                return
            x = args[0].detach().reshape(-1, module.in_features).float()
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            stats = self._stats.get(pid)
            if stats is None:
                stats = self._stats[pid] = [torch.zeros(x.shape[1], x.shape[1], device=x.device), 0]
            stats[0].addmm_(x.T, x)
            stats[1] += x.shape[0]
        return observe

    def input_covariance(self, p: torch.Tensor) -> torch.Tensor:
        """C for weight p, summed over ranks; zeros if no training forward was seen."""
        stats = self._stats.pop(id(p), None)
        cols = p.shape[1]
        dev = local(p).device
        packed = torch.zeros(cols * cols + 1, device=dev)
        if stats is not None:
            packed[:-1] = stats[0].flatten()
            packed[-1] = stats[1]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)  # every strategy: each rank's tokens are different
        return (packed[:-1] / packed[-1].clamp_min(1)).view(cols, cols)

    def _step_group(self, group, params, grads) -> None:
        for p, g in zip(params, grads):
            cov = self.input_covariance(p)
            w = local(p)
            decay = w.float() @ cov
            w.sub_(decay.to(w.dtype), alpha=group["lr"] * group["strength"]).sub_(local(g), alpha=group["lr"])

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
