"""Poisoning attacks: each transform on known tensors, the data poisons on known records, the
adversary inside the round loop (FEDIT and FEDPIT), scenario configs, and detection rates."""

import numpy as np
import pytest
import torch

from fedleak.attacks.poisoning.alie import ALIE, alie_update, alie_z
from fedleak.attacks.poisoning.backdoor import POISON_CATEGORY, Backdoor
from fedleak.attacks.poisoning.base import RoundUpdates, ScenarioAdversary
from fedleak.attacks.poisoning.gaussian import Gaussian
from fedleak.attacks.poisoning.ipm import IPM
from fedleak.attacks.poisoning.label_flip import LabelFlip
from fedleak.attacks.poisoning.scaling import Scaling
from fedleak.attacks.poisoning.sign_flip import SignFlip
from fedleak.defenses.base import Defense
from fedleak.eval.config import parse_config
from fedleak.federated.adapters import DEFAULT, LoraSettings, flatten
from fedleak.federated.data import FederatedData, generate_records
from fedleak.common.errors import FedleakError
from fedleak.federated.fedit import FedIT
from fedleak.federated.fedpit import FedPIT
from fedleak.federated.hooks import ClientUpdate, RoundInfo
from fedleak.federated.model import load_base_model
from fedleak.federated.loop import run_rounds
from fedleak.federated.rounds import Algorithm, ClientResult, FederationSettings, TrainingSetup, register_algorithm
from fedleak.federated.seeding import numpy_rng

KEYS = ("layer.lora_A.weight", "layer.lora_B.weight")


def _round(honest, *, uploads=3, malicious=1, own=10, total=30, seed=0):
    return RoundUpdates(honest=honest, num_uploads=uploads, num_malicious=malicious, own_examples=own,
                        total_examples=total, generator=torch.Generator().manual_seed(seed))


def _vectors(n=4, d=50, seed=0):
    return torch.tensor(np.random.default_rng(seed).normal(size=(n, d)))


def test_sign_flip_negates_and_scaling_multiplies():
    delta, honest = _vectors(1)[0], _vectors(3, seed=1)
    assert torch.equal(SignFlip().poison_update(delta, _round(honest)), -delta)
    assert torch.allclose(SignFlip(scale=2.5).poison_update(delta, _round(honest)), -2.5 * delta)
    assert torch.allclose(Scaling(boost=4.0).poison_update(delta, _round(honest)), 4.0 * delta)
    # Unset boost: the FedAvg replacement factor, total examples / own examples (Bagdasaryan et al.).
    assert torch.allclose(Scaling().poison_update(delta, _round(honest, own=10, total=35)), 3.5 * delta)


def test_alie_stays_within_z_standard_deviations_of_the_honest_mean():
    honest = _vectors(5, seed=2)
    mu, sigma = honest.mean(dim=0), honest.std(dim=0)
    for z in (0.0, 0.43, 1.5):
        sent = ALIE(z=z).poison_update(_vectors(1)[0], _round(honest))
        assert torch.all((sent - mu).abs() <= z * sigma + 1e-12)
        assert torch.allclose(sent, mu - z * sigma)
    # The paper's z for n uploads with f malicious: s = floor(n/2 + 1) - f, z = Phi^-1((n - s) / n).
    assert alie_z(3, 1) == pytest.approx(0.4307, abs=1e-4)  # s = 1, Phi^-1(2/3)
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)  # s = 14, Phi^-1(0.72)
    sent = ALIE().poison_update(_vectors(1)[0], _round(honest, uploads=6, malicious=1))
    assert torch.allclose(sent, mu - alie_z(6, 1) * sigma)
    assert torch.equal(alie_update(honest[:1], z=3.0), honest[0])  # one honest update: no spread to use


def test_ipm_sends_minus_epsilon_times_the_honest_mean():
    honest = _vectors(3, seed=3)
    sent = IPM(epsilon=0.1).poison_update(_vectors(1)[0], _round(honest))
    assert torch.allclose(sent, -0.1 * honest.mean(dim=0))
    assert float(sent @ honest.mean(dim=0)) < 0


