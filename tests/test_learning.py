"""The unchanged update (cql_multigame.compute_loss + Adam + hard target updates) learns a task whose answer
is known, where behavior cloning cannot, and CQL keeps unseen actions' Q below the data's.

Two tiny image MDPs stand in for two games (each with its own head and its own legal actions):
a corridor of 4 cells drawn as a white block on an 84x84 frame. ADVANCE moves one cell right and pays
+1 when it leaves the last cell (terminal); QUIT pays +0.2 and ends the episode; STAY pays 0.
Optimal: always ADVANCE (return gamma**3 = 0.97). The behavior policy QUITs half of the time, so its
most likely action is the wrong one: BC's greedy policy QUITs (return 0.2), about the behavior's return.

The network is a small MLP with the QNetwork interface (uint8 frames + game ids -> [B, 18, 51] logits),
so the test runs in seconds; the update code is exactly the one cql_multigame.main runs.
"""

import numpy as np
import pytest
import torch

from cql_multigame import compute_loss, expected_q

GAMMA, CELLS, K = 0.99, 4, 51
SUPPORT = torch.linspace(-10.0, 10.0, K)
# full-action-set ids of (ADVANCE, QUIT, STAY) in each toy game: the heads must learn game-specific ids
ACTIONS = {0: (3, 1, 0), 1: (2, 5, 0)}


def frame(cell: int) -> np.ndarray:
    f = np.zeros((84, 84), dtype=np.uint8)
    f[37:47, 8 + 18 * cell : 18 + 18 * cell] = 255
    return np.stack([f] * 4)  # [4, 84, 84]


def step(cell: int, kind: int, quit_reward: float, end_reward: float):
    """kind 0 ADVANCE, 1 QUIT, 2 STAY -> (next cell, reward, terminal)."""
    if kind == 0:
        return (cell, end_reward, True) if cell == CELLS - 1 else (cell + 1, 0.0, False)
    if kind == 1:
        return cell, quit_reward, True
    return cell, 0.0, False


def behavior_data(probs, n, seed, quit_reward=0.2, end_reward=1.0):
    """n one-step transitions per game from episodes of the behavior policy (probs over ADVANCE/QUIT/STAY).

    Episodes start in a random cell so that every cell is in the data (evaluation starts in cell 0)."""
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("cell", "action", "reward", "discount", "next_cell", "game")}
    for game in (0, 1):
        cell, count = int(rng.integers(CELLS)), 0
        while count < n:
            kind = int(rng.choice(3, p=probs))
            nxt, r, term = step(cell, kind, quit_reward, end_reward)
            for k, v in zip(
                out, (cell, ACTIONS[game][kind], r, 0.0 if term else GAMMA, nxt, game), strict=True
            ):
                out[k].append(v)
            count += 1
            cell = int(rng.integers(CELLS)) if term else nxt
    return {k: np.array(v) for k, v in out.items()}


def behavior_return(probs, quit_reward=0.2, end_reward=1.0):
    """Exact value of the behavior policy from cell 0 (a linear system)."""
    a, q, s = probs
    v = 0.0
    for _ in range(CELLS):  # backward from the last cell: v = a*(r_or_gamma*v_next) + q*quit + s*gamma*v
        ahead = end_reward if _ == 0 else GAMMA * v
        v = (a * ahead + q * quit_reward) / (1 - s * GAMMA)
    return v


class ToyNet(torch.nn.Module):
    """An MLP with the QNetwork interface: uint8 [B,4,84,84] + game [B] -> logits [B, 18, K]."""

    def __init__(self, num_games=2, hidden=64):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(144, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU()
        )
        self.heads = torch.nn.Linear(hidden, num_games * 18 * K)
        torch.nn.init.normal_(self.heads.weight, std=0.01)
        torch.nn.init.zeros_(self.heads.bias)

    def forward(self, obs, game):
        x = torch.nn.functional.avg_pool2d(obs[:, -1:].float() / 255.0, 7).flatten(1)  # [B, 144]
        h = self.body(x)  # [B, H]
        out = self.heads(h).view(h.shape[0], -1, 18, K)  # [B, G, 18, K]: every head, then the sample's own
        return out[torch.arange(h.shape[0]), game]


