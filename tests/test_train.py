import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, SAMPLE, tiny_config
from safetensors.torch import load_file

from minimind.config import ConfigError, build_config, model_config
from minimind.data.dataset import collate
from minimind.model import count_parameters
from minimind.model.checkpoint import load_model
from minimind.train.compute import model_flops_per_token
from minimind.train.cooldown import cooldown_steps
from minimind.train.loop import Trainer, train
from minimind.train.metrics import peak_bf16_tflops
from minimind.train.objectives import DPO
from minimind.train.schedule import learning_rate


def weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def max_diff(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A tiny model pretrained for a few dozen steps: a teacher that is far from uniform."""
    directory = tmp_path_factory.mktemp("trained")
    train(tiny_config(directory, optim={"batch_size": 16, "lr": 1e-2, "max_steps": 40}))
    return directory


def test_pretrain_loss_falls_20_percent_within_100_steps(pretrained_run):
    _, result, _ = pretrained_run
    losses = [m["loss"] for m in result.history if "loss" in m]
    assert len(losses) == 100
    assert losses[0] == pytest.approx(math.log(6400), abs=0.1)  # an untrained model is near uniform
    # Smoothed over 5 steps so a single lucky batch cannot pass the test.
    smoothed = [sum(losses[i - 5 : i]) / 5 for i in range(5, len(losses) + 1)]
    print(f"first loss {losses[0]:.3f}, best 5-step mean {min(smoothed):.3f} ({min(smoothed) / losses[0]:.1%})")
    # From uniform (ln 6400 = 8.76) a 20% fall is 1.75 nats, far beyond batch-to-batch noise (the smoothed
    # loss of a loop that does not learn stays within ~0.1 of the start); this run falls about 23%.
    assert min(smoothed) <= 0.8 * losses[0], (losses[0], min(smoothed))


def test_resume_equals_uninterrupted_run(tmp_path):
    sections = dict(
        stage="sft",
        model={"dropout": 0.1},
        data={"train_files": [str(SAMPLE / "sft.jsonl")]},
        optim={"batch_size": 4, "grad_accum_steps": 2, "max_steps": 6, "warmup_steps": 2},
        checkpoint={"every_steps": 3},
    )
    straight = Trainer(tiny_config(tmp_path / "a", **sections))
    uninterrupted = straight.fit()
    first = Trainer(tiny_config(tmp_path / "b", **sections))
    first.fit(stop_at_step=3)
    del first
    # Written before ModelConfig had a field (depth_transfer here): it resumes with the field's default.
    meta_file = tmp_path / "b" / "step_00000003" / "model.json"
    meta = json.loads(meta_file.read_text())
    del meta["model"]["depth_transfer"]
    meta_file.write_text(json.dumps(meta))
    resumed = Trainer(tiny_config(tmp_path / "b", **sections))
    result = resumed.fit()
    assert result.steps == 6 and result.history[0]["step"] == 4
    # The trained-token count (Tune's time axis) carries over: the same at every step as uninterrupted.
    assert [m["tokens"] for m in result.history] == [m["tokens"] for m in uninterrupted.history[3:]]
    counts = [m["tokens"] for m in uninterrupted.history]
    assert counts[0] > 0 and all(a < b for a, b in zip(counts, counts[1:]))
    assert max_diff(weights(straight.model), weights(resumed.model)) < 1e-6
    saved = load_file(str(tmp_path / "b" / "step_00000006" / "model.safetensors"))
    assert all(tensor.dtype == torch.float32 for tensor in saved.values())
    # Another model is refused, naming what differs.
    other = {**sections, "model": {"dropout": 0.2}}
    with pytest.raises(ValueError, match=r"model\.dropout 0\.1 there, 0\.2 here"):
        Trainer(tiny_config(tmp_path / "b", **other)).fit()


def test_a_run_directory_stands_for_the_checkpoint_latest_names_else_its_newest_complete_one(tmp_path):
    from minimind.model.checkpoint import META_FILE, checkpoint_location

    run = tmp_path / "run"
    for name, complete in (("step_00000005", True), ("step_00000010", True), ("step_00000015", False)):
        (run / name).mkdir(parents=True)
        if complete:
            (run / name / META_FILE).write_text("{}")
    checkpoint = run / "step_00000005"
    assert checkpoint_location(checkpoint) == str(checkpoint)  # a checkpoint stands for itself
    (run / "latest").write_text("step_00000005\n")
    assert checkpoint_location(run) == str(checkpoint)  # the pointer wins over newer folders
    # No pointer (a run cut short before writing it): the newest folder holding its model.json; step 15's
    # write never finished.
    (run / "latest").unlink()
    assert checkpoint_location(run) == str(run / "step_00000010")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        checkpoint_location(run / "step_00000015")


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path):
    config = tiny_config(tmp_path, optim={"max_steps": 2}, checkpoint={"every_steps": 1})
    Trainer(config).fit(stop_at_step=1)
    (tmp_path / ".tmp-step_00000002").mkdir()  # a crash mid-write
    resumed = Trainer(tiny_config(tmp_path, optim={"max_steps": 2}, checkpoint={"every_steps": 1}))
    assert resumed.fit().history[0]["step"] == 2
    assert (tmp_path / "latest").read_text() == "step_00000002"


def test_accumulation_averages_over_all_targets_of_the_step():
    # Random (ungrouped) batches, so the batch of 8 is exactly the two batches of 4. Gradients are
    # compared before the optimizer step: AdamW's first update is ~lr * sign(g), which turns fp32
    # rounding noise in near-zero gradient entries into full-size differences.
    data = {"train_files": [str(SAMPLE / "sft.jsonl")], "seq_len": 96, "group_by_length": False}
    whole = Trainer(tiny_config(stage="sft", data=data, optim={"batch_size": 8, "max_steps": 1}))
    whole.accumulate_gradients(0)
    split = Trainer(tiny_config(stage="sft", data=data, optim={"batch_size": 4, "grad_accum_steps": 2, "max_steps": 1}))
    split.accumulate_gradients(0)
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        # Both are the mean over the same ~600 target tokens, summed in a different order and
        # grouping: fp32 reduction error is a few ulps (2^-24 ~ 6e-8) times the accumulated
        # magnitude, so 1e-5 of the tensor's largest entry bounds it with room; a wrong
        # normalisation (e.g. a mean of per-micro-batch means) is off by percents.
        scale = a.grad.abs().max().item()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_schedule_warms_up_then_decays_to_the_floor():
    optim = tiny_config(optim={"lr": 1.0, "min_lr_ratio": 0.1, "warmup_steps": 10}).optim
    lrs = [learning_rate(step, 110, optim) for step in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert learning_rate(110, 110, optim) == pytest.approx(0.1)
    # Warmup-stable-decay: 110 steps, the last 20% (22) decay; step k of the decay is (k + 1) / 22 into it.
    for shape, left in (("sqrt", lambda p: 1 - math.sqrt(p)), ("linear", lambda p: 1 - p),
                        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p)))):  # fmt: skip
        wsd = tiny_config(optim={"lr": 1.0, "min_lr_ratio": 0.1, "warmup_steps": 10, "schedule": "wsd",
                                 "decay_shape": shape}).optim  # fmt: skip
        lrs = [learning_rate(step, 110, wsd) for step in range(110)]
        assert lrs[0] == pytest.approx(0.1) and lrs[10:88] == [1.0] * 78
        for step in (88, 98, 109):
            assert lrs[step] == pytest.approx(0.1 + 0.9 * left((step - 87) / 22)), (shape, step)
        assert lrs[109] == pytest.approx(0.1)
        # Until the decay begins the lr does not depend on the run's length.
        assert [learning_rate(step, 500, wsd) for step in range(88)] == lrs[:88]


WSD = {"schedule": "wsd", "decay_fraction": 0.2, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2}
EVAL = {"val_fraction": 0.05, "max_examples": 8, "continuation_docs": 2, "every_steps": 4}


def test_cooldown_evaluations_leave_the_run_as_it_was_and_score_the_shorter_run(tmp_path):
    # Dropout: the branch draws from the RNG streams the run goes on with, so they must be put back too.
    common = dict(model={"dropout": 0.1}, logging={"every_steps": 4})
    cooled = Trainer(tiny_config(optim={**WSD, "max_steps": 12}, eval={**EVAL, "cooldown_fraction": 0.25}, **common))
    cooled_result = cooled.fit()
    plain = Trainer(tiny_config(optim={**WSD, "max_steps": 12}, eval=EVAL, **common))
    plain_rows = {row["step"]: row for row in plain.fit().history if "val_loss" in row}
    # The same operations in the same order on one CPU: bit for bit, not merely close.
    assert all(torch.equal(a, b) for a, b in zip(cooled.model.state_dict().values(), plain.model.state_dict().values()))
    rows = {row["step"]: row for row in cooled_result.history if "val_loss" in row}
    # Decay of the 12-step run: its last round(0.2 * 12) = 2 steps (10, 11), so steps 4 and 8 are stable
    # and branch round(0.25 * 4) = 1 and round(0.25 * 8) = 2 steps; step 12 is the run's end, not branched.
    assert [(step, rows[step].get("cooldown_steps")) for step in sorted(rows)] == [(4, 1), (8, 2), (12, None)]
    assert rows[8]["val_loss"] != rows[8]["val_loss_stable"]
    # The branch at step 8 decays over 2 steps, as the 10-step run decays over its last round(0.2 * 10) = 2:
    # same batches, lrs, optimizer state and dropout draws, so its value is that run's final value exactly.
    short = Trainer(tiny_config(optim={**WSD, "max_steps": 10}, eval=EVAL, **common)).fit()
    assert rows[8]["val_loss"] == short.final_eval["val_loss"]
    assert rows[8]["duration_tokens"] == short.history[-1]["tokens"]
    # The stable value is the plain run's evaluation at step 8. Packed pretraining blocks have no padding:
    # 8 x 64 = 512 tokens a step; the run's position counts its own steps, the branches' (1 + 2) apart.
    assert rows[8]["val_loss_stable"] == plain_rows[8]["val_loss"]
    assert (rows[8]["tokens"], rows[8]["duration_tokens"], rows[12]["cooldown_tokens"]) == (8 * 512, 10 * 512, 3 * 512)
    # In the warmup there is no branch: it would decay from the peak lr, which the run has not reached. With a
    # 10-step warmup the lr of step s is (s + 1) / 10 of the peak, so the peak comes at step 9, the first branched.
    warming = SimpleNamespace(config=tiny_config(optim={**WSD, "warmup_steps": 10}, eval={"cooldown_fraction": 0.25}),
                              total_steps=100)  # fmt: skip
    assert [cooldown_steps(warming, step) for step in (4, 8, 9, 12)] == [0, 0, 2, 3]


def test_next_steps_batches_are_collated_ahead_on_another_thread_and_are_the_steps_own():
    import threading

    trainer = Trainer(tiny_config(optim={"max_steps": 12, "grad_accum_steps": 2}))
    collated_by = {}
    collate_step = trainer.step_batches._collate_step

    def recording(step):
        collated_by.setdefault(step, []).append(threading.current_thread().name)
        return collate_step(step)

    trainer.step_batches._collate_step = recording
    # A run's order with a cooldown branch after step 3 (it trains steps 4 and 5, then the run goes on from 4).
    for step in (0, 1, 2, 3, 4, 5, 4, 5, 6):
        got = trainer.step_batches(step)
        expected = [collate([trainer.examples[i] for i in indices], trainer.tokenizer.pad_id)
                    for indices in trainer.micro_batches(step)]  # fmt: skip
        assert len(got) == len(expected) == 2
        assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(got, expected))
    trainer.step_batches.close()
    # Step 0 and the step the run goes back to (4, whose prefetched successor 6 was not it) are collated on
    # the spot; every other step was collated ahead, on the prefetch thread, while its predecessor trained.
    on_the_spot = {step for step, names in collated_by.items() if "MainThread" in names}
    assert on_the_spot == {0, 4}
    assert all(name.startswith("minimind-batches") for step in (1, 2, 3, 5, 6) for name in collated_by[step][:1])


def test_a_wsd_run_extended_before_its_decay_continues_its_stable_phase(tmp_path):
    sections = dict(logging={"every_steps": 2}, checkpoint={"every_steps": 6})
    Trainer(tiny_config(tmp_path / "short", optim={**WSD, "max_steps": 10}, **sections)).fit(stop_at_step=6)
    # Extended to 20 steps while still stable (the 10-step run decays from step 8): as if it had been 20 all along.
    extended = Trainer(tiny_config(tmp_path / "short", optim={**WSD, "max_steps": 20}, **sections))
    extended.fit()
    straight = Trainer(tiny_config(tmp_path / "long", optim={**WSD, "max_steps": 20}, **sections))
    straight.fit()
    assert max_diff(weights(extended.model), weights(straight.model)) < 1e-6
    # Past the decay's start the lr of steps already trained would change: refused, naming the way out.
    Trainer(tiny_config(tmp_path / "decayed", optim={**WSD, "max_steps": 10}, **sections)).fit()
    with pytest.raises(ValueError, match=r"step 10 of a 10-step run; this run has 20 steps.*init_from"):
        Trainer(tiny_config(tmp_path / "decayed", optim={**WSD, "max_steps": 20}, **sections)).fit()


def test_metrics_report_padding_throughput_and_mfu(tmp_path):
    config = tiny_config(
        tmp_path,
        stage="sft",
        data={"train_files": [str(SAMPLE / "sft.jsonl")], "group_by_length": False},
        logging={"gpu_peak_tflops": 1.0},
    )
    sft = train(config)
    assert all(0 < m["padding_fraction"] < 1 and m["tokens_per_second"] > 0 for m in sft.history)
    # MFU: one worker's FLOP/s (FLOPs per token checked by hand below) over the 1 TFLOP/s peak given.
    per_token = model_flops_per_token(config)
    expected = [m["tokens_per_second"] * per_token / 1e12 for m in sft.history]
    assert [m["mfu"] for m in sft.history] == pytest.approx(expected)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4] and {"loss", "lr", "grad_norm"} <= set(logged[0])
    pretrain = train(tiny_config())
    assert all(m["padding_fraction"] == 0 for m in pretrain.history[:-1])


def test_moe_pretrain_loss_falls_and_step_one_balance_loss_is_minimind_s():
    config = tiny_config(model={"moe": {"enabled": True}}, optim={"max_steps": 4, "lr": 1e-2, "warmup_steps": 1})
    trainer = Trainer(config)
    # Step 1's batch through the untrained model as the objective feeds it, the routers' logits caught.
    batch = collate([trainer.examples[i] for i in trainer.micro_batches(0)[0]], trainer.tokenizer.pad_id)
    router_logits = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda module, inputs, out: router_logits.append(out.detach()))
        for layer in trainer.model.model.layers
    ]
    with torch.no_grad():
        trainer.objective(trainer.model.train(), batch)
    for hook in hooks:
        hook.remove()
    history = trainer.fit().history
    # MiniMind2's sequence-level balance loss (seq_aux), by hand: per layer and sequence, each expert's
    # count of the routed slots over the count uniform routing gives it, times the expert's mean router
    # probability over the sequence; summed over experts, averaged over sequences, times alpha.
    moe = config.model.moe
    sequences, length = batch["input_ids"].shape
    expected = 0.0
    for logits in router_logits:
        probabilities = logits.float().softmax(-1).view(sequences, length, moe.num_routed_experts)
        for sequence in probabilities:
            chosen = sequence.topk(moe.top_k, dim=-1).indices.flatten().tolist()
            for expert in range(moe.num_routed_experts):
                load = chosen.count(expert) / (length * moe.top_k / moe.num_routed_experts)
                expected += moe.aux_loss_alpha * load * sequence[:, expert].mean().item() / sequences
    assert len(router_logits) == config.model.num_layers
    assert history[0]["aux_loss"] == pytest.approx(expected, rel=1e-5)
    # From ln 6400 = 8.77 this run's loss falls ~0.55 in 4 steps; a model that does not learn stays within ~0.1.
    assert history[-1]["loss"] < history[0]["loss"] - 0.3, [m["loss"] for m in history]


def test_training_flops_per_token_count_frozen_weights_without_their_weight_gradients():
    layers, hidden, seq_len = 2, 64, 64  # the tiny preset at the tiny config's sequence length
    attention = 12 * layers * hidden * seq_len
    dense = tiny_config()
    base = count_parameters(dense.model)
    assert model_flops_per_token(dense) == 6 * base + attention
    # LoRA rank 4 on every projection of a layer: q and o (64 -> 64), k and v (64 -> 32: 2 kv heads of 16),
    # gate and up (64 -> 192) and down (192 -> 64); each adapter is rank * (in + out).
    adapters = layers * 4 * (2 * 128 + 2 * 96 + 3 * 256)
    # Forward 2N and activation gradients 2N through every weight, adapters included; weight gradients
    # (2 per weight) for the adapters only.
    lora = tiny_config(lora={"enabled": True, "rank": 4})
    assert model_flops_per_token(lora) == 4 * (base + adapters) + 2 * adapters + attention
    # MoE: a token passes through top_k of the routed experts (2 of 4 SwiGLUs of 3 * 64 * 192 per layer).
    moe = tiny_config(model={"moe": {"enabled": True}})
    experts_skipped = layers * 2 * 3 * 64 * 192
    assert model_flops_per_token(moe) == 6 * (count_parameters(moe.model) - experts_skipped) + attention


def test_gpu_peaks_are_looked_up_by_the_most_specific_name():
    # Names as torch.cuda.get_device_name() returns them; NVL and PCIe parts are not the SXM ones.
    expected = {
        "NVIDIA H100 80GB HBM3": 989.0,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 NVL": 835.0,
        "NVIDIA H200": 989.0,
        "NVIDIA H200 NVL": 835.0,
        "NVIDIA H800": 989.0,
        "NVIDIA B200": 2250.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA A100 80GB PCIe": 312.0,
        "NVIDIA L4": 121.0,
        "NVIDIA L40S": 362.0,
        "NVIDIA A10G": 70.0,
        "NVIDIA A10": 125.0,
        "NVIDIA GeForce RTX 4090": 165.0,
        "Tesla V100-SXM2-16GB": 125.0,
        "Tesla T4": None,  # not in the table: no MFU rather than a wrong one
    }
    assert {name: peak_bf16_tflops(name) for name in expected} == expected


def test_lora_trains_only_adapters_saved_apart_and_mergeable(tmp_path, base_checkpoint):
    config = tiny_config(
        tmp_path,
        stage="sft",
        lora={"enabled": True, "rank": 4},
        data={"train_files": [str(SAMPLE / "lora_identity.jsonl")]},
        optim={"max_steps": 5, "lr": 1e-2},
        checkpoint={"init_from": str(base_checkpoint)},
    )
    trainer = Trainer(config)
    trainer.fit()
    before = load_model(base_checkpoint)
    trained = trainer.model.state_dict()
    for name, tensor in before.state_dict().items():
        wrapped = name.replace("_proj.weight", "_proj.base.weight")
        torch.testing.assert_close(trained.get(wrapped, trained.get(name)), tensor, atol=0, rtol=0)
    final = tmp_path / "step_00000005"
    assert (final / "adapter.safetensors").exists() and not (final / "model.safetensors").exists()
    ids = torch.randint(0, 6400, (1, 24))
    adapted = load_model(tmp_path)(ids)[0]
    merged = load_model(tmp_path, merge=True)(ids)[0]
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, before(ids)[0], atol=1e-4)


def test_dpo_starts_at_log2_and_learns_the_preference(tmp_path, base_checkpoint, tokenizer):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join((SAMPLE / "dpo.jsonl").read_text(encoding="utf-8").splitlines(True)[:40]), encoding="utf-8"
    )
    config = tiny_config(
        tmp_path / "run",
        stage="dpo",
        data={"train_files": [str(pairs)], "seq_len": 256},
        optim={"batch_size": 4, "epochs": 3, "max_steps": None, "lr": 2e-3},
        objective={"dpo_beta": 0.5},
        checkpoint={"init_from": str(base_checkpoint)},
    )
    trainer = Trainer(config)
    history = trainer.fit().history
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    # On the pairs it trained on, the policy now prefers the chosen replies.
    batch = collate(trainer.examples, tokenizer.pad_id)
    with torch.no_grad():
        parts = DPO(load_model(base_checkpoint), beta=0.5)(trainer.model.eval(), batch)
    pairs_seen = len(trainer.examples)
    assert float(parts.loss_sum) / pairs_seen < math.log(2) - 0.1
    assert parts.metrics["reward_accuracy"] >= 0.75


def test_distillation_from_an_identical_teacher_has_zero_kl(tmp_path, base_checkpoint):
    config = tiny_config(
        tmp_path,
        stage="distill",
        data={"train_files": [str(SAMPLE / "sft.jsonl")]},
        objective={"teacher": str(base_checkpoint), "distill_ce_weight": 0.0},
        checkpoint={"init_from": str(base_checkpoint)},
        optim={"max_steps": 1},
    )
    history = train(config).history
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5) and history[0]["loss"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
def test_distillation_weights_cross_entropy_as_minimind_alpha_does(ce_weight, tokenizer):
    """loss = w * CE + (1 - w) * T^2 * KL(teacher_T || student_T) per labelled token, w = objective.distill_ce_weight
    (MiniMind's --alpha), against torch's kl_div and cross_entropy on the labelled positions."""
    import torch.nn.functional as F

    from minimind.data.formats import sft
    from minimind.model import MiniMindLM
    from minimind.train.objectives import Distillation

    torch.manual_seed(0)
    student, teacher = MiniMindLM(model_config("tiny")), MiniMindLM(model_config("tiny"))
    with torch.no_grad():  # a teacher far from the student: KL well above rounding
        teacher.lm_head.weight.mul_(20)
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，我是MiniMind。"}]
    batch = collate([sft.encode_conversation(conversation, tokenizer, seq_len=64)], tokenizer.pad_id)
    objective = Distillation(teacher, ce_weight, temperature=2.0)
    with torch.no_grad():
        parts = objective(student, batch)
        labels = batch["labels"][:, 1:]
        mask = labels != -100  # only the assistant's reply is labelled
        student_logits = student(batch["input_ids"])[0][:, :-1][mask].float()
        teacher_logits = teacher(batch["input_ids"])[0][:, :-1][mask].float()
    t = 2.0
    kl = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                  log_target=True, reduction="batchmean") * t * t  # fmt: skip
    ce = F.cross_entropy(student_logits, labels[mask])
    assert 0 < int(mask.sum()) < mask.numel() and kl > 0.1
    loss = parts.loss_sum / objective.normalizer(batch)
    assert loss.item() == pytest.approx((ce_weight * ce + (1 - ce_weight) * kl).item(), rel=1e-5)


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: two positions, a two-token vocabulary."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids):
        return self.logits[None], torch.zeros(()), None


def test_distillation_loss_of_a_hand_computed_case():
    from minimind.train.objectives import Distillation

    # Position 0 predicts token 0 (labelled); position 1 is the last (no next token). Student: p = (1/2, 1/2);
    # teacher logits (ln 3, 0): p = (3/4, 1/4), at T = 2 (sqrt 3, 1) / (sqrt 3 + 1).
    student, teacher = FixedLogits([[0.0, 0.0], [5.0, 0.0]]), FixedLogits([[math.log(3), 0.0], [0.0, 5.0]])
    batch = {"input_ids": torch.tensor([[1, 0]]), "labels": torch.tensor([[-100, 0]])}
    ce = math.log(2)
    for t, kl in [
        (1.0, 0.75 * math.log(1.5) + 0.25 * math.log(0.5)),
        (2.0, 4 * sum(p * math.log(2 * p) for p in (3**0.5 / (3**0.5 + 1), 1 / (3**0.5 + 1)))),
    ]:
        parts = Distillation(teacher, ce_weight=0.3, temperature=t)(student, batch)
        assert float(parts.loss_sum) == pytest.approx(0.3 * ce + 0.7 * kl, rel=1e-6), t
        assert float(parts.metrics["kl"]) == pytest.approx(kl, rel=1e-6)


def test_the_old_distill_alpha_is_refused_with_its_meaning():
    with pytest.raises(ConfigError, match=r"objective\.distill_alpha: renamed to distill_ce_weight.*1 - distill_alpha"):
        build_config({"objective": {"distill_alpha": 0.5}})


def test_distillation_pulls_a_student_towards_the_teacher(tmp_path, trained_checkpoint):
    config = tiny_config(
        tmp_path,
        stage="distill",
        data={"train_files": [str(SAMPLE / "sft.jsonl")]},
        objective={"teacher": str(trained_checkpoint), "distill_ce_weight": 0.0, "distill_temperature": 1.0},
        optim={"max_steps": 20, "lr": 1e-2},
    )
    history = train(config).history
    assert history[-1]["kl"] < 0.6 * history[0]["kl"]


def test_reasoning_stage_trains_on_r1_data(tmp_path, base_checkpoint):
    config = tiny_config(
        tmp_path,
        stage="reasoning",
        data={"train_files": [str(SAMPLE / "r1.jsonl")], "seq_len": 256},
        optim={"batch_size": 4, "max_steps": 8},
        checkpoint={"init_from": str(base_checkpoint)},
    )
    history = train(config).history
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(dtype):
    trainer = Trainer(tiny_config(runtime={"dtype": dtype}, optim={"max_steps": 3}))
    history = trainer.fit().history
    assert all(math.isfinite(m["loss"]) for m in history)
    assert (trainer.scaler is not None) == (dtype == "fp16")
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_command_line_train_then_generate(tmp_path, capsys, monkeypatch):
    from minimind.cli import main

    monkeypatch.chdir(ROOT)  # the commands' own entry, in this process (a subprocess would import torch again)
    run = tmp_path / "run"
    main(["train", "--config", "recipes/tiny/pretrain.yaml", "--optim.max_steps", "3", "--data.seq_len", "64",
          f"--checkpoint.dir={run}"])  # fmt: skip
    assert (run / "latest").read_text() == "step_00000003"
    capsys.readouterr()
    main(["generate", "--checkpoint", str(run), "--prompt", "你好", "--max-new-tokens", "4",
          "--save", str(tmp_path / "s.json")])  # fmt: skip
    assert capsys.readouterr().out.startswith(">>> 你好")
    assert json.loads((tmp_path / "s.json").read_text())[0]["prompt"] == "你好"
    with pytest.raises(SystemExit) as bad:
        main(["train", "--config", "recipes/tiny/pretrain.yaml", "--optim.lr", "-1"])
    assert bad.value.code == 2 and "optim.lr: must be positive" in capsys.readouterr().err


def test_wandb_logs_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "wandb-run"
    train(tiny_config(run_dir, optim={"max_steps": 2}, logging={"every_steps": 1, "wandb": True}))
    (offline,) = (run_dir / "wandb").glob("offline-run-*-wandb-run")  # the run id is the run's name
    # W&B's service process writes the offline file after finish() returns, when the machine is busy: wait for it.
    deadline = time.time() + 30
    while b"tokens_per_second" not in (records := (offline / "run-wandb-run.wandb").read_bytes()):
        assert time.time() < deadline, records[:200]
        time.sleep(0.2)
    assert b"grad_norm" in records and b"tokens_per_second" in records

    # The experiment page says where each train step's W&B run is: here the offline directory to sync; for an
    # online run (its record written as an online run writes it) a link to the run's page.
    from minimind.experiment.page import write_page

    step = {"kind": "train", "status": "ran", "parents": {}, "output": str(run_dir), "seconds": 1.0, "config": {},
            "summary": {}, "changes": []}  # fmt: skip
    online = tmp_path / "online-run"
    online.mkdir()
    url = "https://wandb.ai/me/minimind/runs/online-run"
    (online / "wandb.json").write_text(json.dumps({"project": "minimind", "id": "online-run", "url": url}))
    record = {"name": "x", "file": "x.yaml", "started_at": 0.0, "finished_at": 1.0,
              "steps": {"pretrain": step, "sft": {**step, "output": str(online)}}}  # fmt: skip
    write_page(str(tmp_path / "page"), record)
    page = (tmp_path / "page" / "index.html").read_text()
    assert f"<code>pretrain</code>: logged offline; <code>wandb sync {offline.resolve()}</code>" in page
    assert f'<code>sft</code>: <a href="{url}">minimind/online-run</a>' in page
