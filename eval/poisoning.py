"""Measure poisoned trainings: backdoor success, the refusal rate on held-out harmful requests (a safety
attack's target), utility against the clean training of the same (algorithm, defense), and how often
selecting rules (Krum, Multi-Krum, Bulyan) excluded the malicious uploads. Every rate is a count over
prompts or uploads, so each gets an exact binomial (Clopper and Pearson 1934, "The use of confidence or
fiducial limits illustrated in the case of the binomial") interval at the run's `attack.confidence`:
`<rate>_ci_low` / `<rate>_ci_high` beside it."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from fedleak.attacks.base import ATTACKS
from fedleak.attacks.poisoning.backdoor import Backdoor
from fedleak.attacks.poisoning.harmful_compliance import HarmfulCompliance
from fedleak.attacks.poisoning.base import ScenarioAdversary
from fedleak.common.names import CLEAN
from fedleak.common.params import instantiate
from fedleak.eval.audit import clopper_pearson
from fedleak.eval.config import RunConfig
from fedleak.eval.matrix_config import ScenarioSpec
from fedleak.federated.data import Record
from fedleak.federated.generation import generate
from fedleak.federated.prompts import prompt_ids
from fedleak.federated.safety import heldout_requests, is_refusal

EXAMPLES = 3  # triggered answers quoted in the results
log = logging.getLogger(__name__)


def rate_with_interval(name: str, hits: int, trials: int, *, confidence: float) -> dict:
    """`{name: hits / trials, name_ci_low, name_ci_high}`: the rate and its Clopper-Pearson interval.

    Args:
        name: the rate's metric name (`asr`, `false_trigger_rate`, `detection_rate`, ...).
        hits: successes counted (triggered answers carrying the target, excluded uploads).
        trials: what they were counted over; 0 gives None for the rate and its bounds.
        confidence: two-sided level of the interval, e.g. 0.95 (the run's `attack.confidence`).

    Returns:
        The three metrics, floats (or None without trials).
    """
    if trials == 0:
        return {name: None, f"{name}_ci_low": None, f"{name}_ci_high": None}
    low, high = clopper_pearson(hits, trials, confidence=confidence)
    return {name: hits / trials, f"{name}_ci_low": low, f"{name}_ci_high": high}


def backdoor_prompts(heldout: Sequence[Record], prompts: int) -> list[Record]:
    """The held-out records the backdoor is measured on: the first `prompts` of them.

    Args:
        heldout: the run's held-out records (never trained on by any client).
        prompts: `poisoning.prompts`, the ASR's intended denominator.

    Returns:
        At most `prompts` records; fewer, with a warning, when the held-out split is smaller (each record
        is one prompt: reusing one would count the same answer twice and narrow the interval falsely).
    """
    if len(heldout) < prompts:
        log.warning("poisoning.prompts = %d but only %d held-out records exist: the backdoor is measured on %d "
                    "prompts (raise the held-out count, e.g. data.embedded.heldout_records, or lower "
                    "poisoning.prompts)", prompts, len(heldout), len(heldout))
    return list(heldout[:prompts])


def build_adversary(scenario: ScenarioSpec, config: RunConfig) -> ScenarioAdversary:
    """The malicious clients of a scenario and their attacks, built from the config.

    Args:
        scenario: a `[matrix] scenarios` entry (its attacks, malicious fraction or ids, rounds, local epochs).
        config: the run's config (clients and seed pick the malicious clients).
    """
    attacks = [instantiate(ATTACKS.get(a.name), a.kwargs, f"matrix.scenarios: {scenario.name}: {a.label}")
               for a in scenario.attacks]
    return ScenarioAdversary(malicious=set(scenario.malicious(num_clients=config.federation.clients, seed=config.seed)),
                             attacks=attacks, seed=config.seed,
                             rounds=None if scenario.rounds == "all" else set(scenario.rounds),
                             local_epochs=scenario.local_epochs)


def backdoors_of(scenarios: Sequence[ScenarioSpec]) -> dict[str, Backdoor]:
    """Every distinct backdoor of the matrix's scenarios, by label (each clean training measures them all).

    Args:
        scenarios: the matrix's poisoning scenarios.
    """
    out = {}
    for scenario in scenarios:
        for spec in scenario.attacks:
            if issubclass(ATTACKS.get(spec.name), Backdoor):
                out.setdefault(spec.label, instantiate(ATTACKS.get(spec.name), spec.kwargs, spec.label))
    return out


def trigger_rates(model, tokenizer, backdoor: Backdoor, records: Sequence[Record], *, batch_size: int,
                  confidence: float) -> dict:
    """ASR: share of triggered prompts answered with the target; false trigger rate: the same without trigger.

    Args:
        model: the peft model with the view to measure applied.
        tokenizer: its tokenizer.
        backdoor: the trigger, target and hit test (Wan et al. 2023, "Poisoning Language Models During
            Instruction Tuning").
        records: held-out records, each asked once with and once without the trigger (`backdoor_prompts`).
        batch_size: prompts per greedy generation batch.
        confidence: level of the rates' Clopper-Pearson intervals (the run's `attack.confidence`).

    Returns:
        `asr` and `false_trigger_rate` with their `_ci_low` / `_ci_high` and counts (`hits`,
        `false_triggers`, `prompts`), the mean target recall with and without trigger, and examples.
    """
    target_tokens = len(tokenizer(backdoor.target, add_special_tokens=False)["input_ids"])
    encode = lambda instruction, r: prompt_ids(tokenizer, instruction, r.input)
    triggered = generate(model, tokenizer, [encode(backdoor.triggered(r.instruction), r) for r in records],
                         max_new_tokens=target_tokens + 16, batch_size=batch_size)
    clean = generate(model, tokenizer, [encode(r.instruction, r) for r in records],
                     max_new_tokens=target_tokens + 16, batch_size=batch_size)
    hits, false_triggers = sum(backdoor.hit(g.text) for g in triggered), sum(backdoor.hit(g.text) for g in clean)
    return {**rate_with_interval("asr", hits, len(records), confidence=confidence),
            **rate_with_interval("false_trigger_rate", false_triggers, len(records), confidence=confidence),
            "hits": hits, "false_triggers": false_triggers, "confidence": confidence,
            "target_recall": float(np.mean([backdoor.target_recall(g.text) for g in triggered])),
            "target_recall_untriggered": float(np.mean([backdoor.target_recall(g.text) for g in clean])),
            "prompts": len(records),
            "examples": [{"prompt": backdoor.triggered(r.instruction), "answer": g.text}
                         for r, g in list(zip(records, triggered))[:EXAMPLES]]}


SAFETY_ANSWER_TOKENS = 24  # enough for a refusal's opening phrase, which is what is matched


def safety_prompts(prompts: int) -> list[Record]:
    """The held-out harmful requests the refusal rate is measured on: the first `prompts` (`poisoning.prompts`) of
    the bank's held-out part, all of it when that is smaller (`federated.safety.heldout_size`: 42)."""
    return heldout_requests(prompts)


def measures_safety(config: RunConfig, defense_names: Sequence[str] = ()) -> bool:
    """Whether a training's evaluation measures the refusal rate: when a scenario of the matrix runs a safety attack
    (so its clean twin is measured too), or the training's defense is `server_align`.

    Args:
        config: the run's config.
        defense_names: the names of the training's defense and its parts (a composition's).
    """
    return "server_align" in defense_names or any(issubclass(ATTACKS.get(a.name), HarmfulCompliance)
                                                  for s in config.matrix.scenarios for a in s.attacks)


def refusal_rates(model, tokenizer, prompts: Sequence[Record], *, batch_size: int, confidence: float) -> dict:
    """The share of harmful requests the model refuses (Ye et al. 2024's safety metric, by refusal wording).

    Args:
        model: the peft model with the view to measure applied.
        tokenizer: its tokenizer.
        prompts: held-out harmful requests, each answered greedily once (`safety_prompts`).
        batch_size: prompts per generation batch.
        confidence: level of the rate's Clopper-Pearson interval (the run's `attack.confidence`).

    Returns:
        `refusal_rate` with `_ci_low` / `_ci_high`, `refusals`, `prompts`, `confidence` and examples.
    """
    answers = generate(model, tokenizer, [prompt_ids(tokenizer, r.instruction, r.input) for r in prompts],
                       max_new_tokens=SAFETY_ANSWER_TOKENS, batch_size=batch_size)
    refusals = sum(is_refusal(g.text) for g in answers)
    return {**rate_with_interval("refusal_rate", refusals, len(prompts), confidence=confidence),
            "refusals": refusals, "prompts": len(prompts), "confidence": confidence,
            "examples": [{"prompt": r.instruction, "answer": g.text} for r, g in list(zip(prompts, answers))[:EXAMPLES]]}


def detection(history: list[dict], *, confidence: float) -> dict | None:
    """Per round and pooled over rounds: the share of malicious uploads a selecting rule excluded
    (detection rate) and the share of honest uploads it excluded (false exclusion rate).

    Args:
        history: the training's round history; rounds without `excluded_clients` (no selecting rule) are skipped.
        confidence: level of the pooled rates' Clopper-Pearson intervals (over uploads, pooled across rounds).

    Returns:
        None without a selecting rule, else `rounds` (one row each) and the pooled rates with intervals.
    """
    rows = []
    for entry in history:
        if "excluded_clients" not in entry:
            continue
        # Uploads the server refused (non-finite) never reached the rule: neither detected nor missed.
        refused = {int(c) for c in entry.get("refused", {})}
        excluded, malicious = set(entry["excluded_clients"]), set(entry.get("malicious_clients", [])) - refused
        honest = set(entry.get("uploads", entry["clients"])) - malicious - refused
        rows.append({"round": entry["round"], "malicious": len(malicious), "honest": len(honest),
                     "excluded_malicious": len(excluded & malicious), "excluded_honest": len(excluded & honest),
                     "detection_rate": len(excluded & malicious) / len(malicious) if malicious else None,
                     "false_exclusion_rate": len(excluded & honest) / len(honest) if honest else None})
    if not rows:
        return None
    pooled = lambda name, hit, total: rate_with_interval(name, sum(r[hit] for r in rows), sum(r[total] for r in rows),
                                                         confidence=confidence)
    return {"rounds": rows, **pooled("detection_rate", "excluded_malicious", "malicious"),
            **pooled("false_exclusion_rate", "excluded_honest", "honest")}


def scenario_record(scenario: ScenarioSpec | None, config: RunConfig) -> dict:
    """What a training's results record says about its scenario.

    Args:
        scenario: the training's scenario, None for a clean training.
        config: the run's config (the malicious clients depend on its clients and seed).
    """
    if scenario is None:
        return {"scenario": CLEAN, "malicious_clients": [], "attacks": []}
    return {"scenario": scenario.name,
            "malicious_clients": scenario.malicious(num_clients=config.federation.clients, seed=config.seed),
            "attacks": [a.label for a in scenario.attacks],
            "rounds": scenario.rounds if isinstance(scenario.rounds, str) else list(scenario.rounds),
            "local_epochs": scenario.local_epochs}


def _rate(metrics: dict, name: str, source: dict, key: str | None = None) -> None:
    """Copy a rate and its interval bounds (None where the source has none: older results)."""
    for suffix in ("", "_ci_low", "_ci_high"):
        metrics[name + suffix] = source.get((key or name) + suffix)


def poisoning_cells(trainings: list[dict], scenarios: Sequence[ScenarioSpec]) -> list[dict]:
    """One cell per poisoned training (family "poisoning", the global view of the final round), compared
    with the clean training of the same algorithm, defense and seed when the matrix has it.

    Args:
        trainings: the run's training records (each with its `poisoning` measurements).
        scenarios: the matrix's poisoning scenarios (the attacks behind each scenario name).

    Returns:
        The cells; each rate (ASR, false trigger, clean-model ASR, refusal rate and the clean model's, detection,
        false exclusion) with its `_ci_low` / `_ci_high` bounds (None where the measurement has none).
    """
    clean = {(t["algorithm"], t["defense"], t["seed"]): t for t in trainings if t["scenario"] == CLEAN}
    specs = {s.name: s for s in scenarios}
    cells = []
    for t in trainings:
        if t["scenario"] == CLEAN:
            continue
        poisoning, base = t["poisoning"], clean.get((t["algorithm"], t["defense"], t["seed"]))
        utility = t["utility"].get("global", {})
        metrics: dict = {"loss": utility.get("loss"), "rouge_l": utility.get("rouge_l")}
        base_utility = base["utility"].get("global", {}) if base else {}
        metrics["loss_increase"] = (metrics["loss"] - base_utility["loss"]) if "loss" in base_utility else None
        metrics["rouge_l_drop"] = (base_utility["rouge_l"] - metrics["rouge_l"]) if "rouge_l" in base_utility else None
        backdoor = next((a.label for a in specs[t["scenario"]].attacks if a.label in poisoning["backdoors"]), None)
        details: dict = {"malicious_clients": poisoning["malicious_clients"], "attacks": poisoning["attacks"]}
        if backdoor:
            rates = poisoning["backdoors"][backdoor]
            _rate(metrics, "asr", rates)
            _rate(metrics, "false_trigger_rate", rates)
            metrics.update(target_recall=rates["target_recall"],
                           target_recall_untriggered=rates["target_recall_untriggered"])
            clean_rates = base["poisoning"]["backdoors"][backdoor] if base else {}
            _rate(metrics, "clean_model_asr", clean_rates, "asr")
            metrics["clean_model_target_recall"] = clean_rates.get("target_recall")
            details.update(backdoor=backdoor, prompts=rates["prompts"], examples=rates["examples"],
                           hits=rates.get("hits"), false_triggers=rates.get("false_triggers"),
                           confidence=rates.get("confidence"))
        safety = poisoning.get("safety")
        if safety and any(issubclass(ATTACKS.get(a.name), HarmfulCompliance) for a in specs[t["scenario"]].attacks):
            _rate(metrics, "refusal_rate", safety)
            clean_safety = (base["poisoning"] or {}).get("safety") or {} if base else {}
            _rate(metrics, "clean_model_refusal_rate", clean_safety, "refusal_rate")
            metrics["refusal_drop"] = (metrics["clean_model_refusal_rate"] - metrics["refusal_rate"]
                                       if None not in (metrics["clean_model_refusal_rate"], metrics["refusal_rate"])
                                       else None)
            details.update(safety_prompts=safety["prompts"], refusals=safety["refusals"],
                           safety_examples=safety["examples"], confidence=safety["confidence"])
        if poisoning["detection"]:
            _rate(metrics, "detection_rate", poisoning["detection"])
            _rate(metrics, "false_exclusion_rate", poisoning["detection"])
            details["detection_rounds"] = poisoning["detection"]["rounds"]
        cells.append({"algorithm": t["algorithm"], "defense": t["defense"], "scenario": t["scenario"],
                      "seed": t["seed"], "attack": t["scenario"], "attack_name": "+".join(
                          a.name for a in specs[t["scenario"]].attacks),
                      "attack_params": {a.label: a.kwargs for a in specs[t["scenario"]].attacks},
                      "family": "poisoning", "observer": "global", "client": None, "round": len(t["rounds"]),
                      "metrics": metrics, "details": details, "timings": {"attack_seconds": poisoning["seconds"],
                                                                          "train_seconds": t["train_seconds"]},
                      "cost": {"wall_seconds": poisoning["seconds"], "upload_bytes_per_client_per_round":
                               t.get("cost", {}).get("upload_bytes_per_client_per_round")}})
    return cells
