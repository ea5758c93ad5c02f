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
