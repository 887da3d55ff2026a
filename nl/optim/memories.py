"""Optimizers as associative memories (HOPE_SPEC.md Sec. 5; NeurIPS Sec. 2.3, arXiv Sec. 4).

u = grad L(W) (after the CMS accumulation of nl/optim/base.py); lr = the group's scheduled
learning rate (eta); a = optim.momentum; P = the diagonal RMS preconditioner of
`rms_precondition`. Every rule is written on local shards; where it needs a whole-tensor
quantity it reduces over the shard group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nl.optim.base import NLOptimizer, adamw_update, local, rms_precondition


class AdamW(NLOptimizer):
    """The baseline: AdamW (decoupled weight decay), equal to torch.optim.AdamW, but with the
    CMS schedule and the sharding layouts of NLOptimizer."""

    STATE_KEYS, COUNTS_STEPS = NLOptimizer.ADAMW_KEYS, True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _step_group(self, group, params, grads) -> None:
        adamw_update(self, group, params, grads)


class Momentum(NLOptimizer):
    """Momentum as a memory of past gradients (HOPE_SPEC.md Sec. 5):
        m_{i+1} = a m_i - lr u_i ;   W_{i+1} = W_i + m_{i+1}"""

    STATE_KEYS = ("momentum",)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 betas=(0.9, 0.95), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "betas": tuple(betas), "eps": eps})

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        return local(self.state[p]["momentum"])

    def _step_group(self, group, params, grads) -> None:
        for p, g in zip(params, grads):
            m = self._buffer(p)
            m.mul_(group["momentum"]).add_(local(g), alpha=-group["lr"])
            local(p).add_(m)


class PreconditionedMomentum(Momentum):
    """m_{i+1} = a m_i - lr P_i u_i ;  W_{i+1} = W_i + m_{i+1}   (HOPE_SPEC.md Sec. 5)
    P_i u = u / (sqrt(v_i / (1 - b2^i)) + eps), v_i = b2 v_{i-1} + (1 - b2) u^2 (optim.beta2)."""

    STATE_KEYS, COUNTS_STEPS = ("momentum", "exp_avg_sq"), True

    def _step_group(self, group, params, grads) -> None:
        for p, g in zip(params, grads):
            pu = rms_precondition(self, group, p, local(g))
            m = self._buffer(p)
            m.mul_(group["momentum"]).add_(pu, alpha=-group["lr"])
            local(p).add_(m)


class DeltaRuleMomentum(Momentum):
    """Delta-rule momentum: the momentum is a linear memory trained on an L2 objective, so it
    forgets along the directions the new gradient writes (HOPE_SPEC.md Sec. 5):
        m_{i+1} = m_i (a I - beta k_i^T k_i) - lr P_i u_i ,   k_i = u_i / ||u_i||_F
    A parameter is seen as a matrix [-1, last dim] (a vector as one row; a per-head stack
    [H, in, out] as H*in rows of width out), so k^T k is the [cols, cols] Gram of the normalised
    gradient's rows. Decision: the key is L2-normalised (as the spec does for
    the DGD keys), which bounds the decay term by beta (optim.delta_beta) and keeps it stable.
    Under FSDP the Gram and the norm are sums over rows: each rank adds its rows' share."""

    STATE_KEYS, COUNTS_STEPS = ("momentum", "exp_avg_sq"), True

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 betas=(0.9, 0.95), eps: float = 1e-8, delta_beta: float = 1.0):
        super().__init__(params, lr, momentum, weight_decay, betas, eps)
        for group in self.param_groups:
            group.setdefault("delta_beta", delta_beta)

    def _step_group(self, group, params, grads) -> None:
        a, beta = group["momentum"], group["delta_beta"]
        for p, g in zip(params, grads):
            u = local(g)
            pu = rms_precondition(self, group, p, u)
            m = self._buffer(p)
            norm_sq = self.shard_sum(u.to(torch.promote_types(u.dtype, torch.float32)).pow(2).sum(), p)
            k = u / norm_sq.sqrt().clamp_min(1e-30).to(u.dtype)
            if p.ndim >= 2:  # rows are sharded: the [cols, cols] Gram sums over all rows
                k2, m2 = k.reshape(-1, k.shape[-1]), m.reshape(-1, m.shape[-1])
                gram = self.shard_sum(k2.T @ k2, p)
                decay = (m2 @ gram).reshape(m.shape)
            else:  # one row: m k^T k = (m . k) k, the dot product summed over the shards
                decay = self.shard_sum((m * k).sum(), p) * k
            m.mul_(a).sub_(decay, alpha=beta).add_(pu, alpha=-group["lr"])
            local(p).add_(m)


