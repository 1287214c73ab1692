"""Throughput of the Dreamer update: ours against TorchRL's library components and a plain-PyTorch baseline.

    python benchmarks/throughput.py --quick                 # CPU, under 3 minutes on a 2-core machine
    python benchmarks/throughput.py --device cuda           # eager, compile, bf16 and fp16 autocast
    python benchmarks/throughput.py --variants eager,compile --repeats 5 model.cnn_depth=32   # Hydra overrides last

Sizes come from the project's Hydra config (``config/``; model ``dreamer_v1``, imagination horizon, optimiser
settings; env ``dmc``: 64x64x3 pixels, 6 actions); the batch is ``--batch-size`` sequences of ``--batch-length``
steps (the paper's 50 x 50 by default). Every implementation gets the same replay-format batch, already on the
device, and for each (implementation, variant) the script times, as medians over ``--repeats`` runs after
``--warmup`` runs:

* ``full_update_s``: one full update (ours: ``DreamerUpdate.step``);
* ``world_model_update_s``: the world-model loss, its gradient and its Adam step alone;
* ``behaviour_update_s``: the actor and value losses (imagination from all ``B*T`` posterior states), their gradients
  and Adam steps alone;
* ``policy_forward_steps_per_s``: the acting policy's forward on a ``[1]`` batch (eager variant only);
* ours only: ``collector_steps_per_s`` (``DreamerPolicy`` in a TorchRL ``Collector`` over a constant-frame pixel
  env), ``replay_sample_s`` (``sample_sequences`` of one batch from ``make_replay_buffer`` holding
  ``--replay-frames`` steps in memmap, and its copy to the device) and ``replay_bytes_per_frame`` measured from the
  storage's tensors.

The implementations run round-robin, one timed call each in turn, so that load from other processes on a shared
machine affects them alike. CUDA timings synchronise before and after each call. On a CPU shared with other work,
``--threads 1`` (the ``--quick`` default) keeps timings steady: more threads than free cores make OpenMP wait on
descheduled threads and single updates take 2-5x longer at random. The last printed line is
``full update ours/torchrl: <ratio>`` (eager; below 1 means ours is faster); ``--json`` writes one record per
(implementation, variant).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project runs from its checkout
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any, Protocol  # noqa: E402

os.environ.setdefault("MUJOCO_GL", "egl")

import tensordict  # noqa: E402
import torch  # noqa: E402
import torchrl  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from tensordict import TensorDict, TensorDictBase  # noqa: E402
from torchrl.collectors import Collector  # noqa: E402
from torchrl.data import Bounded, Composite, TensorDictReplayBuffer, Unbounded  # noqa: E402
from torchrl.envs import EnvBase, StepCounter, TransformedEnv  # noqa: E402
from torchrl.envs.utils import ExplorationType, set_exploration_type  # noqa: E402

from benchmarks.plain_dreamer import PlainDreamer  # noqa: E402
from benchmarks.torchrl_dreamer import TorchRLDreamer  # noqa: E402
from utils.agent import Agent, EnvInfo, build_agent  # noqa: E402
from utils.config import compose_config as project_config  # noqa: E402
from utils.config import cpu_has_native_bf16  # noqa: E402
from utils.envs import add_recurrent_primer  # noqa: E402
from utils.replay import make_replay_buffer, sample_sequences  # noqa: E402

IMPLS = ("ours", "torchrl", "plain")
# A variant is a "+"-joined set of options, e.g. "eager", "bf16", "compile_step+bf16", "channels_last+bf16".
VARIANT_OPTIONS = ("eager", "compile", "compile_step", "bf16", "fp16", "channels_last")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
CUDA_ONLY_OPTIONS = ("fp16",)
PROFILE_TOP_OPS = 15
PAPER_BATCH = (50, 50)
# --quick keeps the paper's model, sequence length and horizon but 8 sequences per batch: one paper-size CPU update
# takes 15-60 s on a shared 2-core machine, and the three implementations need about 20 updates' worth of calls.
QUICK_BATCH = (8, 50)
EPISODE_STEPS = 501  # a DMC episode: 1000 frames at action repeat 2, plus its reset observation
REPLAY_CHUNK = 5000
QUICK_REPLAY_FRAMES, FULL_REPLAY_FRAMES = 20_000, 100_000
QUICK_POLICY_STEPS, FULL_POLICY_STEPS = 20, 200
CPU_TARGETS = (
    "targets (CPU): ours no slower than TorchRL's components (ours/torchrl <= 1), within 10% of plain (<= 1.10)"
)
CUDA_TARGETS = "targets (CUDA): ours >= 3x faster than TorchRL's components, >= 50 full updates/s at 50x50 with bf16"
TORCHRL_NOTE = (
    "torchrl: RSSMRollout has no is_first reset, l2 losses instead of Gaussian NLLs, the actor reads non-detached "
    "states, value evaluated twice, sequential loss/step order (see benchmarks/torchrl_dreamer.py)"
)


@dataclasses.dataclass
class Settings:
    """What one run measures (from the command line)."""

    device: torch.device
    batch_size: int
    batch_length: int
    repeats: int
    warmup: int
    variants: list[str]
    replay_frames: int
    policy_steps: int
    quick: bool
    overrides: list[str]
    profile: bool = False
    prefetch: int = 2
    impls: tuple[str, ...] = IMPLS
    interleave: bool = False
    compile_backend: str = "inductor"


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a variant name asks for: autocast dtype, ``compile`` (``None``, ``"losses"``: the loss modules,
    ``"step"``: the whole update step) and channels-last convolution weights."""

    name: str
    autocast: torch.dtype | None
    compile: str | None
    channels_last: bool


