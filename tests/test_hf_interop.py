import pytest
import torch

from minimind.config import model_config
from minimind.model import MiniMindLM
from minimind.model.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")


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


def test_moe_export_is_refused(tokenizer, tmp_path):
    model = MiniMindLM(model_config("tiny", moe={"enabled": True}))
    with pytest.raises(ValueError, match="only dense models export"):
        export_hf(model, tokenizer, tmp_path)


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
