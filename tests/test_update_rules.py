"""Robust rules over updates (upload - the round's starting adapter), issue 21: robust learning rate (Ozdayi et
al. 2021), centred clipping (Karimireddy et al. 2021) and FoolsGold (Fung et al. 2020), each against hand cases;
the round loop runs every built-in rule in tests/test_nonfinite.py."""

import math

import numpy as np
import pytest
import torch

from fedleak.common.errors import FedleakError
from fedleak.defenses.base import DEFENSES
from fedleak.defenses.centered_clip import CenteredClip, centered_clip
from fedleak.defenses.foolsgold import FoolsGold, foolsgold, foolsgold_weights
from fedleak.defenses.robust_lr import RobustLR, robust_lr
from fedleak.federated.hooks import ClientUpdate, RoundInfo

KEY = "layer.lora_A.weight"


def _s(*values):
    return {KEY: torch.tensor(values, dtype=torch.float64)}


def _info(rnd=1, start=None, clients=(0, 1, 2)):
    return RoundInfo(round=rnd, clients=list(clients), num_clients_total=len(clients),
                     generator=torch.Generator().manual_seed(0), start=start)


def _updates(*states, weights=None):
    return [ClientUpdate(client=i, state=s, num_examples=(weights or [1] * len(states))[i]) for i, s in enumerate(states)]


# -- robust learning rate ---------------------------------------------------------------------------------------

def test_robust_lr_reverses_the_step_where_the_signs_disagree():
    start = _s(1.0, 1.0, 1.0)
    # updates: (+1, +2, 0), (+3, -2, 0), (+2, +1, 0): coordinate 0 agrees 3/3, coordinate 1 has |1 - 1 + 1| = 1,
    # coordinate 2 is zero everywhere (sign 0).
    results = [(_s(2.0, 3.0, 1.0), 1), (_s(4.0, -1.0, 1.0), 1), (_s(3.0, 2.0, 1.0), 2)]
    state, reversed_share = robust_lr(results, start, threshold=2, server_lr=1.0)
    mean = np.array([(1 + 3 + 2 * 2) / 4, (2 - 2 + 2 * 1) / 4, 0.0])  # FedAvg of the updates, weights 1, 1, 2
    np.testing.assert_allclose(state[KEY].numpy(), [1 + mean[0], 1 - mean[1], 1 - 0.0])
    assert reversed_share == pytest.approx(2 / 3)
    # Where every coordinate agrees the rule is FedAvg scaled by server_lr.
    agree = [(_s(2.0, 3.0, 2.0), 1), (_s(4.0, 2.0, 3.0), 3)]
    state, share = robust_lr(agree, start, threshold=2, server_lr=0.5)
    np.testing.assert_allclose(state[KEY].numpy(), 1 + 0.5 * np.array([(1 + 9) / 4, (2 + 3) / 4, (1 + 6) / 4]))
    assert share == 0.0


def test_robust_lr_leaves_a_nonfinite_upload_out_and_keeps_dtypes():
    start = {KEY: torch.zeros(2, dtype=torch.float32)}
    results = [({KEY: torch.tensor([1.0, 1.0])}, 1), ({KEY: torch.tensor([math.nan, 1.0])}, 1),
               ({KEY: torch.tensor([1.0, 3.0])}, 1)]
    state, _ = robust_lr(results, start, threshold=2)
    assert state[KEY].dtype == torch.float32
    torch.testing.assert_close(state[KEY], torch.tensor([1.0, 2.0]))