def parse_variant(name: str) -> Variant:
    """``"compile_step+bf16"`` -> ``Variant``; raises ``ValueError`` on an unknown or contradictory option."""
    options = name.split("+")
    unknown = [option for option in options if option not in VARIANT_OPTIONS]
    if unknown or not options:
        raise ValueError(f"unknown variant option(s) {unknown} in {name!r}; allowed: {', '.join(VARIANT_OPTIONS)}")
    dtypes = [AUTOCAST[option] for option in options if option in AUTOCAST]
    compiles = [option for option in options if option.startswith("compile")]
    if len(dtypes) > 1 or len(compiles) > 1 or ("eager" in options and len(options) > 1):
        raise ValueError(f"variant {name!r} combines options that exclude each other")
    return Variant(
        name=name,
        autocast=dtypes[0] if dtypes else None,
        compile={"compile": "losses", "compile_step": "step"}[compiles[0]] if compiles else None,
        channels_last="channels_last" in options,
    )


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The project's config with ``overrides``; the continue head is off, as on DMC (no baseline has one)."""
    return project_config(*overrides, "model.continue_head=false")


def random_pixels(shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, 256, tuple(shape), dtype=torch.uint8, generator=generator)


def make_replay_batch(batch_size: int, batch_length: int, info: EnvInfo, device: torch.device) -> TensorDict:
    """A replay-format batch ``[B, T]`` for ``info``'s env (uint8 ``"pixels"``, ``"action"``, ``"reward"``,
    ``"terminated"``, ``"is_first"``) with one episode start inside each sequence, seeded."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, batch_length)
    is_first = torch.zeros(*shape, 1, dtype=torch.bool)
    is_first[:, batch_length // 2] = True
    return TensorDict(
        {
            "pixels": random_pixels((*shape, *info.obs_shape), generator),
            "action": torch.rand(*shape, info.action_dim, generator=generator) * 2 - 1,
            "reward": torch.rand(*shape, 1, generator=generator),
            "terminated": torch.zeros(*shape, 1, dtype=torch.bool),
            "is_first": is_first,
        },
        batch_size=shape,
    ).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``call()``, synchronising the device before and after."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


class UnderTest(Protocol):
    """One implementation's update and policy, driven from a replay-format batch."""

    def full_update(self, batch: TensorDictBase) -> None: ...

    def world_model_update(self, batch: TensorDictBase) -> None: ...

    def start_states(self, batch: TensorDictBase) -> Any: ...

    def behaviour_update(self, start: Any) -> None: ...

    def policy_step(self) -> None: ...

    def parameter_counts(self) -> dict[str, int]: ...

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]: ...


def _counts(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, int]:
    return {name: sum(parameter.numel() for parameter in params) for name, params in groups.items()}


class OursUnderTest:
    """Our agent from ``utils.agent.build_agent``: ``DreamerUpdate`` and ``DreamerPolicy``."""

    def __init__(self, agent: Agent) -> None:
        self.agent, self.update = agent, agent.update
        model = agent.cfg.model
        self.policy_input = TensorDict(
            {
                agent.obs_key: random_pixels((1, *agent.info.obs_shape)),
                "deter": torch.zeros(1, model.deter_dim),
                "stoch": torch.zeros(1, model.stoch_dim),
                "prev_action": torch.zeros(1, agent.info.action_dim),
            },
            batch_size=[1],
        ).to(agent.device)

    def full_update(self, batch: TensorDictBase) -> None:
        self.update.step(batch.copy())

    def _apply(self, objectives: dict[str, torch.Tensor]) -> None:
        # The same gradient routing as DreamerUpdate.step, for a subset of the three groups.
        gradients = {name: self.update._gradient(name, loss) for name, loss in objectives.items()}
        for name, grads in gradients.items():
            self.update._apply(name, grads)

    def world_model_update(self, batch: TensorDictBase) -> None:
        self.update.world_model_step(batch.copy())

    def start_states(self, batch: TensorDictBase) -> TensorDictBase:
        with torch.no_grad(), self.update._autocast():
            return self.agent.world_model(batch.copy()).select("deter", "stoch")

    def behaviour_update(self, start: TensorDictBase) -> None:
        with self.update._autocast():
            actor_terms = self.update.actor_loss(start)
            value_terms = self.update.value_loss(actor_terms)
        self._apply({"actor": actor_terms["loss_actor"], "value": value_terms["loss_value"]})

    def policy_step(self) -> None:
        self.agent.policy(self.policy_input)

    def parameter_counts(self) -> dict[str, int]:
        return _counts(self.update.parameters)

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return self.update.parameters


class TorchRLUnderTest:
    """``benchmarks.torchrl_dreamer.TorchRLDreamer``."""

    def __init__(self, dreamer: TorchRLDreamer, info: EnvInfo) -> None:
        self.dreamer = dreamer
        self.policy_input = TensorDict(
            {
                "pixels": random_pixels((1, *info.obs_shape)),
                "state": torch.zeros(1, dreamer.stoch_dim),
                "belief": torch.zeros(1, dreamer.deter_dim),
                "prev_action": torch.zeros(1, info.action_dim),
            },
            batch_size=[1],
        ).to(dreamer.device)

    def full_update(self, batch: TensorDictBase) -> None:
        self.dreamer.step(batch)

    def world_model_update(self, batch: TensorDictBase) -> None:
        self.dreamer.world_model_step(batch)

    def start_states(self, batch: TensorDictBase) -> TensorDictBase:
        return self.dreamer.posterior_states(batch)

    def behaviour_update(self, start: TensorDictBase) -> None:
        self.dreamer.behaviour_step(start)

    def policy_step(self) -> None:
        self.dreamer.act(self.policy_input)

    def parameter_counts(self) -> dict[str, int]:
        return _counts(self.dreamer.parameters)

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return self.dreamer.parameters


