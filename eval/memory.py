"""Peak memory of a run's phases, estimated from the architecture's config alone (no weights load), and
the check that refuses a run which cannot fit (`fedleak run`, also with --dry-run).

Phases, each on the chosen device (`model.device`):
- training: the base weights (params x bytes of `model.dtype`; bitsandbytes "4bit" keeps 0.5 byte per
  weight of every linear layer but the output head, plus ~3% of quantisation constants, "8bit" 1 byte;
  embeddings, head and norms in fp32, as QLoRA's recipe casts them, and the activations too), every adapter the algorithms hold (fp32,
  counted layer by layer as peft wraps them: in x r + r x out per targeted linear; full fine-tuning: a
  copy of every base parameter), AdamW's two
  moments and the gradients of the trained adapter (DP-SGD: one fp32 gradient per record of the
  batch), the clients' uploads held for aggregation, and the activations of a batch of
  federation.batch_size x federation.max_length tokens;
- scoring: a forward pass without gradients at attack.batch_size (utility's loss at utility.batch_size);
- generation: the KV cache at utility.batch_size x (federation.max_length + utility.max_new_tokens).

The activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", sbh(34 + 5as/h) bytes per layer in fp16), recounted for what autograd keeps in a LoRA-trained
Llama-type decoder layer (frozen weights keep no inputs; RMSNorm, RoPE, gated MLP, the adapters'
fp32 inputs), with the s^2 attention term only for eager attention, and one layer's share plus
the layer inputs under gradient checkpointing. The logits add 12 bytes per token and vocabulary entry
in training (fedleak's fp32 log-softmax, its gradient and the logits' gradient): an upper bound, as
training computes them at target positions only (`federated/batching.py`).
tests/test_memory.py holds the estimate against peaks measured on the embedded model.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fedleak.common.errors import FedleakError

GIB = 1024 ** 3
FP32 = 4


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of an architecture (read on the meta device, no weights)."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # key/value heads x head_dim
    vocab: int
    params: int  # every base parameter, tied ones once
    quantizable: int  # parameters of the linear layers bitsandbytes quantises (all but the output head)
    linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of each linear layer but the head
    embeddings: tuple[tuple[str, int, int], ...]  # (name, rows, dim) of each embedding
    gated: bool = True  # a gated MLP (gate, up, down) rather than fc -> act -> proj

    def adapter_params(self, settings) -> tuple[int, int, int]:
        """(adapter parameters, summed input width of the layers whose adapter copies its input, LoRA's rank
        or 0) for one adapter of `settings`' method (federated.methods)."""
        if settings.method == "prompt_tuning":  # one embedding row per virtual token
            return settings.num_virtual_tokens * self.hidden, 0, 0
        if settings.method == "prefix_tuning":  # a key and a value per layer per prefix position
            return settings.num_virtual_tokens * 2 * self.layers * self.kv_dim, 0, 0
        if settings.method == "full":  # every parameter; each linear layer keeps its input for its weight's gradient
            return self.params, sum(i for _, i, _ in self.linears), 0
        if settings.method == "ia3":  # a scale per output feature (per input feature for feed-forward ones)
            hit = _matcher(settings.target_modules)
            ff = _matcher(tuple(settings.feedforward_modules))
            return sum((i if settings.feedforward_modules and ff(n) else o) for n, i, o in self.linears if hit(n)), 0, 0
        return (*self.lora_params(settings.target_modules, settings.r), settings.r)

    def lora_params(self, targets, r: int) -> tuple[int, int]:
        """(adapter parameters, summed input width of the targeted linear layers) for one adapter, as
        peft matches `target_modules`: "all-linear", a regex string (full match) or name suffixes."""
        hit = _matcher(targets)
        linears = [(n, i, o) for n, i, o in self.linears if hit(n)]
        embeds = [(n, v, d) for n, v, d in self.embeddings if targets != "all-linear" and hit(n)]
        return (sum(r * (i + o) for _, i, o in linears) + sum(r * (v + d) for _, v, d in embeds),
                sum(i for _, i, _ in linears))


