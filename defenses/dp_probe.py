"""DP-SGD's guard against a wrong epsilon: Opacus's per-sample gradients must be per record.

Opacus's hooks compute a layer's per-sample gradients from its input and output gradient, taking the
first dimension as the batch. A layer that sees another first dimension gives rows that are not
records: OPT reshapes hidden states to [batch x tokens, hidden] before `fc1`/`fc2`, so LoRA there gets
per-token rows (all-linear crashes; `fc1` alone would clip per token, each record's influence up to
T times the clipping norm, and the epsilon would be wrong), and a Mixtral-type router and fused
experts get none. So before a DP training, a one-batch probe checks every trainable parameter's rows
against each record's own autograd gradient and refuses the modules that fail, naming LoRA targets
that pass. A wrong epsilon is then impossible for these layers, not just unlikely.
"""

from __future__ import annotations

import re
import warnings
import weakref

import torch

from fedleak.common.errors import FedleakError
from fedleak.federated.training import Example, collate, sequence_losses

PROBE_LENGTHS = (13, 9, 6)  # tokens of the probe's records: different lengths, so padding is exercised
# How far (relative L2) a per-sample gradient row may be from the record's own gradient: batched and single
# passes reduce in different orders (TF32 on GPUs); 16-bit or quantised base weights get more room. A wrong
# row (another record's, a sum over records) is off by order 1.
PROBE_RTOL = {"float32": 0.02, "low": 0.1}
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {trainable parameters: refusal or None}
_ATTENTION_PARENT = re.compile(r"(attn|attention)", re.IGNORECASE)


def _module_path(param_name: str) -> str:
    """The module a trainable parameter adapts, without peft's wrapper prefix and LoRA suffix:
    base_model.model.model.decoder.layers.0.fc1.lora_A.default.weight -> model.decoder.layers.0.fc1."""
    path = param_name.removeprefix("base_model.model.").replace(".base_layer.", ".")  # peft's nested wrappers
    path = path.removeprefix("base.")  # full fine-tuning's wrapper (federated/full.py)
    cut = re.search(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)", path)
    return path[:cut.start()] if cut else path.rpartition(".")[0]


def _compress(paths) -> str:
    """Module paths with layer indices folded: "model.decoder.layers.*.fc1, model.decoder.layers.*.fc2 (2 layers)"."""
    patterns: dict[str, set] = {}
    for path in paths:
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", path)
        patterns.setdefault(pattern, set()).add(tuple(re.findall(r"\.(\d+)(?=\.|$)", path)))
    text = ", ".join(patterns)
    layers = {index for indices in patterns.values() for index in indices if index}
    return f"{text} ({len(layers)} layers)" if len(layers) > 1 else text


def _probe_batch(examples, pad_id) -> list[Example]:
    """Three records of different lengths cut from the job's first examples, the loss on every token (so
    every LoRA matrix that can have a gradient gets a non-zero one)."""
    records = []
    for i, length in enumerate(PROBE_LENGTHS):
        ids = tuple(examples[i % len(examples)].input_ids[:length])
        records.append(Example(ids, ids))
    return records


def _probe(model, records, pad_id, params: dict) -> tuple[dict[str, str], str | None]:
    """One Opacus hooks pass over `records` against per-record autograd, for the parameters in `params`.

    Returns:
        ({parameter name: what is wrong with its per-sample gradients}, None), or ({}, the exception's line)
        when Opacus (or the model under its hooks) fails.
    """
    from opacus import GradSampleModule

    device = next(iter(params.values())).device
    batch = {k: v.to(device) for k, v in collate(records, pad_id).items()}
    count, width = batch["input_ids"].shape
    low = any(p.dtype in (torch.float16, torch.bfloat16) or not p.is_floating_point() for p in model.parameters())
    rtol = PROBE_RTOL["low" if low else "float32"]
    # Per-record references (plain autograd on each record alone).
    expected = []
    for record in records:
        model.zero_grad(set_to_none=True)
        alone = {k: v.to(device) for k, v in collate([record], pad_id).items()}
        sequence_losses(model, alone).mean().backward()
        expected.append({n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                         for n, p in params.items()})
    model.zero_grad(set_to_none=True)
    wrapped, samples = None, {}
    try:
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")  # make_private's hooks mode
        with warnings.catch_warnings():  # a frozen base: the hooks fire on module outputs, as in training
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            sequence_losses(wrapped, batch).mean().backward()
        samples = {n: getattr(p, "grad_sample", None) for n, p in params.items()}
    except Exception as exc:  # Opacus's hooks fail on some layers: refused, not raised
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return {}, f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    finally:
        if wrapped is not None:
            wrapped.cleanup()
        for p in params.values():
            p.grad, p.grad_sample = None, None
    problems: dict[str, str] = {}
    for name, grad_sample in samples.items():
        if grad_sample is None:
            problems[name] = "missing"
        elif grad_sample.shape[0] != count:
            problems[name] = "per token" if grad_sample.shape[0] == count * width else f"{grad_sample.shape[0]} rows"
        else:
            for i in range(count):
                want = expected[i][name]
                if (grad_sample[i].float() - want.float()).norm() > rtol * want.float().norm() + 1e-7:
                    problems[name] = "values"
                    break
    return problems, None


