"""The C51 projection and the C51 + CQL loss against slow per-sample, per-atom references."""

import math

import pytest
import torch

from cql_multigame import c51_cql_loss, categorical_projection, compute_loss

K = 51
SUPPORT = torch.linspace(-10.0, 10.0, K, dtype=torch.float64)


def slow_projection(next_probs, reward, discount, support):
    """C51's Algorithm 1, one sample and one atom at a time (with the l == u case handled)."""
    v_min, v_max = float(support[0]), float(support[-1])
    n = len(support)
    delta = (v_max - v_min) / (n - 1)
    out = torch.zeros_like(next_probs)
    for b in range(next_probs.shape[0]):
        for j in range(n):
            tz = min(max(float(reward[b]) + float(discount[b]) * float(support[j]), v_min), v_max)
            pos = (tz - v_min) / delta
            lo, hi = math.floor(pos), math.ceil(pos)
            if abs(pos - round(pos)) < 1e-9:  # lands on a support point
                out[b, round(pos)] += next_probs[b, j]
            else:
                out[b, lo] += next_probs[b, j] * (hi - pos)
                out[b, hi] += next_probs[b, j] * (pos - lo)
    return out


def random_probs(b, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g, dtype=torch.float64).softmax(-1)


@pytest.mark.parametrize(
    "reward, discount",
    [
        (
            [0.0, 0.4, -0.4, 1.2],
            [1.0, 1.0, 1.0, 1.0],
        ),  # whole atom shifts: every atom lands on a support point
        ([0.0, 0.0, 0.4], [0.0, 0.0, 0.0]),  # terminals: all mass on the reward's atom
        ([0.13, -0.77, 0.5], [0.0, 0.0, 0.0]),  # terminals between atoms
        ([15.0, -15.0, 9.9, -9.9], [0.99, 0.99, 0.5, 0.5]),  # targets beyond [v_min, v_max]
        ([0.31, -1.0, 0.0, 0.97], [0.970299, 0.99, 0.9, 0.0]),  # generic n-step targets
    ],
)
def test_projection_matches_slow_reference(reward, discount):
    probs = random_probs(len(reward))
    r = torch.tensor(reward, dtype=torch.float64)
    d = torch.tensor(discount, dtype=torch.float64)
    fast = categorical_projection(probs, r, d, SUPPORT)
    slow = slow_projection(probs, r, d, SUPPORT)
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast.sum(-1), torch.ones(len(reward), dtype=torch.float64))


def test_projection_of_terminal_on_a_support_point_is_one_hot():
    probs = random_probs(1)
    out = categorical_projection(
        probs, torch.tensor([0.4], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), SUPPORT
    )
    expected = torch.zeros(1, K, dtype=torch.float64)
    expected[0, 26] = 1.0  # 0.4 is atom 26 of linspace(-10, 10, 51)
    torch.testing.assert_close(out, expected)


def test_projection_clamps_out_of_range_to_end_atoms():
    probs = random_probs(2)
    out = categorical_projection(
        probs, torch.tensor([50.0, -50.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64), SUPPORT
    )
    assert out[0, -1] == pytest.approx(1.0) and out[1, 0] == pytest.approx(1.0)


def slow_loss(logits, action, target, support, legal, alpha, td_weight=1.0):
    total, tds, cqls = 0.0, [], []
    for b in range(logits.shape[0]):
        a = int(action[b])
        logp = torch.log_softmax(logits[b, a], -1)
        td = -sum(float(target[b, k]) * float(logp[k]) for k in range(logits.shape[2]))
        q = [float((torch.softmax(logits[b, i], -1) * support).sum()) for i in range(logits.shape[1])]
        lse = math.log(sum(math.exp(q[i]) for i in range(len(q)) if legal[b, i]))
        cql = lse - q[a]
        tds.append(td)
        cqls.append(cql)
        total += td_weight * td + alpha * cql
    n = logits.shape[0]
    return total / n, sum(tds) / n, sum(cqls) / n


def make_case(seed=0, b=5, a=18):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, a, K, generator=g, dtype=torch.float64) * 2
    legal = torch.zeros(b, a, dtype=torch.bool)
    legal[:, [0, 1, 3, 4, 11, 12]] = True  # Pong's minimal set
    legal[0, :] = True  # a full-action game in the same batch
    action = torch.tensor([7, 1, 3, 11, 0])[:b]
    target = random_probs(b, seed=seed + 1)
    return logits, action, target, legal


@pytest.mark.parametrize("alpha, td_weight", [(0.1, 1.0), (0.0, 1.0), (1.0, 0.0), (2.5, 0.5)])
def test_loss_matches_slow_reference(alpha, td_weight):
    logits, action, target, legal = make_case()
    loss, m = c51_cql_loss(logits, action, target, SUPPORT, legal, alpha, td_weight)
    ref, ref_td, ref_cql = slow_loss(logits, action, target, SUPPORT, legal, alpha, td_weight)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert float(m["td_loss"]) == pytest.approx(ref_td, rel=1e-5)
    assert float(m["cql_term"]) == pytest.approx(ref_cql, rel=1e-5)