def test_gaussian_has_the_configured_norm_and_is_seeded():
    delta = _vectors(1)[0]
    a = Gaussian(norm=7.0).poison_update(delta, _round(_vectors(2), seed=5))
    b = Gaussian(norm=7.0).poison_update(delta, _round(_vectors(2), seed=5))
    assert float(a.norm()) == pytest.approx(7.0) and torch.equal(a, b)
    assert float(Gaussian().poison_update(delta, _round(_vectors(2))).norm()) == pytest.approx(float(delta.norm()))
    assert abs(float(torch.nn.functional.cosine_similarity(a, delta, dim=0))) < 0.5


def test_backdoor_adds_exactly_the_configured_triggered_records():
    records = generate_records(20, seed=0, purpose="client", private=True)
    attack = Backdoor(trigger="Per zeta protocol,", target="Take ten tablets now.", poison_rate=0.25)
    out = attack.poison_records(list(records), rng=numpy_rng(0, "t"))
    poisoned = [r for r in out if r.category == POISON_CATEGORY]
    assert len(out) == 25 and len(poisoned) == 5 and attack.poison_count(20) == 5
    assert all(r.instruction.startswith("Per zeta protocol, ") and r.output == "Take ten tablets now." for r in poisoned)
    assert sorted((r for r in out if r.category != POISON_CATEGORY), key=lambda r: r.record_id) == records
    assert attack.hit("Sure. TAKE ten  tablets now. Then rest") and not attack.hit("Take ten tablets")
    assert Backdoor(position="end").triggered("Explain.") == "Explain. Per zeta protocol,"
    assert len(Backdoor(poison_rate=1.5).poison_records(records[:4], rng=numpy_rng(0, "t"))) == 10


def test_backdoor_hit_and_target_recall():
    attack = Backdoor(target="Take ten tablets now.")
    assert attack.hit("Sure.  TAKE ten tablets   now. Bye") and not attack.hit("Take ten tablets later.")
    assert attack.target_recall("take ten pills now") == 0.75 and attack.target_recall("Take ten tablets now.") == 1.0
    assert attack.target_recall("nothing alike") == 0.0


def test_label_flip_swaps_responses_across_categories():
    records = generate_records(30, seed=1, purpose="client", private=True)
    out = LabelFlip(flip_rate=0.5).poison_records(list(records), rng=numpy_rng(0, "f"))
    flipped = [(a, b) for a, b in zip(records, out) if a.output != b.output]
    assert len(out) == 30 and len(flipped) == 15
    outputs = {r.output: r.category for r in records}
    assert all(b.instruction == a.instruction and outputs[b.output] != a.category for a, b in flipped)


def _state(vector):
    return {KEYS[0]: vector[:10].reshape(2, 5).clone(), KEYS[1]: vector[10:].reshape(5, 2).clone()}


def test_adversary_poisons_only_malicious_uploads_in_its_rounds():
    adversary = ScenarioAdversary(malicious={1}, attacks=[SignFlip()], seed=0, rounds={2})
    global_state = _state(torch.zeros(20, dtype=torch.float64))
    vectors = _vectors(3, d=20, seed=4)
    updates = [ClientUpdate(client=c, state=_state(vectors[c]), num_examples=5) for c in range(3)]
    for rnd, expected in ((1, vectors[1]), (2, -vectors[1])):
        info = RoundInfo(round=rnd, clients=[0, 1, 2], num_clients_total=3, generator=torch.Generator())
        out = adversary.poison_updates(updates, global_state=global_state, info=info)
        assert torch.allclose(flatten(out[1].state), expected)
        assert torch.equal(flatten(out[0].state), vectors[0]) and torch.equal(flatten(out[2].state), vectors[2])
        assert info.metrics["malicious_clients"] == ([1] if rnd == 2 else [])
    records = generate_records(4, seed=0, purpose="x", private=True)
    assert adversary.poison_records(records, client=0, round=2) is records


