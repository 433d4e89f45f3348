"""The sections of a language spec for the launched stages: how to embed (EmbedSpec), train (TrainSpec, its
DataSpec and PerturbationSpec) and start their processes (LauncherSpec).

pea.spec re-exports every name here: import them from pea.spec.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pea.spec.sections import Strict

# Always forwarded to every rank (the launcher's own children inherit the whole environment; remote nodes
# get only what `.deepspeed_env` lists): where the project, lake and caches are, and MLflow's settings.
FORWARDED_ENV = ("PEA_HOME", "PEA_LAKE", "PEA_RESULTS", "PEA_DEVICE", "PYTHONPATH", "HF_HOME", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TORCH_EXTENSIONS_DIR", "MLFLOW_*")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")


class LauncherSpec(Strict):
    """How many processes train one adapter (train.launcher) or embed (embed.launcher). One process (the
    default) runs inside the calling process; more are started through the `deepspeed` launcher
    (pea.embed.launcher, from pea.train.launch / pea.embed.launch): num_gpus per node times num_nodes."""

    num_gpus: int = Field(1, ge=1, le=1024, description="processes per node, one per GPU (deepspeed --num_gpus); "
                          "on a CPU-only machine, processes (gloo)")
    num_nodes: int = Field(1, ge=1, le=4096, description="nodes (deepspeed --num_nodes); more than one needs hostfile")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile (`host slots=N` lines), a path relative to the "
                                 "project home or absolute; needed for num_nodes > 1")
    multinode_runner: Literal["pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi", "no_ssh"] = Field(
        "pdsh", description="how the nodes are started: pdsh over ssh or an MPI / slurm runner (deepspeed --launcher) "
                            "from one node; or no_ssh: every node runs the same launch itself, with its index in the "
                            "hostfile in $PEA_NODE_RANK (e.g. a Kubernetes indexed job), deepspeed --no_ssh --node_rank")
    master_addr: str | None = Field(None, description="rendezvous host; None: the launcher's choice (this host, or "
                                    "the hostfile's first host)")
    master_port: int | None = Field(None, ge=1024, le=65535, description="rendezvous port; None: a free port on one "
                                    "node, 29500 across nodes")
    forward_env: list[str] = Field(default_factory=list, description="environment variables forwarded to every rank "
                                   "besides " + ", ".join(FORWARDED_ENV) + "; a trailing * forwards a prefix "
                                   "(e.g. NCCL_*)")

    @field_validator("forward_env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name (or a prefix ending in *)")
        return names

    @field_validator("master_addr")
    @classmethod
    def _plain_host(cls, host: str | None) -> str | None:
        if host is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]+", host):
            raise ValueError(f"{host!r} is not a host name or address")
        return host

    @model_validator(mode="after")
    def _nodes_need_a_hostfile(self) -> LauncherSpec:
        if self.num_nodes > 1 and self.hostfile is None:
            raise ValueError(f"num_nodes={self.num_nodes} needs a hostfile naming the nodes")
        if self.multinode_runner == "no_ssh" and self.num_nodes > 1 and self.master_addr is None:
            raise ValueError("multinode_runner no_ssh needs master_addr: every node must name the same rendezvous host")
        return self

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes


class EmbedSpec(Strict):
    dtype: Literal["float16", "bfloat16"] = "float16"
    text_batch_size: int = Field(64, ge=1, description="captions per teacher / student encoder call")
    image_batch_size: int = Field(64, ge=1, description="images per VAE encoder call (the heavier one: at 1024 px "
                                  "a batch of 64 needs tens of GB)")
    launcher: LauncherSpec = Field(LauncherSpec(), description="workers: one (the default) embeds in the calling "
                                   "process; more run under the deepspeed launcher (pea.embed.launch), each "
                                   "computing the missing rows of its own hash bucket")

    @model_validator(mode="before")
    @classmethod
    def _one_batch_size(cls, data: Any) -> Any:
        # The former single `batch_size` still reads: it sets whichever of the two is not given.
        if isinstance(data, dict) and "batch_size" in data:
            data = dict(data)
            size = data.pop("batch_size")
            data.setdefault("text_batch_size", size)
            data.setdefault("image_batch_size", size)
        return data

    @model_validator(mode="after")
    def _one_launch_starts_every_worker(self) -> EmbedSpec:
        # pea.embed.launch counts every worker's result in a scratch folder of its own launch; under no_ssh each
        # node's launch would see only its own workers' results.
        if self.launcher.multinode_runner == "no_ssh" and self.launcher.num_nodes > 1:
            raise ValueError("embed.launcher: multinode_runner no_ssh is not supported for the embed stage (each node's "
                             "launch would count only its own workers); embed on one node (num_nodes: 1, num_gpus: N) "
                             "or start every node from one with pdsh or an MPI/slurm runner")
        return self


class DataSpec(Strict):
    """How training reads its packed shards (pea.train.shards, pea.train.reader). A resume with a different world size is
    exact while `partitions` stays the same and the new world size divides it."""

    row_group_rows: int = Field(256, ge=1, description="rows per Parquet row group of the packed shards: the unit "
                                "the reader shuffles and fetches (256 SD 1.5 rows ≈ 79 MB)")
    partitions: int | None = Field(None, ge=1, description="canonical streams the global batch is drawn from, "
                                   "each from its own row groups; rank r reads only its partitions' row groups. The "
                                   "world size must divide it and each rank's micro-batch must split evenly over "
                                   "its partitions. None: the world size (the order then changes with it)")
    shuffle_row_groups: int = Field(4, ge=1, description="row groups shuffled together in one partition (the "
                                    "shuffle buffer); host memory per rank ≈ partitions/world × (1 + prefetch) × "
                                    "this × row_group_rows × bytes per row")
    prefetch: int = Field(1, ge=0, description="shuffle windows per partition read ahead in background threads")


class PerturbationSpec(Strict):
    """Distillation under random low-rank perturbations of the frozen UNet's attention (pea.method.perturb): on that
    share of micro-steps the teacher's and the student's passes both run through one random LoRA, so the adapter
    must match the teacher where a LoRA it never saw can look too (plug-and-play, docs/results.md). On half the
    steps by default, ρ up to 2: in the toy UNet about the conditioning's own effect on the output (a random rank-4
    update of norm ρ‖W‖ changes a projection's output on random inputs by about ρ times its size, at any width)."""

    share: float = Field(0.5, ge=0, le=1, description="share of micro-steps distilled under a random LoRA")
    rank: int = Field(4, ge=1, description="rank of each random update B·A")
    relative_norm: float = Field(2.0, gt=0, description="largest ‖B·A‖ / ‖W‖ (Frobenius) per projection; each "
                                 "perturbed step draws its size uniformly up to this")
    targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                               description="attention projections perturbed (peft target_modules suffixes)")