def _matcher(targets):
    """Whether a module name is targeted, as peft matches `target_modules`: "all-linear", a regex string
    (full match) or name suffixes."""
    def hit(name: str) -> bool:
        if targets == "all-linear":
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)
    return hit


def shape_of(hf_config) -> Shape:
    """Instantiate the architecture of `hf_config` on the meta device and walk its modules."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    head = model.get_output_embeddings()
    linears, embeddings = [], []
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear):
            linears.append((name, module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":  # GPT-2's linear layers: weight [in, out]
            linears.append((name, *module.weight.shape))
        elif isinstance(module, torch.nn.Embedding):
            embeddings.append((name, module.num_embeddings, module.embedding_dim))
    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    inter = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None) or 4 * hidden
    params = sum(p.numel() for p in model.parameters())
    return Shape(layers=getattr(c, "num_hidden_layers", None) or c.n_layer, hidden=hidden, intermediate=inter,
                 heads=heads, q_dim=heads * head_dim, kv_dim=kv_heads * head_dim, vocab=c.vocab_size, params=params,
                 quantizable=sum(i * o for _, i, o in linears), linears=tuple(linears), embeddings=tuple(embeddings),
                 gated=any(re.search(r"gate|w1\b|w3\b", n) for n, _, _ in linears))


def model_config(config, model_config_or_folder=None):
    """The base model's transformers config without its weights: given, read from a folder, or for the
    embedded model its build's config.json (before the build: a LlamaConfig from model.embedded's
    fields, vocab_size an upper bound). None when a hub id's config is not available offline."""
    from transformers import AutoConfig, LlamaConfig
    source = model_config_or_folder
    if source is not None and not isinstance(source, (str, os.PathLike)):
        return source
    if source is None and config.model.name == "embedded":
        from fedleak.eval.context import built_model_ref
        source = built_model_ref(config)
        if source is None:
            e = config.model.embedded
            return LlamaConfig(vocab_size=e.vocab_size, hidden_size=e.hidden_size, num_hidden_layers=e.num_layers,
                               num_attention_heads=e.num_heads, num_key_value_heads=e.num_heads,
                               intermediate_size=e.intermediate_size, max_position_embeddings=e.max_length,
                               tie_word_embeddings=True)
    source = source if source is not None else config.model.name
    try:
        return AutoConfig.from_pretrained(str(source), local_files_only=not config.model.allow_download)
    except Exception:  # noqa: BLE001 - any unreadable config: no estimate; loading the model says why
        return None


def _algorithm_adapters(config, *, on_together: bool = False) -> int:
    """The most adapters one algorithm of the matrix holds at once (FEDPIT: a global and a local one), or with
    `on_together`, keeps on at once (else 1): soft prompts and prefixes then take that many times their
    positions, full fine-tuning holds their sum besides the copies."""
    from fedleak.common.params import instantiate
    from fedleak.federated.rounds import ALGORITHMS
    most = 1
    for spec in config.matrix.algorithms:
        if on_together and not ALGORITHMS.get(spec.name).combines_adapters:
            continue
        algorithm = instantiate(ALGORITHMS.get(spec.name), spec.kwargs, f"matrix.algorithms: {spec.label}")
        most = max(most, len({name for name, _ in algorithm.training_plan(1)}))
    return most


# Attacks that train an adapter of their own beside the view's (a shadow model, a self-prompt reference).
ADAPTER_TRAINING_ATTACKS = frozenset({"lira", "rmia", "spv_mia"})


def _attack_adapters(config) -> int:
    """One more adapter while an attack trains its own on the view's base (for full fine-tuning, a whole copy)."""
    return int(any(spec.name in ADAPTER_TRAINING_ATTACKS for spec in config.matrix.attacks))


def _uses_dp_sgd(config) -> bool:
    return any(part.name == "dp_sgd" for spec in config.matrix.defenses for part in (spec.parts or (spec,)))


