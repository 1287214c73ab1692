"""Whole training runs in this process: exact resume, an episode cut by an interruption, two environments, best.pt.

Every run is ``tests.runs.TINY_RUN`` (Pendulum, tiny model, 160 frames, a few seconds) or a variant of it. A run is
interrupted with Ctrl-C (``KeyboardInterrupt``) raised in the middle of its 5th update (after its forward passes drew
latent noise, before any optimiser step): in the middle of the training phase at 80 frames (updates 4 to 6), after 4
completed updates.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensordict import TensorDict

import utils.train
from tests.runs import (
    RATE_COLUMNS,
    TINY_RUN,
    RunRecord,
    acted_by_the_policy,
    check_sequences_stay_in_episodes,
    checkpoint_state,
    differences,
    episodes_by_id,
    replay_of,
    stored_steps,
    train_in_process,
)
from tests.test_precision import fixed_batch
from utils.agent import build_agent
from utils.checkpoint import capture_rng_state, load_checkpoint, save_atomic
from utils.config import compose_config
from utils.evaluation import EpisodeResult
from utils.run_state import load_agent_state, prepare_run

INTERRUPT_AT_UPDATE = 5  # the 5th update: 4 made, 2 still owed for the phase at 80 frames
UPDATES_PER_PHASE = 3
TOTAL_UPDATES = 4 * UPDATES_PER_PHASE  # phases at 40, 80, 120 and 160 frames
# Episodes of 14 agent steps (28 frames) against collection batches of 20 steps: the interruption cuts an episode.
MISALIGNED = (*TINY_RUN, "env.max_episode_frames=28")


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-clock rate columns."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k not in RATE_COLUMNS} for row in csv.DictReader(handle)]


def interrupted_and_resumed(base: Path, overrides: tuple[str, ...]) -> SimpleNamespace:
    """A run interrupted at ``INTERRUPT_AT_UPDATE``, a copy of its directory at that point, and its resumption."""
    run_dir = base / "interrupted"
    interrupted = train_in_process(run_dir, overrides, interrupt_at_update=INTERRUPT_AT_UPDATE)
    shutil.copytree(run_dir, base / "at_interruption")
    resumed = train_in_process(run_dir, (), resume=True)
    return SimpleNamespace(
        run_dir=run_dir, at_interruption=base / "at_interruption", interrupted=interrupted, resumed=resumed
    )


# A metrics.csv row every 3 updates: the interruption (after update 4) cuts the window of the row at update 6. An
# evaluation every 40 frames: metrics.csv already holds evaluation rows (other columns) when the run is resumed.
EXACT = (*TINY_RUN, "logger.log_every=3", "logger.eval_every=40")


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``EXACT`` uninterrupted (``reference``), and the same run interrupted and resumed."""
    base = tmp_path_factory.mktemp("exact")
    runs = interrupted_and_resumed(base, EXACT)
    runs.reference_dir = base / "reference"
    runs.reference = train_in_process(runs.reference_dir, EXACT)
    return runs


def test_resume_restores_the_learner_state_of_the_interruption(exact: SimpleNamespace) -> None:
    """What ``prepare_run`` restores from ``last.pt`` is the state at the Ctrl-C: weights, optimiser moments,
    gradient scalers, RNG streams (torch, NumPy, Python) and counters."""
    moment = exact.interrupted.interrupted
    assert moment is not None, "the interruption did not happen"
    run_dir = exact.at_interruption.parent / "restore_check"
    shutil.copytree(exact.at_interruption, run_dir)
    _, agent, state = prepare_run(compose_config(f"resume={run_dir}"), run_dir)
    restored_rng = capture_rng_state()
    assert not differences(moment["agent"], agent.state_dict()), "resume must restore the network weights"
    optimisers = {k: v for k, v in moment["update"].items() if k.startswith("optimizer/")}
    scalers = {k: v for k, v in moment["update"].items() if k.startswith("grad_scaler/")}
    restored = agent.update.state_dict()
    assert optimisers["optimizer/world_model"]["state"], "the optimisers have no moments yet: nothing is checked"
    assert not differences(optimisers, {k: restored[k] for k in optimisers}), (
        "resume must restore every optimiser's moments and step counts"
    )
    assert not differences(scalers, {k: restored[k] for k in scalers}), "resume must restore the gradient scalers"
    rng_differences = differences(moment["rng"], restored_rng)
    assert not rng_differences, (
        "resume must restore the torch, NumPy and Python RNG streams as they were after the last completed update "
        f"(an update cut by Ctrl-C puts back what it drew): {rng_differences}"
    )
    assert (state.frames, state.agent_steps, state.updates, state.episodes) == (80, 40, 4, 2), (
        "resume must restore the counters of the interruption (80 frames, 4 updates)"
    )


