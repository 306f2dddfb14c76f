"""Tests of resnet.py: shapes, per-game heads against a slow reference, gradient isolation between games,
feature normalization, parameter counts (docs/performance.md's table), transfer to new games,
channels_last, and the per-sample GroupNorm (the form XLA runs) against nn.GroupNorm."""

import pytest
import torch
import torch.nn.functional as F

import resnet
from resnet import ARCHS, QNetwork, count_parameters, transfer

# docs/performance.md's "Model sizes" table: 40 games, 18 actions x 51 atoms, 8 spatial features, mlp_dim 640.
PARAMS_40_GAMES = {
    "tiny": {"trunk": 115_136, "spatial_embedding": 41_472, "shared_mlp": 328_320, "heads": 23_537_520,
             "total": 24_022_448},
    "impala": {"trunk": 97_744, "spatial_embedding": 30_976, "shared_mlp": 164_480, "heads": 23_537_520,
               "total": 23_830_720},
    "resnet18": {"trunk": 11_179_648, "spatial_embedding": 147_456, "shared_mlp": 2_622_080,
                 "heads": 23_537_520, "total": 37_486_704},
    "resnet34": {"trunk": 21_287_808, "spatial_embedding": 147_456, "shared_mlp": 2_622_080,
                 "heads": 23_537_520, "total": 47_594_864},
    "resnet50": {"trunk": 23_511_168, "spatial_embedding": 589_824, "shared_mlp": 10_486_400,
                 "heads": 23_537_520, "total": 58_124_912},
    "resnet101": {"trunk": 42_503_296, "spatial_embedding": 589_824, "shared_mlp": 10_486_400,
                  "heads": 23_537_520, "total": 77_117_040},
}


def _obs(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8, generator=g)


def _meta_counts(arch: str, num_games: int = 40) -> dict[str, int]:
    with torch.device("meta"):  # no memory, no init cost: counts only
        return count_parameters(QNetwork(num_games, arch))


def test_archs_named_in_the_design():
    assert set(ARCHS) >= {"tiny", "impala", "resnet18", "resnet34", "resnet50", "resnet101"}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_runs_a_batch_of_two(arch):
    torch.manual_seed(0)
    net = QNetwork(num_games=3, arch=arch)
    out = net(_obs(2), torch.tensor([0, 2]))
    assert out.shape == (2, 18, 51) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    feats = net.features(_obs(2))
    assert feats.shape == (2, 640)
    c, h, w = net.feature_shape
    assert 6 <= h == w <= 11, "the spatial embedding should see a small but not trivial map"


def _reference_logits(net: QNetwork, obs: torch.Tensor, game: torch.Tensor) -> torch.Tensor:
    """Slow, obvious version of the whole forward pass: one sample and one head at a time."""
    x = net.trunk(obs.float() / 255.0)  # [B, C, H, W]
    kernel = net.spatial_embedding.kernel  # [H, W, C, F]
    rows = []
    for b in range(obs.shape[0]):
        emb = torch.stack([(x[b, c, :, :, None] * kernel[:, :, c, :]).sum((0, 1)) for c in range(x.shape[1])])
        h = net.shared_mlp(emb.flatten()[None])[0]  # [D]
        h = h / h.norm()
        g = int(game[b])
        rows.append(net.heads.weight[g] @ h + net.heads.bias[g])
    return torch.stack(rows).view(-1, net.num_actions, net.num_atoms)


@pytest.mark.parametrize("game", [[1, 1, 1, 1, 1], [0, 1, 2, 3, 0], [3, 0, 0, 2, 1]])
def test_heads_match_per_sample_reference_for_any_mix_of_games(game):
    torch.manual_seed(0)
    net = QNetwork(num_games=4, arch="tiny")
    with torch.no_grad():  # make the heads differ visibly from one another
        net.heads.weight.normal_(std=0.5)
        net.heads.bias.normal_()
    obs, game = _obs(5), torch.tensor(game)
    with torch.no_grad():
        torch.testing.assert_close(net(obs, game), _reference_logits(net, obs, game), rtol=1e-4, atol=1e-4)


def test_loss_on_some_games_gives_exactly_zero_gradient_to_other_heads():
    torch.manual_seed(0)
    net = QNetwork(num_games=5, arch="tiny")
    game = torch.tensor([1, 3, 1, 3])
    F.log_softmax(net(_obs(4), game), -1)[..., 7].sum().backward()
    for g in range(5):
        gw, gb = net.heads.weight.grad[g], net.heads.bias.grad[g]
        if g in (1, 3):
            assert gw.abs().sum() > 0 and gb.abs().sum() > 0
        else:
            assert torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0
    assert net.shared_mlp[0].weight.grad.abs().sum() > 0  # the shared parts do learn


