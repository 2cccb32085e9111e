"""Measure poisoned trainings: backdoor success, utility against the clean training of the same
(algorithm, defense), and how often selecting rules (Krum, Multi-Krum, Bulyan) excluded the
malicious uploads."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedleak.attacks.base import ATTACKS
from fedleak.attacks.poisoning.backdoor import Backdoor
from fedleak.attacks.poisoning.base import ScenarioAdversary
from fedleak.common.names import CLEAN
from fedleak.common.params import instantiate
from fedleak.eval.config import RunConfig
from fedleak.eval.matrix_config import ScenarioSpec
from fedleak.federated.data import Record
from fedleak.federated.generation import generate
from fedleak.federated.prompts import format_prompt

EXAMPLES = 3  # triggered answers quoted in the results


def build_adversary(scenario: ScenarioSpec, config: RunConfig) -> ScenarioAdversary:
    attacks = [instantiate(ATTACKS.get(a.name), a.kwargs, f"matrix.scenarios: {scenario.name}: {a.label}")
               for a in scenario.attacks]
    return ScenarioAdversary(malicious=set(scenario.malicious(num_clients=config.federation.clients, seed=config.seed)),
                             attacks=attacks, seed=config.seed,
                             rounds=None if scenario.rounds == "all" else set(scenario.rounds),
                             local_epochs=scenario.local_epochs)


def backdoors_of(scenarios: Sequence[ScenarioSpec]) -> dict[str, Backdoor]:
    """Every distinct backdoor of the matrix's scenarios, by label (each clean training measures them all)."""
    out = {}
    for scenario in scenarios:
        for spec in scenario.attacks:
            if issubclass(ATTACKS.get(spec.name), Backdoor):
                out.setdefault(spec.label, instantiate(ATTACKS.get(spec.name), spec.kwargs, spec.label))
    return out


def trigger_rates(model, tokenizer, backdoor: Backdoor, records: Sequence[Record], *, batch_size: int) -> dict:
    """ASR: share of triggered prompts answered with the target; false trigger rate: the same without trigger."""
    target_tokens = len(tokenizer(backdoor.target, add_special_tokens=False)["input_ids"])
    encode = lambda instruction, r: tokenizer(format_prompt(instruction, r.input), add_special_tokens=False)["input_ids"]
    triggered = generate(model, tokenizer, [encode(backdoor.triggered(r.instruction), r) for r in records],
                         max_new_tokens=target_tokens + 16, batch_size=batch_size)
    clean = generate(model, tokenizer, [encode(r.instruction, r) for r in records],
                     max_new_tokens=target_tokens + 16, batch_size=batch_size)
    return {"asr": float(np.mean([backdoor.hit(g.text) for g in triggered])),
            "false_trigger_rate": float(np.mean([backdoor.hit(g.text) for g in clean])),
            "target_recall": float(np.mean([backdoor.target_recall(g.text) for g in triggered])),
            "target_recall_untriggered": float(np.mean([backdoor.target_recall(g.text) for g in clean])),
            "prompts": len(records),
            "examples": [{"prompt": backdoor.triggered(r.instruction), "answer": g.text}
                         for r, g in list(zip(records, triggered))[:EXAMPLES]]}


def detection(history: list[dict]) -> dict | None:
    """Per round and pooled over rounds: the share of malicious uploads a selecting rule excluded
    (detection rate) and the share of honest uploads it excluded (false exclusion rate)."""
    rows = []
    for entry in history:
        if "excluded_clients" not in entry:
            continue
        excluded, malicious = set(entry["excluded_clients"]), set(entry.get("malicious_clients", []))
        honest = set(entry.get("uploads", entry["clients"])) - malicious
        rows.append({"round": entry["round"], "malicious": len(malicious), "honest": len(honest),
                     "excluded_malicious": len(excluded & malicious), "excluded_honest": len(excluded & honest),
                     "detection_rate": len(excluded & malicious) / len(malicious) if malicious else None,
                     "false_exclusion_rate": len(excluded & honest) / len(honest) if honest else None})
    if not rows:
        return None
    pooled = lambda hit, total: (sum(r[hit] for r in rows) / sum(r[total] for r in rows)
                                 if sum(r[total] for r in rows) else None)
    return {"rounds": rows, "detection_rate": pooled("excluded_malicious", "malicious"),
            "false_exclusion_rate": pooled("excluded_honest", "honest")}


def scenario_record(scenario: ScenarioSpec | None, config: RunConfig) -> dict:
    if scenario is None:
        return {"scenario": CLEAN, "malicious_clients": [], "attacks": []}
    return {"scenario": scenario.name,
            "malicious_clients": scenario.malicious(num_clients=config.federation.clients, seed=config.seed),
            "attacks": [a.label for a in scenario.attacks],
            "rounds": scenario.rounds if isinstance(scenario.rounds, str) else list(scenario.rounds),
            "local_epochs": scenario.local_epochs}


def poisoning_cells(trainings: list[dict], scenarios: Sequence[ScenarioSpec]) -> list[dict]:
    """One cell per poisoned training (family "poisoning", the global view of the final round), compared
    with the clean training of the same algorithm, defense and seed when the matrix has it."""
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
            metrics.update(asr=rates["asr"], false_trigger_rate=rates["false_trigger_rate"],
                           target_recall=rates["target_recall"],
                           target_recall_untriggered=rates["target_recall_untriggered"])
            clean_rates = base["poisoning"]["backdoors"][backdoor] if base else {}
            metrics["clean_model_asr"] = clean_rates.get("asr")
            metrics["clean_model_target_recall"] = clean_rates.get("target_recall")
            details.update(backdoor=backdoor, prompts=rates["prompts"], examples=rates["examples"])
        if poisoning["detection"]:
            metrics["detection_rate"] = poisoning["detection"]["detection_rate"]
            metrics["false_exclusion_rate"] = poisoning["detection"]["false_exclusion_rate"]
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