def test_resume_restores_active_gradient_scalers(tmp_path: Path) -> None:
    """A float16 run (CUDA) has one active gradient scaler per loss; a CPU run's are disabled and their state empty,
    so the whole-run comparisons cannot see them. Here on CPU under float16 autocast: after two updates the scalers'
    state (loss scale, growth tracker) goes through a checkpoint into a fresh agent by ``load_agent_state``, what
    ``prepare_run`` calls on resume."""
    config = compose_config(*TINY_RUN)
    agents = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        agents.append(build_agent(config, torch.device("cpu"), torch.float16))
    trained, fresh = agents
    for _ in range(2):
        trained.update.step(fixed_batch(trained.info.action_dim))
    scalers = {k: v for k, v in trained.update.state_dict().items() if k.startswith("grad_scaler/")}
    assert len(scalers) == 3 and all(state["_growth_tracker"] == 2 for state in scalers.values()), scalers
    save_atomic({"agent": trained.state_dict(), "update": trained.update.state_dict()}, tmp_path / "last.pt")
    load_agent_state(fresh, load_checkpoint(tmp_path / "last.pt"))
    restored = {k: v for k, v in fresh.update.state_dict().items() if k in scalers}
    assert not differences(scalers, restored), (
        f"resume must restore the gradient scalers: saved {scalers}, restored {restored}"
    )


def test_a_resumed_run_makes_exactly_the_owed_updates_and_no_second_prefill(exact: SimpleNamespace) -> None:
    assert exact.interrupted.update_calls == INTERRUPT_AT_UPDATE
    made_before = INTERRUPT_AT_UPDATE - 1
    assert exact.resumed.update_calls == TOTAL_UPDATES - made_before, (
        "a resumed run must make exactly the updates it owes: the rest of the interrupted phase and the later ones"
    )
    # After the resume (80 frames, past the 40-frame prefill) every agent step is the policy's: no random prefill.
    assert not acted_by_the_policy(exact.reference.batches[0]), "the prefill batch looks like the policy's"
    assert all(acted_by_the_policy(batch) for batch in exact.resumed.batches), (
        "the random prefill must not be repeated after a resume"
    )
    counters = ("frames", "agent_steps", "updates", "episodes")
    reference, resumed = checkpoint_state(exact.reference_dir), checkpoint_state(exact.run_dir)
    assert [resumed["counters"][c] for c in counters] == [reference["counters"][c] for c in counters], (
        "a resumed run must end with the uninterrupted run's counters"
    )


def test_owed_updates_are_made_before_new_data_is_collected(exact: SimpleNamespace) -> None:
    """The uninterrupted run finishes a training phase before it collects the next batch; a resumed one must too."""
    remaining = exact.reference.batches_before_update[INTERRUPT_AT_UPDATE - 1 :]
    collected_before_interruption = exact.interrupted.batches_before_update[-1]
    expected = [count - collected_before_interruption for count in remaining]
    assert exact.resumed.batches_before_update == expected, (
        "exact resume: the updates owed by the interrupted phase must come before the next collection "
        f"(collector batches seen before each update: expected {expected}, got {exact.resumed.batches_before_update})"
    )