@pytest.mark.parametrize("arch", ["tiny", "impala", "resnet18"])
def test_features_are_unit_norm(arch):
    torch.manual_seed(0)
    net = QNetwork(num_games=2, arch=arch)
    with torch.no_grad():
        norms = net.features(_obs(3)).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(3))


def test_spatial_embedding_is_the_stated_einsum():
    torch.manual_seed(0)
    net = QNetwork(num_games=1, arch="tiny")
    c, h, w = net.feature_shape
    x = torch.randn(2, c, h, w)
    kernel = net.spatial_embedding.kernel  # [H, W, C, F]
    expected = torch.zeros(2, c, kernel.shape[-1])
    for b in range(2):
        for i in range(h):
            for j in range(w):
                expected[b] += x[b, :, i, j, None] * kernel[i, j]
    torch.testing.assert_close(net.spatial_embedding(x), expected.flatten(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_parameter_counts_match_readme_table(arch):
    assert _meta_counts(arch) == PARAMS_40_GAMES[arch]


def test_capacity_ordering_and_resnet101_size():
    totals = {a: _meta_counts(a)["total"] for a in ("resnet34", "resnet50", "resnet101")}
    assert totals["resnet34"] < totals["resnet50"] < totals["resnet101"]
    assert 70e6 <= totals["resnet101"] <= 90e6  # the paper's "up to 80M parameters"
    trunks = {a: _meta_counts(a)["trunk"] for a in ("resnet34", "resnet50", "resnet101")}
    assert trunks["resnet34"] < trunks["resnet50"] < trunks["resnet101"]


def test_count_parameters_adds_up_to_all_parameters():
    net = QNetwork(num_games=3, arch="impala")
    counts = count_parameters(net)
    assert counts["total"] == sum(p.numel() for p in net.parameters())
    assert counts["heads"] == 3 * (640 * 18 * 51 + 18 * 51)


def test_transfer_copies_shared_parts_and_gives_fresh_heads():
    torch.manual_seed(0)
    net = QNetwork(num_games=4, arch="impala", mlp_dim=64)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)  # "trained": different from any fresh initialization
    new = transfer(net, num_games=2)
    assert new.num_games == 2 and new.config() == {**net.config(), "num_games": 2}
    assert new.heads.weight.shape == (2, 18 * 51, 64) and new.heads.bias.shape == (2, 18 * 51)
    for part in ("trunk", "spatial_embedding", "shared_mlp"):
        old_sd, new_sd = getattr(net, part).state_dict(), getattr(new, part).state_dict()
        assert old_sd.keys() == new_sd.keys()
        for k in old_sd:
            assert torch.equal(old_sd[k], new_sd[k]), f"{part}.{k} was not copied"
            assert old_sd[k].data_ptr() != new_sd[k].data_ptr(), f"{part}.{k} is shared, not copied"
    assert torch.count_nonzero(new.heads.bias) == 0  # fresh heads, not the old ones
    assert new.heads.weight.std() < 0.05
    with torch.no_grad():
        torch.testing.assert_close(new.features(_obs(2)), net.features(_obs(2)), rtol=0, atol=0)
        new.trunk[0].weight.add_(1.0)  # the copy is independent: changing it leaves the old net alone
    assert not torch.equal(new.trunk[0].weight, net.trunk[0].weight)
    assert new(_obs(2), torch.tensor([0, 1])).shape == (2, 18, 51)


def test_config_rebuilds_an_identical_network():
    torch.manual_seed(0)
    net = QNetwork(num_games=3, arch="tiny", num_actions=6, num_atoms=11, num_spatial=4, mlp_dim=32)
    config = net.config()
    assert all(isinstance(v, int | str) for v in config.values())
    rebuilt = QNetwork(**config)
    rebuilt.load_state_dict(net.state_dict())
    obs, game = _obs(2), torch.tensor([2, 0])
    with torch.no_grad():
        assert rebuilt(obs, game).shape == (2, 6, 11)
        torch.testing.assert_close(rebuilt(obs, game), net(obs, game))


@pytest.mark.parametrize("arch", ["tiny", "impala", "resnet18"])
def test_channels_last_gives_the_same_outputs(arch):
    torch.manual_seed(0)
    net = QNetwork(num_games=2, arch=arch)
    obs, game = _obs(2), torch.tensor([0, 1])
    with torch.no_grad():
        ref = net(obs, game)
        net = net.to(memory_format=torch.channels_last)
        assert net.trunk[0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(net(obs, game), ref, rtol=1e-4, atol=1e-4)
    new = transfer(net, num_games=3)
    assert new.trunk[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_bad_arch_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="resnet101") as info:
        QNetwork(num_games=2, arch="resnet99")
    for name in ARCHS:
        assert name in str(info.value)


def test_bad_inputs_raise_one_clear_error():
    net = QNetwork(num_games=2, arch="tiny")
    with pytest.raises(ValueError, match="uint8"):
        net(_obs(2).float(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="84, 84"):
        net(torch.zeros(2, 4, 64, 64, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_games"):
        QNetwork(num_games=0, arch="tiny")


# --------------------------------------------------------------------------------------------------------
# GroupNorm: on XLA the network normalizes per sample (group_norm_per_sample) so that SPMD never gathers
# the batch; it must be nn.GroupNorm exactly, forward and backward, with the same parameter names.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "groups", "channels_last"),
    [
        ((5, 32, 9, 9), 16, False),
        ((1, 64, 6, 6), 32, False),
        ((3, 16, 20, 20), 8, True),
        ((2, 8, 1, 1), 4, False),
    ],
)
def test_group_norm_per_sample_is_nn_group_norm_forward_and_backward(shape, groups, channels_last):
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(groups, shape[1])
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    x = (3 * torch.randn(shape) + 1).requires_grad_()
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = ref.weight.detach().clone().requires_grad_(), ref.bias.detach().clone().requires_grad_()
    out_ref = ref(x)
    out = resnet.group_norm_per_sample(x, groups, w, b, ref.eps)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(shape)
    grads_ref = torch.autograd.grad(out_ref, (x, ref.weight, ref.bias), upstream)
    grads = torch.autograd.grad(out, (x, w, b), upstream)
    for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n} grad: {m}")


def test_group_norm_per_sample_matches_the_definition_one_sample_at_a_time():
    # the slow, obvious reference: each sample's groups on their own, biased variance
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 8, 5, 5, dtype=torch.float64), torch.randn(8), torch.randn(8)
    expected = torch.empty_like(x)
    for i in range(3):
        for g in range(4):
            part = x[i, 2 * g : 2 * g + 2]
            normed = (part - part.mean()) / torch.sqrt(part.var(unbiased=False) + 1e-5)
            expected[i, 2 * g : 2 * g + 2] = (
                normed * w[2 * g : 2 * g + 2, None, None] + b[2 * g : 2 * g + 2, None, None]
            )
    out = resnet.group_norm_per_sample(x.float(), 4, w, b, 1e-5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_one_sample_does_not_change_another_samples_group_norm():
    # what makes it data-parallel under SPMD: a sample's output depends on that sample only
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 16, 7, 7), torch.randn(16), torch.randn(16)
    out = resnet.group_norm_per_sample(x, 8, w, b, 1e-5)
    x2 = x.clone()
    x2[1:] = 100 * torch.randn(3, 16, 7, 7)
    torch.testing.assert_close(resnet.group_norm_per_sample(x2, 8, w, b, 1e-5)[0], out[0], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["tiny", "resnet18", "resnet50"])
def test_network_with_per_sample_group_norm_gives_the_same_logits_and_gradients(arch, monkeypatch):
    torch.manual_seed(0)
    net = QNetwork(num_games=2, arch=arch, mlp_dim=64).double()  # float64: 50 layers of rounding stay small
    with torch.no_grad():  # the zero-initialised last GN scales would hide a difference in their branch
        for m in net.modules():
            if isinstance(m, resnet.GroupNorm):
                m.weight.normal_(1.0, 0.2)
    obs, game = _obs(3), torch.tensor([0, 1, 1])

    def run():
        net.zero_grad()
        out = net(obs, game)
        out.square().mean().backward()
        return out.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}

    out_ref, grads_ref = run()
    per_sample = lambda m, x: resnet.group_norm_per_sample(x, m.num_groups, m.weight, m.bias, m.eps)
    monkeypatch.setattr(resnet.GroupNorm, "forward", per_sample)  # what runs on XLA
    out, grads = run()
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-9)
    for k in grads_ref:
        torch.testing.assert_close(
            grads[k], grads_ref[k], rtol=1e-7, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_old_checkpoints_with_nn_group_norm_load_both_ways():
    # checkpoints written before GroupNorm had its own class hold nn.GroupNorm's weight/bias: same names
    torch.manual_seed(0)
    net = QNetwork(num_games=2, arch="resnet18")
    old = QNetwork(num_games=2, arch="resnet18")
    for name, m in list(old.named_modules()):
        if isinstance(m, resnet.GroupNorm):
            parent, _, attr = name.rpartition(".")
            plain = torch.nn.GroupNorm(m.num_groups, m.num_channels, m.eps)
            setattr(old.get_submodule(parent) if parent else old, attr, plain)
    assert not any(isinstance(m, resnet.GroupNorm) for m in old.modules())
    assert list(old.state_dict()) == list(net.state_dict())
    with torch.no_grad():
        for p in old.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    net.load_state_dict(old.state_dict())  # strict: every name and shape the same
    obs, game = _obs(2), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(net(obs, game), old(obs, game), rtol=0, atol=0)
    old.load_state_dict(net.state_dict())
