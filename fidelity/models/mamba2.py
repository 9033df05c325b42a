"""Mamba-2 (Dao & Gu 2024): the SSD mixer, its pre-norm residual block and ``Mamba2LM``.

Per layer, for the normalized input ``(batch, length, d_model)``:

1. ``in_proj`` gives ``z`` (the gate, ``d_inner``), ``xBC`` (``d_inner + 2 * ngroups *
   d_state``) and ``dt`` (one per head);
2. a causal depthwise convolution over ``xBC``, then SiLU, split into ``x`` (``nheads`` heads
   of ``headdim``), ``B`` and ``C`` (``ngroups`` groups of ``d_state``; head ``h`` reads group
   ``h // (nheads / ngroups)``);
3. the SSD scan with a scalar decay per head: ``dt' = softplus(dt + dt_bias)``,
   ``A = -exp(A_log)``, ``h_t = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T`` (state
   ``(headdim, d_state)`` per head), ``y_t = h_t C_t + D x_t``;
4. gated RMSNorm (``rmsnorm(y * silu(z))``, per group of channels, mamba_ssm's
   ``norm_before_gate=False``) and ``out_proj``.

The scan used by the forward pass, :func:`ssd_scan_chunked`, is pure PyTorch: inside a chunk
of ``chunk_size`` steps the outputs come from a ``(chunk, chunk)`` matrix of segment sums of
``dt' * A`` (exact decays between every pair of steps), and a state is carried from chunk to
chunk, so memory stays bounded by one chunk at any length. :func:`ssd_scan_ref` is the plain
step-by-step recurrence it is tested against. There is no Triton/CUDA path here.

Parameter names follow mamba_ssm's ``Mamba2`` inside ``MambaLMHeadModel``: ``embedding``,
``layers.{i}.norm.weight``, ``layers.{i}.mixer.{in_proj.weight, conv1d.weight, conv1d.bias,
dt_bias, A_log, D, norm.weight, out_proj.weight}``, ``norm_f.weight``, ``lm_head.weight``, so
a mamba_ssm checkpoint maps by dropping its ``backbone.`` prefix (Hugging Face's
``Mamba2ForCausalLM`` additionally names the embedding ``backbone.embeddings``). Not supported:
mamba_ssm's ``dt_limit`` clamp (its default, no clamp, is what this module computes),
``D_has_hdim`` and the extra MLP channels (``d_ssm < d_inner``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fidelity.kernels import selective_scan
from fidelity.models.base import CausalLM, RMSNorm, causal_conv1d, conv_window, softplus_inverse
from fidelity.models.config import ModelConfig
from fidelity.models.mamba import init_lm_weights

SCANS = ("selective_scan", "ssd_chunked")


@dataclass
class Mamba2Config(ModelConfig):
    """Mamba-2 language model (defaults as in mamba_ssm's ``Mamba2`` unless noted)."""

    model_type = "mamba2"

    d_state: int = 128  # SSM state size per head and group (mamba_ssm Mamba2 default)
    d_conv: int = 4  # causal depthwise conv width (mamba_ssm default)
    expand: int = 2  # d_inner = expand * d_model (mamba_ssm default)
    headdim: int = 64  # channels per head; nheads = d_inner / headdim (mamba_ssm default)
    ngroups: int = 1  # groups sharing B and C, like GQA's key groups (mamba_ssm default)
    chunk_size: int = 64  # SSD chunk of the "ssd_chunked" scan: speed only (mamba_ssm GPU: 256)
    scan: str = "selective_scan"  # "selective_scan": the fused kernels of fidelity.kernels (the
    # SSD recurrence is a selective scan with A, dt and D shared within a head); "ssd_chunked":
    # the pure-PyTorch chunked SSD below (same numbers; slower to train on CPU)
    A_init_min: float = 1.0  # A = -uniform(A_init_min, A_init_max) per head (mamba_ssm range)
    A_init_max: float = 16.0
    dt_min: float = 0.001  # initial softplus(dt_bias) range, log-uniform (mamba_ssm default)
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True  # mamba_ssm default
    bias: bool = False  # biases of in_proj/out_proj (mamba_ssm default)
    rmsnorm: bool = True  # gated RMSNorm before out_proj; False: y * silu(z) (mamba_ssm)
    norm_before_gate: bool = False  # rmsnorm(y) * silu(z) instead of rmsnorm(y * silu(z))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: ``x``, ``B`` and ``C`` together."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    def validate(self) -> None:
        super().validate()
        if self.scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {self.scan!r}")
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_inner % self.headdim:
            raise ValueError(
                f"d_inner = expand * d_model = {self.d_inner} must be a multiple of headdim "
                f"({self.headdim})"
            )
        if self.nheads % self.ngroups:
            raise ValueError(
                f"the number of heads ({self.nheads} = d_inner / headdim) must be a multiple of "
                f"ngroups ({self.ngroups})"
            )
        if not 0 < self.A_init_min <= self.A_init_max:
            raise ValueError(
                f"need 0 < A_init_min <= A_init_max, got {self.A_init_min}, {self.A_init_max}"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


# -- the SSD scan ------------------------------------------------------------------------------


def ssd_scan_selective(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan as Mamba-1 selective scans (:func:`fidelity.kernels.selective_scan`), one
    per group: channel ``(h, p)`` gets ``delta = dt_h``, ``A = A_h`` on every state and
    ``D_h``, and the group's ``B``/``C`` are shared by its channels exactly as Mamba-1 shares
    them. Same arguments, shapes and results as :func:`ssd_scan_chunked` (no ``chunk_size``);
    fused forward and backward on CPU, Triton or mamba_ssm on CUDA.
    """
    _check_scan_shapes(x, dt, A, B, C)
    batch, length, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    per_group = nheads // ngroups
    outputs, states = [], []
    for group in range(ngroups):
        heads = slice(group * per_group, (group + 1) * per_group)
        channels = per_group * headdim
        u = x[:, :, heads].reshape(batch, length, channels).transpose(1, 2)
        delta = dt[:, :, heads].repeat_interleave(headdim, dim=2).transpose(1, 2)
        A_group = A[heads].repeat_interleave(headdim)[:, None].expand(channels, d_state)
        D_group = None if D is None else D[heads].repeat_interleave(headdim)
        start = None
        if initial_state is not None:
            start = initial_state[:, heads].reshape(batch, channels, d_state)
        result = selective_scan(
            u,
            delta,
            A_group,
            B[:, :, group].transpose(1, 2),
            C[:, :, group].transpose(1, 2),
            D_group,
            return_last_state=return_final_state,
            initial_state=start,
        )
        if return_final_state:
            result, last = result
            states.append(last.reshape(batch, per_group, headdim, d_state))
        outputs.append(result.transpose(1, 2).reshape(batch, length, per_group, headdim))
    y = torch.cat(outputs, dim=2)  # (batch, length, nheads, headdim)
    return (y, torch.cat(states, dim=1)) if return_final_state else y


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_scan_shapes(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, nheads, headdim), got {tuple(x.shape)}")
    batch, length, nheads, _ = x.shape
    if dt.shape != (batch, length, nheads):
        raise ValueError(
            f"dt must be (batch, length, nheads) = {(batch, length, nheads)}, got {tuple(dt.shape)}"
        )
    if A.shape != (nheads,):
        raise ValueError(f"A must be (nheads,) = ({nheads},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, length) or B.shape != C.shape:
        raise ValueError(
            "B and C must both be (batch, length, ngroups, d_state) with the batch and length "
            f"of x; got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    if nheads % B.shape[2]:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({B.shape[2]})")


def _heads_from_groups(BC: torch.Tensor, nheads: int) -> torch.Tensor:
    """``(batch, length, ngroups, d_state)`` -> ``(batch, length, nheads, d_state)``."""
    return BC.repeat_interleave(nheads // BC.shape[2], dim=2)


def segment_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """``out[..., t, s] = log_decay[..., s+1] + ... + log_decay[..., t]`` for ``s <= t`` (0 on
    the diagonal) and ``-inf`` above it.

    ``log_decay`` `(..., T)` -> `(..., T, T)`. Built by a cumulative sum down the columns of a
    strictly lower-triangular copy, so no difference of large cumulative sums is taken.
    """
    steps = log_decay.shape[-1]
    strictly_lower = torch.ones(steps, steps, dtype=torch.bool, device=log_decay.device).tril(-1)
    per_row = log_decay[..., :, None].expand(*log_decay.shape, steps)  # [t, s] = a_t
    sums = per_row.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    lower = torch.ones(steps, steps, dtype=torch.bool, device=log_decay.device).tril()
    return sums.masked_fill(~lower, -math.inf)


def ssd_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan, chunk by chunk, in pure PyTorch (differentiable by autograd).

    Shapes (mamba_ssm's ``mamba_chunk_scan_combined`` layout): ``x`` `(batch, length, nheads,
    headdim)`; ``dt`` `(batch, length, nheads)`, the step sizes already through bias and
    softplus; ``A`` `(nheads,)` (negative); ``B``, ``C`` `(batch, length, ngroups, d_state)`;
    ``D`` `(nheads,)`; ``initial_state`` `(batch, nheads, headdim, d_state)`. Returns ``y``
    `(batch, length, nheads, headdim)` in ``x``'s dtype and, with ``return_final_state``, the
    state after the last step `(batch, nheads, headdim, d_state)` in the compute dtype (float64
    for float64 inputs, float32 otherwise). Any ``length`` works: the last chunk may be short.

    Within a chunk, ``y_t = sum_{s<=t} (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s x_s`` (with
    ``a = dt * A``) plus the carried state's share ``exp(a_1 + ... + a_t) C_t h_start``; every
    exponent is a sum of non-positive terms, so nothing overflows.
    """
    _check_scan_shapes(x, dt, A, B, C)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    dtype = _compute_dtype(x.dtype)
    batch, length, nheads, headdim = x.shape
    d_state = B.shape[-1]
    x_c, dt_c = x.to(dtype), dt.to(dtype)
    B_h = _heads_from_groups(B.to(dtype), nheads)  # (batch, length, nheads, d_state)
    C_h = _heads_from_groups(C.to(dtype), nheads)
    log_decay = dt_c * A.to(dtype)  # (batch, length, nheads)
    x_dt = x_c * dt_c[..., None]  # (batch, length, nheads, headdim)
    if initial_state is None:
        state = x_c.new_zeros(batch, nheads, headdim, d_state)
    else:
        state = initial_state.to(dtype)
    outputs = []
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        a = log_decay[:, start:end].transpose(1, 2)  # (batch, nheads, chunk)
        B_k, C_k, xdt_k = B_h[:, start:end], C_h[:, start:end], x_dt[:, start:end]
        decay_pairs = segment_sums(a).exp()  # (batch, nheads, chunk, chunk): [t, s]
        scores = torch.einsum("bthn,bshn->bhts", C_k, B_k) * decay_pairs
        y_inside = torch.einsum("bhts,bshp->bthp", scores, xdt_k)
        decay_from_start = a.cumsum(-1)  # (batch, nheads, chunk): a_1 + ... + a_t
        y_carried = (
            torch.einsum("bthn,bhpn->bthp", C_k, state)
            * (decay_from_start.exp().transpose(1, 2)[..., None])
        )
        outputs.append(y_inside + y_carried)
        decay_to_end = decay_pairs[..., -1, :]  # (batch, nheads, chunk): from s to the end
        state = decay_from_start[..., -1].exp()[..., None, None] * state + torch.einsum(
            "bshn,bhs,bshp->bhpn", B_k, decay_to_end, xdt_k
        )
    y = torch.cat(outputs, dim=1)  # (batch, length, nheads, headdim)
    if D is not None:
        y = y + x_c * D.to(dtype)[:, None]
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence one step at a time: the oracle for :func:`ssd_scan_chunked`.

    Same signature and shapes (``chunk_size`` is accepted and ignored)::

        h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T      (per head, (headdim, d_state))
        y_t = h_t C_t + D * x_t
    """
    _check_scan_shapes(x, dt, A, B, C)
    dtype = _compute_dtype(x.dtype)
    batch, length, nheads, headdim = x.shape
    x_c, dt_c, A_c = x.to(dtype), dt.to(dtype), A.to(dtype)
    B_h = _heads_from_groups(B.to(dtype), nheads)
    C_h = _heads_from_groups(C.to(dtype), nheads)
    if initial_state is None:
        state = x_c.new_zeros(batch, nheads, headdim, B.shape[-1])
    else:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(length):
        step = dt_c[:, t, :, None, None]  # (batch, nheads, 1, 1)
        state = torch.exp(step * A_c[:, None, None]) * state + step * (
            x_c[:, t, :, :, None] * B_h[:, t, :, None, :]
        )
        outputs.append((state * C_h[:, t, :, None, :]).sum(-1))  # (batch, nheads, headdim)
    y = torch.stack(outputs, dim=1)
    if D is not None:
        y = y + x_c * D.to(dtype)[:, None]
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y


# -- the model ---------------------------------------------------------------------------------


class GatedRMSNorm(nn.Module):
    """mamba_ssm's ``RMSNormGated``: RMS-normalize each group of ``group_size`` channels.

    ``forward(y, z)`` with ``y``, ``z`` `(..., d)` -> `(..., d)`: ``norm(y * silu(z)) * weight``,
    or ``norm(y) * weight * silu(z)`` with ``norm_before_gate``. Computed in float32 for half
    inputs, in the input dtype otherwise.
    """

    def __init__(
        self, d: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False
    ) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        y, gate = y.to(work), F.silu(z.to(work))
        if not self.norm_before_gate:
            y = y * gate
        grouped = y.unflatten(-1, (-1, self.group_size))  # (..., ngroups, group_size)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        y = grouped.flatten(-2) * self.weight.to(work)
        if self.norm_before_gate:
            y = y * gate
        return y.to(dtype)


@dataclass
class Mamba2LayerCache:
    """Recurrent state of one mixer: ``conv`` `(batch, conv_dim, d_conv - 1)` (the last inputs
    of the causal conv over ``xBC``) and ``ssm`` `(batch, nheads, headdim, d_state)`."""

    conv: torch.Tensor
    ssm: torch.Tensor


class Mamba2Mixer(nn.Module):
    """The Mamba-2 (SSD) mixer: ``(batch, length, d_model)`` -> same shape."""

    def __init__(self, config: Mamba2Config) -> None:
        super().__init__()
        self.config = config
        d_in_proj = 2 * config.d_inner + 2 * config.ngroups * config.d_state + config.nheads
        self.in_proj = nn.Linear(config.d_model, d_in_proj, bias=config.bias)
        self.conv1d = nn.Conv1d(
            config.conv_dim,
            config.conv_dim,
            kernel_size=config.d_conv,
            groups=config.conv_dim,
            padding=config.d_conv - 1,
            bias=config.conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(config.nheads))
        self.A_log = nn.Parameter(torch.empty(config.nheads))
        self.D = nn.Parameter(torch.empty(config.nheads))
        if config.rmsnorm:
            self.norm = GatedRMSNorm(
                config.d_inner,
                group_size=config.d_inner // config.ngroups,
                eps=config.norm_epsilon,
                norm_before_gate=config.norm_before_gate,
            )
        self.out_proj = nn.Linear(config.d_inner, config.d_model, bias=config.bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba_ssm's initialization of dt_bias, A_log and D."""
        config = self.config
        log_dt = torch.rand(config.nheads) * (
            math.log(config.dt_max) - math.log(config.dt_min)
        ) + math.log(config.dt_min)
        dt = log_dt.exp().clamp(min=config.dt_init_floor)
        self.dt_bias.copy_(softplus_inverse(dt))
        A = torch.empty(config.nheads).uniform_(config.A_init_min, config.A_init_max)
        self.A_log.copy_(A.log())
        self.D.fill_(1.0)

    def _split_projection(
        self, zxbcdt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(..., d_in_proj)`` -> ``z`` `(..., d_inner)`, ``xBC`` `(..., conv_dim)`, ``dt``
        `(..., nheads)`."""
        config = self.config
        z, xBC, dt = torch.split(zxbcdt, [config.d_inner, config.conv_dim, config.nheads], -1)
        return z, xBC, dt

    def _split_xBC(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(..., conv_dim)`` -> ``x`` `(..., nheads, headdim)`, ``B``, ``C`` `(..., ngroups,
        d_state)`."""
        config = self.config
        group_width = config.ngroups * config.d_state
        x, B, C = torch.split(xBC, [config.d_inner, group_width, group_width], dim=-1)
        return (
            x.unflatten(-1, (config.nheads, config.headdim)),
            B.unflatten(-1, (config.ngroups, config.d_state)),
            C.unflatten(-1, (config.ngroups, config.d_state)),
        )

    def _output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gate/normalize ``y`` `(..., d_inner)` with ``z`` and project to `(..., d_model)`."""
        y = self.norm(y, z) if self.config.rmsnorm else y * F.silu(z)
        return self.out_proj(y)

    def forward(self, hidden: torch.Tensor, cache: Mamba2LayerCache | None = None) -> torch.Tensor:
        """``hidden`` `(batch, length, d_model)` -> `(batch, length, d_model)`; with ``cache``
        the sequence continues from its state and the cache is advanced in place."""
        config = self.config
        z, xBC, dt = self._split_projection(self.in_proj(hidden))
        conv_input = xBC.transpose(1, 2)  # (batch, conv_dim, length)
        prefix = cache.conv if cache is not None else None
        conv_out = causal_conv1d(conv_input, self.conv1d.weight, self.conv1d.bias, prefix)
        x, B, C = self._split_xBC(F.silu(conv_out).transpose(1, 2))
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype))  # (batch, length, nheads)
        scan_options = {"chunk_size": config.chunk_size} if config.scan == "ssd_chunked" else {}
        scan = ssd_scan_chunked if config.scan == "ssd_chunked" else ssd_scan_selective
        result = scan(
            x,
            dt,
            -torch.exp(self.A_log),
            B,
            C,
            D=self.D,
            initial_state=cache.ssm if cache is not None else None,
            return_final_state=cache is not None,
            **scan_options,
        )
        if cache is not None:
            y, last_state = result
            cache.ssm = last_state.to(cache.ssm.dtype)
            cache.conv = conv_window(cache.conv, conv_input)
        else:
            y = result
        return self._output(y.flatten(-2), z)

    def step(self, hidden: torch.Tensor, cache: Mamba2LayerCache) -> torch.Tensor:
        """One position: ``hidden`` `(batch, d_model)` -> `(batch, d_model)`, cache updated."""
        z, xBC, dt = self._split_projection(self.in_proj(hidden))
        window = torch.cat([cache.conv, xBC[..., None].to(cache.conv.dtype)], dim=-1)
        cache.conv = window[..., 1:]
        conv_out = (window * self.conv1d.weight[:, 0, :]).sum(-1)  # (batch, conv_dim)
        if self.conv1d.bias is not None:
            conv_out = conv_out + self.conv1d.bias
        x, B, C = self._split_xBC(F.silu(conv_out))  # (b, h, p), (b, g, n), (b, g, n)
        dtype = _compute_dtype(x.dtype)
        nheads = self.config.nheads
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype)).to(dtype)  # (batch, nheads)
        B_h = B.to(dtype).repeat_interleave(nheads // B.shape[1], dim=1)  # (b, h, n)
        C_h = C.to(dtype).repeat_interleave(nheads // C.shape[1], dim=1)
        decay = torch.exp(dt * -torch.exp(self.A_log.to(dtype)))[..., None, None]
        x_c = x.to(dtype)
        state = decay * cache.ssm.to(dtype) + (dt[..., None] * x_c)[..., None] * B_h[:, :, None]
        cache.ssm = state.to(cache.ssm.dtype)
        y = (state * C_h[:, :, None]).sum(-1) + x_c * self.D.to(dtype)[:, None]  # (b, h, p)
        return self._output(y.to(hidden.dtype).flatten(-2), z)

    def init_cache(self, batch_size: int, device, dtype) -> Mamba2LayerCache:
        config = self.config
        return Mamba2LayerCache(
            conv=torch.zeros(
                batch_size, config.conv_dim, config.d_conv - 1, device=device, dtype=dtype
            ),
            ssm=torch.zeros(
                batch_size,
                config.nheads,
                config.headdim,
                config.d_state,
                device=device,
                dtype=dtype,
            ),
        )


class Mamba2Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``; `(batch, length, d_model)` both ways."""

    def __init__(self, config: Mamba2Config) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mixer = Mamba2Mixer(config)

    def forward(self, x: torch.Tensor, cache: Mamba2LayerCache | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), cache)

    def step(self, x: torch.Tensor, cache: Mamba2LayerCache) -> torch.Tensor:
        return x + self.mixer.step(self.norm(x), cache)

    def init_cache(self, batch_size: int, device, dtype) -> Mamba2LayerCache:
        return self.mixer.init_cache(batch_size, device, dtype)


class Mamba2LM(CausalLM):
    """Mamba-2 language model: ``input_ids`` `(batch, length)` -> logits `(batch, length,
    vocab)` (as ``LMOutput.logits``)."""

    config: Mamba2Config

    def __init__(self, config: Mamba2Config) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(Mamba2Block(config) for _ in range(config.n_layer))
        init_lm_weights(self)