class PlainUnderTest:
    """``benchmarks.plain_dreamer.PlainDreamer``: the batch's tensors, no TensorDict past this adapter."""

    def __init__(self, dreamer: PlainDreamer, info: EnvInfo, exploration_noise: float) -> None:
        self.dreamer, self.noise = dreamer, exploration_noise
        device = dreamer.device
        self.pixels = random_pixels((1, *info.obs_shape)).to(device)
        self.deter = torch.zeros(1, dreamer.deter_dim, device=device)
        self.stoch = torch.zeros(1, dreamer.stoch_dim, device=device)
        self.action = torch.zeros(1, info.action_dim, device=device)

    @staticmethod
    def _tensors(batch: TensorDictBase) -> tuple[torch.Tensor, ...]:
        return batch["pixels"], batch["action"], batch["reward"], batch["is_first"]

    def full_update(self, batch: TensorDictBase) -> None:
        self.dreamer.step(*self._tensors(batch))

    def world_model_update(self, batch: TensorDictBase) -> None:
        self.dreamer.world_model_step(*self._tensors(batch))

    def start_states(self, batch: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self.dreamer._autocast():
            _, deter, stoch = self.dreamer.world_model_loss(*self._tensors(batch))
        return deter, stoch

    def behaviour_update(self, start: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.dreamer.behaviour_step(*start)

    def policy_step(self) -> None:
        self.dreamer.act(self.pixels, self.deter, self.stoch, self.action, self.noise)

    def parameter_counts(self) -> dict[str, int]:
        return _counts(self.dreamer.parameters)

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return self.dreamer.parameters


def build_impl(
    impl: str, cfg: DictConfig, variant: str, device: torch.device, info: EnvInfo, compile_backend: str = "inductor"
) -> UnderTest:
    """Implementation ``impl`` in ``variant`` (see :func:`parse_variant`), seeded, for the environment of ``info``."""
    spec = parse_variant(variant)
    compile_losses = spec.compile == "losses"
    torch.manual_seed(0)
    if impl == "ours":
        cfg = cfg.copy()
        cfg.optimization.compile = compile_losses
        cfg.optimization.compile_backend = compile_backend
        under_test: UnderTest = OursUnderTest(build_agent(cfg, device, spec.autocast))
        stepper = under_test.update
    else:
        options = dict(
            action_dim=info.action_dim,
            channels=info.obs_shape[0],
            device=device,
            autocast_dtype=spec.autocast,
            compile=compile_losses,
        )
        if impl == "torchrl":
            under_test = TorchRLUnderTest(TorchRLDreamer(cfg.model, cfg.optimization, **options), info)
        else:
            under_test = PlainUnderTest(
                PlainDreamer(cfg.model, cfg.optimization, **options), info, cfg.collector.exploration_noise
            )
        stepper = under_test.dreamer
    if spec.channels_last:
        to_channels_last(under_test.parameter_groups())
    if spec.compile == "step":  # the whole update: losses, gradients, clipping and the Adam steps
        stepper.step = torch.compile(stepper.step, backend=compile_backend)
    return under_test


def to_channels_last(groups: dict[str, list[torch.nn.Parameter]]) -> None:
    """Stores every 4-d (convolution) weight channels-last, in place (the optimisers keep the same parameters);
    convolutions then run channels-last, since a channels-last weight makes their output channels-last."""
    for parameters in groups.values():
        for parameter in parameters:
            if parameter.dim() == 4:
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def round_robin(
    calls: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """``repeats`` timed calls of each entry, one entry after the other (rotating the order each round).

    Returns the times per entry and, for entries whose call raised, the error (they are not called again)."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, str] = {}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name in errors:
                continue
            try:
                times[name].append(timed(calls[name], device))
            except Exception as error:  # one implementation failing (e.g. under torch.compile) spares the others
                errors[name] = f"{type(error).__name__}: {error}"
    return times, errors


def measure_variant(cfg: DictConfig, variant: str, settings: Settings, info: EnvInfo) -> list[dict[str, Any]]:
    """All implementations in ``variant``: one record each (``error`` set where one failed)."""
    device = settings.device
    impls: dict[str, UnderTest] = {}
    records: dict[str, dict[str, Any]] = {}
    for impl in settings.impls:
        records[impl] = {"impl": impl, "variant": variant}
        try:
            impls[impl] = build_impl(impl, cfg, variant, device, info, settings.compile_backend)
            records[impl]["parameters"] = impls[impl].parameter_counts()
        except Exception as error:  # an implementation that cannot be built is reported, the others still run
            records[impl]["error"] = f"build failed: {type(error).__name__}: {error}"
    batch = make_replay_batch(settings.batch_size, settings.batch_length, info, device)

    def drop_failed(errors: dict[str, str], stage: str) -> None:
        for impl, error in errors.items():
            records[impl]["error"] = f"{stage} failed: {error}"
            del impls[impl]

    def calls(measure: Callable[[UnderTest, str], object]) -> dict[str, Callable[[], object]]:
        return {impl: functools.partial(measure, under_test, impl) for impl, under_test in impls.items()}

    def full(under_test: UnderTest, impl: str) -> None:
        under_test.full_update(batch)

    # Warm-up (includes torch.compile's compilation); the first call is kept as first_call_s.
    first, errors = round_robin(calls(full), 1, device)
    drop_failed(errors, "first update")
    for impl in impls:
        records[impl]["first_call_s"] = first[impl][0]
    drop_failed(round_robin(calls(full), settings.warmup - 1, device)[1], "warm-up")

    starts: dict[str, Any] = {}
    for impl, under_test in list(impls.items()):
        try:
            starts[impl] = under_test.start_states(batch)
        except Exception as error:
            drop_failed({impl: f"{type(error).__name__}: {error}"}, "posterior states")
    measures: dict[str, Callable[[UnderTest, str], object]] = {
        "full_update_s": full,
        "world_model_update_s": lambda under_test, impl: under_test.world_model_update(batch),
        "behaviour_update_s": lambda under_test, impl: under_test.behaviour_update(starts[impl]),
    }
    for key, measure in measures.items():
        if key != "full_update_s" and parse_variant(variant).compile == "losses":  # halves compile their own graphs
            drop_failed(round_robin(calls(measure), settings.warmup, device)[1], f"{key} warm-up")
        times, errors = round_robin(calls(measure), settings.repeats, device)
        drop_failed(errors, key)
        for impl in impls:
            records[impl][key] = median(times[impl])
            records[impl][f"{key.removesuffix('_s')}_times_s"] = times[impl]
    for impl, under_test in impls.items():
        records[impl]["peak_memory_bytes"] = peak_memory_bytes(functools.partial(full, under_test, impl), device)
    if settings.profile and "ours" in impls:
        records["ours"].update(profile_update(functools.partial(full, impls["ours"], "ours"), device))
    if variant == "eager":
        for impl, under_test in impls.items():
            records[impl]["policy_forward_steps_per_s"] = policy_steps_per_second(under_test, settings)
        if isinstance(impls.get("ours"), OursUnderTest):
            records["ours"]["collector_steps_per_s"] = collector_steps_per_second(impls["ours"].agent, settings)
    for record in records.values():
        if record.get("full_update_s"):
            record["full_updates_per_s"] = 1.0 / record["full_update_s"]
    return list(records.values())


def measure_interleaved(cfg: DictConfig, settings: Settings, info: EnvInfo) -> dict[tuple[str, str], list[float]]:
    """Full-update times of every (implementation, variant), all built at once and timed in turns (round-robin over
    variants too), so that a changing load on a shared machine affects every variant alike."""
    device = settings.device
    batch = make_replay_batch(settings.batch_size, settings.batch_length, info, device)
    calls = {}
    for variant in settings.variants:
        for impl in settings.impls:
            under_test = build_impl(impl, cfg, variant, device, info, settings.compile_backend)
            calls[f"{impl}|{variant}"] = functools.partial(under_test.full_update, batch)
    round_robin(calls, max(settings.warmup, 1), device)
    times, _ = round_robin(calls, settings.repeats, device)
    return {tuple(name.split("|")): values for name, values in times.items()}


def peak_memory_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    """Peak device memory allocated while ``call()`` runs (CUDA); ``None`` on a CPU, where nothing is called."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


OP_CATEGORIES = {  # operator name fragments -> category, first match wins
    "convolution": ("conv",),
    "matmul": ("addmm", "::mm", "bmm", "matmul", "linear", "gru"),
    "optimizer": ("_foreach", "adam", "clip_grad"),
    "copy/layout": ("copy_", "contiguous", "clone", "to_copy", "cat", "stack", "index", "reshape", "view"),
    "compiled graph": ("compiled", "inductor", "graph"),
}


def op_category(name: str) -> str:
    lowered = name.lower()
    return next((cat for cat, parts in OP_CATEGORIES.items() if any(p in lowered for p in parts)), "elementwise/other")


def profile_update(call: Callable[[], object], device: torch.device) -> dict[str, Any]:
    """``torch.profiler`` of one ``call()`` (a full update): total operator self time, operator calls, time per
    category (convolution, matmul, optimizer, copy/layout, elementwise/other) and the top operators by self time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        call()
        synchronize(device)
    events = [event for event in profiler.key_averages() if event.self_cpu_time_total > 0]
    total = sum(event.self_cpu_time_total for event in events) / 1e6
    categories: dict[str, float] = {}
    for event in events:
        category = op_category(event.key)
        categories[category] = categories.get(category, 0.0) + event.self_cpu_time_total / 1e6
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:PROFILE_TOP_OPS]
    return {
        "profile_self_cpu_s": total,
        "profile_op_calls": sum(event.count for event in events),
        "profile_category_share": {name: value / total for name, value in sorted(categories.items())},
        "profile_top_ops": [
            {
                "op": event.key,
                "self_cpu_s": event.self_cpu_time_total / 1e6,
                "share": event.self_cpu_time_total / 1e6 / total,
                "calls": event.count,
            }
            for event in top
        ],
    }


def policy_steps_per_second(under_test: UnderTest, settings: Settings) -> float:
    """Acting-policy forwards per second on a ``[1]`` batch (median of ``repeats`` blocks of ``policy_steps``)."""
    steps = settings.policy_steps

    def block() -> None:
        for _ in range(steps):
            under_test.policy_step()

    with set_exploration_type(ExplorationType.RANDOM):
        timed(block, settings.device)
        return steps / statistics.median(timed(block, settings.device) for _ in range(settings.repeats))


class ConstantPixelEnv(EnvBase):
    """The cheapest pixel environment: one fixed uint8 ``obs_shape`` frame, zero reward, never terminates."""

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int) -> None:
        super().__init__(batch_size=[])
        self.observation_spec = Composite(pixels=Bounded(0, 255, obs_shape, dtype=torch.uint8))
        self.action_spec = Bounded(-1.0, 1.0, (action_dim,))
        self.reward_spec = Unbounded((1,))
        self.frame = random_pixels(obs_shape)

    def _observation(self, **entries: torch.Tensor) -> TensorDict:
        false = torch.zeros(1, dtype=torch.bool)
        return TensorDict(pixels=self.frame.clone(), done=false, terminated=false.clone(), **entries)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDict:
        return self._observation()

    def _step(self, tensordict: TensorDictBase) -> TensorDict:
        return self._observation(reward=torch.zeros(1))

    def _set_seed(self, seed: int | None) -> None:
        torch.manual_seed(seed or 0)


def collector_steps_per_second(agent: Agent, settings: Settings) -> float:
    """Environment steps per second of our ``DreamerPolicy`` in a TorchRL ``Collector`` over
    ``ConstantPixelEnv`` (episodes of ``EPISODE_STEPS - 1`` steps), median over ``repeats`` batches."""
    model = agent.cfg.model
    env = TransformedEnv(ConstantPixelEnv(agent.info.obs_shape, agent.info.action_dim), StepCounter(EPISODE_STEPS - 1))
    env = add_recurrent_primer(env, model.deter_dim, model.stoch_dim, agent.info.action_dim)
    steps = settings.policy_steps
    collector = Collector(
        env,
        agent.policy,
        frames_per_batch=steps,
        total_frames=steps * (settings.repeats + 1),
        exploration_type=ExplorationType.RANDOM,
        device="cpu",
        policy_device=agent.device,
        auto_register_policy_transforms=False,
    )
    times = []
    start = time.perf_counter()
    for _ in collector:
        synchronize(settings.device)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    collector.shutdown()
    return steps / statistics.median(times[1:])


def measure_replay(
    settings: Settings, info: EnvInfo, update: Callable[[TensorDictBase], object] | None = None
) -> dict[str, Any]:
    """Fills ``make_replay_buffer`` (memmap) with ``replay_frames`` random pixel steps in DMC-length episodes, times
    ``sample_sequences`` of one batch and its copy to the device (as training does; median of ``repeats``), and
    measures the stored bytes per frame from the storage's tensors. With ``update`` it also times sampling hidden
    behind updates (:func:`measure_prefetch`)."""
    frames, batch_size, batch_length = settings.replay_frames, settings.batch_size, settings.batch_length
    with tempfile.TemporaryDirectory(prefix="dreamer-replay-") as scratch:
        buffer = make_replay_buffer(frames, batch_length, "memmap", Path(scratch))
        generator = torch.Generator().manual_seed(0)
        for start in range(0, frames, REPLAY_CHUNK):
            index = torch.arange(start, min(start + REPLAY_CHUNK, frames))
            size = index.numel()
            step = index % EPISODE_STEPS
            buffer.extend(
                TensorDict(
                    pixels=random_pixels((size, *info.obs_shape), generator),
                    action=torch.rand(size, info.action_dim, generator=generator) * 2 - 1,
                    reward=torch.rand(size, 1, generator=generator),
                    terminated=torch.zeros(size, 1, dtype=torch.bool),
                    is_first=(step == 0).unsqueeze(-1),
                    episode=index // EPISODE_STEPS,
                    step=step,
                    batch_size=[size],
                )
            )
        storage = buffer.storage
        stored = {
            ".".join(key) if isinstance(key, tuple) else key: value for key, value in storage._storage.items(True, True)
        }
        bytes_per_frame = {key: value[0].numel() * value.element_size() for key, value in stored.items()}

        def sample() -> TensorDict:
            return sample_sequences(buffer, batch_size, batch_length).to(settings.device)

        sample()
        times = [timed(sample, settings.device) for _ in range(settings.repeats)]
        total_bytes = sum(value.numel() * value.element_size() for value in stored.values())
        overlap = measure_prefetch(buffer, settings, update) if update is not None else {}
        return {
            **overlap,
            "replay_frames": len(storage),
            "replay_sample_s": median(times),
            "replay_sample_times_s": times,
            "replay_bytes_per_frame": total_bytes / storage.max_size,
            "replay_pixel_bytes_per_frame": bytes_per_frame["pixels"],
            "replay_stored_keys": sorted(stored),
        }


def measure_prefetch(
    buffer: TensorDictReplayBuffer, settings: Settings, update: Callable[[TensorDictBase], object]
) -> dict[str, Any]:
    """Sampling exposed to the training loop with and without prefetching, over ``buffer``'s steps.

    Two buffers share ``buffer``'s storage: one samples on demand, one prefetches ``settings.prefetch`` batches
    (pinned on CUDA). Each loop step samples a batch, copies it to the device (non-blocking) and runs ``update`` on
    it, as training does; the buffers take turns. ``replay_sample_exposed_s`` is the median time the loop waits for
    its batch, ``replay_step_s`` the median of sampling plus update (on a CPU the prefetching thread competes with
    the update for the cores, which this shows), per prefetch count.
    """
    device, count = settings.device, settings.prefetch
    samplers = {
        prefetch: make_replay_buffer(
            buffer.storage.max_size,
            settings.batch_length,
            buffer.storage,
            None,
            batch_size=settings.batch_size,
            prefetch=prefetch,
            pin_memory=device.type == "cuda",
        )
        for prefetch in dict.fromkeys((0, count))
    }

    def loop_step(sampler: TensorDictReplayBuffer) -> tuple[float, float]:
        synchronize(device)
        start = time.perf_counter()
        batch = sample_sequences(sampler, settings.batch_size, settings.batch_length).to(device, non_blocking=True)
        synchronize(device)
        sampled = time.perf_counter()
        update(batch)
        synchronize(device)
        return sampled - start, time.perf_counter() - start

    exposed: dict[str, list[float]] = {str(prefetch): [] for prefetch in samplers}
    steps: dict[str, list[float]] = {str(prefetch): [] for prefetch in samplers}
    for sampler in samplers.values():
        loop_step(sampler)  # warm-up: fills the prefetch queue
    for round_index in range(settings.repeats):
        order = list(samplers.items())
        for prefetch, sampler in order[round_index % 2 :] + order[: round_index % 2]:
            wait, step = loop_step(sampler)
            exposed[str(prefetch)].append(wait)
            steps[str(prefetch)].append(step)
    for sampler in samplers.values():
        sampler.shutdown()
    exposed_s = {key: median(values) for key, values in exposed.items()}
    off, on = exposed_s["0"], exposed_s[str(count)]
    return {
        "replay_prefetch": count,
        "replay_sample_exposed_s": exposed_s,
        "replay_step_s": {key: median(values) for key, values in steps.items()},
        "replay_sample_hidden_fraction": 1 - on / off if off else None,
    }


def add_speedups(records: list[dict[str, Any]]) -> None:
    """``speedup_vs_eager``: each record's full update against the same implementation's eager float32 one."""
    for key in ("full_update_s", "full_update_interleaved_s"):
        eager = {r["impl"]: r.get(key) for r in records if r["variant"] == "eager"}
        for record in records:
            base, own = eager.get(record["impl"]), record.get(key)
            record[key.replace("full_update", "speedup_vs_eager").removesuffix("_s")] = (
                base / own if base and own else None
            )


def environment_info(device: torch.device) -> dict[str, Any]:
    info = {
        "torch_version": torch.__version__,
        "torchrl_version": torchrl.__version__,
        "tensordict_version": tensordict.__version__,
        "python_version": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ratio(records: list[dict[str, Any]], variant: str, key: str, numerator: str, denominator: str) -> float | None:
    """``key`` of ``numerator`` over ``denominator`` in ``variant`` (None where either is missing)."""
    values = {r["impl"]: r.get(key) for r in records if r["variant"] == variant}
    top, bottom = values.get(numerator), values.get(denominator)
    return top / bottom if top and bottom else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(records: list[dict[str, Any]]) -> str:
    header = (
        f"{'variant':<20} {'impl':<8} {'full s':>8} {'upd/s':>7} {'x eager':>7} {'wm s':>8} {'beh s':>8} "
        f"{'peak MB':>8} {'policy/s':>9} {'collect/s':>9}  note"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(
            f"{r['variant']:<20} {r['impl']:<8} {_fmt(r.get('full_update_s')):>8} "
            f"{_fmt(r.get('full_updates_per_s'), 2):>7} {_fmt(r.get('speedup_vs_eager'), 2):>7} "
            f"{_fmt(r.get('world_model_update_s')):>8} {_fmt(r.get('behaviour_update_s')):>8} "
            f"{_fmt(_megabytes(r.get('peak_memory_bytes')), 0):>8} "
            f"{_fmt(r.get('policy_forward_steps_per_s'), 0):>9} {_fmt(r.get('collector_steps_per_s'), 0):>9}  "
            f"{r.get('error', '')}"
        )
    return "\n".join(lines)


def _megabytes(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def replay_lines(ours: dict[str, Any], settings: Settings) -> list[str]:
    """The replay measures of ``ours``' record, in words."""
    if "replay_sample_s" not in ours:
        return []
    lines = [
        f"replay: sample {settings.batch_size}x{settings.batch_length} from {ours['replay_frames']} memmap steps "
        f"{_fmt(ours['replay_sample_s'])} s; {ours['replay_bytes_per_frame']:.0f} bytes/frame stored "
        f"({ours['replay_pixel_bytes_per_frame']} pixels; keys {', '.join(ours['replay_stored_keys'])})"
    ]
    if "replay_sample_exposed_s" in ours:
        count = str(ours["replay_prefetch"])
        exposed, steps = ours["replay_sample_exposed_s"], ours["replay_step_s"]
        lines.append(
            f"replay in the loop: sampling exposed {_fmt(exposed['0'], 4)} s without prefetch, "
            f"{_fmt(exposed[count], 4)} s with prefetch {count} ({_fmt(ours['replay_sample_hidden_fraction'], 2)} "
            f"hidden); sample+update {_fmt(steps['0'])} s vs {_fmt(steps[count])} s"
        )
    return lines


def profile_lines(records: list[dict[str, Any]]) -> list[str]:
    """Ours' profile per variant: operator time by category and the five most expensive operators."""
    lines = []
    for record in records:
        if "profile_top_ops" not in record:
            continue
        shares = ", ".join(f"{name} {share:.0%}" for name, share in record["profile_category_share"].items())
        top = ", ".join(f"{op['op']} {op['share']:.0%}" for op in record["profile_top_ops"][:5])
        lines.append(
            f"profile {record['variant']} ours: {record['profile_self_cpu_s']:.3f} s operator time, "
            f"{record['profile_op_calls']} operator calls; {shares}; top: {top}"
        )
    return lines


def summary_lines(records: list[dict[str, Any]], settings: Settings) -> list[str]:
    """Ratios per variant and the targets, compared (not asserted)."""
    lines = []
    for variant in settings.variants:
        parts = []
        for key, label in (("full_update_s", "full"), ("world_model_update_s", "wm"), ("behaviour_update_s", "beh")):
            parts.append(
                f"{label} ours/torchrl {_fmt(ratio(records, variant, key, 'ours', 'torchrl'), 2)}, "
                f"ours/plain {_fmt(ratio(records, variant, key, 'ours', 'plain'), 2)}"
            )
        lines.append(f"{variant}: " + "; ".join(parts))
    for record in records:
        if record["impl"] == "ours" and record["variant"] != "eager" and record.get("speedup_vs_eager"):
            interleaved = record.get("speedup_vs_eager_interleaved")
            lines.append(
                f"ours {record['variant']}: {record['speedup_vs_eager']:.2f}x eager float32"
                + (f" ({interleaved:.2f}x timed in turns with it)" if interleaved else "")
            )
    paper = (settings.batch_size, settings.batch_length) == PAPER_BATCH
    size_note = "" if paper else f" [measured at {settings.batch_size}x{settings.batch_length}, targets are for 50x50]"
    if settings.device.type == "cpu":
        lines.append(CPU_TARGETS + size_note)
        versus_torchrl = ratio(records, "eager", "full_update_s", "ours", "torchrl")
        versus_plain = ratio(records, "eager", "full_update_s", "ours", "plain")
        lines.append(f"  eager ours/torchrl {_fmt(versus_torchrl, 2)}: {_verdict(versus_torchrl, 1.0, below=True)}")
        lines.append(f"  eager ours/plain {_fmt(versus_plain, 2)}: {_verdict(versus_plain, 1.10, below=True)}")
    else:
        lines.append(CUDA_TARGETS + size_note)
        for variant in settings.variants:
            speedup = ratio(records, variant, "full_update_s", "torchrl", "ours")
            lines.append(f"  {variant} torchrl/ours {_fmt(speedup, 2)}x: {_verdict(speedup, 3.0, below=False)}")
        bf16 = next((r for r in records if r["impl"] == "ours" and r["variant"] == "bf16"), {})
        rate = bf16.get("full_updates_per_s")
        lines.append(f"  bf16 ours {_fmt(rate, 1)} updates/s: {_verdict(rate, 50.0, below=False)}")
    return lines


def _verdict(value: float | None, threshold: float, *, below: bool) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= threshold if below else value >= threshold) else "NOT met"


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 autocast runs natively: a GPU that supports it, or a CPU with native bfloat16."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()


def default_variants(device: torch.device, quick: bool) -> list[str]:
    """Eager (only, with ``quick`` on a CPU), compile, and the autocast dtypes ``device`` runs natively."""
    variants = ["eager"] if quick and device.type == "cpu" else ["eager", "compile"]
    if bf16_supported(device):
        variants.append("bf16")
    if device.type == "cuda":
        variants.append("fp16")
    return variants


def variant_problem(variants: Sequence[str], device: torch.device) -> str | None:
    """Why ``variants`` cannot be measured on ``device`` (``None`` when they can)."""
    if not variants:
        return "no variant given"
    for variant in variants:
        try:
            spec = parse_variant(variant)
        except ValueError as error:
            return str(error)
        if device.type == "cpu" and any(option in CUDA_ONLY_OPTIONS for option in variant.split("+")):
            return "fp16 (autocast) needs --device cuda"
        if spec.autocast is torch.bfloat16 and not bf16_supported(device):
            return f"bf16 needs native bfloat16 on {device} (CPU: avx512_bf16, amx_bf16 or Arm bf16)"
    return None


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 8x50, 1 thread, fewer runs, eager only on CPU: under 3 min on 2 cores",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default 50, quick 8)")
    parser.add_argument("--batch-length", type=int, default=None, help="steps per sequence (default 50)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measure (default 5, quick 3)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed runs first (default 2, quick 1; at least 1 update is run)"
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma list of variants, each a +-joined set of eager, compile (the loss modules), compile_step (the\n"
        "whole update), bf16, fp16, channels_last; e.g. eager,bf16,compile_step+bf16 (default: eager, compile,\n"
        "and the autocast dtypes the device supports; bf16 on CPUs with native bfloat16, fp16 on CUDA only)",
    )
    parser.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma list of implementations to time (default {','.join(IMPLS)})"
    )
    parser.add_argument(
        "--interleave", action="store_true", help="also time the full updates of all variants in turns (fair ratios)"
    )
    parser.add_argument("--profile", action="store_true", help="torch.profiler of one update of ours per variant")
    parser.add_argument("--prefetch", type=int, default=2, help="batches prefetched in the replay measure (2)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor)")
    parser.add_argument("--replay-frames", type=int, default=None, help="steps in the replay buffer (20k quick, 100k)")
    parser.add_argument("--policy-steps", type=int, default=None, help="policy steps per timed block (20 quick, 200)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's, quick on CPU: 1; more threads than free cores make OpenMP\n"
        "stall and timings swing 2-5x on a shared machine)",
    )
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/results/throughput_<device>.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the project config, e.g. model.cnn_depth=16")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); use --device cpu"
        )
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: allowed: cpu, cuda, cuda:N")
    variants = default_variants(device, args.quick) if args.variants is None else args.variants.split(",")
    variants = [v.strip() for v in variants if v.strip()]
    problem = variant_problem(variants, device)
    if problem:
        parser.error(f"--variants {args.variants!r}: {problem}")
    impls = tuple(impl.strip() for impl in args.impls.split(",") if impl.strip())
    if not impls or "ours" not in impls or any(impl not in IMPLS for impl in impls):
        parser.error(f"--impls {args.impls!r}: a comma list of {', '.join(IMPLS)} that includes ours")
    if args.prefetch < 1:
        parser.error(f"--prefetch {args.prefetch}: must be at least 1")
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)
    settings = Settings(
        device=device,
        batch_size=args.batch_size or (QUICK_BATCH if args.quick else PAPER_BATCH)[0],
        batch_length=args.batch_length or (QUICK_BATCH if args.quick else PAPER_BATCH)[1],
        repeats=args.repeats or (3 if args.quick else 5),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        variants=variants,
        replay_frames=args.replay_frames or (QUICK_REPLAY_FRAMES if args.quick else FULL_REPLAY_FRAMES),
        policy_steps=args.policy_steps or (QUICK_POLICY_STEPS if args.quick else FULL_POLICY_STEPS),
        quick=args.quick,
        overrides=list(args.overrides),
        profile=args.profile,
        prefetch=args.prefetch,
        compile_backend=args.compile_backend,
        impls=impls,
        interleave=args.interleave,
    )
    json_path = args.json or ROOT / "benchmarks" / "results" / f"throughput_{device.type}.json"
    return settings, json_path


