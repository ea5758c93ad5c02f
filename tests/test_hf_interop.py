import pytest
import torch
import transformers
from conftest import SAMPLE
from test_minimind_parity import CASES, OURS_SMALL, SMALL, reference

from minimind.config import model_config
from minimind.model import MiniMindLM
from minimind.model.hf import export_hf, import_hf


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = MiniMindLM(model_config("tiny", num_layers=3)).eval()
    directory = export_hf(model, tokenizer, tmp_path_factory.mktemp("hf"))
    return model, directory


def test_transformers_llama_logits_match(exported):
    model, directory = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(0, 6400, (2, 40))
    with torch.no_grad():
        ours, _, _ = model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_auto_tokenizer_renders_our_chat_template(exported, tokenizer):
    _, directory = exported
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    messages = [
        {"role": "system", "content": "你是MiniMind"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "1+1?"},
    ]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ours
    assert hf_tokenizer(ours, add_special_tokens=False)["input_ids"] == tokenizer.encode(ours)
    assert hf_tokenizer.eos_token_id == 2 and hf_tokenizer.pad_token_id == 0


def test_import_round_trip(exported):
    model, directory = exported
    back = import_hf(directory)
    ids = torch.randint(0, 6400, (1, 16))
    torch.testing.assert_close(back(ids)[0], model(ids)[0], atol=0, rtol=0)


def test_an_moe_without_a_transformers_architecture_is_refused(tokenizer, tmp_path):
    model = MiniMindLM(model_config("tiny", moe={"enabled": True}))  # MiniMind2's: a shared expert, no QK-norm
    with pytest.raises(ValueError, match=r"exports as Qwen3-MoE.*qk_norm=False and 1 shared expert"):
        export_hf(model, tokenizer, tmp_path)


