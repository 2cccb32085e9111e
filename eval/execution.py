"""Where the work runs: `[engine]`, where one federated training's clients run (in process or on
Flower), and `[executor]`, where the matrix's trainings and attack cells run (processes of this machine
or tasks on a Ray cluster, `eval/ray_executor.py`). Neither changes a result, so neither enters a cache key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from fedleak.common.params import NonNegativeInt, PositiveFloat, PositiveInt, Range, check_fields

@dataclass(frozen=True)
class EngineSettings:
    """Where the federated trainings run: in this process, or on Flower's Simulation Engine (Ray), one
    virtual SuperNode per client. Results are the same either way (one thread per client: the same adapters)."""

    name: Literal["inprocess", "flower"] = field(default="inprocess", metadata={
        "help": "\"inprocess\": fedleak's own round loop; \"flower\": Flower's Simulation Engine (needs fedleak[flower]); "
                "`fedleak run --engine` overrides. Trainings without a server (centralised, local) stay in process."})
    num_cpus: PositiveFloat = field(default=1.0, metadata={
        "help": "CPUs each Flower client reserves (Ray): about total CPUs / num_cpus clients train at once; "
                "each client's torch uses max(1, floor(num_cpus)) threads."})
    num_gpus: Annotated[float, Range(ge=0)] = field(default=0.0, metadata={
        "help": "GPU share each Flower client reserves: 0.25 lets four clients share a GPU; 0 = CPU only."})
    total_cpus: NonNegativeInt = field(default=0, metadata={"help": "CPUs the Ray backend may use; 0 = all."})
    round_timeout: Annotated[float, Range(ge=0)] = field(default=0.0, metadata={
        "help": "Seconds a Flower round waits for replies; later clients are recorded as failed and the round goes "
                "on without them; 0 = wait for every client."})
    connect_timeout: PositiveFloat = field(default=300.0, metadata={
        "help": "Seconds a Flower training waits for one node per client to connect and say which client it holds."})
    secagg_clipping_range: PositiveFloat = field(default=8.0, metadata={
        "help": "With the secagg defense on Flower (SecAgg+): each adapter value is clipped to +-this before it is "
                "quantised and masked."})
    secagg_quantization_range: PositiveInt = field(default=4194304, metadata={
        "help": "SecAgg+'s quantisation levels over [-clipping range, clipping range]: the global adapter differs from "
                "FedAvg's by about clipping range / quantization range per value."})
    secagg_max_weight: NonNegativeInt = field(default=0, metadata={
        "help": "SecAgg+'s largest FedAvg weight (an upload's training examples; a larger one is clipped to it): "
                "weights are scaled by it before quantisation, so a loose bound costs precision; 0 = the largest "
                "client's record count in the run's split."})

    def __post_init__(self):
        check_fields(self, "engine.")

    def secagg(self) -> dict:
        return {"clipping_range": self.secagg_clipping_range, "quantization_range": self.secagg_quantization_range,
                "max_weight": self.secagg_max_weight}


@dataclass(frozen=True)
class ExecutorSettings:
    """Where the matrix's work runs: "local", this machine (`fedleak run --jobs N` processes), or "ray", one Ray
    task per uncached training and one per training's attack cells, each reserving the resources below, on a
    cluster (`address`) or a Ray instance started for the run. Results are the same either way."""

    name: Literal["local", "ray"] = field(default="local", metadata={
        "help": "\"local\": this machine's processes (--jobs); \"ray\": tasks on Ray (needs fedleak[ray]); "
                "`fedleak run --executor` overrides."})
    address: str = field(default="", metadata={
        "help": "The Ray cluster: \"HOST:PORT\" (its head's GCS, `ray start --head --port`), \"ray://HOST:PORT\" (Ray "
                "Client), \"auto\" (the cluster this machine joined); \"\": start a Ray instance for this run. "
                "`fedleak run --address` overrides."})
    storage: Literal["shared", "driver"] = field(default="shared", metadata={
        "help": "\"shared\": the output folder, the config's folder and the model are paths every node sees (a "
                "network filesystem) and tasks write there; \"driver\": tasks work in a node-local folder and send "
                "their checkpoints back, which the driver writes (the config's folder travels as Ray's working_dir)."})
    train_cpus: PositiveFloat = field(default=1.0, metadata={
        "help": "CPUs a training task reserves; its torch uses max(1, floor(train_cpus)) threads."})
    train_gpus: Annotated[float, Range(ge=0)] = field(default=0.0, metadata={
        "help": "GPUs a training task reserves (fractions share a GPU); 0 = CPU only."})
    attack_cpus: PositiveFloat = field(default=1.0, metadata={
        "help": "CPUs an attack task (one training's attack cells) reserves; its torch uses max(1, floor(attack_cpus)) "
                "threads."})
    attack_gpus: Annotated[float, Range(ge=0)] = field(default=0.0, metadata={
        "help": "GPUs an attack task reserves; 0 = CPU only."})
    max_retries: NonNegativeInt = field(default=1, metadata={
        "help": "Times a failed task is retried (on any node) before it is recorded as failed in results.json and "
                "the rest of the matrix goes on; a FedleakError (a config or plug-in fault) is never retried."})
    num_cpus: NonNegativeInt = field(default=0, metadata={
        "help": "CPUs of the Ray instance started for the run (address \"\"); 0 = all of this machine's."})
    progress_interval: PositiveInt = field(default=30, metadata={
        "help": "Seconds between the driver's progress lines in run.log (done, running with their node, queued)."})

    def __post_init__(self):
        check_fields(self, "executor.")