def _probe_all(model, examples, pad_id, params: dict) -> dict[str, str]:
    """{parameter name: problem} over `params`; a failing pass is repeated per module pattern, to name it."""
    records = _probe_batch(examples, pad_id)
    flags = {m: m.training for m in model.modules()}
    try:
        # Deterministic: dropout and routing jitter off; only the layers holding trainable parameters train
        # (Opacus's hooks record activations of modules in training mode only).
        model.eval()
        for module in model.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                module.train()
        with torch.random.fork_rng(devices=[]):
            problems, crash = _probe(model, records, pad_id, params)
            if crash is None:
                return problems
            groups: dict[str, dict] = {}
            for name, p in params.items():
                groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", _module_path(name)), {})[name] = p
            problems = {}
            for group in groups.values():
                for name, p in params.items():
                    p.requires_grad_(name in group)
                found, crash = _probe(model, records, pad_id, group)
                problems.update(found if crash is None else {name: f"crash {crash}" for name in group})
            return problems
    finally:
        for p in params.values():
            p.requires_grad_(True)
        for module, training in flags.items():
            module.training = training


def _suggested_targets(model, failing: set[str], passing: list[str]) -> list[str]:
    """LoRA target names that work: the probed ones that passed, else the attention projections."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n in dict.fromkeys(path.rpartition(".")[2] for path in passing) if n not in failing]
    if names:
        return names
    projections = []
    for path, module in model.named_modules():
        if ".lora_" in path or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        parent, _, leaf = path.removesuffix(".base_layer").rpartition(".")
        if _ATTENTION_PARENT.search(parent.rpartition(".")[2]) and leaf not in failing:
            projections.append(leaf)
    return list(dict.fromkeys(projections))


def refusal(model, problems: dict[str, str]) -> str:
    """The one-line refusal for the parameters in `problems` (see `_probe_all`)."""
    by_kind: dict[str, list[str]] = {}
    crashes = {}
    for name, problem in problems.items():
        kind = "crash" if problem.startswith("crash") else "rows" if problem.endswith("rows") else problem
        by_kind.setdefault(kind, []).append(_module_path(name))
        if kind == "crash":
            crashes.setdefault(problem.removeprefix("crash "), None)
    reasons = {
        "per token": "are per token, not per record (the layer sees [batch*tokens, hidden])",
        "rows": "are not one per record (the layer sees tokens, not records, e.g. a router or experts)",
        "missing": "are never computed (Opacus's hooks do not see these parameters)",
        "values": "differ from each record's own gradient",
        "crash": f"make Opacus fail ({'; '.join(crashes)})",
    }
    from fedleak.federated.full import FullModel
    from fedleak.federated.methods import is_prompt_learning

    full = isinstance(model, FullModel)
    prompt = is_prompt_learning(model)
    what = "the parameters of" if full else "the prefix in" if prompt else "LoRA on"
    parts = [f"{what} {_compress(dict.fromkeys(paths))} {reasons[kind]}" for kind, paths in by_kind.items()]
    failing = {_module_path(n).rpartition(".")[2] for n in problems}
    # Full fine-tuning's passing parameters include norms and embeddings, which are no LoRA targets.
    passing = [] if full or prompt else [_module_path(n) for n, p in model.named_parameters() if p.requires_grad and n not in problems]
    consequence = ("Opacus would clip per token and the epsilon would be wrong" if set(by_kind) == {"per token"}
                   else "Opacus cannot clip each record's gradient and the epsilon would be wrong")
    targets = _suggested_targets(model, failing, passing)
    if prompt:
        fix = "use dp_fedavg, or model.adaptation = 'lora'"
    elif full:
        fix = ("full fine-tuning trains every parameter, these too: use dp_fedavg, or model.adaptation = 'lora'"
               + (f" with target_modules {_json_list(targets)}" if targets else ""))
    else:
        fix = (f"set model.lora.target_modules to {_json_list(targets)} or use dp_fedavg" if targets
               else "pick LoRA target_modules whose layers see one row per record, or use dp_fedavg")
    return f"dp_sgd: per-sample gradients of {'; '.join(parts)}: {consequence}: {fix}"


def _json_list(names: list[str]) -> str:
    return "[" + ", ".join(f'"{n}"' for n in names) + "]"


def check_per_sample_gradients(model, examples, pad_id) -> None:
    """Refuse DP-SGD on a model whose trainable parameters Opacus cannot give per-record gradients.

    Probes once per model object and trainable parameter set (cached; every client shares the model):
    three records of `examples` of different lengths through Opacus's GradSampleModule in hooks mode
    must give every trainable parameter `grad_sample` with one row per record, each equal (relative L2
    within PROBE_RTOL) to the record's own autograd gradient. Training state, gradients and the RNG are
    left as they were.

    Args:
        model: the (peft) model DP-SGD will train.
        examples: the training's examples (at least one); only their first tokens are used.
        pad_id: the pad token id.

    Raises:
        FedleakError: one line naming the failing modules (layer indices folded) and LoRA targets that pass.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params or not examples:
        return
    # The active adapters too: a prefix trains alone or behind another (FEDPIT), under the same parameter name.
    active = getattr(model, "active_adapters", ())  # a peft property; transformers' bare models have a method
    key = (tuple(active) if isinstance(active, (list, tuple)) else (),
           tuple((n, tuple(p.shape)) for n, p in params.items()))
    cache = _PROBES.setdefault(model, {})
    if key not in cache:
        problems = _probe_all(model, examples, pad_id, params)
        cache[key] = refusal(model, problems) if problems else None
    if cache[key] is not None:
        raise FedleakError(cache[key])
