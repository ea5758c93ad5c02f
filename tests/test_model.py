import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

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


COORDINATE_WIDTHS = (64, 128, 256, 512)
WATCHED = ("model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp",
           "model.layers.1")  # fmt: skip


def coordinate_sizes(parametrization: str, width: int, ids: torch.Tensor) -> dict[str, float]:
    """Mean |activation| of each watched layer (and of the logits) after 10 Adam steps on ``ids``, the
    optimizer built and scheduled as training builds it (μP's per-group lr scales included)."""
    from minimind.config import build_config
    from minimind.train.loop import build_optimizer
    from minimind.train.schedule import set_learning_rate

    torch.manual_seed(0)
    fields = {"preset": "custom", "hidden_size": width, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "max_seq_len": 64, "parametrization": parametrization}  # fmt: skip
    if parametrization == "mup":
        fields["mup_base_width"] = COORDINATE_WIDTHS[0]
    config = build_config({"model": fields, "optim": {"lr": 3e-3, "weight_decay": 0.0}, "data": {"seq_len": 64}})
    model = MiniMindLM(config.model)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    set_learning_rate(optimizer, config.optim.lr)
    for _ in range(10):
        logits = model(ids[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sizes = {}
    modules = dict(model.named_modules())
    for name in WATCHED:
        output = lambda module, inputs, out, name=name: sizes.__setitem__(  # noqa: E731
            name, (out[0] if isinstance(out, tuple) else out).abs().mean().item()
        )
        modules[name].register_forward_hook(output)
    with torch.no_grad():
        sizes["logits"] = model(ids[:, :-1])[0].abs().mean().item()
    return sizes


def test_mup_keeps_activations_the_same_size_across_widths_where_standard_grows_with_width(tokenizer):
    """The coordinate check of μP (Yang et al. 2022, fig. 5; microsoft/mup's coord_check): after a few
    Adam steps at one lr, each layer's mean |activation| at widths 64 to 512.

    Standard: an Adam step moves every weight by about lr, so a layer's output moves by about
    lr * fan_in once updates align: it grows with width (here 40-130x over 8x width in the blocks,
    products of grown terms growing faster; the logits 3x, the loss saturating them). μP scales the
    hidden matrices' lr by 1/m and the logits by 1/m: the sizes stay Theta(1) (here within 0.7-1.35x)."""
    from conftest import SAMPLE

    text = "".join(json.loads(line)["text"] for line in (SAMPLE / "pretrain.jsonl").read_text().splitlines()[:20])
    ids = torch.tensor(tokenizer.encode(text)[: 8 * 65]).view(8, 65)
    for parametrization in ("standard", "mup"):
        sizes = {width: coordinate_sizes(parametrization, width, ids) for width in COORDINATE_WIDTHS}
        for layer in (*WATCHED, "logits"):
            across = [sizes[width][layer] for width in COORDINATE_WIDTHS]
            growth = across[-1] / across[0]
            if parametrization == "mup":
                assert max(across) / min(across) < 2.0, (layer, across)
            else:
                assert growth > (2.0 if layer == "logits" else 8.0), (layer, across)


def test_info_prints_a_recipes_run_and_its_flops_counted_by_hand():
    # The tiny preset by hand: embedding 6,400 x 64 (tied: counted once); per layer q, o 64 x 64, k, v
    # 64 x 32 (2 KV heads of 16), SwiGLU 3 x 64 x 192, two norms of 64; the final norm: 508,224 weights.
    # 6N + 12 * layers * width * seq = 6 * 508,224 + 12 * 2 * 64 * 128 per token; 10 steps of 16 x 128.
    parameters = 6400 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192 + 2 * 64) + 64
    flops = 10 * 16 * 128 * (6 * parameters + 12 * 2 * 64 * 128)
    command = [sys.executable, "-m", "minimind.cli", "info", "--config", "recipes/tiny/pretrain.yaml",
               "--optim.max_steps", "10"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert f"tiny: {parameters:,} parameters" in out
    assert "run: 10 steps x 2,048 tokens = 20,480 tokens (optim.max_steps 10)" in out
    assert f"training FLOPs: {flops:.3e}" in out
