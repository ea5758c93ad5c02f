import subprocess
import sys

import pytest
import torch

from minimind.config import model_config
from minimind.model import MiniMindLM, count_parameters
from minimind.model.generate import generate


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("minimind-26m", 25_829_888),
        ("minimind-104m", 104_030_976),
        ("minimind-moe-145m", 145_029_760),
        ("minimind-3", 63_912_192),
        ("minimind-3-moe", 198_416_640),
    ],
)
def test_parameter_counts_equal_minimind(preset, expected):
    assert count_parameters(model_config(preset)) == expected


@pytest.mark.parametrize(
    "preset, count",
    [("minimind-26m", "25,829,888"), ("minimind-3", "63,912,192"), ("minimind-3-moe", "198,416,640")],
)
def test_info_command_prints_the_count(preset, count):
    out = subprocess.run(
        [sys.executable, "-m", "minimind.cli", "info", preset], capture_output=True, text=True, check=True
    ).stdout
    assert f"{preset}: {count} parameters" in out


def test_structure_matches_minimind():
    model = MiniMindLM(model_config("minimind-26m", num_layers=1))
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.weight.shape == (2 * 64, 512)  # 2 kv heads of 64
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (1408, 512)  # 64*ceil(floor(8*512/3)/64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.norm.eps == 1e-5 and model.config.rope_theta == 1e6
    assert all(getattr(m, "bias", None) is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = MiniMindLM(model_config("tiny")).eval()
    ids = torch.randint(0, 6400, (1, 20))
    full, _, _ = model(ids)
    logits, _, cache = model(ids[:, :12])
    steps = [logits[:, -1]]
    for position in range(12, 20):
        logits, _, cache = model(ids[:, position : position + 1], cache=cache)
        steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 11:19], atol=1e-5, rtol=1e-5)


def test_greedy_generation_is_deterministic_and_stops_at_eos():
    torch.manual_seed(0)
    model = MiniMindLM(model_config("tiny"))
    first = generate(model, [5, 6, 7], max_new_tokens=10, temperature=0)
    assert first == generate(model, [5, 6, 7], max_new_tokens=10, temperature=0)
    stop = first[-1]
    assert generate(model, [5, 6, 7], max_new_tokens=10, temperature=0, eos_id=stop) == first[: first.index(stop) + 1]


def test_sampling_respects_top_k_one():
    torch.manual_seed(0)
    model = MiniMindLM(model_config("tiny"))
    greedy = generate(model, [9, 10], max_new_tokens=6, temperature=0, eos_id=None)
    sampled = generate(model, [9, 10], max_new_tokens=6, temperature=1.3, top_k=1, eos_id=None, repetition_penalty=1.0)
    assert sampled == greedy


def test_document_mask_isolates_packed_documents():
    torch.manual_seed(0)
    model = MiniMindLM(model_config("tiny")).eval()
    ids = torch.randint(10, 6400, (1, 16))
    docs = torch.tensor([[0] * 8 + [1] * 8])
    changed = ids.clone()
    changed[0, :8] = torch.randint(10, 6400, (8,))
    a, _, _ = model(ids, document_ids=docs)
    b, _, _ = model(changed, document_ids=docs)
    torch.testing.assert_close(a[0, 8:], b[0, 8:])  # document 1 never sees document 0
    c, _, _ = model(changed)
    assert not torch.allclose(a[0, 8:], c[0, 8:])  # without the mask it does


def test_moe_routes_top_k_and_returns_balance_loss():
    torch.manual_seed(0)
    model = MiniMindLM(model_config("tiny", moe={"enabled": True, "num_routed_experts": 4, "top_k": 2}))
    model.train()
    logits, aux, _ = model(torch.randint(0, 6400, (2, 12)))
    assert logits.shape == (2, 12, 6400)
    # Perfect balance gives alpha per layer; any routing gives a positive value near it.
    assert 0 < aux.item() < 4 * 0.1 * model.config.num_layers
    aux.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    model.eval()
    assert float(model(torch.randint(0, 6400, (1, 4)))[1]) == 0.0


def test_streamed_text_joins_to_the_decoded_reply(tokenizer):
    from minimind.model.generate import stream_text

    torch.manual_seed(0)
    model = MiniMindLM(model_config("tiny"))
    prompt = tokenizer.encode("杭州市的美食有")
    ids = generate(
        model, prompt, max_new_tokens=40, temperature=1.0, eos_id=None, generator=torch.Generator().manual_seed(5)
    )
    pieces = list(
        stream_text(
            model,
            prompt,
            tokenizer.decode,
            eos_id=-1,
            max_new_tokens=40,
            temperature=1.0,
            generator=torch.Generator().manual_seed(5),
        )
    )
    assert "".join(pieces) == tokenizer.decode(ids)
    assert len(pieces) > 1 and all(pieces)