SKIPPED = "skipped: wall-clock budget spent"


def run(settings: Settings, deadline: float | None = None) -> list[dict[str, Any]]:
    """Every variant of every implementation, then the replay measures (attached to ours' first record).

    Variants not started by ``deadline`` (a ``time.perf_counter()`` value) get records with ``error`` ``SKIPPED``.
    """
    cfg = compose_config(settings.overrides)
    if not cfg.env.from_pixels:
        raise SystemExit("throughput: error: the benchmark times the pixel agent; use a pixel env (env=dmc)")
    info = EnvInfo.probe(cfg.env)
    records: list[dict[str, Any]] = []
    for variant in settings.variants:
        if deadline is not None and time.perf_counter() > deadline:
            records += [{"impl": impl, "variant": variant, "error": SKIPPED} for impl in settings.impls]
            continue
        print(f"[throughput] measuring {variant} ...", flush=True)
        records += measure_variant(cfg, variant, settings, info)
        gc.collect()  # the variant's models and graphs go before the next one is built
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    if settings.interleave:
        print("[throughput] timing full updates of all variants in turns ...", flush=True)
        interleaved = measure_interleaved(cfg, settings, info)
        for record in records:
            values = interleaved.get((record["impl"], record["variant"]))
            if values:
                record["full_update_interleaved_s"] = median(values)
                record["full_update_interleaved_times_s"] = values
    print("[throughput] measuring replay ...", flush=True)
    # Prefetching is timed against ours' update in the first variant, as a training run would use it.
    ours = build_impl("ours", cfg, settings.variants[0], settings.device, info, settings.compile_backend)
    replay = measure_replay(settings, info, ours.full_update)
    next(r for r in records if r["impl"] == "ours").update(replay)
    add_speedups(records)
    common = {
        "device": str(settings.device),
        "batch_size": settings.batch_size,
        "batch_length": settings.batch_length,
        "horizon": cfg.optimization.imagination_horizon,
        "obs_shape": list(info.obs_shape),
        "action_dim": info.action_dim,
        "model": OmegaConf.to_container(cfg.model),
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "quick": settings.quick,
        **environment_info(settings.device),
    }
    for record in records:
        record.update({key: value for key, value in common.items() if key not in record})
        if record["impl"] == "torchrl":
            record["note"] = TORCHRL_NOTE
    return records