class DMGD(NLOptimizer):
    """Deep Momentum Gradient Descent (HOPE_SPEC.md Sec. 5; NeurIPS Eq. 23): the momentum is an MLP
    memory m_theta, acting per coordinate c on two features of the preconditioned gradient:
        phi_i = [ P u_i , mbar_i ],   mbar_i = a mbar_{i-1} + (1 - a) P u_i       (a = optim.momentum)
        m_theta(phi) = w . phi + w2 . silu(W1 phi + b1)                         (w: 2, W1: [h, 2], b1, w2: h)
    The memory is an associative memory of the gradient stream (arXiv Sec. 4): its key is what it saw
    at the previous step, phi_{i-1}, its value the preconditioned gradient that followed, P u_i. Each
    step, before it is read, it takes one gradient step on its internal objective over every
    coordinate of the group:
        l2  (default): L2(theta) = mean_c (m_theta(phi_{i-1})_c - (P u_i)_c)^2   (predict the next gradient)
        dot          : L2(theta) = -mean_c m_theta(phi_{i-1})_c (P u_i)_c         (the paper's dot-product form)
        theta_{i+1} = (1 - memory_decay) theta_i - memory_lr grad L2(theta_i)
    then it is read on the current key:  o_i = m_{theta_{i+1}}(phi_i),  W_{i+1} = W_i - lr o_i
    (the paper's W_{i+1} = W_i + m_{i+1}(u_i), the sign inside m). phi_0 = [0, 0].
    Decision (docs/HOPE.md, measured in docs/BENCHMARKS.md): the value is never one of the key's
    features. Regressed onto P u_i from features that contain P u_i, the memory's minimiser copies
    that input (w = [1, 0]) and the memory unlearns its momentum; from phi_{i-1} the minimiser is the
    conditional mean of the next gradient given the past ones, which a copy does not reach.
    theta starts as w = [0, 1], W1 ~ N(0, 1/2), b1 = 0, w2 = 0: exactly an EMA momentum of P u.
    mbar, not the memory's own previous output, is the second feature: fed its own output the memory
    is a recurrence whose slope it does not control (NaN after ~60 steps on the tiny HOPE).

    One memory per param group (all its parameters' coordinates feed its objective), stored in
    the state of the group's first parameter (under ZeRO: its flat partition). Its gradient is a
    sum over coordinates, added up over shards (FSDP mesh, or the ZeRO group with padding masked),
    so every rank keeps the same memory as a single process would. The gradient is written out by
    hand (a two-layer MLP) and evaluated in chunks to bound memory; tests check it against autograd.
    State per coordinate: mbar ('momentum'), the RMS second moment, and P u_{i-1} ('prev_precond').
    """

    CHUNK = 1 << 20  # coordinates per evaluation: [CHUNK, hidden] floats of scratch
    STATE_KEYS, COUNTS_STEPS = ("momentum", "exp_avg_sq", "prev_precond"), True

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 betas=(0.9, 0.95), eps: float = 1e-8, hidden: int = 8, internal_loss: str = "l2",
                 memory_lr: float = 1e-2, memory_decay: float = 0.0, seed: int = 0):
        if internal_loss not in ("l2", "dot"):
            raise ValueError(f"dmgd internal_loss must be 'l2' or 'dot', got {internal_loss!r}")
        if internal_loss == "dot" and memory_decay <= 0:
            raise ValueError("dmgd internal_loss='dot' is unbounded below without retention: set "
                             "optim.dmgd.memory_decay > 0 (e.g. 0.01)")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "betas": tuple(betas), "eps": eps, "hidden": hidden,
                                  "internal_loss": internal_loss, "memory_lr": memory_lr,
                                  "memory_decay": memory_decay})
        self.seed = seed
        for i, group in enumerate(self.param_groups):
            group.setdefault("group_id", i)  # stable under DeepSpeed, which steps one group at a time
        # group_id -> L2 before this step's update, kept on device: read (and synced) only when logged
        self._internal_loss: dict[int, torch.Tensor] = {}

    @property
    def last_internal_loss(self) -> dict[int, float]:
        """{group_id: internal loss L2 before the last memory step} (one host sync per read)."""
        return {k: float(v) for k, v in self._internal_loss.items()}

    # theta packed in one vector: [w (2) | W1 (2h, row-major [h, 2]) | b1 (h) | w2 (h)]
    @staticmethod
    def unpack(theta: torch.Tensor, hidden: int):
        w, rest = theta[:2], theta[2:]
        return w, rest[:2 * hidden].view(hidden, 2), rest[2 * hidden:3 * hidden], rest[3 * hidden:]

    def init_memory(self, group: dict, device) -> torch.Tensor:
        h = group["hidden"]
        gen = torch.Generator().manual_seed(self.seed + group["group_id"])
        w1 = torch.randn(h, 2, generator=gen, dtype=torch.float32) * 0.5 ** 0.5
        theta = torch.cat([torch.tensor([0.0, 1.0]), w1.flatten(), torch.zeros(h), torch.zeros(h)])
        return theta.to(device)

    @staticmethod
    def memory_forward(theta: torch.Tensor, hidden: int, phi: torch.Tensor):
        """phi: [n, 2] -> (o [n], pre-activation z [n, h])."""
        w, w1, b1, w2 = DMGD.unpack(theta, hidden)
        z = torch.addmm(b1, phi, w1.T)
        return phi @ w + F.silu(z) @ w2, z

    @staticmethod
    def features(precond: torch.Tensor, mbar: torch.Tensor) -> torch.Tensor:
        """[P u, mbar] per coordinate: two tensors of any (equal) shape -> [n, 2] float32."""
        return torch.stack([precond.reshape(-1).float(), mbar.reshape(-1).float()], dim=1)

    def memory_pair(self, state: dict, pu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(key [n, 2], value [n]) of this step's internal objective, read before the state moves
        on: the key phi_{i-1} = [P u_{i-1}, mbar_{i-1}], the value P u_i (float32)."""
        return self.features(local(state["prev_precond"]), local(state["momentum"])), pu.reshape(-1).float()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts floating state to the parameter's dtype on load; the memory stays float32."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "memory" in state:
                state["memory"] = state["memory"].float()

    def _ensure_state(self, group, params) -> None:
        super()._ensure_state(group, params)
        owner = self.state[group["params"][0]]
        if "memory" not in owner:
            owner["memory"] = self.init_memory(group, local(group["params"][0]).device)

    def _objective_grad(self, theta, group, key, value, mask) -> torch.Tensor:
        """[grad of the summed internal loss wrt theta | loss sum | count] over the rows of key."""
        h, dot = group["hidden"], group["internal_loss"] == "dot"
        w2 = self.unpack(theta, h)[3]
        total = torch.zeros(theta.numel() + 2, device=theta.device)
        for start in range(0, key.shape[0], self.CHUNK):
            x, v = key[start:start + self.CHUNK], value[start:start + self.CHUNK]
            o, z = self.memory_forward(theta, h, x)
            loss, dl_do = (-o * v, -v) if dot else ((o - v).pow(2), 2 * (o - v))
            if mask is not None:
                keep = mask[start:start + self.CHUNK].to(o.dtype)
                loss, dl_do, count = loss * keep, dl_do * keep, keep.sum()
            else:
                count = torch.tensor(float(x.shape[0]), device=x.device)
            sig = torch.sigmoid(z)
            dz = dl_do[:, None] * w2 * (sig * (1 + z * (1 - sig)))  # d silu(z)/dz
            total += torch.cat([x.T @ dl_do, (dz.T @ x).flatten(), dz.sum(0), F.silu(z).T @ dl_do,
                                loss.sum().reshape(1), count.reshape(1)])
        return total

    def _step_group(self, group, params, grads) -> None:
        h, a = group["hidden"], group["momentum"]
        theta = self.state[group["params"][0]]["memory"]
        # The internal objective: its gradient summed over coordinates and shards, then one GD step.
        grad_sum = torch.zeros(theta.numel() + 2, device=theta.device)
        for p, g in zip(params, grads):
            state = self.state[p]
            pu = rms_precondition(self, group, p, local(g))
            key, value = self.memory_pair(state, pu)
            grad_sum += self._objective_grad(theta, group, key, value, self.zero_masks.get(id(p)))
            local(state["momentum"]).mul_(a).add_(pu, alpha=1 - a)
            local(state["prev_precond"]).copy_(pu)
        grad_sum = self.shard_sum(grad_sum, group["params"][0])
        n = grad_sum[-1].clamp_min(1)
        self._internal_loss[group["group_id"]] = grad_sum[-2] / n
        theta.mul_(1 - group["memory_decay"]).sub_(grad_sum[:-2] / n, alpha=group["memory_lr"])

        # Read the updated memory on the current key: o = m_{i+1}(phi_i); W <- W - lr o.
        for p in params:
            state = self.state[p]
            phi = self.features(local(state["prev_precond"]), local(state["momentum"]))
            out = torch.cat([self.memory_forward(theta, h, phi[s:s + self.CHUNK])[0]
                             for s in range(0, phi.shape[0], self.CHUNK)])
            lp = local(p)
            lp.sub_(out.view(lp.shape).to(lp.dtype), alpha=group["lr"])