def test_robust_lr_defense_checks_its_threshold_and_needs_the_round_start():
    with pytest.raises(FedleakError, match=r"robust_lr: threshold = 4 exceeds the 3 clients per round.*lower threshold"):
        RobustLR(threshold=4).check(clients_per_round=3)
    RobustLR(threshold=3).check(clients_per_round=3)
    with pytest.raises(FedleakError, match=r"robust_lr: RoundInfo.start is not set.*RoundInfo\(start=\.\.\.\)"):
        RobustLR().aggregate(_updates(_s(1.0), _s(2.0)), info=_info())
    info = _info(start=_s(0.0, 0.0))
    out = RobustLR(threshold=2).aggregate(_updates(_s(1.0, 1.0), _s(1.0, -1.0)), info=info)
    torch.testing.assert_close(out[KEY], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert info.metrics["robust_lr_reversed"] == 0.5
    with pytest.raises(Exception, match="threshold"):
        RobustLR(threshold=0)


# -- centred clipping ---------------------------------------------------------------------------------------------

def test_centered_clip_caps_an_outlier_at_tau_over_n():
    start = _s(0.0, 0.0)
    results = [(_s(1.0, 0.0), 1), (_s(1.0, 0.0), 5), (_s(100.0, 0.0), 1)]
    state, center, clipped = centered_clip(results, start, tau=1.0)
    # Around 0: the honest differences have norm 1 (kept), the outlier's 100 is scaled by 1/100: v = (1+1+1)/3.
    torch.testing.assert_close(state[KEY], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert clipped == [2]
    torch.testing.assert_close(center, torch.tensor([1.0, 0.0], dtype=torch.float64))
    # A second iteration starts from v_1 = (1, 0): the honest updates sit on it, the outlier adds 1/3 again.
    state, _, _ = centered_clip(results, start, tau=1.0, iterations=2)
    torch.testing.assert_close(state[KEY], torch.tensor([1.0 + 1 / 3, 0.0], dtype=torch.float64))
    # Everything within tau of the centre: the unweighted mean of the updates (example counts ignored).
    state, _, clipped = centered_clip([(_s(1.0, 2.0), 1), (_s(3.0, 2.0), 9)], _s(1.0, 1.0), tau=10.0)
    torch.testing.assert_close(state[KEY], torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert clipped == []


def test_centered_clip_starts_each_round_from_the_previous_aggregate_update():
    rule = CenteredClip(tau=1.0)
    first = _info(1, start=_s(0.0, 0.0))
    rule.aggregate(_updates(_s(2.0, 0.0), _s(2.0, 0.0), _s(2.0, 0.0)), info=first)
    assert first.metrics["centered_clip_clipped"] == [0, 1, 2]  # norm 2 > tau around the zero centre
    # Round 2 from start (10, 10): the centre is round 1's update v = (1, 0); updates (1, 0) sit on it.
    second = _info(2, start=_s(10.0, 10.0))
    out = rule.aggregate(_updates(_s(11.0, 10.0), _s(11.0, 10.0), _s(11.0, 13.0)), info=second)
    # differences from v: (0, 0), (0, 0), (0, 3) -> the last scaled to (0, 1): v = (1, 1/3)
    torch.testing.assert_close(out[KEY], torch.tensor([11.0, 10.0 + 1 / 3], dtype=torch.float64))
    assert second.metrics["centered_clip_clipped"] == [2]
    # A new training (round 1 again) forgets the centre.
    again = rule.aggregate(_updates(_s(3.0, 0.0), _s(3.0, 0.0)), info=_info(1, start=_s(0.0, 0.0)))
    torch.testing.assert_close(again[KEY], torch.tensor([1.0, 0.0], dtype=torch.float64))  # carried centre: (2, 1/3)


# -- FoolsGold ----------------------------------------------------------------------------------------------------

def _reference_weights(histories: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """Fung et al.'s Algorithm 1 as loops over clients, written from the paper and the authors' published code."""
    n = len(histories)
    norms = np.linalg.norm(histories, axis=1)
    cs = np.array([[histories[i] @ histories[j] / (norms[i] * norms[j]) for j in range(n)] for i in range(n)])
    cs -= np.eye(n)
    maxcs = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
    wv = np.clip(1 - cs.max(axis=1), 0, 1)
    wv = wv / wv.max()
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = kappa * (np.log(wv / (1 - wv)) + 0.5)
    wv[np.isinf(wv) & (wv > 0)] = 1
    return np.clip(wv, 0, 1)


def test_foolsgold_gives_sybil_twins_nothing_and_a_distinct_client_everything():
    w = foolsgold_weights(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    # Pardoning: the third client resembles the sybils (cos 1/sqrt 2) less than they resemble each other (1), so
    # its similarity is scaled by 0.707 / 1 to 0.5 and it keeps full weight.
    w = foolsgold_weights(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    # Pardoning decides: a = b, c = (1, 1), d = (-1, 1). c's similarity to the twins (0.707) is scaled by 0.707 to 0.5,
    # so c keeps weight 0.5 (without pardoning: 0).
    w = foolsgold_weights(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 1.0]]))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=torch.float64))
    # Graded: a and b at cos 0.5, c orthogonal to both. alpha = 1 - 0.5 for a and b, 1 for c;
    # normalised 0.5, 0.5, 1 -> 0.99; logit(0.5) + 0.5 = 0.5.
    w = foolsgold_weights(torch.tensor([[1.0, 0.0, 0.0], [0.5, math.sqrt(0.75), 0.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64))
    assert foolsgold_weights(torch.tensor([[1.0, 0.0, 0.0], [0.5, math.sqrt(0.75), 0.0], [0.0, 0.0, 1.0]]),
                             kappa=1.5)[0] == pytest.approx(0.75)
    # Every history with a twin: nobody is trusted.
    assert foolsgold_weights(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]])).sum() == 0