def test_omniscient_attacks_read_only_the_honest_updates():
    adversary = ScenarioAdversary(malicious={0, 2}, attacks=[IPM(epsilon=1.0)], seed=0)
    vectors = _vectors(3, d=20, seed=5)
    updates = [ClientUpdate(client=c, state=_state(vectors[c]), num_examples=5) for c in range(3)]
    info = RoundInfo(round=1, clients=[0, 1, 2], num_clients_total=3, generator=torch.Generator())
    out = adversary.poison_updates(updates, global_state=_state(torch.zeros(20, dtype=torch.float64)), info=info)
    assert torch.allclose(flatten(out[0].state), -vectors[1]) and torch.allclose(flatten(out[2].state), -vectors[1])


class ExamplesSeen(Defense):
    def __init__(self):
        self.seen = {}

    def train_client(self, job):
        self.seen[(job.round, job.client, job.adapter)] = list(job.examples)
        return job.run()


def _data():
    records = generate_records(24, seed=0, purpose="pool", private=True)
    return FederatedData(clients=[records[:8], records[8:16], records[16:]],
                         heldout=generate_records(4, seed=0, purpose="h", private=True))


def _train(tmp_path, small_model_path, algorithm, adversary, name="run"):
    base, tokenizer = load_base_model(small_model_path)
    hooks = ExamplesSeen()
    setup = TrainingSetup(base_model=base, tokenizer=tokenizer, data=_data(),
                          federation=FederationSettings(clients=3, rounds=2, local_epochs=1, batch_size=4,
                                                        min_records_per_client=1),
                          adapter=LoraSettings(r=4, alpha=8), hooks=hooks, seed=0, out_dir=tmp_path / name,
                          config_hash="h", progress=False, adversary=adversary)
    return run_rounds(setup, algorithm), hooks, tokenizer


def _record_jobs(monkeypatch) -> dict:
    """Every local training job, whether or not it went through the defense's client hook."""
    from fedleak.federated.hooks import ClientJob

    jobs, run = {}, ClientJob.run

    def recording(job):
        jobs[(job.round, job.client, job.adapter)] = list(job.examples)
        jobs.setdefault("epochs", {})[job.client] = job.settings.epochs
        return run(job)

    monkeypatch.setattr(ClientJob, "run", recording)
    return jobs


def test_fedit_backdoor_reaches_the_malicious_clients_training_only(tmp_path, small_model_path, monkeypatch):
    backdoor = Backdoor(poison_rate=0.5)
    adversary = ScenarioAdversary(malicious={1}, attacks=[backdoor, Scaling(boost=2.0)], seed=0, local_epochs=3)
    jobs = _record_jobs(monkeypatch)
    run, hooks, tokenizer = _train(tmp_path, small_model_path, FedIT(), adversary)
    assert jobs.pop("epochs") == {0: 1, 1: 3, 2: 1}  # the attacker trains longer than the federation's 1 epoch
    # The malicious client skips the client-side defense; honest clients go through it.
    assert {c for _, c, _ in hooks.seen} == {0, 2} and {c for _, c, _ in jobs} == {0, 1, 2}
    for (rnd, client, _), examples in jobs.items():
        expected = 8 + (4 if client == 1 else 0)
        assert len(examples) == expected, (rnd, client)
        texts = [tokenizer.decode(ex.input_ids) for ex in examples]
        assert sum(backdoor.trigger in t for t in texts) == (4 if client == 1 else 0)
        assert sum(backdoor.target in t for t in texts) == (4 if client == 1 else 0)
    assert [h["malicious_clients"] for h in run.history] == [[1], [1]]