@dataclass(frozen=True)
class Estimate:
    """Peak bytes per phase on `device`, and the memory available there (None: not known, e.g. MPS)."""
    phases: dict[str, int]
    device: str
    dtype: str
    available: int | None
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def largest(self) -> tuple[str, int]:
        return max(self.phases.items(), key=lambda kv: kv[1])

    def lines(self) -> list[str]:
        have = f"{self.available / GIB:.2f} GiB available" if self.available is not None else "available memory unknown"
        return [f"memory on {self.device} ({self.dtype}; {have}):"] + [
            f"  {phase}: about {n / GIB:.3f} GiB ({self.notes.get(phase, '')})" for phase, n in self.phases.items()]


def estimate(config, model_config_or_folder=None, *, device: torch.device | str | None = None,
             available: int | None = None, jobs: int = 1, shape: Shape | None = None) -> Estimate | None:
    """Each phase's peak bytes for `config` (None when the model's config.json is not at hand).
    `model_config_or_folder`: a transformers config or a folder with config.json (default: `model_config`);
    `device` (default model.device here), `available` bytes (default `available_memory`), `jobs` (processes
    at once, each with its own base weights, each training or attacking), `shape` (a `Shape` already read: no meta instantiation)."""
    from fedleak.federated.model import resolve_device, resolve_dtype
    m, fed = config.model, config.federation
    if shape is None:
        hf_config = model_config(config, model_config_or_folder)
        try:
            shape = shape_of(hf_config) if hf_config is not None else None
        except Exception:  # noqa: BLE001 - an architecture or config transformers cannot build
            shape = None
        if shape is None:
            return None
    device = torch.device(device) if device is not None else resolve_device(m.device)
    dtype = resolve_dtype(m.load_dtype, device)
    quant = m.quantization
    # peft's prepare_model_for_kbit_training (QLoRA's recipe, federated/model.py) casts every weight that
    # is not quantised (embeddings, output head, norms) to fp32, so the residual stream runs in fp32.
    e = FP32 if quant in ("4bit", "8bit") else torch.empty((), dtype=dtype).element_size()
    s = shape
    h, q, kv, i, a, L, V = s.hidden, s.q_dim, s.kv_dim, s.intermediate, s.heads, s.layers, s.vocab
    eager = m.attn_implementation == "eager"
    per_weight = {"4bit": 0.5 * 1.03, "8bit": 1.0 * 1.02}.get(quant)
    weights = (s.params * e if per_weight is None
               else s.quantizable * per_weight + (s.params - s.quantizable) * e)
    lora, lora_in, rank = s.adapter_params(m.adapter)
    adapters = _algorithm_adapters(config) + _attack_adapters(config)  # an attack trains beside the view's
    combined = _algorithm_adapters(config, on_together=True)
    if m.adaptation == "full" and combined > 1:
        adapters += 1  # the copies' sum, which trains in their place (federated/full.py)
    dp = _uses_dp_sgd(config)
    # The clients' uploads are CPU copies (adapters.get_adapter_state): on the device only on the CPU.
    uploads = config.federation.clients_per_round * lora * FP32 if device.type == "cpu" else 0
    held = adapters * lora * FP32 + uploads
    optimizer = 2 * lora * FP32 + lora * FP32 * (1 + (fed.batch_size if dp else 0))

    def layer_tokens(training: bool) -> float:
        """Bytes per token of one decoder layer: kept for the backward pass, or the forward's transient peak."""
        mlp = (4 if s.gated else 3) * i
        if training:  # inputs of norms, adapters and attention, RoPE outputs, attention output, MLP
            kept = e * (4 * h + 3 * q + 2 * kv + mlp + 2) + FP32 * a + FP32 * rank * len(s.linears) / L
            if e != FP32:  # RMSNorm's fp32 upcasts and the adapters' fp32 copies of their inputs
                kept += FP32 * (2 * h + lora_in / L)
            return kept
        return e * (2 * h + mlp - i) + (FP32 * max(h, i) if e != FP32 else 0)

    def attention_square(batch: int, length: int, training: bool) -> float:
        if not eager:
            return batch * length * length  # the padding mask (bool)
        return batch * a * length * length * ((FP32 + (e if e != FP32 else 0)) if training else FP32 + e)
    # a soft prompt or prefix lengthens the attended sequence
    b, t = fed.batch_size, fed.max_length + getattr(m.adapter, "num_virtual_tokens", 0) * combined
    tokens = b * t
    logits_train = tokens * V * 3 * FP32  # log-softmax output, its gradient, the logits' gradient
    final = tokens * (h * e + FP32)  # the final norm's input
    if m.gradient_checkpointing:  # layer inputs kept; the logits' backward, then one layer's
        acts = tokens * L * h * e + final + max(logits_train, tokens * layer_tokens(True) + attention_square(b, t, True))
    else:  # every layer's activations are alive when the logits' backward runs
        acts = tokens * L * layer_tokens(True) + L * attention_square(b, t, True) + final + logits_train
    training = weights + held + optimizer + acts
    cache = 2 * L * kv * e  # per token: a forward pass keeps every layer's keys and values (use_cache)

    def scoring(batch: int, *, stats: bool) -> float:
        n = batch * t
        # Scoring passes keep no key/value cache (use_cache=False in token_logprobs and compute_stats).
        fwd = n * (layer_tokens(False) + h * e) + attention_square(batch, t, False)
        head = n * (h * e + V * e)
        if stats:  # compute_stats: the head at scored positions only, fp32 softmax statistics in chunks of 512
            from fedleak.attacks.membership.stats import TOKEN_CHUNK
            logits = n * V * e + min(n, TOKEN_CHUNK) * V * 4 * FP32
        else:  # token_logprobs: logits and their fp32 log-softmax
            logits = n * V * (e + FP32 + (FP32 if e != FP32 else 0))
        return weights + held + max(fwd, head, logits)
    ab, ub = config.attack.batch_size, config.utility.batch_size
    score = max(scoring(ab, stats=True), scoring(ub, stats=False))
    context = t + config.utility.max_new_tokens
    kv_cache = ub * context * cache
    prefill = ub * t * layer_tokens(False) + attention_square(ub, t, False) + ub * V * (e + 2 * FP32)
    generation = weights + held + kv_cache + prefill
    available = available if available is not None else available_memory(device)
    quant_note = f", {quant}" if quant != "none" else ""
    # With --jobs, each process may be in any phase at once (a training's attacks start beside other trainings):
    # every phase is counted once per process.
    phases = {"client training": int(training * jobs), "scoring": int(score * jobs),
              "generation": int(generation * jobs)}
    per_job = f", x {jobs} jobs" * (jobs > 1)
    extra = [", DP-SGD per-sample gradients" * dp, ", gradient checkpointing" * bool(m.gradient_checkpointing),
             per_job]
    notes = {"client training": f"batch {b} x {t} tokens{quant_note}, {lora:,} adapter parameters x {adapters}"
                                + "".join(extra),
             "scoring": f"attack batch {ab} / utility batch {ub} x {t} tokens, no gradients{per_job}",
             "generation": f"utility batch {ub} x {context} tokens of KV cache{per_job}"}
    return Estimate(phases, str(device), str(dtype).removeprefix("torch."), available, notes)


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: CUDA's free memory, the machine's available RAM on the CPU, None elsewhere."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        meminfo = Path("/proc/meminfo")
        lines = meminfo.read_text().splitlines() if meminfo.exists() else []
        return next((int(x.split()[1]) * 1024 for x in lines if x.startswith("MemAvailable:")), None)