# The table's diffusion-loss-only baseline (evaluate.diffusion_only_baseline): the default's adapter trained by the
# diffusion loss alone. Every part of the default that reads the teacher (the token term, the warm start's regression
# on the teacher's context) or its UNet under a random LoRA is off, so the row says what the images alone teach.
DIFFUSION_ONLY = {"diffusion_loss": "all", "token_kd_weight": 0.0, "token_warmup": 0.0, "perturbation": {"share": 0.0}}


class TrainSpec(Strict):
    hidden_dim: int = Field(2048, ge=1, description="adapter inner width h")
    steps: int = Field(50_000, ge=1)
    micro_batch_size: int = Field(10, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr: float = Field(5e-8, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    output_kd_weight: float = Field(1.0, ge=0, description="MSE(ε_student, ε_teacher)")
    feature_kd_weight: float = Field(0.1, ge=0, description="Σ MSE over UNet block outputs")
    # The defaults below train the plug-and-play adapter (#31, docs/results.md): the teacher's token count through an
    # attention mixer, aligned token by token, warm-started by regression and distilled partly under random LoRAs, so
    # that LoRAs and ControlNets made for the English model keep their effect. The paper's adapter is the profile
    # `paper` (data/profiles/paper.yaml): adapter_tokens student, no token term, no warm start, no perturbation.
    adapter_tokens: Literal["student", "teacher"] = Field(
        "teacher", description="the adapter's output tokens: one per student token (the paper), or the teacher's "
                               "count through a learned token mixer (pea.method.adapter), which token_kd_weight aligns")
    token_mixer: Literal["linear", "attention"] = Field(
        "attention", description="with adapter_tokens: teacher, a fixed map over the token axis, or that map refined by "
                              "multi-head attention over the adapter's tokens (pea.method.adapter)")
    mixer_heads: int | None = Field(None, ge=1, description="with token_mixer: attention, its heads; None: the "
                                    "teacher's width // 64 (CLIP's head size), at least 8; must divide the teacher's "
                                    "width")
    token_kd_weight: float = Field(10.0, ge=0, description="Σ MSE(adapter tokens, teacher tokens) on parallel rows, "
                                   "token by token (needs adapter_tokens: teacher)")
    # 4: zh's worst unseen LoRA at 3x keeps 0.86 of the gap, against 0.79 at 1 and 0.69 without (docs/results.md).
    token_warmup: float = Field(4.0, ge=0, le=100, description="steps that fit the adapter's context to the "
                                "teacher's by regression alone, as a share of `steps`, run before them (parallel rows, "
                                "no UNet pass: a step costs the adapter's forward and backward); needs adapter_tokens: "
                                "teacher")
    diffusion_loss: Literal["native", "all", "none"] = Field(
        "native", description="native: MSE(ε_student, ε) only for native-only captions (the paper's rule); "
                              "all: for every sample instead of KD (the diffusion-only ablation); none: native-only "
                              "captions get no loss at all (the ablation without native captions)")
    # 10: the teacher-side terms (token KD x10, the warm start) otherwise crowd out the few native rows: culture set
    # ja 0.250 -> 0.611, zh 0.583 -> 0.694 with judge and 3x LoRA figures unchanged (docs/results.md).
    native_loss_weight: float = Field(10.0, ge=0, description="weight of the diffusion loss on native-only captions "
                                      "(the only thing that teaches what they say beyond the parallel pairs, e.g. "
                                      "culture-specific phrases)")
    caption_dropout: float = Field(0.1, ge=0, le=1)
    noise_offset: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(1000, ge=1)
    seed: int = 0
    launcher: LauncherSpec = Field(LauncherSpec(), description="processes and nodes; more than one process runs "
                                   "under the deepspeed launcher")
    data: DataSpec = DataSpec()
    perturbation: PerturbationSpec = PerturbationSpec()

    @model_validator(mode="after")
    def _token_kd_needs_teacher_tokens(self) -> TrainSpec:
        if self.token_kd_weight > 0 and self.adapter_tokens != "teacher":
            raise ValueError("token_kd_weight > 0 compares the adapter's tokens with the teacher's one by one: set "
                             "adapter_tokens: teacher (a token mixer to the teacher's count)")
        if self.token_warmup > 0 and self.adapter_tokens != "teacher":
            raise ValueError("token_warmup fits the adapter's tokens to the teacher's one by one: set adapter_tokens: "
                             "teacher (a token mixer to the teacher's count)")
        if self.mixer_heads is not None and self.token_mixer != "attention":
            raise ValueError("mixer_heads sets the token mixer's attention heads: set token_mixer: attention")
        if self.token_mixer == "attention" and self.adapter_tokens != "teacher":
            raise ValueError("token_mixer: attention refines the mix to the teacher's token count: set "
                             "adapter_tokens: teacher")
        return self

    @model_validator(mode="after")
    def _diffusion_only_reads_no_teacher(self) -> TrainSpec:
        if self.diffusion_loss == "all" and (self.token_kd_weight or self.token_warmup or self.perturbation.share):
            raise ValueError("diffusion_loss: all trains by the diffusion loss alone, but token_kd_weight, "
                             "token_warmup or perturbation.share would still use the teacher: set them to 0 "
                             "(pea.spec.DIFFUSION_ONLY holds the whole override)")
        return self

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self) -> TrainSpec:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        return self

    @model_validator(mode="after")
    def _partitions_fit_the_layout(self) -> TrainSpec:
        self.partitions_for(self.launcher.world_size)
        return self

    @property
    def fitting_steps(self) -> int:
        """The token warm start's steps (token_warmup × steps), run before the `steps` distillation steps."""
        return round(self.token_warmup * self.steps)

    @property
    def total_steps(self) -> int:
        return self.fitting_steps + self.steps

    def heads_for(self, width: int) -> int:
        """The attention mixer's heads for a teacher context `width` wide: mixer_heads, else heads of CLIP's 64
        dimensions but at least 8 (one head on the toy's 64-wide context could not fit it, docs/results.md)."""
        return self.mixer_heads or max(8, width // 64)

    def partitions_for(self, world: int) -> int:
        """The reader's partitions for `world` processes; refused unless each rank gets a whole number of
        partitions and an equal share of its micro-batch from each."""
        partitions = self.data.partitions or world
        if partitions % world or self.micro_batch_size % (partitions // world):
            raise ValueError(f"train.data.partitions={partitions} does not fit {world} process(es) with "
                             f"micro_batch_size={self.micro_batch_size}: the world size must divide the partitions "
                             "and the micro-batch must split evenly over each rank's partitions")
        return partitions
