"""Provenance and cost: what produced the results (versions, commit, seeds, config, machine, wall time,
model and data) and what the run cost per training (time, upload bytes) and per attack."""

from __future__ import annotations

import datetime as dt
import json

from fedleak.common.names import CLEAN
from fedleak.reports.document import Section, Table, fmt, is_number
from fedleak.reports.merge import Merged, train_seconds


def _duration(started: str | None, finished: str | None) -> str:
    try:
        seconds = (dt.datetime.fromisoformat(finished) - dt.datetime.fromisoformat(started)).total_seconds()
    except (TypeError, ValueError):
        return "n/a"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _machine(machine: dict | None) -> str:
    if not machine:
        return "n/a"
    get = lambda name: fmt(machine.get(name))
    return (f"{get('platform')} ({get('machine')}), python {get('python')}, {get('cpu_count')} CPUs, "
            f"{get('torch_threads')} torch threads, {get('jobs')} parallel jobs")


def provenance_table(run: Merged) -> Table:
    """What produced the results: versions, commit, seeds, config, machine, times, model, data."""
    results = run.results
    model = results.get("model", {})
    rows = [["fedleak", fmt(results.get("fedleak_version"))], ["git commit", fmt(results.get("git_commit"))],
            ["seeds", ", ".join(map(str, run.seeds)) or "n/a"], ["config", fmt(results.get("config_path"))],
            ["machine", _machine(results.get("machine"))],
            ["started", fmt(results.get("started_at"))], ["finished", fmt(results.get("finished_at"))],
            ["run wall time", _duration(results.get("started_at"), results.get("finished_at"))],
            ["subset (--only)", ", ".join(results.get("only") or []) or "none: the whole matrix"],
            *([["checkpoints attacked", results["checkpoint_dir"]]] if results.get("checkpoint_dir") else []),
            ["model", f"{model.get('name')} ({model.get('parameters', '?')} parameters)"],
            ["adaptation", adaptation_text((results.get("config") or {}).get("model") or {})],
            *data_rows(results.get("data") or {})]
    rows += [[name, fmt(version)] for name, version in results.get("versions", {}).items()]
    return Table(["what", "value"], rows)


def adaptation_text(model: dict) -> str:
    """The trained method and its settings, e.g. "model.adaptation = lora (r = 16, alpha = 32, ...)"."""
    method = model.get("adaptation", "lora")  # results from before model.adaptation existed trained LoRA
    settings = ", ".join(f"{k} = {json.dumps(v)}" for k, v in (model.get(method) or {}).items())
    return f"model.adaptation = {method}" + (f" ({settings})" if settings else "")


def data_rows(data: dict) -> list[list[str]]:
    """What the run trained on: the data file (path as given, sha256, records, field mapping), the split
    used and why, duplicates dropped, truncation at max_length and the declared identifiers; results from
    before these were recorded show their sizes alone."""
    sizes = {k: data[k] for k in ("client_sizes", "heldout", "canaries", "reference_canaries", "audit_canaries",
                                  "audit_canaries_inserted") if k in data}
    file = data.get("file")
    if file:
        fields = ", ".join(f"{role} = {name!r}" for role, name in file.get("fields", {}).items() if name)
        source = (f"{file.get('path')} (sha256 {file.get('sha256')}, {fmt(file.get('records'))} records; fields: "
                  f"{fields}; {fmt(file.get('records_with_category'))} records name a category)")
    else:
        source = {"embedded": "data.embedded (synthetic clinical records)"}.get(data.get("source"), "n/a")
    rows = [["data", source], ["data sizes", json.dumps(sizes)]]
    split = data.get("split")
    if split:
        text = split["method"] + (f" (alpha {fmt(split['alpha'])})" if "alpha" in split else "")
        if split.get("method") != split.get("requested"):
            text += f", not the requested {split.get('requested')}: {split.get('reason')}"
        rows.append(["data split", f"{text}; {fmt(split.get('categories'))} categories"])
    if "duplicates_dropped" in data:
        rows.append(["duplicates dropped", f"{data['duplicates_dropped']} exact duplicate records (same instruction, "
                                           f"input and output), before the held-out split"])
    cut = data.get("truncation")
    if cut:
        kept = cut.get("answer_tokens_kept")
        rows.append(["truncation", f"{cut['answer_cut']} of {cut['records']} records have their answer cut at "
                                   f"max_length {cut['max_length']} tokens"
                                   + (f" ({kept:.0%} of answer tokens kept)" if is_number(kept) else "")
                                   + f"; {cut['prompt_fills']} prompts fill it"])
    if file and (file.get("identifier_patterns") or file.get("fields", {}).get("identifiers")):
        rows.append(["identifiers", f"{fmt(file.get('records_with_identifiers'))} records carry identifiers "
                                    f"(patterns: {', '.join(file.get('identifier_patterns') or []) or 'none'})"])
    return rows