def test_the_environment_stream_continues_after_a_resume(exact: SimpleNamespace) -> None:
    """Pendulum's start states come from the environment's RNG alone: the episodes of the resumed run must start
    where the uninterrupted run's start, not replay the start states of the run's first episodes."""
    starts = {}
    for name, run_dir in (("reference", exact.reference_dir), ("resumed", exact.run_dir)):
        steps = stored_steps(run_dir)
        starts[name] = steps["observation"][steps["is_first"].squeeze(-1)]
    assert starts["reference"].shape == starts["resumed"].shape == (4, 3)
    assert torch.equal(starts["resumed"], starts["reference"]), (
        "exact resume: the environment RNG stream must continue after a resume "
        f"(episode start states, uninterrupted {starts['reference'].tolist()}, resumed {starts['resumed'].tolist()})"
    )


def test_an_interrupted_and_resumed_run_ends_as_the_uninterrupted_one(exact: SimpleNamespace) -> None:
    """Equal on CPU with one thread, bit for bit: weights, optimiser moments, gradient scalers, RNG streams,
    counters, the replay buffer and metrics.csv (all but the wall-clock rate columns)."""
    found = differences(checkpoint_state(exact.reference_dir), checkpoint_state(exact.run_dir), "checkpoint")
    found += differences(stored_steps(exact.reference_dir).to_dict(), stored_steps(exact.run_dir).to_dict(), "replay")
    reference_rows, resumed_rows = metrics_rows(exact.reference_dir), metrics_rows(exact.run_dir)
    found += [
        f"metrics.csv row {index}"
        for index, (expected, got) in enumerate(zip(reference_rows, resumed_rows, strict=False))
        if expected != got
    ]
    if len(reference_rows) != len(resumed_rows):
        found.append(f"metrics.csv: {len(reference_rows)} rows != {len(resumed_rows)}")
    assert not found, (
        f"exact resume: the interrupted and resumed run differs from the uninterrupted one in {len(found)} places: "
        + ", ".join(found[:12])
    )