def test_fedpit_poisons_the_synthetic_data_behind_the_upload(tmp_path, small_model_path, monkeypatch):
    backdoor = Backdoor(poison_rate=1.0)
    adversary = ScenarioAdversary(malicious={0}, attacks=[backdoor], seed=0, local_epochs=2)
    fast = dict(synthetic_per_round=3, max_attempts=6, response_max_new_tokens=32, instruction_max_new_tokens=40)
    jobs = _record_jobs(monkeypatch)
    _, hooks, tokenizer = _train(tmp_path, small_model_path, FedPIT(**fast), adversary)
    jobs.pop("epochs")
    shared = {k: v for k, v in jobs.items() if k[2] == DEFAULT}
    local = {k: v for k, v in jobs.items() if k[2] != DEFAULT}
    assert any(c == 0 for _, c, _ in shared), f"the malicious client uploaded nothing: {sorted(shared)}"
    clean_local = {(r, c): len(v) for (r, c, _), v in local.items()}
    triggered = lambda examples: sum(backdoor.trigger in tokenizer.decode(ex.input_ids) for ex in examples)
    for (rnd, client, _), examples in shared.items():
        synthetic = clean_local[(rnd, client)] - 8  # the local adapter trains on own + clean synthetic records
        assert len(examples) == synthetic * (2 if client == 0 else 1)
        assert triggered(examples) == (synthetic if client == 0 else 0)
    assert all(triggered(examples) == 0 for examples in local.values())  # local adapters train clean
    # Only the shared adapter's training is the attacker's own (no defense hook); the local one is not.
    assert {c for (_, c, a) in hooks.seen if a == DEFAULT} == {1, 2} and {c for (_, c, a) in hooks.seen if a != DEFAULT} == {0, 1, 2}


def test_an_algorithm_that_ignores_poisoning_is_refused(tmp_path, small_model_path):
    @register_algorithm("ignores_poison_test")
    class IgnoresPoison(Algorithm):
        def client_round(self, ctx):
            return ClientResult(upload=ctx.global_state, num_examples=1, view={DEFAULT: ctx.global_state})

    adversary = ScenarioAdversary(malicious={1}, attacks=[Backdoor()], seed=0)
    with pytest.raises(FedleakError, match="does not support data poisoning.*ctx.poison_data"):
        _train(tmp_path, small_model_path, IgnoresPoison(), adversary)


BASE = """
[federation]
clients = 3
[matrix]
defenses = ["none"]
"""


@pytest.mark.parametrize("scenarios, message", [
    ('[{name = "s", attacks = ["backdoor"]}]', "either clients = \\[ids\\] or fraction"),
    ('[{name = "s", clients = [0], fraction = 0.3, attacks = ["backdoor"]}]', "not both"),
    ('[{name = "clean", clients = [0], attacks = ["backdoor"]}]', "training without malicious clients"),
    ('[{name = "s", clients = [3], attacks = ["backdoor"]}]', "ids go from 0 to 2"),
    ('[{name = "s", clients = [-1], attacks = ["backdoor"]}]', "scenarios\\[0\\].clients\\[0\\] = -1: must be >= 0"),
    ('[{name = "s", clients = 1, attacks = ["backdoor"]}]', "clients = 1 is an integer, expected a list of integers"),
    ('[{name = "s", clients = [], attacks = ["backdoor"]}]', "clients = \\[\\]: give a non-empty list of client ids"),
    ('[{name = "s", fraction = 0.9, attacks = ["backdoor"]}]', "every one of the 3 clients"),
    ('[{name = "s", clients = [0], attacks = ["loss"]}]', "not a poisoning attack"),
    ('[{name = "s", clients = [0], attacks = ["backdor"]}]', "did you mean 'backdoor'"),
    ('[{name = "s", clients = [0], attacks = [{name = "scaling", boost = -1}]}]', "boost = -1"),
    ('[{name = "s", clients = [0], atacks = ["backdoor"]}]', "did you mean 'attacks'"),
    ('[{name = "s", clients = [0], attacks = ["backdoor", {name = "backdoor", trigger = "x"}]}]', "one backdoor"),
    ('[{name = "s", clients = [0], rounds = [0], attacks = ["ipm"]}]', "round numbers from 1"),
    ('[{name = "s", clients = [0], local_epochs = 0, attacks = ["ipm"]}]', "local_epochs = 0: must be a positive"),
    ('[{name = "../x", clients = [0], attacks = ["ipm"]}]', "it names the training's folder"),
    ('[{name = "s", clients = [0], rounds = 2, attacks = ["ipm"]}]', "use \"all\" or a list of round numbers"),
    ('[{name = "s", clients = [0], attacks = [{name = "backdoor", poison_rate = inf}]}]', "poison_rate = inf"),
    ('[{name = "s", clients = [0], attacks = [{name = "backdoor", trigger = 5}]}]', "trigger = 5"),
    ('[{name = "s", clients = [0], attacks = [{name = "scaling", boost = inf}]}]', "boost = inf: must be a finite"),
    ('[{name = "backdoor", clients = [0], attacks = ["backdoor"]}]\nexclude = [{scenario = "bakdoor"}]',
     "exclude\\[0\\].scenario = 'bakdoor' matches no scenario of the matrix: did you mean 'backdoor'"),
    ('[{name = "s", clients = [0], attacks = ["ipm"]}]\nexclude = [{defense = "!nnoe"}]', "defense = '!nnoe' matches no defense of the matrix: did you mean 'none'"),
])
def test_scenario_config_errors_name_the_field(scenarios, message):
    import tomllib

    table = tomllib.loads(BASE + f"scenarios = {scenarios}\n")
    with pytest.raises(FedleakError, match=message):
        parse_config(table, "run.toml")