def main(argv: Sequence[str] | None = None) -> int:
    settings, json_path = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    print(
        f"[throughput] device {settings.device}, batch {settings.batch_size}x{settings.batch_length}, "
        f"variants {','.join(settings.variants)}, {settings.warmup} warm-up + {settings.repeats} timed runs each, "
        f"{torch.get_num_threads()} CPU thread(s)",
        flush=True,
    )
    if settings.quick:
        print(
            f"[throughput] --quick: batch {settings.batch_size}x{settings.batch_length} (paper 50x50; "
            "--batch-size 50 for paper size), replay and policy blocks shortened"
            + (
                "; torch.compile skipped on CPU (inductor takes minutes on the unrolled loops)"
                if settings.device.type == "cpu" and "compile" not in settings.variants
                else ""
            )
        )
    records = run(settings)
    print(format_table(records))
    ours = next(r for r in records if r["impl"] == "ours")
    for line in replay_lines(ours, settings) + profile_lines(records):
        print(line)
    print("policy/s: acting-policy forward on a [1] batch; collect/s: ours in a TorchRL Collector, constant-frame env")
    print(TORCHRL_NOTE)
    for line in summary_lines(records, settings):
        print(line)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(records, indent=2) + "\n")
    print(f"[throughput] wrote {json_path}")
    first = "eager" if "eager" in settings.variants else settings.variants[0]
    print(f"full update ours/torchrl: {_fmt(ratio(records, first, 'full_update_s', 'ours', 'torchrl'), 3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
