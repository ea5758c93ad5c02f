import pytest

from minimind.config import (
    ConfigError,
    build_config,
    config_to_dict,
    dump_yaml,
    load_config,
    parse_override_args,
)


def test_yaml_and_dotted_overrides_address_the_same_fields(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: sft\nmodel: {preset: tiny}\noptim: {lr: 1.0e-3, batch_size: 4}\n")
    overrides = parse_override_args(["--optim.lr", "3e-4", "--model.moe.enabled=true", "--data.train_files", "[a, b]"])
    config = load_config(recipe, overrides)
    assert config.optim.lr == 3e-4 and config.optim.batch_size == 4
    assert config.model.moe.enabled and config.model.hidden_size == 64  # preset filled, override kept
    assert config.data.train_files == ["a", "b"]
    assert config.data_format == "sft"


def test_preset_expansion_keeps_explicit_fields():
    config = build_config({"model": {"preset": "minimind-104m", "num_layers": 4}})
    assert (config.model.hidden_size, config.model.num_layers) == (768, 4)


def test_round_trip_through_yaml(tmp_path):
    config = build_config({"model": {"preset": "minimind-moe-145m"}, "lora": {"enabled": True, "rank": 4}})
    dump_yaml(config, tmp_path / "c.yaml")
    assert config_to_dict(load_config(tmp_path / "c.yaml")) == config_to_dict(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optim.lr": 0}, "optim.lr: must be positive"),
        ({"optim.lr": -1e-3}, "optim.lr: must be positive"),
        ({"optim.batch_size": 0}, "optim.batch_size: must be positive"),
        ({"model.hidden_size": 100}, "model.hidden_size: 100 is not divisible by num_heads=8"),
        ({"model.num_kv_heads": 3}, "model.num_kv_heads: 3 does not divide num_heads=8"),
        ({"optim.lrr": 1e-3}, "optim.lrr: unknown key; did you mean 'lr'?"),
        ({"modle.hidden_size": 1}, "modle: unknown key; did you mean 'model'?"),
        ({"optim.batch_size": "big"}, "optim.batch_size: expected an integer"),
        ({"lora.enabled": "yes"}, "lora.enabled: expected true/false"),
        ({"stage": "rlhf"}, "stage: must be one of"),
        ({"model.preset": "gpt4"}, "model.preset: unknown preset 'gpt4'"),
        ({"stage": "dpo"}, "checkpoint.init_from: DPO needs a starting checkpoint"),
        ({"data.seq_len": 4096, "model.max_seq_len": 1024}, "data.seq_len: 4096 exceeds model.max_seq_len=1024"),
        (
            {"distributed.use_gpu": True, "distributed.num_workers": 2, "distributed.gpus_per_worker": 0.5},
            "distributed.gpus_per_worker: 0.5 GPU per worker: with 2 workers under ddp",
        ),
        (
            {"distributed.use_gpu": True, "distributed.strategy": "deepspeed", "distributed.gpus_per_worker": 0.25},
            "distributed.gpus_per_worker: 0.25 GPU per worker",
        ),
        (
            {"distributed.use_gpu": True, "distributed.num_workers": 2, "distributed.gpus_per_worker": 2},
            "distributed.gpus_per_worker: 2 GPU per worker: with 2 workers under ddp every worker needs one whole",
        ),
        (
            {"distributed.use_gpu": True, "distributed.strategy": "deepspeed", "distributed.offload_optimizer": True},
            "distributed.cpus_per_worker: 1 with offload_optimizer on GPU workers: DeepSpeed's CPU Adam",
        ),
        ({"optim.schedule": "linear"}, "optim.schedule: must be one of ('cosine', 'wsd')"),
        ({"model.parametrization": "ntk"}, "model.parametrization: must be one of ('standard', 'mup')"),
        ({"model.mup_base_width": 128}, "model.mup_base_width: a base width applies to parametrization: mup"),
        (
            {"model.parametrization": "mup", "model.mup_base_width": 100},
            "model.mup_base_width: 100 cannot be the width of a base model with num_heads=8",
        ),
        (
            {"model.depth_transfer": "completep"},
            "model.depth_transfer: completep extends μP, and this model (preset minimind-26m) has parametrization: "
            "standard; set model.parametrization: mup",
        ),
        ({"model.depth_transfer": True}, "model.depth_transfer: must be false or 'completep', got True"),
        ({"model.depth_base_layers": 2}, "model.depth_base_layers: a base depth applies to depth_transfer: completep"),
        (
            {"model.parametrization": "mup", "model.depth_transfer": "completep", "model.depth_base_layers": 0},
            "model.depth_base_layers: must be positive, got 0",
        ),
        ({"optim.schedule": "wsd", "optim.decay_fraction": 0}, "optim.decay_fraction: must be in (0, 1]"),
        ({"eval.cooldown_fraction": 0.25}, "eval.cooldown_fraction: cooldown evaluations branch a warmup-stable"),
        (
            {
                "optim.schedule": "wsd",
                "eval.cooldown_fraction": 0.25,
                "distributed.strategy": "deepspeed",
                "distributed.zero_stage": 0,
            },
            "distributed.zero_stage: cooldown evaluations (eval.cooldown_fraction) branch the partitions of ZeRO's",
        ),
    ],
)
def test_invalid_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as error:
        build_config({}, overrides)
    assert message in str(error.value)


def test_offload_needs_cpus_only_where_cpu_adam_steps_it():
    offload = {"distributed.strategy": "deepspeed", "distributed.offload_optimizer": True}
    build_config({}, {**offload, "distributed.use_gpu": True, "distributed.cpus_per_worker": 4})
    build_config({}, offload)  # CPU workers step with torch's AdamW on their own threads


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_override_args(["--optim.lr"])
    with pytest.raises(ConfigError, match="expected --dotted.path"):
        parse_override_args(["optim.lr", "1"])