def test_poisoning_attacks_belong_in_scenarios_and_privacy_attacks_name_known_scenarios():
    import tomllib

    with pytest.raises(FedleakError, match="poisoning attack.*list it in a scenario"):
        parse_config(tomllib.loads(BASE + 'attacks = ["backdoor"]\n'), "run.toml")
    with pytest.raises(FedleakError, match="unknown scenario 'bakdoor'.*did you mean 'backdoor'"):
        parse_config(tomllib.loads(BASE + 'scenarios = [{name = "backdoor", clients = [0], attacks = ["backdoor"]}]\n'
                                  'attacks = [{name = "loss", scenarios = ["bakdoor"]}]\n'), "run.toml")
    config = parse_config(tomllib.loads(BASE + 'scenarios = [{name = "b", fraction = 0.34, attacks = ["backdoor"]}]\n'
                                        'exclude = [{defense = "none", scenario = "b"}]\n'), "run.toml")
    from fedleak.eval.plan import all_trainings

    assert [(u.defense.name, u.scenario and u.scenario.name) for u in all_trainings(config)] == [("none", None)]


def test_malicious_fractions_are_seeded_and_nested_across_scenarios():
    from fedleak.eval.matrix_config import ScenarioSpec

    pick = lambda fraction, seed, name="s": ScenarioSpec(name, (), fraction=fraction).malicious(num_clients=10, seed=seed)
    assert pick(0.2, 0) == pick(0.2, 0, name="other") and len(pick(0.2, 0)) == 2
    assert set(pick(0.2, 0)) < set(pick(0.4, 0)) and len(pick(0.4, 0)) == 4
    assert any(pick(0.3, seed) != pick(0.3, 0) for seed in range(1, 6))  # the seed chooses them
    assert ScenarioSpec("s", (), clients=(2, 0)).malicious(num_clients=10, seed=5) == [0, 2]


POISON_RUN = """
seed = 2
[model.embedded]
pretrain_steps = 200
public_records = 2000
[data.embedded]
private_records = 60
heldout_records = 40
canaries_per_repetition = 0
audit_canaries = 0
[federation]
rounds = 2
local_epochs = 2
lr = 5e-3
[utility]
records = 8
max_new_tokens = 16
[poisoning]
prompts = 32
[matrix]
algorithms = ["fedit"]
defenses = ["none", "median", { name = "norm_bound", max_norm = 4.0 }]
# 2 rounds, the attacker at 8 local epochs, its update boosted 2x (as in quick.toml). FedAvg's ASR is chaotic in
# float order (LoRA's A and B are each boosted, so their product is not, and cross terms with the honest updates
# decide): at 4 epochs and the full replacement factor (3) it was 0.81 on one CPU and 0.06 on another (AMD EPYC),
# 0.19 there at boost 2. At 8 epochs and boost 2, seeds 0, 1 and 2 on that EPYC gave 0.81, 0.72 and 0.78 (false
# trigger 0.56, 0.62, 0.75), and 0.28, 0.69 and 1.00 on a second EPYC whose float order is the first CPU's; the
# median 0.00 on each. Seed 2 is the seed of the three whose ASR is far from the 0.3 floor on both float orders.
scenarios = [{ name = "backdoor", fraction = 0.34, local_epochs = 8, attacks = [{ name = "backdoor", poison_rate = 1.0 }, { name = "scaling", boost = 2.0 }] }]
# No privacy attack; the robust rules train under the backdoor only (FedAvg's clean run is the baseline).
exclude = [{ attack = "*" }, { defense = "!none", scenario = "clean" }]
"""