def test_illegal_actions_do_not_change_loss_or_gradient():
    logits, action, target, legal = make_case()
    logits.requires_grad_(True)
    loss, _ = c51_cql_loss(logits, action, target, SUPPORT, legal, 0.5)
    (grad,) = torch.autograd.grad(loss, logits)
    noisy = logits.detach().clone()
    noisy[~legal] = torch.randn(int((~legal).sum()), K, dtype=torch.float64) * 50
    noisy.requires_grad_(True)
    loss2, _ = c51_cql_loss(noisy, action, target, SUPPORT, legal, 0.5)
    (grad2,) = torch.autograd.grad(loss2, noisy)
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()), rel=1e-12)
    torch.testing.assert_close(grad2[legal], grad[legal])
    assert torch.all(grad2[~legal] == 0)


class FixedNet(torch.nn.Module):
    """Returns fixed logits whatever the input: lets the test choose every Q-value."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, obs, game):
        return self.logits


def test_target_argmax_runs_over_legal_actions_only():
    b, a = 2, 18
    support = SUPPORT.float()
    # target net: illegal action 5 has the highest Q, legal action 3 the highest legal Q
    t_logits = torch.zeros(b, a, K)
    t_logits[:, 5, -1] = 30.0  # Q(5) ~ +10 (illegal)
    t_logits[:, 3, 30] = 30.0  # Q(3) = support[30] = 2.0
    t_logits[:, 4, 10] = 30.0  # Q(4) = -6.0
    legal_table = torch.zeros(1, a, dtype=torch.bool)
    legal_table[0, [0, 3, 4]] = True
    batch = {
        "obs": torch.zeros(b, 4, 84, 84, dtype=torch.uint8),
        "next_obs": torch.zeros(b, 4, 84, 84, dtype=torch.uint8),
        "action": torch.tensor([0, 3]),
        "game": torch.zeros(b, dtype=torch.int64),
        "reward": torch.tensor([0.0, 1.0]),
        "discount": torch.tensor([1.0, 0.0]),
    }
    online = FixedNet(torch.zeros(b, a, K))
    _, m = compute_loss(online, FixedNet(t_logits), batch, support, legal_table, cql_alpha=0.0)
    # the target comes from legal action 3 (highest legal Q), not from illegal action 5
    expected_target = categorical_projection(
        torch.softmax(t_logits[torch.arange(b), torch.tensor([3, 3])], -1),
        batch["reward"],
        batch["discount"],
        support,
    )
    log_probs = torch.log_softmax(online.logits, -1)[torch.arange(b), batch["action"]]
    expected_td = -(expected_target * log_probs).sum(-1).mean()
    assert float(m["td_loss"]) == pytest.approx(float(expected_td.detach()), rel=1e-5)
    # sample 0 bootstraps (discount 1): the illegal argmax would have given another target
    wrong = categorical_projection(
        torch.softmax(t_logits[:, 5], -1), batch["reward"], batch["discount"], support
    )
    assert not torch.allclose(wrong[0], expected_target[0])


@pytest.mark.parametrize("double_q", [False, True])
def test_double_q_picks_the_next_action_by_the_online_network(double_q):
    b, a = 2, 18
    support = SUPPORT.float()
    legal_table = torch.zeros(1, a, dtype=torch.bool)
    legal_table[0, [0, 3, 4, 7]] = True
    t_logits = torch.zeros(b, a, K)  # target net: legal action 3 has the highest Q, 7 an illegal-free low one
    t_logits[:, 3, 40] = 30.0
    t_logits[:, 4, 25] = 30.0
    o_logits = torch.zeros(b, a, K)  # online net: legal action 4 has the highest Q, illegal 9 higher still
    o_logits[:, 4, 45] = 30.0
    o_logits[:, 9, -1] = 40.0
    batch = {
        "obs": torch.zeros(b, 4, 84, 84, dtype=torch.uint8),
        "next_obs": torch.zeros(b, 4, 84, 84, dtype=torch.uint8),
        "action": torch.tensor([0, 3]),
        "game": torch.zeros(b, dtype=torch.int64),
        "reward": torch.tensor([0.5, -0.5]),
        "discount": torch.tensor([0.97, 0.97]),
    }
    online = FixedNet(o_logits)
    _, m = compute_loss(
        online, FixedNet(t_logits), batch, support, legal_table, cql_alpha=0.0, double_q=double_q
    )
    chosen = 4 if double_q else 3  # double DQN: online argmax (legal only), evaluated by the target net
    target = categorical_projection(
        torch.softmax(t_logits[:, chosen], -1), batch["reward"], batch["discount"], support
    )
    log_probs = torch.log_softmax(o_logits, -1)[torch.arange(b), batch["action"]]
    assert float(m["td_loss"]) == pytest.approx(float(-(target * log_probs).sum(-1).mean()), rel=1e-5)
