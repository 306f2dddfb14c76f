"""The Scaled QL network (Kumar et al., ICLR 2023, Section 4 "Our approach" and Appendix B.3).

uint8 frames [B, 4, 84, 84] -> ResNet trunk with group normalization -> learned spatial embedding
(instead of global average pooling) -> shared MLP -> feature normalization -> one linear head per game,
each giving C51 logits [num_actions, num_atoms]. The paper's capacity study compares ResNet-34/50/101
(up to ~80M parameters) with the IMPALA CNN; `tiny` is ours, for CPU demos and tests.

What it leaves out: the paper's exact ResNet stem, GroupNorm group count, MLP width and the exact form of
its feature normalization are not stated in any source we have; each choice here is marked "# ours:".
The network knows nothing about the loss, the replay or the games' names (game ids are integers).

Public: ARCHS, QNetwork, count_parameters, expected_q, target_network, transfer, freeze_trunk, copy_head,
network_from_checkpoint, support_from_checkpoint, GroupNorm.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from machinery.checkpoints import checkpoint_support
from machinery.flags import ConfigError

# --------------------------------------------------------------------------------------------------------
# Trunks. Each builder takes no arguments and returns an nn.Module mapping float [B, 4, 84, 84] in [0, 1]
# to a feature map [B, C, H, W]. The QNetwork measures C, H, W with one dummy forward.
# --------------------------------------------------------------------------------------------------------


def _gn(channels: int) -> GroupNorm:
    # ours: 32 groups (Wu & He 2018's default) for channels >= 64, channels // 2 for narrower layers
    # (16 -> 8 groups, 32 -> 16 groups) so that each group normalizes more than one channel.
    return GroupNorm(min(32, channels // 2), channels)


class GroupNorm(nn.GroupNorm):
    """Group normalization (Wu & He 2018) that is nn.GroupNorm on CPU/CUDA and written per sample on XLA.

    Same parameters (weight, bias: old checkpoints load), same numbers. Why two forms: torch-xla lowers
    nn.GroupNorm to a batch norm over a [1, B*G, ...] reshape, and under SPMD the partitioner all-gathers
    the whole batch for it, so every device would redo the following convolutions on the global batch.
    Written per sample (group_norm_per_sample) nothing crosses samples, and every device keeps its B/N rows
    (benchmarks/xla_spmd_check.py checks the compiled step). CPU and CUDA keep torch's fused kernel (faster,
    and it keeps channels_last). Under --bf16 on XLA the statistics are float32 here, where torch-xla's
    group_norm computed them in bfloat16 (measured: 7e-7 vs 1.6e-2 max error against float64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "xla":
            return super().forward(x)
        return group_norm_per_sample(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm_per_sample(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """F.group_norm as reductions inside each sample: x [B, C, H, W] -> [B, C, H, W]. The statistics are
    computed in at least float32; under autocast the output is float32, as torch's group_norm's on CUDA."""
    b, c = x.shape[:2]
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 -> float32; float64 stays
    y = x.reshape(b, num_groups, -1).to(dtype)  # [B, G, C/G*H*W]
    mean = y.mean(-1, keepdim=True)  # [B, G, 1]
    var = (y - mean).square().mean(-1, keepdim=True)  # [B, G, 1], biased, as GroupNorm's
    y = ((y - mean) * torch.rsqrt(var + eps)).view(b, c, -1)  # [B, C, H*W]
    y = y * weight.to(dtype).view(1, c, 1) + bias.to(dtype).view(1, c, 1)
    return y.view(x.shape).to(out_dtype)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: 3x3 conv, GN, ReLU, 3x3 conv, GN, plus a (projected) shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.gn1 = _gn(ch)
        self.conv2 = nn.Conv2d(ch, out_ch, 3, 1, 1, bias=False)
        self.gn2 = _gn(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.gn1(self.conv1(x)))
        y = self.gn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet-50/101 block (v1.5: stride on the 3x3 conv): 1x1, 3x3, 1x1 (x4 channels), GN after each."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.gn1 = _gn(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.gn2 = _gn(ch)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.gn3 = _gn(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _gn(out_ch))


def _resnet(block: type[BasicBlock] | type[Bottleneck], layers: list[int]) -> nn.Sequential:
    # ours: the ImageNet stem (7x7 conv, stride 2) without its max-pool, so 84x84 frames give
    # 42 -> 42 -> 21 -> 11 -> 6: a 6x6 final map for the spatial embedding (with the max-pool it would be
    # 3x3). Stage widths and block counts are the standard ones (He et al. 2016).
    mods: list[nn.Module] = [nn.Conv2d(4, 64, 7, 2, 3, bias=False), _gn(64), nn.ReLU()]
    in_ch = 64
    for i, (ch, n) in enumerate(zip([64, 128, 256, 512], layers, strict=True)):
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            mods.append(block(in_ch, ch, stride))
            in_ch = ch * block.expansion
    return nn.Sequential(*mods)


def _tiny() -> nn.Sequential:
    # ours: Nature-DQN's first two convs (84 -> 20 -> 9) with GN, then one basic residual block at 9x9.
    return nn.Sequential(
        nn.Conv2d(4, 32, 8, 4, bias=False), _gn(32), nn.ReLU(),
        nn.Conv2d(32, 64, 4, 2, bias=False), _gn(64), nn.ReLU(),
        BasicBlock(64, 64),
    )  # fmt: skip


class _ImpalaResidual(nn.Module):
    """IMPALA residual block (Espeholt et al. 2018): x + conv(relu(conv(relu(x))))."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _impala() -> nn.Sequential:
    # The IMPALA CNN: 3 stages [16, 32, 32] of conv3x3 + maxpool(3, stride 2) + 2 residual blocks, final
    # ReLU; 84 -> 42 -> 21 -> 11. ours: no normalization, as in IMPALA itself (it is the paper's
    # "standard architecture" baseline, so we keep it as published).
    mods: list[nn.Module] = []
    in_ch = 4
    for ch in (16, 32, 32):
        mods += [nn.Conv2d(in_ch, ch, 3, 1, 1), nn.MaxPool2d(3, 2, 1)]
        mods += [_ImpalaResidual(ch), _ImpalaResidual(ch)]
        in_ch = ch
    mods.append(nn.ReLU())
    return nn.Sequential(*mods)


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "tiny": _tiny,
    "impala": _impala,
    "resnet18": lambda: _resnet(BasicBlock, [2, 2, 2, 2]),
    "resnet34": lambda: _resnet(BasicBlock, [3, 4, 6, 3]),
    "resnet50": lambda: _resnet(Bottleneck, [3, 4, 6, 3]),
    "resnet101": lambda: _resnet(Bottleneck, [3, 4, 23, 3]),
}

# --------------------------------------------------------------------------------------------------------
# Spatial embedding, per-game heads, the Q-network.
# --------------------------------------------------------------------------------------------------------


class SpatialEmbedding(nn.Module):
    """Learned spatial embedding (Anand et al. 2022, used by Scaled QL instead of global average pooling).

    A learned kernel K [H, W, C, F] reduces a feature map [B, C, H, W] to [B, C*F]:
    out[b, c, f] = sum_{h,w} x[b, c, h, w] * K[h, w, c, f]. Each channel gets F learned spatial weightings,
    so the position of an object (which average pooling throws away) reaches the Q-values.
    """

    def __init__(self, channels: int, height: int, width: int, num_features: int = 8):
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(height, width, channels, num_features))  # [H, W, C, F]
        # ours: variance scaling over the fan-in H*W, so each output has the scale of one input.
        nn.init.normal_(self.kernel, std=(height * width) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("bchw,hwcf->bcf", x, self.kernel)  # [B, C, F]
        return out.flatten(1)  # [B, C*F]


def normalize_features(x: torch.Tensor) -> torch.Tensor:
    """Feature normalization, one of Scaled QL's three architecture choices (Sec. 4: the shared features
    that every game's head reads are normalized, which the paper finds important for stable multi-game
    training). The paper does not give its exact form; ours: the L2 normalization of each sample's shared
    features [B, D] (after the MLP's ReLU), with no learned scale."""
    return F.normalize(x, dim=-1)  # [B, D], every row of unit L2 norm


class GameHeads(nn.Module):
    """One linear layer per game, mapping features [B, D] to [B, num_actions * num_atoms].

    One dense matmul against all G heads, then a gather of each sample's own block: static shapes, any mix of
    games in a batch (a one-game evaluation batch; per-game shares that differ by one), and the gather's
    backward is a scatter, so every other game's head gets a gradient of exactly 0. It does G times the
    useful head FLOPs, small next to the trunk (0.5% for resnet101 with 40 games). The alternatives (gathering
    each sample's weights; one batched matmul over equal per-game groups) and their measured times are in
    docs/performance.md's "Model sizes" (benchmarks/bench_network.py --heads-only).
    """

    def __init__(self, num_games: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_games, out_dim, in_dim))  # [G, A*K, D]
        self.bias = nn.Parameter(torch.zeros(num_games, out_dim))  # [G, A*K]
        # ours: small init so that every head starts near a uniform return distribution.
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor, game: torch.Tensor) -> torch.Tensor:
        g, o, d = self.weight.shape
        all_heads = F.linear(x, self.weight.reshape(g * o, d), self.bias.reshape(g * o))  # [B, G*A*K]
        index = game.long().view(-1, 1, 1).expand(-1, 1, o)  # [B, 1, A*K]
        return all_heads.view(-1, g, o).gather(1, index).squeeze(1)  # [B, A*K]


class QNetwork(nn.Module):
    """Scaled QL's multi-game Q-network: shared trunk + spatial embedding + shared MLP, one head per game.

    forward(obs uint8 [B, 4, 84, 84], game int64 [B]) -> C51 logits float32 [B, num_actions, num_atoms].
    features(obs) -> the shared, L2-normalized features [B, mlp_dim] that every head reads.
    """

    def __init__(
        self,
        num_games: int,
        arch: str = "resnet101",
        num_actions: int = 18,
        num_atoms: int = 51,
        num_spatial: int = 8,  # F, learned spatial features per channel (ours: 8, not stated in the paper)
        mlp_dim: int = 640,  # ours: gives resnet101 with 40 games 77.1M parameters (paper: "up to 80M")
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}.")
        for name, value in [
            ("num_games", num_games),
            ("num_actions", num_actions),
            ("num_atoms", num_atoms),
            ("num_spatial", num_spatial),
            ("mlp_dim", mlp_dim),
        ]:
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        self.arch, self.num_games, self.num_actions, self.num_atoms = arch, num_games, num_actions, num_atoms
        self.num_spatial, self.mlp_dim = num_spatial, mlp_dim

        self.trunk = ARCHS[arch]()
        with torch.device("meta"):  # shapes only: no memory, no compute
            _, c, h, w = ARCHS[arch]()(torch.zeros(1, 4, 84, 84)).shape
        self.feature_shape = (c, h, w)  # resnets: (512 or 2048, 6, 6); tiny: (64, 9, 9); impala: (32, 11, 11)
        self.spatial_embedding = SpatialEmbedding(c, h, w, num_spatial)
        # ours: one hidden layer; the paper does not give the shared MLP's depth or width.
        self.shared_mlp = nn.Sequential(nn.Linear(c * num_spatial, mlp_dim), nn.ReLU())
        self.heads = GameHeads(num_games, mlp_dim, num_actions * num_atoms)
        self._init_trunk()

    def _init_trunk(self) -> None:
        for m in self.trunk.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            # ours: zero-init the last GN scale of each residual branch (Goyal et al. 2017), so every block
            # starts as the identity; it makes the deep GN ResNets train from the first step.
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.gn2.weight)
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.gn3.weight)

    def config(self) -> dict:
        """The constructor's keyword arguments (plain types), to rebuild this network from a checkpoint."""
        return {
            "num_games": self.num_games,
            "arch": self.arch,
            "num_actions": self.num_actions,
            "num_atoms": self.num_atoms,
            "num_spatial": self.num_spatial,
            "mlp_dim": self.mlp_dim,
        }

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 obs [B, 4, 84, 84] -> shared features [B, mlp_dim], each of unit L2 norm."""
        if obs.dtype != torch.uint8 or tuple(obs.shape[1:]) != (4, 84, 84):
            raise ValueError(
                f"obs must be uint8 of shape [B, 4, 84, 84] (raw frames; the network scales"
                f" them), got {obs.dtype} {tuple(obs.shape)}."
            )
        x = obs.to(next(self.trunk.parameters()).dtype) / 255.0  # [B, 4, 84, 84] in [0, 1]
        if self.trunk[0].weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # the net was moved to channels_last
        x = self.trunk(x)  # [B, C, H, W]
        x = self.spatial_embedding(x)  # [B, C*F]
        x = self.shared_mlp(x)  # [B, D]
        return normalize_features(x)  # [B, D]

    def forward(self, obs: torch.Tensor, game: torch.Tensor) -> torch.Tensor:
        logits = self.heads(self.features(obs), game)  # [B, A*K]
        return logits.view(-1, self.num_actions, self.num_atoms).float()  # [B, A, K]


def count_parameters(net: QNetwork) -> dict[str, int]:
    """Parameter counts by part: trunk, spatial_embedding, shared_mlp, heads, and their total."""
    parts = {
        name: sum(p.numel() for p in getattr(net, name).parameters())
        for name in ("trunk", "spatial_embedding", "shared_mlp", "heads")
    }
    parts["total"] = sum(parts.values())
    return parts


def transfer(net: QNetwork, num_games: int) -> QNetwork:
    """A new QNetwork for `num_games` new games: trunk, spatial embedding and shared MLP copied from `net`
    (independent copies of the weights, on the same device, dtype and memory format), fresh heads."""
    new = QNetwork(**{**net.config(), "num_games": num_games})
    new.trunk = copy.deepcopy(net.trunk)
    new.spatial_embedding = copy.deepcopy(net.spatial_embedding)
    new.shared_mlp = copy.deepcopy(net.shared_mlp)
    ref = next(net.heads.parameters())
    new.heads.to(device=ref.device, dtype=ref.dtype)
    new.train(net.training)
    return new


# Network surgery shared by the training scripts (cql_multigame, finetune_offline, finetune_online).


def target_network(net: QNetwork) -> QNetwork:
    """The target network of `net` (DQN's Q-hat): a frozen deep copy of the online network, holding net's
    current weights on its device, dtype and memory format, with requires_grad False. The training loop
    copies the online weights into it every target_update_every steps (load_state_dict)."""
    return copy.deepcopy(net).requires_grad_(False)


def freeze_trunk(net: QNetwork) -> None:
    """requires_grad False for the representation (trunk, spatial embedding, shared MLP); the heads train.
    GroupNorm keeps no running statistics, so the frozen parts stay bit-for-bit unchanged."""
    for part in (net.trunk, net.spatial_embedding, net.shared_mlp):
        part.requires_grad_(False)


def copy_head(dst: QNetwork, dst_game: int, src: QNetwork, src_game: int) -> None:
    """dst's head `dst_game` := src's head `src_game` (weights and bias; the networks' heads must match)."""
    with torch.no_grad():
        dst.heads.weight[dst_game] = src.heads.weight[src_game]  # [A*K, D]
        dst.heads.bias[dst_game] = src.heads.bias[src_game]  # [A*K]


# --------------------------------------------------------------------------------------------------------
# Reading a C51 head, and a network out of a checkpoint
# --------------------------------------------------------------------------------------------------------

# The C51 support every run of this repo uses unless told otherwise: 51 atoms on [-10, 10] (ours: C51's
# defaults for clipped rewards; cql_multigame.Args' v_min, v_max and num_atoms default to these values).
V_MIN, V_MAX, NUM_ATOMS = -10.0, 10.0, 51


def expected_q(logits: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """[B, A, K] logits -> [B, A] expected Q-values, sum_k softmax(logits)_k z_k (every script's Q)."""
    return (logits.float().softmax(-1) * support).sum(-1)


def support_bounds(ckpt: dict | None, path: object = "the checkpoint") -> tuple[float, float, int]:
    """(v_min, v_max, num_atoms) of a checkpoint: the support it records (machinery.checkpoints.
    checkpoint_support: one sentence if it records none, instead of a guess). No checkpoint at all (a
    from-scratch baseline): V_MIN, V_MAX, NUM_ATOMS."""
    if ckpt is None:
        return V_MIN, V_MAX, NUM_ATOMS
    return checkpoint_support(ckpt, path)


def support_from_checkpoint(ckpt: dict | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The C51 support [K] a checkpoint's network was trained with (support_bounds), on `device`."""
    v_min, v_max, num_atoms = support_bounds(ckpt)
    return torch.linspace(v_min, v_max, num_atoms, device=device)  # [K]


def network_from_checkpoint(ckpt: dict, which: str = "model", path: object = "the checkpoint") -> QNetwork:
    """Rebuild the QNetwork a checkpoint was trained with and load its weights (`which`: model or target).

    A checkpoint this resnet.py cannot rebuild (an unknown arch, weights of another shape) stops with one
    sentence naming the first weight that does not fit.
    """
    try:
        net = QNetwork(**ckpt["net_config"])
        net.load_state_dict(ckpt[which])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        reason = str(e).strip().splitlines()[0].rstrip(":.") if str(e).strip() else type(e).__name__
        if isinstance(e, RuntimeError) and "net" in locals():  # name the first weight that does not fit
            built, saved = net.state_dict(), ckpt[which]
            bad = [k for k in built if k not in saved or saved[k].shape != built[k].shape]
            bad = bad or [k for k in saved if k not in built]
            if bad:
                k = bad[0]
                got = tuple(saved[k].shape) if k in saved else "missing"
                want = tuple(built[k].shape) if k in built else "no such weight"
                reason = f"{k} is {got} in its weights but {want} in its net_config"
        raise ConfigError(
            f"checkpoint {path} holds a network this resnet.py cannot rebuild ({reason}); use a checkpoint "
            "written by this version of cql_multigame.py."
        ) from None
    return net
