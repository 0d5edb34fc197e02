"""Configuration of the learner: LoRA training, the replay buffer, and EWC.

Three frozen dataclasses, each a TOML section (``[train]``, ``[replay]``, ``[ewc]``), each field
documented below itself, each listing its own problems like the sections of ``policies.config``.
Pure: no torch here; the learner turns these into tensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_DTYPES: tuple[str, ...] = ("bfloat16", "float32")
SELECTIONS: tuple[str, ...] = ("reservoir", "diversity")
FISHER_REPRESENTATIONS: tuple[str, ...] = ("rank1", "dense")


def cycle_threads(configured: int, cores: int, service_running: bool) -> int:
    """Torch threads for a cycle's training and evaluation: ``train.threads`` if set; else every core, but one
    left for serving while a service runs on the state; at least one."""
    if configured > 0:
        return configured
    return max(1, cores - 1 if service_running else cores)


@dataclass(frozen=True)
class TrainConfig:
    lora_rank: int = 8
    """Rank r of each LoRA adapter (the A and B matrices are r x in and out x r)."""
    lora_alpha: float = 16.0
    """LoRA alpha; the adapter's update is scaled by alpha / rank."""
    lora_dropout: float = 0.05
    """Dropout on the adapter's input while training (0 disables it)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Names of the linear layers that get an adapter (and an EWC penalty), e.g. "q_proj"."""
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW on the adapter weights."""
    warmup_steps: int = 5
    """Steps of linear warm-up from 0 to the peak learning rate; then linear decay to 10% at the last step."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm over the adapter, EWC gradient included); 0 disables it."""
    steps: int = 100
    """Optimizer steps per cycle (one experience). The new rows are cycled through as often as needed."""
    batch_size: int = 8
    """Sequences per step, new and replayed together."""
    max_length: int = 256
    """Longest sequence in tokens (chat template included); longer conversations are cut at the end."""
    bucket_steps: int = 16
    """Length bucketing: the sequences of this many consecutive steps are sorted by length and regrouped, so
    that a batch holds sequences of similar length and little compute goes to padding (1 turns it off)."""
    seed: int = 0
    """Seed of the data order, the replay draws, the adapter's initialisation and dropout: same seed, same adapter."""
    threads: int = 0
    """Torch threads of a cycle's training and evaluation; 0 means all cores, or all but one (at least one) while
    ``selftune serve`` runs on the state and needs one for serving (``cycle_threads``)."""
    checkpoint_every: int = 25
    """Write a resumable checkpoint every this many steps (and always on SIGTERM); 0 means only on SIGTERM."""
    progress_every: int = 1
    """Append a line to progress.jsonl every this many steps."""
    bf16_autocast: bool = True
    """Run matrix products in bfloat16 (autocast) while the adapter and optimizer stay in float32. A large
    speed-up on CPUs with AMX or AVX512-BF16 and on recent GPUs; without hardware bfloat16 (an AVX2-only
    CPU) it would be several times slower, so there it is skipped and everything runs in float32."""
    base_dtype: str = "bfloat16"
    """Storage dtype of the frozen base's linear layers while training: "bfloat16" (half the memory, no
    per-step cast; with bf16_autocast the products are bfloat16 anyway; float32 where the hardware has no
    bfloat16, as for ``bf16_autocast``) or "float32". Embeddings, norms and the merge always stay float32."""

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.lora_rank <= 1024:
            out.append(f"train.lora_rank = {self.lora_rank}: use a rank from 1 to 1024 (8 or 16 are typical)")
        if not self.lora_alpha > 0:
            out.append(f"train.lora_alpha = {self.lora_alpha}: use a positive number (e.g. twice the rank)")
        if not 0.0 <= self.lora_dropout < 1.0:
            out.append(f"train.lora_dropout = {self.lora_dropout}: use a value from 0 up to (not including) 1")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            out.append(
                f"train.target_modules = {list(self.target_modules)!r}: list the linear layers to adapt, "
                f"e.g. {list(DEFAULT_TARGET_MODULES)!r}"
            )
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            out.append(f"train.learning_rate = {self.learning_rate}: use a value in (0, 1], e.g. 2e-4")
        if self.warmup_steps < 0:
            out.append(f"train.warmup_steps = {self.warmup_steps}: use 0 or more")
        if self.weight_decay < 0:
            out.append(f"train.weight_decay = {self.weight_decay}: use 0 or more")
        if self.max_grad_norm < 0:
            out.append(f"train.max_grad_norm = {self.max_grad_norm}: use 0 (off) or a positive norm")
        if self.steps < 1:
            out.append(f"train.steps = {self.steps}: use 1 or more")
        if not 1 <= self.batch_size <= 4096:
            out.append(f"train.batch_size = {self.batch_size}: use a value from 1 to 4096")
        if not 16 <= self.max_length <= 1_000_000:
            out.append(f"train.max_length = {self.max_length}: use at least 16 tokens")
        if self.bucket_steps < 1:
            out.append(f"train.bucket_steps = {self.bucket_steps}: use 1 (no bucketing) or more")
        if self.seed < 0:
            out.append(f"train.seed = {self.seed}: use 0 or a positive integer")
        if self.threads < 0:
            out.append(f"train.threads = {self.threads}: use 0 (all cores, but one while serving) or a positive count")
        if self.checkpoint_every < 0:
            out.append(f"train.checkpoint_every = {self.checkpoint_every}: use 0 (only on SIGTERM) or a positive count")
        if self.progress_every < 1:
            out.append(f"train.progress_every = {self.progress_every}: use 1 or more")
        if self.base_dtype not in BASE_DTYPES:
            out.append(f"train.base_dtype = {self.base_dtype!r}: use one of {', '.join(BASE_DTYPES)}")
        return out