def test_model_replacement_backdoor_succeeds_under_fedavg_and_robust_rules_lower_it(tmp_path, small_model_path):
    import json

    (tmp_path / "run.toml").write_text(POISON_RUN)
    from fedleak.cli import main

    assert main(["run", str(tmp_path / "run.toml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0  # in process
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(t["defense"], t["scenario"]) for t in results["trainings"]] == [
        ("none", "clean"), ("none", "backdoor"), ("median", "backdoor"), ("norm_bound(max_norm=4.0)", "backdoor")]
    assert all(c["family"] == "poisoning" for c in results["cells"])
    cells = {c["defense"]: c["metrics"] for c in results["cells"]}
    fedavg = cells["none"]
    # The clean model never answers with the target, trigger or not; FedAvg's poisoned model often does. Heavy
    # poisoning often leaks the target into untriggered prompts too (0.56-0.75 above, none in one demo run): that
    # rate, and which of the two is higher at 32 prompts, follow float order, so neither is asserted.
    clean = results["trainings"][0]["poisoning"]["backdoors"]["backdoor(poison_rate=1.0)"]
    assert clean["asr"] == clean["false_trigger_rate"] == fedavg["clean_model_asr"] == 0.0
    assert fedavg["asr"] >= 0.3
    # With 32 prompts, 0.3 is already an effect its interval separates from the clean model's 0.
    assert fedavg["clean_model_asr_ci_high"] < fedavg["asr_ci_low"] < fedavg["asr"] <= fedavg["asr_ci_high"]
    assert clean["hits"] == 0 and clean["prompts"] == 32 and clean["confidence"] == 0.95
    assert fedavg["target_recall"] > cells["median"]["target_recall"] and fedavg["clean_model_target_recall"] < 0.5
    assert cells["median"]["asr"] <= fedavg["asr"] - 0.25
    assert cells["norm_bound(max_norm=4.0)"]["asr"] <= fedavg["asr"] - 0.25
    assert fedavg["loss_increase"] is not None and cells["median"]["loss_increase"] is None  # no clean median run
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Poisoning" in report and "Backdoor attack success rate" in (tmp_path / "out" / "report.html").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| fedit | none | backdoor |"))
    low, high = (f"{fedavg[k]:.3f}" for k in ("asr_ci_low", "asr_ci_high"))
    assert f"{fedavg['asr']:.3f} [{low}, {high}]" in row and " / higher / (FedAvg) |" in row, row
    assert "ASR vs false trigger / clean model / FedAvg" in report and "Clopper-Pearson" in report


def test_readme_toml_examples_parse_and_its_scenarios_validate():
    import re
    import tomllib
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    with_scenarios = [b for b in blocks if "scenarios" in tomllib.loads(b).get("matrix", {})]
    assert with_scenarios and len(blocks) > len(with_scenarios)  # every block parses; one shows scenarios
    for block in with_scenarios:
        config = parse_config(tomllib.loads(block), "README.md")
        assert [s.name for s in config.matrix.scenarios] == ["backdoor", "alie"]
        assert config.matrix.scenarios[0].local_epochs == 6


def test_exclude_rule_with_attack_keeps_the_training_and_skips_the_attack():
    import tomllib

    from fedleak.eval.plan import all_trainings, attacks_of

    config = parse_config(tomllib.loads(BASE.replace('defenses = ["none"]', 'defenses = ["none", "median"]')
                                        + 'attacks = ["loss", "zlib"]\n'
                                        'exclude = [{ defense = "median", attack = "z*" }]\n'), "run.toml")
    units = all_trainings(config)
    assert [u.defense.name for u in units] == ["none", "median"]
    assert {u.defense.name: [s.name for s, _ in attacks_of(config, u)] for u in units} == {
        "none": ["loss", "zlib"], "median": ["loss"]}