@pytest.fixture(scope="module")
def cut(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``MISALIGNED`` interrupted in the middle of an episode, and resumed."""
    return interrupted_and_resumed(tmp_path_factory.mktemp("cut"), MISALIGNED)


def test_an_episode_cut_by_an_interruption_is_closed_and_the_next_one_starts_afresh(cut: SimpleNamespace) -> None:
    recorder = load_checkpoint(cut.at_interruption)["counters"]["recorder"]
    assert not recorder["needs_reset"][0], "the interruption fell between episodes: nothing is checked"
    cut_episode, next_id = int(recorder["episode"][0]), int(recorder["next_episode_id"])
    before, after = stored_steps(cut.at_interruption), stored_steps(cut.run_dir)
    count = before.shape[0]
    assert not differences(before.to_dict(), after[:count].to_dict()), "a resume must not alter the stored steps"
    resumed = after[count:]
    assert resumed["is_first"][0].item() and resumed["step"][0].item() == 0, (
        "the first episode after a resume must start with an is_first step"
    )
    assert resumed["episode"][0].item() == next_id, "the first episode after a resume must get a new episode id"
    assert cut_episode not in resumed["episode"].tolist(), "the episode cut by the interruption must stay closed"
    assert not set(before["episode"].tolist()) & set(resumed["episode"].tolist()), (
        "an episode id continues across the resume"
    )
    episodes_by_id(after)  # every episode counts its steps from 0, with is_first exactly at its first step
    check_sequences_stay_in_episodes(replay_of(cut.run_dir), batch_size=8, batch_length=6)


def stream_episodes(batches: list[TensorDict]) -> list[torch.Tensor]:
    """Each environment's episodes (observations ``[n, 3]``, the reset one first), rebuilt from collector batches."""
    stream = TensorDict.cat([batch if batch.batch_dims == 2 else batch.unsqueeze(0) for batch in batches], dim=1)
    episodes = []
    for env in range(stream.shape[0]):
        current = [stream["observation"][env, 0]]
        for t in range(stream.shape[1]):
            current.append(stream["next", "observation"][env, t])
            if stream["next", "done"][env, t].item():
                episodes.append(torch.stack(current))
                current = [stream["observation"][env, t + 1]] if t + 1 < stream.shape[1] else []
        if current:
            episodes.append(torch.stack(current))
    return episodes


def sorted_by_content(episodes: list[torch.Tensor]) -> list[list[float]]:
    return sorted(episode.flatten().tolist() for episode in episodes)


@pytest.fixture(scope="module")
def two_envs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    run_dir = tmp_path_factory.mktemp("two_envs") / "run"
    # An evaluation every 40 frames: the first comes before either environment has finished an episode.
    overrides = (*MISALIGNED, "env.num_envs=2", "logger.eval_every=40")
    return SimpleNamespace(run_dir=run_dir, record=train_in_process(run_dir, overrides))


def test_two_environments_end_to_end(two_envs: SimpleNamespace) -> None:
    """Each stored episode is exactly one environment's episode (as the collector delivered it), and the
    counters count the steps of both environments."""
    record: RunRecord = two_envs.record
    assert all(batch.shape == (2, 10) for batch in record.batches), [batch.shape for batch in record.batches]
    counters = load_checkpoint(two_envs.run_dir)["counters"]
    collected = sum(batch.numel() for batch in record.batches)
    assert (counters["agent_steps"], counters["frames"]) == (collected, 2 * collected) == (80, 160)
    assert counters["episodes"] == sum(int(batch["next", "done"].sum()) for batch in record.batches) > 0
    assert counters["updates"] == TOTAL_UPDATES
    assert [acted_by_the_policy(batch) for batch in record.batches] == [False, True, True, True], (
        "after the 40-frame prefill the policy must act in both environments"
    )
    stored = episodes_by_id(stored_steps(two_envs.run_dir))
    assert sorted_by_content(list(stored.values())) == sorted_by_content(stream_episodes(record.batches)), (
        "with num_envs > 1 each stored episode must be one environment's episode, in order"
    )
    check_sequences_stay_in_episodes(replay_of(two_envs.run_dir), batch_size=8, batch_length=6)
    assert sorted(record.env_seeds["train"]) == [0, 1], "the two training environments must get their own seeds"


def test_evaluation_environments_never_share_a_seed_with_training_ones(
    exact: SimpleNamespace, two_envs: SimpleNamespace
) -> None:
    for record in (exact.reference, two_envs.record):
        train, evaluation = set(record.env_seeds["train"]), set(record.env_seeds["eval"])
        assert train and len(record.env_seeds["eval"]) >= 2, record.env_seeds
        assert not train & evaluation, f"evaluation environments share seeds {train & evaluation} with training"


def test_best_checkpoint_changes_only_on_a_new_best_return(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluations at 40, 80, 120 and 160 frames return -5, -7, -5 (a tie) and -3: best.pt is written twice."""
    returns = iter([-5.0, -7.0, -5.0, -3.0])
    monkeypatch.setattr(
        utils.train,
        "evaluate_policy",
        lambda agent, episodes, seed_offset: [EpisodeResult(next(returns), 20, TensorDict({}, []))],
    )
    saved = []
    save = utils.train.save_run_checkpoint

    def spy(path: Path, cfg, agent, state, replay, recorder) -> None:
        saved.append((path.name, state.frames, state.best_eval_return))
        save(path, cfg, agent, state, replay, recorder)

    monkeypatch.setattr(utils.train, "save_run_checkpoint", spy)
    train_in_process(tmp_path / "run", (*TINY_RUN, "logger.eval_every=40", "optimization.train_steps=1"))
    assert [entry for entry in saved if entry[0] == "best.pt"] == [("best.pt", 40, -5.0), ("best.pt", 160, -3.0)], (
        "best.pt must be written at a new best evaluation return only (not on a tie or a worse one)"
    )
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["counters"]
    assert (best["frames"], best["best_eval_return"], best["last_eval_return"]) == (160, -3.0, -3.0)
    assert np.isclose(load_checkpoint(tmp_path / "run")["counters"]["best_eval_return"], -3.0)