def check_positions(config, hf_config) -> None:
    """Refuse a `federation.max_length` beyond the positions the model has (config.json's
    max_position_embeddings or n_positions): learned positions would index out of range, rotary ones
    run where the model never trained."""
    limit = next((getattr(hf_config, k, None) for k in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(hf_config, k, None), int)), None)
    from fedleak.eval.sweep import settings_of, variant

    # The longest soft prompt or prefix any variant trains (adaptations, or a sweep of model.adaptation or of its
    # length), times the prompts an algorithm concatenates (FEDPIT's global and local): they take positions
    # before the text.
    soft = max(getattr(variant(config, s).model.adapter, "num_virtual_tokens", 0) for s in settings_of(config))
    soft *= _algorithm_adapters(config, on_together=True)
    length = config.federation.max_length
    if limit is not None and length + soft > limit:
        extra = f" plus a soft prompt's or prefix's {soft} virtual tokens" if soft else ""
        raise FedleakError(f"federation.max_length = {length}{extra} exceeds the {limit} positions of model.name = "
                           f"{config.model.name!r} (its config.json): lower federation.max_length to {limit - soft} "
                           f"or less")


def check_memory(config, model_config_or_folder=None, *, jobs: int = 1, **options) -> Estimate | None:
    """The estimate, or a one-line FedleakError naming the settings to change when its largest phase
    exceeds the available memory. Also refuses what the config can already tell will not load: a device
    this machine lacks, quantisation or flash attention without their GPU and package, a max_length
    beyond the model's positions. Each variant of the matrix (`matrix.adaptations`, `matrix.sweep`) is
    estimated, and the largest stands for the run: a full fine-tuning variant holds far more than LoRA."""
    from fedleak.eval.sweep import label, methods_of, settings_of, variant
    from fedleak.federated.model import check_load_options

    m = config.model
    check_load_options(device=m.device, dtype=m.load_dtype, attn_implementation=m.attn_implementation,
                       quantization=m.quantization)
    if model_config_or_folder is None or isinstance(model_config_or_folder, (str, os.PathLike)):
        hf_config = model_config(config, model_config_or_folder)
        if hf_config is not None:
            check_positions(config, hf_config)
            model_config_or_folder = hf_config
    shape = options.pop("shape", None)
    if shape is None and model_config_or_folder is not None and not isinstance(model_config_or_folder, (str, os.PathLike)):
        try:  # the architecture once, not once per variant (a meta instantiation each)
            shape = shape_of(model_config_or_folder)
        except Exception:  # noqa: BLE001 - as in `estimate`: no estimate
            return None
    estimates = [(estimate(variant(config, s), model_config_or_folder, jobs=jobs, shape=shape, **options), s)
                 for s in settings_of(config)]
    est, setting = max(estimates, key=lambda es: es[0].largest[1] if es[0] is not None else -1)
    config = variant(config, setting)
    if est is None or est.available is None:
        return est
    phase, need = est.largest
    if need <= est.available:
        return est
    m, fed = config.model, config.federation
    fixes = []
    if est.device.startswith("cuda") and m.quantization != "4bit" and m.adaptation != "full":
        fixes.append('model.quantization = "4bit"')
    if est.device.startswith("cuda") and est.dtype == "float32" and m.adaptation != "full":
        fixes.append('model.dtype = "bfloat16"')
    if phase == "client training":
        fixes += [f"federation.batch_size (now {fed.batch_size})", f"federation.max_length (now {fed.max_length})"]
        # Opacus cannot run with checkpointing, nor can a prefix (it lives in the cache checkpointing drops)
        if not m.gradient_checkpointing and not _uses_dp_sgd(config) and "prefix_tuning" not in methods_of(config):
            fixes.append("model.gradient_checkpointing = true")
        if jobs > 1:
            fixes.append(f"--jobs (now {jobs})")
    elif phase == "scoring":
        fixes += [f"attack.batch_size (now {config.attack.batch_size})",
                  f"utility.batch_size (now {config.utility.batch_size})",
                  f"federation.max_length (now {fed.max_length})"]
    else:
        fixes += [f"utility.batch_size (now {config.utility.batch_size})",
                  f"utility.max_new_tokens (now {config.utility.max_new_tokens})",
                  f"federation.max_length (now {fed.max_length})"]
    which = f" of the variant [{label(setting)}]" if setting else ""
    raise FedleakError(f"{phase}{which} needs about {need / GIB:.2f} GiB on {est.device} and {est.available / GIB:.2f} GiB "
                       f"are available ({est.notes[phase]}): lower the peak with {', '.join(fixes)}, or model.name "
                       f"= a smaller model")


def memory_lines(config, *, jobs: int = 1) -> list[str]:
    """The dry run's lines: one per phase, or why there is no estimate; raises when the run cannot fit."""
    est = check_memory(config, jobs=jobs)
    if est is None:
        return [f"memory: not estimated (the config.json of model.name = {config.model.name!r} is not at hand "
                f"offline, or transformers cannot build its architecture)"]
    return est.lines()
