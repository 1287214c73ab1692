"""The throughput benchmark at tiny sizes: it runs, writes valid JSON, and its baselines do what they claim.

No wall-clock assertions: timings on a shared machine say nothing about correctness.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from omegaconf import DictConfig

from benchmarks.plain_dreamer import PlainDreamer
from benchmarks.throughput import (
    IMPLS,
    OursUnderTest,
    build_impl,
    compose_config,
    main,
    make_replay_batch,
    op_category,
    parse_variant,
    ratio,
)
from utils.agent import EnvInfo

TINY = ["experiment=debug"]
TINY_RUN = [
    "--batch-size", "2", "--batch-length", "3", "--repeats", "1", "--warmup", "0",
    "--replay-frames", "600", "--policy-steps", "2", "--variants", "eager",
]  # fmt: skip
REQUIRED_KEYS = ("impl", "variant", "device", "batch_size", "batch_length", "full_update_s")


@pytest.fixture(scope="module")
def tiny_cfg() -> DictConfig:
    return compose_config(TINY)


@pytest.fixture(scope="module")
def tiny_info(tiny_cfg: DictConfig) -> EnvInfo:
    return EnvInfo.probe(tiny_cfg.env)


def copy_ours_into_plain(ours: OursUnderTest, plain: PlainDreamer) -> None:
    """Loads our networks' weights into the plain baseline's (same architecture, different module layout)."""
    world_model, nets = ours.agent.world_model, plain.nets
    nets.encoder.load_state_dict(world_model.encoder.convs.state_dict())
    decoder = {"0.weight": world_model.decoder.linear.weight, "0.bias": world_model.decoder.linear.bias}
    for key, value in world_model.decoder.deconvs.state_dict().items():
        index, name = key.split(".")
        decoder[f"{int(index) + 2}.{name}"] = value
    nets.decoder.load_state_dict(decoder)
    prior = world_model.rssm.prior
    nets.prior_input.load_state_dict(prior.input_layer.state_dict())
    nets.gru.load_state_dict(prior.gru.state_dict())
    nets.prior_output.load_state_dict(prior.output_layer.state_dict())
    nets.posterior.load_state_dict(world_model.rssm.posterior.net.state_dict())
    nets.reward.load_state_dict(world_model.reward_head.state_dict())
    nets.actor.load_state_dict(ours.agent.actor.net.state_dict())
    nets.value.load_state_dict(ours.agent.value.state_dict())


def test_plain_baseline_computes_our_losses_and_gradients(tiny_cfg: DictConfig, tiny_info: EnvInfo) -> None:
    device = torch.device("cpu")
    ours = build_impl("ours", tiny_cfg, "eager", device, tiny_info)
    plain = build_impl("plain", tiny_cfg, "eager", device, tiny_info).dreamer
    copy_ours_into_plain(ours, plain)
    batch = make_replay_batch(3, 6, tiny_info, device)

    # Same seed, same order of random draws (posterior samples, then actor noise and prior samples per step).
    torch.manual_seed(1)
    world_terms, actor_terms, value_terms = ours.update.losses(batch.copy())
    our_losses = {
        "world_model": world_terms["loss_world_model"],
        "actor": actor_terms["loss_actor"],
        "value": value_terms["loss_value"],
    }
    torch.manual_seed(1)
    world_model_loss, deter, stoch = plain.world_model_loss(
        batch["pixels"], batch["action"], batch["reward"], batch["is_first"]
    )
    actor_loss, value_loss = plain.behaviour_losses(deter.detach(), stoch.detach())
    plain_losses = {"world_model": world_model_loss, "actor": actor_loss, "value": value_loss}

    for name in our_losses:
        torch.testing.assert_close(plain_losses[name], our_losses[name], rtol=1e-5, atol=1e-5)
        our_grads = torch.autograd.grad(our_losses[name], ours.update.parameters[name], retain_graph=True)
        plain_grads = torch.autograd.grad(plain_losses[name], plain.parameters[name], retain_graph=True)
        our_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in our_grads]))
        plain_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in plain_grads]))
        torch.testing.assert_close(plain_norm, our_norm, rtol=1e-4, atol=1e-6)


def test_the_three_implementations_have_the_same_sizes(tiny_cfg: DictConfig, tiny_info: EnvInfo) -> None:
    counts = {
        impl: build_impl(impl, tiny_cfg, "eager", torch.device("cpu"), tiny_info).parameter_counts() for impl in IMPLS
    }
    assert counts["ours"]["world_model"] > 0
    assert counts["torchrl"] == counts["ours"] == counts["plain"]


def test_a_tiny_run_prints_the_ratio_last_and_writes_valid_json(tmp_path, capsys, tiny_info: EnvInfo) -> None:
    path = tmp_path / "out.json"
    assert main([*TINY_RUN, "--json", str(path), *TINY]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"full update ours/torchrl: (\d+\.\d+)", lines[-1])
    assert match is not None, lines[-1]

    records = json.loads(path.read_text())
    assert sorted(r["impl"] for r in records) == sorted(IMPLS)
    for record in records:
        assert "error" not in record, record["error"]
        assert all(key in record for key in REQUIRED_KEYS)
        assert (record["variant"], record["device"], record["batch_size"], record["batch_length"]) == (
            "eager",
            "cpu",
            2,
            3,
        )
        assert record["full_update_s"] > 0 and record["world_model_update_s"] > 0 and record["behaviour_update_s"] > 0
        assert record["policy_forward_steps_per_s"] > 0
    by_impl = {r["impl"]: r for r in records}
    assert float(match.group(1)) == pytest.approx(
        by_impl["ours"]["full_update_s"] / by_impl["torchrl"]["full_update_s"], abs=1e-3
    )

    ours = by_impl["ours"]
    assert ours["collector_steps_per_s"] > 0 and ours["replay_sample_s"] > 0
    assert ours["replay_frames"] == 600
    # One uint8 64x64x3 frame per stored step and no ("next", ...) copy; beside it the action (float32), reward
    # (float32), terminated and is_first (bool), episode and step (int64), and TorchRL's int64 "index".
    assert ours["replay_pixel_bytes_per_frame"] == 3 * 64 * 64
    assert ours["replay_bytes_per_frame"] == 3 * 64 * 64 + 4 * tiny_info.action_dim + 4 + 1 + 1 + 3 * 8
    assert not any(key.startswith("next") for key in ours["replay_stored_keys"])
    # Sampling in the training loop, on demand and prefetched (2 batches by default); no GPU, no peak memory.
    assert ours["replay_prefetch"] == 2
    assert set(ours["replay_sample_exposed_s"]) == set(ours["replay_step_s"]) == {"0", "2"}
    assert all(ours["replay_step_s"][k] >= ours["replay_sample_exposed_s"][k] > 0 for k in ("0", "2"))
    assert all(record["peak_memory_bytes"] is None for record in records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_fails_with_a_clear_message(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_float16_autocast_is_refused_on_cpu(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--variants", "eager,compile_step+fp16"])
    assert "fp16 (autocast) needs --device cuda" in capsys.readouterr().err


def test_ratio_divides_the_named_implementations_within_a_variant() -> None:
    records = [
        {"impl": "ours", "variant": "eager", "full_update_s": 3.0},
        {"impl": "torchrl", "variant": "eager", "full_update_s": 4.0},
        {"impl": "ours", "variant": "compile", "full_update_s": 1.0},
        {"impl": "torchrl", "variant": "compile", "error": "build failed"},
    ]
    assert ratio(records, "eager", "full_update_s", "ours", "torchrl") == 0.75
    assert ratio(records, "compile", "full_update_s", "ours", "torchrl") is None


def test_variant_names_combine_precision_compilation_and_memory_format() -> None:
    spec = parse_variant("compile_step+bf16+channels_last")
    assert (spec.autocast, spec.compile, spec.channels_last) == (torch.bfloat16, "step", True)
    assert parse_variant("compile").compile == "losses" and parse_variant("eager").autocast is None
    for bad in ("fast", "bf16+fp16", "compile+compile_step", "eager+bf16"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_channels_last_keeps_the_optimised_parameters_and_the_update(tiny_cfg: DictConfig, tiny_info: EnvInfo) -> None:
    """Channels-last weights are the same parameters (the optimisers still step them) and give the same losses."""
    device = torch.device("cpu")
    eager = build_impl("ours", tiny_cfg, "eager", device, tiny_info)
    channels_last = build_impl("ours", tiny_cfg, "channels_last", device, tiny_info)
    convolutions = [p for p in channels_last.update.parameters["world_model"] if p.dim() == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    optimised = {
        id(p) for group in channels_last.update.optimizers["world_model"].param_groups for p in group["params"]
    }
    assert {id(p) for p in convolutions} <= optimised
    batch = make_replay_batch(3, 6, tiny_info, device)
    torch.manual_seed(1)
    expected = eager.update.step(batch.copy())
    torch.manual_seed(1)
    got = channels_last.update.step(batch.copy())
    for name in ("loss/world_model", "loss/actor", "loss/value"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def test_compile_step_compiles_the_whole_update_of_every_implementation(
    tiny_cfg: DictConfig, tiny_info: EnvInfo
) -> None:
    """The wrapper only (running it takes minutes on a CPU): each implementation's step becomes a compiled one."""
    for impl in IMPLS:
        under_test = build_impl(impl, tiny_cfg, "compile_step", torch.device("cpu"), tiny_info, "eager")
        stepper = under_test.update if impl == "ours" else under_test.dreamer
        assert hasattr(stepper.step, "_torchdynamo_orig_callable"), f"{impl}: step is not compiled"


def test_profiled_operators_fall_into_the_reported_categories() -> None:
    assert op_category("aten::convolution_backward") == "convolution"
    assert op_category("aten::addmm") == op_category("aten::mm") == "matmul"
    assert op_category("aten::_foreach_add_") == "optimizer"
    assert op_category("aten::tanh") == "elementwise/other"