@dataclass(frozen=True)
class ReplayConfig:
    buffer_size: int = 256
    """Most earlier examples kept for replay across all experiences of a branch (0 turns replay off)."""
    ratio: float = 0.125
    """Share of each training batch drawn from the replay buffer (when it holds anything): with batch_size 8
    and 0.125, every step trains on 1 replayed sequence (besides the rehearsal's), and the replayed ones
    weigh their share of the loss whatever their length. (SmolLM2-135M, 4 domains: 0.125 kept forgetting at
    17-24% of naive's; 0.25 removed it but slowed learning a long new domain to 74% of naive's gain.)"""
    selection: str = "reservoir"
    """What stays in the buffer: "reservoir" (a uniform sample of everything seen, Avalanche's reservoir
    buffer) or "diversity" (per experience, the examples farthest apart in the model's own mean-pooled
    hidden states, greedy k-center with faiss)."""
    rehearsal: int = 64
    """Generation 0's own answers to up to this many general prompts (recorded once, disjoint from the
    foundation probe; answers it did not end within 160 tokens left out) are replayed in every cycle,
    beside the buffer and never in it, so that specialising keeps rehearsing what the foundation could do
    (0: none; the bundled prompt set holds 80)."""
    rehearsal_ratio: float = 0.25
    """Share of each training batch drawn from those rehearsal rows. (SmolLM2-135M, first cycle on
    python_docs, 100 steps: 0.25 kept the foundation probe within +0.3% of generation 0 and 0.125 let it
    rise 14%, for the same -16% loss on the new data.)"""

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.buffer_size <= 10_000_000:
            out.append(f"replay.buffer_size = {self.buffer_size}: use 0 (no replay) up to 10000000")
        if not 0.0 <= self.ratio < 1.0:
            out.append(f"replay.ratio = {self.ratio}: use a share from 0 up to (not including) 1, e.g. 0.125")
        if self.rehearsal < 0:
            out.append(f"replay.rehearsal = {self.rehearsal}: use 0 (no rehearsal) or a positive count, e.g. 64")
        if not 0.0 <= self.rehearsal_ratio < 1.0:
            out.append(f"replay.rehearsal_ratio = {self.rehearsal_ratio}: use a share from 0 up to (not including) 1, e.g. 0.25")
        elif 0.0 <= self.ratio < 1.0 and self.ratio + self.rehearsal_ratio >= 1.0:
            out.append(f"replay.ratio + replay.rehearsal_ratio = {self.ratio + self.rehearsal_ratio:g}: keep the sum "
                       "below 1, so that every batch trains on new data")
        if self.selection not in SELECTIONS:
            out.append(f"replay.selection = {self.selection!r}: use one of {', '.join(SELECTIONS)}")
        return out

    @property
    def enabled(self) -> bool:
        return self.buffer_size > 0 and self.ratio > 0


@dataclass(frozen=True)
class EwcConfig:
    strength: float = 1e3
    """Lambda in the penalty lambda * sum(F * (scale * B @ A)**2) on the effective weight change of every
    adapted layer (0 turns EWC off). Too high stops learning, too low forgets: tune it per model (the
    bench's SmolLM2-135M stream: 1e3 with replay; 1e4 cut forgetting further but slowed new domains)."""
    gamma: float = 0.9
    """Online decay of earlier generations' importance: F = gamma * F_old + F_new."""
    representation: str = "rank1"
    """How the diagonal Fisher of each layer is kept: "rank1" (F ~ outer(a, b), a few KB per layer, cheapest
    penalty) or "dense" (exact, as large as the layer; penalty gradient added in closed form)."""
    fisher_examples: int = 64
    """Training examples used to estimate the new generation's Fisher at the end of a cycle (0 skips it)."""
    fisher_batch_size: int = 4
    """Sequences per backward pass while estimating the Fisher (F is the mean of squared batch gradients)."""

    def problems(self) -> list[str]:
        out = []
        if not (math.isfinite(self.strength) and self.strength >= 0):
            out.append(f"ewc.strength = {self.strength}: use 0 (off) or a positive number, e.g. 1e3")
        if not 0.0 <= self.gamma <= 1.0:
            out.append(f"ewc.gamma = {self.gamma}: use a decay from 0 (forget earlier generations) to 1 (keep all)")
        if self.representation not in FISHER_REPRESENTATIONS:
            out.append(f"ewc.representation = {self.representation!r}: use one of {', '.join(FISHER_REPRESENTATIONS)}")
        if self.fisher_examples < 0:
            out.append(f"ewc.fisher_examples = {self.fisher_examples}: use 0 (skip) or more")
        if self.fisher_batch_size < 1:
            out.append(f"ewc.fisher_batch_size = {self.fisher_batch_size}: use 1 or more")
        return out

    @property
    def enabled(self) -> bool:
        return self.strength > 0


def check(*sections: TrainConfig | ReplayConfig | EwcConfig) -> None:
    """Raise one ``ConfigError`` listing every problem of the given sections."""
    problems = [p for s in sections for p in s.problems()]
    if problems:
        raise ConfigError(problems)


def to_dict(section: TrainConfig | ReplayConfig | EwcConfig) -> dict[str, Any]:
    """A JSON-ready dict of a section (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(section).items()}


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a section from a dict (e.g. job.json); unknown keys are an error that names them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError([f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(known)}"])
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to the peak over ``warmup_steps``,
    then linear decay to 10% of the peak at the last step. A function of the step alone, so a resumed run
    needs no scheduler state."""
    peak = cfg.learning_rate
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - 1 - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return peak * (1.0 - 0.9 * progress)
