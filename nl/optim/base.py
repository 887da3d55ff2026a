"""What every optimizer in the registry shares: the CMS multi-frequency schedule, decoupled
weight decay, and the helpers that keep a rule exact when its parameter is a shard.

Param-group keys read here (set by nl.optim.build_optimizer):
  lr, weight_decay       as in torch.optim.AdamW (decay is decoupled: p <- p (1 - lr wd))
  every                  C: the group is stepped every C-th call of step() (HOPE_SPEC.md Sec. 3,
                         NeurIPS Eq. 31) with the gradients accumulated since its last step
  reduce                 'sum' (Eq. 31) or 'mean' (divide the accumulated gradient by C)
  lr_scale               multiplier the trainer applies to the scheduled lr of this group
  rule                   'main' (the optimizer's own rule) or 'adamw' (the AdamW fallback M3 and
                         DGD use for non-matrix parameters)

Sharding. A rule sees local tensors. Three layouts exist:
  replicated  (single process, DDP, DeepSpeed stage 0): every rank holds whole tensors;
  fsdp        (FSDP2): parameters, gradients and per-coordinate state are DTensors sharded on
              dim 0; a whole-tensor quantity is reduced over the DTensor's mesh (`shard_sum`),
              a whole matrix is gathered (`full_matrix`);
  zero        (DeepSpeed ZeRO-1/2/3): DeepSpeed hands step() flat fp32 partitions that mix
              parameters, padded at the end; `attach_zero_partitions` records which
              coordinates are real, and sums over coordinates run over the world group.
Rules that need a parameter's shape (delta-rule momentum, M3, DGD) refuse the zero layout
(nl.optim.check_supported).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch 2.5
    from torch.distributed._tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (shares storage: in-place ops write through), else `t`."""
    return t.to_local() if isinstance(t, DTensor) else t


class NLOptimizer(torch.optim.Optimizer):
    """Base class: step() applies the multi-frequency schedule and weight decay, then the
    subclass's `_step_group(group, params, grads)` (or the AdamW fallback for rule 'adamw')."""

    def __init__(self, params, defaults: dict) -> None:
        super().__init__(params, {"every": 1, "reduce": "sum", "lr_scale": 1.0, "rule": "main", **defaults})
        # Set by attach_zero_partitions under DeepSpeed ZeRO: id(flat partition) -> bool mask of
        # its real (not padding) coordinates, and the group the partitions are spread over.
        self.zero_masks: dict[int, torch.Tensor] = {}
        self.zero_group = None

    # ---- sharding helpers -------------------------------------------------------------
    def shard_sum(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Sum a per-shard partial result `t` over the ranks that share the tensor `like`."""
        if isinstance(like, DTensor):
            dist.all_reduce(t, group=like.device_mesh.get_group())
        elif self.zero_group is not None:
            dist.all_reduce(t, group=self.zero_group)
        return t

    @staticmethod
    def full_matrix(t: torch.Tensor) -> torch.Tensor:
        """The whole tensor (all-gathered from the shards under FSDP)."""
        return t.full_tensor() if isinstance(t, DTensor) else t

    @staticmethod
    def local_rows(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's rows of `full`, laid out as the dim-0 shard of `like` (torch.chunk order)."""
        if not isinstance(like, DTensor):
            return full
        mesh = like.device_mesh
        rows = torch.chunk(full, mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        shard = rows[rank] if rank < len(rows) else full[:0]
        if shard.shape != like.to_local().shape:
            raise RuntimeError(f"unexpected shard layout {tuple(like.to_local().shape)} of {tuple(full.shape)}")
        return shard

    # ---- state --------------------------------------------------------------------------
    # Per-parameter state tensors (zeros like the parameter) of the optimizer's own rule, and
    # whether it counts steps. Created on a group's first step() call even when the CMS schedule
    # does not step it yet: a checkpoint template (DCP's get_state_dict) then has every key, so a
    # resume in the middle of a window restores the whole state.
    STATE_KEYS: tuple[str, ...] = ()
    COUNTS_STEPS = False
    ADAMW_KEYS = ("exp_avg", "exp_avg_sq")

    def _ensure_state(self, group: dict, params: list[torch.Tensor]) -> None:
        keys, counts = (self.ADAMW_KEYS, True) if group["rule"] == "adamw" else (self.STATE_KEYS, self.COUNTS_STEPS)
        if group["every"] > 1:
            keys = (*keys, "cms_accum")
        for p in params:
            state = self.state[p]
            for key in keys:
                if key not in state:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if counts and "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
            if group["every"] > 1 and "cms_count" not in state:
                state["cms_count"] = torch.zeros((), dtype=torch.float32)

    # ---- the step ---------------------------------------------------------------------
    def _due(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """CMS schedule: add this step's gradients to each parameter's accumulator; on every
        C-th call return the accumulated gradients (sum or mean) and reset, else None."""
        every = int(group["every"])
        if every == 1:
            return [p.grad for p in params]
        due = False
        for p in params:
            state = self.state[p]
            state["cms_accum"].add_(p.grad)
            state["cms_count"] += 1
            due = int(state["cms_count"]) >= every
        if not due:
            return None
        grads = []
        for p in params:
            state = self.state[p]
            acc = state["cms_accum"].clone()
            if group["reduce"] == "mean":
                acc.div_(every)
            grads.append(acc)
            state["cms_accum"].zero_()
            state["cms_count"].zero_()
        return grads

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            self._ensure_state(group, params)
            grads = self._due(group, params)
            if grads is None:
                continue  # a slow CMS level between its updates: weights and state stay as they are
            if group["weight_decay"]:
                for p in params:
                    local(p).mul_(1 - group["lr"] * group["weight_decay"])
            if group["rule"] == "adamw":
                adamw_update(self, group, params, grads)
            else:
                self._step_group(group, params, grads)
        return loss


def _step_count(state: dict) -> float:
    state["step"] += 1
    return float(state["step"])


def adamw_update(opt: NLOptimizer, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Adam moments and bias correction (Loshchilov & Hutter), weight decay already applied:
        m <- b1 m + (1-b1) g ;  v <- b2 v + (1-b2) g^2 ;  p <- p - lr (m / bc1) / (sqrt(v / bc2) + eps)
    Per coordinate, so it runs on any shard. foreach kernels over the group."""
    b1, b2 = group["betas"]
    exp_avgs, exp_avg_sqs = [], []
    for p in params:  # state created by NLOptimizer._ensure_state
        state = opt.state[p]
        exp_avgs.append(local(state["exp_avg"]))
        exp_avg_sqs.append(local(state["exp_avg_sq"]))
        t = _step_count(state)
    g = [local(x) for x in grads]
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    torch._foreach_lerp_(exp_avgs, g, 1 - b1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - b2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2 ** 0.5)
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_addcdiv_([local(p) for p in params], exp_avgs, denom, value=-group["lr"] / bc1)


def rms_precondition(opt: NLOptimizer, group: dict, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """P u: the diagonal preconditioner of HOPE_SPEC.md Sec. 5 as we define it (local shard):
        v <- b2 v + (1-b2) u^2 ;  P u = u / (sqrt(v / (1 - b2^t)) + eps)"""
    state = opt.state[p]
    t = _step_count(state)
    b2 = group["betas"][1]
    v = local(state["exp_avg_sq"])
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    return g / (v / (1 - b2 ** t)).sqrt().add_(group["eps"])