def test_minimind_3_moe_exports_as_qwen3_moe_with_equal_logits_and_comes_back(tokenizer, tmp_path):
    torch.manual_seed(0)
    small = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}
    model = MiniMindLM(model_config("minimind-3-moe", **small)).eval()
    directory = export_hf(model, tokenizer, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    ids = torch.randint(0, 6400, (2, 40))
    with torch.no_grad():
        expected = model(ids)[0]
        # fp32 both sides; top-1 routing picks the same expert unless two router scores tie to ~1e-7.
        assert (hf(ids).logits - expected).abs().max().item() < 1e-4
        torch.testing.assert_close(import_hf(directory)(ids)[0], expected, atol=0, rtol=0)
        # What transformers itself saves (experts fused under transformers 5) comes back too.
        hf.save_pretrained(tmp_path / "theirs")
        assert (import_hf(tmp_path / "theirs")(ids)[0] - expected).abs().max().item() < 1e-6


def test_exports_load_for_inference_like_checkpoints(exported):
    from minimind.model.hf import load_for_inference

    model, directory = exported
    ids = torch.randint(0, 6400, (1, 12))
    torch.testing.assert_close(load_for_inference(directory)(ids)[0], model(ids)[0], atol=0, rtol=0)


def test_a_model_shorter_than_the_default_sequence_loads_again(tokenizer, tmp_path):
    """A model.max_seq_len below data.seq_len's default (512) is the model's own business: its
    checkpoint and its export load again (a run config's defaults are not checked against it)."""
    from minimind.model.checkpoint import load_model, save_model

    model = MiniMindLM(model_config("tiny", max_seq_len=256)).eval()
    save_model(model, tmp_path)
    (tmp_path / "hf").mkdir()
    ids = torch.randint(0, 6400, (1, 16))
    for back in (load_model(tmp_path), import_hf(export_hf(model, tokenizer, tmp_path / "hf"))):
        assert back.config.max_seq_len == 256
        torch.testing.assert_close(back(ids)[0], model(ids)[0], atol=0, rtol=0)


def test_a_qk_norm_model_exports_as_qwen3_with_equal_logits_and_comes_back(tokenizer, tmp_path):
    """minimind-3's architecture (QK-norm) is transformers' Qwen3; MiniMind2's stays Llama."""
    torch.manual_seed(0)
    model = MiniMindLM(model_config("minimind-3", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)).eval()
    directory = export_hf(model, tokenizer, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ids = torch.randint(0, 6400, (2, 40))
    with torch.no_grad():
        # fp32 on both sides; only the kernels' summation order differs (~1e-6 on logits of ~1).
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() < 1e-4
        back = import_hf(directory)
        assert back.config.qk_norm
        torch.testing.assert_close(back(ids)[0], model(ids)[0], atol=0, rtol=0)


def test_fused_experts_split_back_into_one_tensor_per_expert():
    """MiniMind's convert_model.py under transformers 5 writes experts fused as
    gate_up_proj = cat([stack(gate), stack(up)], dim=1) and down_proj = stack(down)."""
    from minimind.model.hf import split_fused_experts

    torch.manual_seed(0)
    model = MiniMindLM(model_config("minimind-3-moe", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2))
    state = model.state_dict()
    prefix = "model.layers.0.mlp.experts"
    stack = lambda proj: torch.stack([state[f"{prefix}.{e}.{proj}.weight"] for e in range(4)])  # noqa: E731
    fused = {name: tensor for name, tensor in state.items() if f"{prefix}." not in name}
    fused[f"{prefix}.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
    fused[f"{prefix}.down_proj"] = stack("down_proj")
    split = split_fused_experts(fused)
    assert split.keys() == state.keys() and all(torch.equal(split[k], state[k]) for k in state)


# CompleteP at twice its base depth: each residual branch scaled by 1/2 in training, folded on export.
COMPLETEP = {"depth_transfer": "completep", "depth_base_layers": 1}


@pytest.mark.parametrize(
    "case, fields, architecture",
    [
        ("minimind2", {}, "LlamaForCausalLM"),
        ("minimind-3", {}, "Qwen3ForCausalLM"),
        ("minimind-3-moe", COMPLETEP, "Qwen3MoeForCausalLM"),
    ],
    ids=["minimind2", "minimind-3", "minimind-3-moe-completep"],
)
def test_a_trained_mup_model_exports_as_a_standard_one_that_transformers_and_minimind_compute_alike(
    case, fields, architecture, tokenizer, tmp_path
):
    """μP's output multiplier and attention scale fold into the final norm and the queries (q_norm
    under QK-norm), CompleteP's residual multiplier into o_proj and every expert's down_proj: the
    exports are standard models with the μP model's logits, after training (where the norms, queries
    and projections are no longer at their init)."""
    from minimind.config import build_config
    from minimind.model.minimind_format import export_minimind_pth
    from minimind.train.loop import Trainer

    reference_module, their_fields, our_fields = CASES[case]
    model_fields = {"preset": "custom", **OURS_SMALL, **our_fields, **fields, "parametrization": "mup",
                    "mup_base_width": 32}  # fmt: skip
    raw = {"model": model_fields, "data": {"train_files": [str(SAMPLE / "pretrain.jsonl")], "seq_len": 64},
           "optim": {"lr": 2e-2, "batch_size": 4, "max_steps": 12, "warmup_steps": 2}}  # fmt: skip
    trainer = Trainer(build_config(raw))
    trainer.fit()
    model = trainer.model.eval()
    assert not torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))  # trained
    ids = torch.randint(0, 6400, (2, 40))
    with torch.no_grad():
        ours = model(ids)[0]
        hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tokenizer, tmp_path / "hf")).eval()
        assert type(hf).__name__ == architecture
        # fp32 on both sides: the folded multipliers and the kernels' summation order differ (~1e-6).
        assert (hf(ids).logits - ours).abs().max().item() < 1e-4
        back = import_hf(tmp_path / "hf")
        assert back.config.parametrization == "standard"
        assert (back(ids)[0] - ours).abs().max().item() < 1e-4
        ref = reference(reference_module)
        theirs = ref.MiniMindForCausalLM(ref.MiniMindConfig(**SMALL, **their_fields)).eval()
        theirs.load_state_dict(torch.load(export_minimind_pth(model, tmp_path / "mup.pth", "float32")), strict=True)
        assert (theirs(ids).logits - ours).abs().max().item() < 1e-4