def _bytes(value) -> str:
    if not is_number(value):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "n/a"


def training_cost_table(results: dict) -> Table:
    """Per training and seed: wall and training time, upload bytes per client and round, and in all."""
    rows = []
    for t in results["trainings"]:
        cost = t.get("cost") or {}
        rows.append([t["algorithm"], t["defense"], t.get("scenario", CLEAN), fmt(t.get("seed")),
                     fmt(cost.get("wall_seconds"), 1), fmt(train_seconds(t), 1),
                     _bytes(cost.get("upload_bytes_per_client_per_round")), _bytes(cost.get("upload_bytes_total"))])
    return Table(["algorithm", "defense", "scenario", "seed", "wall s", "train s", "upload per client per round",
                  "upload total"], rows)


def attack_cost_table(results: dict) -> Table:
    """Per attack: cells, and total seconds over them (wall: schema 4's cost; attack: the older timings)."""
    rows = []
    for attack in dict.fromkeys(c["attack"] for c in results["cells"]):
        cells = [c for c in results["cells"] if c["attack"] == attack]
        rows.append([attack, cells[0]["family"], str(len(cells)),
                     _total([(c.get("cost") or {}).get("wall_seconds") for c in cells]),
                     _total([(c.get("timings") or {}).get("attack_seconds") for c in cells])])
    return Table(["attack", "family", "cells", "total wall s", "total attack s"], rows)


def _total(values: list) -> str:
    """A sum that says when some terms are missing instead of passing for the whole."""
    known = [v for v in values if is_number(v)]
    if not known:
        return "n/a"
    return fmt(float(sum(known)), 1) + ("" if len(known) == len(values) else f" ({len(known)} of {len(values)} cells)")


def engine_notes(results: dict) -> list[str]:
    """Which trainings ran on Flower, and every client that failed a round there (the round went on without it)."""
    notes = []
    engines = [(t.get("cost") or {}).get("engine") for t in results["trainings"]]
    for engine, where in (("flower", "Flower's Simulation Engine, one virtual SuperNode per client"),
                          ("flower-deployment", "a deployed Flower federation, one SuperNode per client")):
        if engine in engines:
            notes.append(f"{engines.count(engine)} of {len(engines)} trainings ran on {where}.")
    for t in results["trainings"]:
        for entry in t.get("rounds") or []:
            for client, reason in sorted((entry.get("failed") or {}).items(), key=lambda kv: int(kv[0])):
                notes.append(f"Client {client} failed in round {entry['round']} of {t['algorithm']}/{t['defense']}/"
                             f"{t.get('scenario', CLEAN)} seed {fmt(t.get('seed'))} ({reason}); that round aggregated "
                             f"the other clients' uploads.")
    return notes


def executor_notes(results: dict) -> list[str]:
    """Where the tasks ran (a Ray cluster) and every task that failed there: what is missing from the report."""
    executor = results.get("executor") or {}
    notes = []
    if executor.get("name") == "ray":
        notes.append(f"Trainings and attack cells ran as Ray {executor.get('ray_version', '')} tasks on "
                     f"{executor.get('nodes', '?')} node(s) ({fmt(executor.get('cpus'))} CPUs, "
                     f"{fmt(executor.get('gpus'))} GPUs; address {executor.get('address', '?')}, storage "
                     f"{executor.get('storage', '?')}).")
    for f in results.get("failures") or []:
        what = "its training" if f["task"] == "training" else "its attack cells"
        how = f"failed after {f['attempts']} attempt(s)" if f["attempts"] else "did not run"
        notes.append(f"MISSING: {what} of {f['algorithm']}/{f['defense']}/{f.get('scenario', CLEAN)} seed "
                     f"{fmt(f.get('seed'))} {how} ({f['error']}). Rerun to retry (finished work is cached).")
    return notes


def provenance_section(run: Merged) -> Section:
    """Provenance, the engine and failed clients, then the cost per training and per attack."""
    return Section("Provenance and cost", [
        provenance_table(run), *engine_notes(run.results), *executor_notes(run.results),
        "Cost per training (wall: training, utility and poisoning evaluation; upload: what each client sends the "
        "server per round, and in all; n/a: not recorded, as in results before schema 4):",
        training_cost_table(run.results), "Cost per attack, over all its cells (trainings, views, rounds and seeds):",
        attack_cost_table(run.results)])