@pytest.mark.parametrize("seed", range(5))
def test_foolsgold_weights_match_the_papers_algorithm(seed):
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=16)
    histories = np.stack([shared * rng.uniform(0.2, 2.0) + rng.normal(size=16) * rng.uniform(0.1, 3.0)
                          for _ in range(6)])
    kappa = [1.0, 0.5, 2.0, 1.0, 3.0][seed]
    got = foolsgold_weights(torch.tensor(histories), kappa=kappa).numpy()
    want = _reference_weights(histories, kappa=kappa)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_foolsgold_aggregate_divides_by_n_and_histories_accumulate():
    start = _s(0.0, 0.0)
    results = [(_s(1.0, 0.0), 1), (_s(1.0, 0.0), 1), (_s(0.0, 3.0), 1), (_s(math.inf, 0.0), 1)]
    state, after, weights = foolsgold(results, start, torch.zeros(4, 2, dtype=torch.float64))
    # weights 0, 0, 1 over the 3 finite uploads: start + (0 + 0 + (0, 3)) / 3
    torch.testing.assert_close(state[KEY], torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(after[3], torch.zeros(2, dtype=torch.float64))  # the refused upload adds nothing
    with pytest.raises(ValueError, match="at least 2 finite client updates"):
        foolsgold(results[2:], start, torch.zeros(2, 2, dtype=torch.float64))


def test_foolsgold_defense_keeps_histories_per_client_and_resets_per_training():
    rule = FoolsGold()
    with pytest.raises(FedleakError, match="foolsgold compares clients' update histories: it needs at least 2"):
        rule.check(clients_per_round=1)
    first = _info(1, start=_s(0.0, 0.0))
    rule.aggregate(_updates(_s(1.0, 0.0), _s(0.0, 1.0), _s(-1.0, 0.0)), info=first)
    assert first.metrics["excluded_clients"] == [] and set(first.metrics["foolsgold_weights"]) == {"0", "1", "2"}
    # Round 2: clients 0 and 2 now send the same update; their histories (1, 1) and (-1, 1) are not alike yet
    # (cos 0): FoolsGold reads histories, not the round's updates alone.
    second = _info(2, start=_s(0.0, 0.0))
    rule.aggregate(_updates(_s(0.0, 1.0), _s(0.0, -1.0), _s(0.0, 1.0)), info=second)
    assert torch.equal(rule._histories[0], torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.equal(rule._histories[2], torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert second.metrics["excluded_clients"] == []
    rule.aggregate(_updates(_s(5.0, 5.0), _s(0.0, 1.0)), info=_info(1, start=_s(0.0, 0.0), clients=(0, 1)))
    assert torch.equal(rule._histories[0], torch.tensor([5.0, 5.0], dtype=torch.float64)) and 2 not in rule._histories


def test_the_new_rules_are_registered_and_need_individual_uploads():
    for name in ("robust_lr", "centered_clip", "foolsgold"):
        assert DEFENSES.get(name).needs_individual_updates, name
