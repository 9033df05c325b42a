"""Mamba-1: the selective-SSM mixer, its pre-norm residual block, and ``MambaLM``.

Parameter names and shapes follow mamba_ssm's ``MambaLMHeadModel`` (``embedding``,
``layers.{i}.norm``, ``layers.{i}.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj}``, ``norm_f``, ``lm_head``) so its checkpoints load with a fixed prefix map
(see :mod:`fidelity.models.checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fidelity.kernels import selective_scan, selective_state_update
from fidelity.models.base import CausalLM, RMSNorm, causal_conv1d, conv_window, softplus_inverse
from fidelity.models.config import ModelConfig


@dataclass
class MambaConfig(ModelConfig):
    """Mamba-1 language model (defaults as in mamba_ssm unless noted)."""

    model_type = "mamba"

    d_state: int = 16  # SSM state size per channel (mamba_ssm default)
    d_conv: int = 4  # causal depthwise conv width (mamba_ssm default)
    expand: int = 2  # d_inner = expand * d_model (mamba_ssm default)
    dt_rank: int = 0  # rank of the delta projection; 0 means ceil(d_model / 16) as in mamba_ssm
    dt_min: float = 0.001  # initial delta range, log-uniform (mamba_ssm default)
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True  # mamba_ssm default
    bias: bool = False  # biases of in_proj/out_proj (mamba_ssm default)
    scan_backend: str = "auto"  # selective-scan backend, see fidelity.kernels.selective_scan

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    def validate(self) -> None:
        super().validate()
        for name in ("d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


@dataclass
class MambaLayerCache:
    """Recurrent state of one mixer: ``conv`` `(batch, d_inner, d_conv - 1)` (the last inputs
    of the causal conv) and ``ssm`` `(batch, d_inner, d_state)`."""

    conv: torch.Tensor
    ssm: torch.Tensor


class MambaMixer(nn.Module):
    """The Mamba-1 selective-SSM mixer: ``(batch, length, d_model)`` -> same shape."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        d_model, d_inner, d_state = config.d_model, config.d_inner, config.d_state
        dt_rank = config.resolved_dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=config.bias)
        self.conv1d = nn.Conv1d(
            d_inner,
            d_inner,
            kernel_size=config.d_conv,
            groups=d_inner,
            padding=config.d_conv - 1,
            bias=config.conv_bias,
        )
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=config.bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba_ssm's initialization of dt_proj, A_log and D."""
        config = self.config
        dt_std = config.resolved_dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        log_dt = torch.rand(config.d_inner) * (
            math.log(config.dt_max) - math.log(config.dt_min)
        ) + math.log(config.dt_min)
        dt = log_dt.exp().clamp(min=config.dt_init_floor)
        self.dt_proj.bias.copy_(softplus_inverse(dt))
        a = torch.arange(1, config.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(a.log().repeat(config.d_inner, 1))
        self.D.fill_(1.0)

    def ssm_inputs(
        self, hidden: torch.Tensor, conv_prefix: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The scan's inputs for ``hidden`` `(batch, length, d_model)` (the normalized block
        input): ``u`` and ``z`` `(batch, d_inner, length)`, ``delta`` `(batch, d_inner, length)`
        before bias and softplus, ``B``, ``C`` `(batch, d_state, length)`, ``A`` `(d_inner,
        d_state)`, ``conv_input`` `(batch, d_inner, length)` (for the conv state)."""
        config = self.config
        xz = channel_major_product(self.in_proj.weight, hidden)  # (batch, 2 * d_inner, length)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        x, z = xz.chunk(2, dim=1)  # each (batch, d_inner, length), rows contiguous
        u = F.silu(causal_conv1d(x, self.conv1d.weight, self.conv1d.bias, conv_prefix))
        x_dbl = self.x_proj(u.transpose(1, 2))  # (batch, length, dt_rank + 2 * d_state)
        dt, B, C = torch.split(
            x_dbl, [config.resolved_dt_rank, config.d_state, config.d_state], dim=-1
        )
        delta = channel_major_product(self.dt_proj.weight, dt)  # (batch, d_inner, length)
        return {
            "u": u,
            "z": z,
            "delta": delta,
            "B": B.transpose(1, 2),  # (batch, d_state, length), views: the scan lays them out
            "C": C.transpose(1, 2),
            "A": -torch.exp(self.A_log),
            "conv_input": x,
        }

    def forward(self, hidden: torch.Tensor, cache: MambaLayerCache | None = None) -> torch.Tensor:
        """``hidden`` `(batch, length, d_model)` -> `(batch, length, d_model)`; with ``cache``
        the sequence continues from its state and the cache is advanced in place."""
        inputs = self.ssm_inputs(hidden, cache.conv if cache is not None else None)
        y = selective_scan(
            inputs["u"],
            inputs["delta"],
            inputs["A"],
            inputs["B"],
            inputs["C"],
            self.D,
            z=inputs["z"],
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            return_last_state=cache is not None,
            initial_state=cache.ssm if cache is not None else None,
            backend=self.config.scan_backend,
        )
        if cache is not None:
            y, last_state = y
            cache.ssm = last_state.to(cache.ssm.dtype)
            cache.conv = conv_window(cache.conv, inputs["conv_input"])
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden: torch.Tensor, cache: MambaLayerCache) -> torch.Tensor:
        """One position: ``hidden`` `(batch, d_model)` -> `(batch, d_model)`, cache updated."""
        config = self.config
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # each (batch, d_inner)
        window = torch.cat([cache.conv, x[..., None].to(cache.conv.dtype)], dim=-1)
        cache.conv = window[..., 1:]
        u = (window * self.conv1d.weight[:, 0, :]).sum(-1)  # (batch, d_inner)
        if self.conv1d.bias is not None:
            u = u + self.conv1d.bias
        u = F.silu(u)
        dt, B, C = torch.split(
            self.x_proj(u), [config.resolved_dt_rank, config.d_state, config.d_state], dim=-1
        )
        delta = dt @ self.dt_proj.weight.t()  # (batch, d_inner)
        y = selective_state_update(
            cache.ssm,
            u,
            delta,
            -torch.exp(self.A_log),
            B,
            C,
            self.D,
            z=z,
            dt_bias=self.dt_proj.bias,
            dt_softplus=True,
        )
        return self.out_proj(y.to(hidden.dtype))

    def init_cache(self, batch_size: int, device, dtype) -> MambaLayerCache:
        config = self.config
        return MambaLayerCache(
            conv=torch.zeros(
                batch_size, config.d_inner, config.d_conv - 1, device=device, dtype=dtype
            ),
            ssm=torch.zeros(batch_size, config.d_inner, config.d_state, device=device, dtype=dtype),
        )


class MambaBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``; `(batch, length, d_model)` both ways."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mixer = MambaMixer(config)

    def forward(self, x: torch.Tensor, cache: MambaLayerCache | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), cache)

    def step(self, x: torch.Tensor, cache: MambaLayerCache) -> torch.Tensor:
        return x + self.mixer.step(self.norm(x), cache)

    def init_cache(self, batch_size: int, device, dtype) -> MambaLayerCache:
        return self.mixer.init_cache(batch_size, device, dtype)


def channel_major_product(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``weight`` `(d_out, d_in)` times ``hidden`` `(batch, length, d_in)` position by
    position, returned channel-major and contiguous, `(batch, d_out, length)`: the layout the
    convolution and the scan read, so that neither copies a transposed view (``W @ x^T`` as one
    batched product; ``torch.matmul`` would compute ``x W^T`` and copy its transpose)."""
    return torch.bmm(weight.expand(hidden.shape[0], -1, -1), hidden.transpose(1, 2))


def init_lm_weights(model: CausalLM, n_residuals_per_layer: int = 1) -> None:
    """mamba_ssm's ``_init_weights``: normal(0.02) embeddings, zero biases, and output
    projections rescaled by ``1 / sqrt(n_residuals_per_layer * n_layer)``."""
    n_layer = model.config.n_layer
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            if not name.endswith("dt_proj"):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    for name, param in model.named_parameters():
        if name.endswith("out_proj.weight"):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            with torch.no_grad():
                param /= math.sqrt(n_residuals_per_layer * n_layer)


class MambaLM(CausalLM):
    """Mamba-1 language model: ``input_ids`` `(batch, length)` -> logits `(batch, length,
    vocab)` (as ``LMOutput.logits``)."""

    config: MambaConfig

    def __init__(self, config: MambaConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layer))
        init_lm_weights(self)