def train(data, *, cql_alpha, td_weight=1.0, steps=1000, seed=0):
    torch.manual_seed(seed)
    net, target = ToyNet(), ToyNet()
    target.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=3.125e-4)
    legal = torch.zeros(2, 18, dtype=torch.bool)
    for g, acts in ACTIONS.items():
        legal[g, list(acts)] = True
    frames = torch.from_numpy(np.stack([frame(c) for c in range(CELLS)]))  # [CELLS, 4, 84, 84]
    rng = np.random.default_rng(seed)
    n = len(data["cell"])
    for i in range(steps):
        idx = rng.integers(0, n, 64)
        batch = {
            "obs": frames[data["cell"][idx]],
            "next_obs": frames[data["next_cell"][idx]],
            "action": torch.from_numpy(data["action"][idx]),
            "reward": torch.from_numpy(data["reward"][idx]).float(),
            "discount": torch.from_numpy(data["discount"][idx]).float(),
            "game": torch.from_numpy(data["game"][idx]),
        }
        loss, _ = compute_loss(net, target, batch, SUPPORT, legal, cql_alpha, td_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % 50 == 0:
            target.load_state_dict(net.state_dict())
    with torch.no_grad():
        q = {g: expected_q(net(frames, torch.full((CELLS,), g)), SUPPORT) for g in ACTIONS}  # [CELLS, 18]
    return q


def greedy_return(q_game, game, quit_reward=0.2, end_reward=1.0):
    legal = list(ACTIONS[game])
    cell, ret, disc = 0, 0.0, 1.0
    for _ in range(20):
        kind = int(torch.argmax(q_game[cell, legal]))  # ACTIONS lists (ADVANCE, QUIT, STAY)
        cell, r, term = step(cell, kind, quit_reward, end_reward)
        ret += disc * r
        disc *= GAMMA
        if term:
            break
    return ret


BEHAVIOR = (0.3, 0.5, 0.2)  # ADVANCE, QUIT, STAY


@pytest.fixture(scope="module")
def data():
    return behavior_data(BEHAVIOR, 3000, seed=0)


def test_cql_learns_the_optimal_policy_in_both_games_and_beats_the_behavior(data):
    q = train(data, cql_alpha=0.1)
    behavior = behavior_return(BEHAVIOR)
    for game in ACTIONS:
        advance = ACTIONS[game][0]
        legal = list(ACTIONS[game])
        for cell in range(CELLS):
            assert legal[int(torch.argmax(q[game][cell, legal]))] == advance, (
                game,
                cell,
                q[game][cell, legal],
            )
        assert greedy_return(q[game], game) == pytest.approx(GAMMA ** (CELLS - 1))
        assert greedy_return(q[game], game) > behavior + 0.5


def test_bc_preset_only_matches_the_behavior(data):
    q = train(data, cql_alpha=1.0, td_weight=0.0)  # the `bc` preset's loss
    behavior = behavior_return(BEHAVIOR)
    for game in ACTIONS:
        assert greedy_return(q[game], game) <= behavior + 0.05  # it QUITs, like the behavior's mode


def test_cql_keeps_unseen_actions_below_the_data(data):
    """Data without STAY and with costly outcomes: without CQL, the never-seen STAY keeps its initial Q (~0)
    above the data's negative values and becomes the greedy action; CQL pushes it below."""
    costly = behavior_data((0.4, 0.6, 0.0), 3000, seed=1, quit_reward=-0.5, end_reward=-0.2)

    def gap(q):  # mean over games and cells of Q(unseen STAY) - mean Q of the data's actions
        out = []
        for game, (adv, quit_, stay) in ACTIONS.items():
            out.append(q[game][:, stay] - 0.5 * (q[game][:, adv] + q[game][:, quit_]))
        return float(torch.cat(out).mean())

    no_cql, cql = train(costly, cql_alpha=0.0), train(costly, cql_alpha=1.0)
    assert gap(no_cql) > 0.1
    assert gap(cql) < -0.1
