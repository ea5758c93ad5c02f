import json

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
def test_info_command_prints_the_count(preset, count, capsys):
    from minimind.cli import main

    main(["info", preset])  # the command's own entry, in this process (a subprocess would import torch again)
    assert f"{preset}: {count} parameters" in capsys.readouterr().out


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


def test_top_p_and_repetition_penalty_by_hand():
    """Logits (2, 1, 0, -1) have probabilities (.644, .237, .087, .032): top_p 0.5 keeps the first token alone,
    0.7 the first two (the tokens before the third already cover 0.881). A penalty of 2 halves a seen positive
    logit and doubles a seen negative one (CTRL's rule)."""
    from minimind.model.generate import Sampling, _filter_logits, _sample

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for top_p, kept in ((0.5, [True, False, False, False]), (0.7, [True, True, False, False]), (1.0, [True] * 4)):
        assert torch.isfinite(_filter_logits(logits, 0, top_p)).tolist() == kept
    seen = torch.tensor([True, False, True, False])
    logits = torch.tensor([2.0, 1.5, -1.0, 0.5])  # penalised: (1.0, 1.5, -2.0, 0.5)
    assert _sample(logits, seen, Sampling(temperature=0)) == 0
    assert _sample(logits, seen, Sampling(temperature=0, repetition_penalty=2.0)) == 1
    # Sampling among the two kept tokens: a seen negative logit, doubled, is never the pick at top_p 0.9.
    generator = torch.Generator().manual_seed(0)
    picks = {_sample(torch.tensor([0.0, -1.0, 0.1]), torch.tensor([False, True, False]),
                     Sampling(temperature=1.0, top_p=0.9, top_k=0, repetition_penalty=10.0, generator=generator))
             for _ in range(200)}  # fmt: skip
    assert picks == {0, 2}


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


MOE_LAYOUTS = {
    "minimind2": {"num_routed_experts": 4, "num_shared_experts": 1, "top_k": 2},
    "minimind-3": {"num_routed_experts": 4, "num_shared_experts": 0, "top_k": 1, "balance_over": "batch"},
    "top-3-of-5": {"num_routed_experts": 5, "num_shared_experts": 2, "top_k": 3, "norm_topk_prob": False},
}


def moe_layer(layout: str):
    torch.manual_seed(0)
    return MiniMindLM(model_config("tiny", moe={"enabled": True, **MOE_LAYOUTS[layout]})).model.layers[0].mlp.train()


def token_by_token_moe(layer, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer by hand, one token at a time: the router's top-k experts' SwiGLU outputs weighted
    by their (renormalised) probabilities, plus every shared expert's."""

    def swiglu(expert, token):
        gate, up = expert.gate_proj.weight @ token, expert.up_proj.weight @ token
        return expert.down_proj.weight @ (gate * torch.sigmoid(gate) * up)

    outputs = []
    for token in x.reshape(-1, x.shape[-1]):
        probabilities = (layer.gate.weight @ token).softmax(-1)
        top, experts = probabilities.topk(layer.top_k)
        if layer.norm_topk_prob:
            top = top / top.sum()
        out = sum(weight * swiglu(layer.experts[e], token) for weight, e in zip(top, experts.tolist()))
        outputs.append(out + sum(swiglu(shared, token) for shared in layer.shared_experts))
    return torch.stack(outputs).view_as(x)


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_moe_dispatch_gives_the_token_by_token_outputs_and_gradients(layout):
    layer = moe_layer(layout)
    parameters = dict(layer.named_parameters())
    # Two sequences of 12, and a single token: most experts then get no row, yet still a (zero) gradient.
    for shape in ((2, 12), (1, 1)):
        x = torch.randn(*shape, 64, requires_grad=True)
        upstream = torch.randn(*shape, 64)
        out, _ = layer(x)
        expected = token_by_token_moe(layer, x)
        torch.testing.assert_close(out, expected)
        inputs = [x, *parameters.values()]
        grads = torch.autograd.grad((out * upstream).sum(), inputs)
        expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs, allow_unused=True)
        for name, got, want in zip(["input", *parameters], grads, expected_grads):
            torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, msg=name)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="torch's grouped GEMM kernel runs on CUDA GPUs of compute capability 8.0 and up",
)
def test_the_grouped_gemm_kernel_gives_the_loop_s_outputs_and_gradients_on_a_gpu():
    """The bf16 kernel MoE layers take on a GPU (the CPU suite only ever runs the loop), against the loop in fp32
    on the same bf16 values: the kernel accumulates in fp32 and rounds once, so each value is within a bf16 ulp
    (2^-7 relative) of the reference; an expert that gets no row gets an exactly zero weight gradient."""
    from minimind.model.grouped_gemm import _kernel_applies, grouped_linear

    torch.manual_seed(0)
    rows = torch.randn(24, 64, device="cuda").bfloat16().requires_grad_()
    weight = torch.randn(4, 128, 64, device="cuda").div(8).bfloat16().requires_grad_()
    upstream = torch.randn(24, 128, device="cuda").bfloat16()
    assert _kernel_applies(rows, weight)
    for counts in ([6, 0, 18, 0], [0, 0, 0, 24], [24, 0, 0, 0], [6, 6, 6, 6]):
        ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
        out = grouped_linear(rows, weight, ends)
        grads = torch.autograd.grad((out.float() * upstream.float()).sum(), [rows, weight])
        rows32, weight32 = rows.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        expected = torch.ops.minimind.grouped_linear_loop(rows32, weight32, ends)
        expected_grads = torch.autograd.grad((expected * upstream.float()).sum(), [rows32, weight32])
        torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-3, msg=str(counts))
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-3, msg=str(counts))
        for expert, count in enumerate(counts):
            if count == 0:
                assert not grads[1][expert].any(), (counts, expert)


def test_moe_layer_compiles_to_one_graph_forward_and_backward():
    layer = moe_layer("minimind2")
    x = torch.randn(2, 12, 64, requires_grad=True)
    # fullgraph: a graph break (a host sync such as .item() or nonzero, a data-dependent shape) raises.
    # aot_eager traces the backward too, without Inductor's code generation (minutes on 2 CPU cores).
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out, aux = compiled(x)
    grads = torch.autograd.grad(out.square().sum() + aux, [x, *layer.parameters()])
    eager_out, eager_aux = layer(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum() + eager_aux, [x, *layer.parameters()])
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(aux, eager_aux)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_a_served_batch_never_cuts_a_request_below_its_budget_for_another_s_prompt():
    """Rows of one batch share the context: in a 1,024-token model a 900-token prompt would leave a 10-token
    prompt's row 124 tokens of its 300. The server splits such rows apart; rows that fit share a batch."""
    from minimind.model.generate import BatchDecoder, Sampling, context_groups

    assert context_groups([900, 10, 20], [100, 300, 300], 1024) == [[1, 2], [0]]
    assert context_groups([10, 500, 20], [1000, 300, 300], 1024) == [[0, 2], [1]]  # 500 + 1000 > 1024
    assert context_groups([10, 20, 30], [300, 300, 300], 1024) == [[0, 1, 2]]
    assert context_groups([5], [1019], 1024) == [[0]]
    model = MiniMindLM(model_config("tiny", max_seq_len=1024))
    together = BatchDecoder(model, [[5] * 900, [5] * 10], [Sampling(100), Sampling(300)])
    assert together.left == [100, 1024 - 900]  # what a batch of both gave the short prompt


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


def train_a_few_adam_steps(model: MiniMindLM, config, ids: torch.Tensor, steps: int = 10) -> None:
    """``steps`` Adam steps on ``ids`` at ``optim.lr``, the optimizer built and scheduled as training
    builds it (μP's per-group lr scales and CompleteP's epsilon included)."""
    from minimind.train.loop import build_optimizer
    from minimind.train.schedule import set_learning_rate

    optimizer = build_optimizer(model, config, torch.device("cpu"))
    set_learning_rate(optimizer, config.optim.lr)
    for _ in range(steps):
        logits = model(ids[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def coordinate_sizes(parametrization: str, width: int, ids: torch.Tensor) -> dict[str, float]:
    """Mean |activation| of each watched layer (and of the logits) after 10 Adam steps on ``ids``."""
    from minimind.config import build_config

    torch.manual_seed(0)
    fields = {"preset": "custom", "hidden_size": width, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "max_seq_len": 64, "parametrization": parametrization}  # fmt: skip
    if parametrization == "mup":
        fields["mup_base_width"] = COORDINATE_WIDTHS[0]
    config = build_config({"model": fields, "optim": {"lr": 3e-3, "weight_decay": 0.0}, "data": {"seq_len": 64}})
    model = MiniMindLM(config.model)
    train_a_few_adam_steps(model, config, ids)
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


def test_info_prints_a_recipes_run_and_its_flops_counted_by_hand(capsys, monkeypatch):
    # The tiny preset by hand: embedding 6,400 x 64 (tied: counted once); per layer q, o 64 x 64, k, v
    # 64 x 32 (2 KV heads of 16), SwiGLU 3 x 64 x 192, two norms of 64; the final norm: 508,224 weights.
    # 6N + 12 * layers * width * seq = 6 * 508,224 + 12 * 2 * 64 * 128 per token; 10 steps of 16 x 128.
    parameters = 6400 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192 + 2 * 64) + 64
    flops = 10 * 16 * 128 * (6 * parameters + 12 * 2 * 64 * 128)
    from minimind.cli import main

    monkeypatch.chdir(ROOT)
    command = ["info", "--config", "recipes/tiny/pretrain.yaml", "--optim.max_steps", "10"]
    main(command)
    out = capsys.readouterr().out
    assert f"tiny: {parameters:,} parameters" in out
    assert "run: 10 steps x 2,048 tokens = 20,480 tokens (optim.max_steps 10)" in out
    assert f"training FLOPs: {flops:.3e}" in out
    # A max_steps beyond the recipe's epochs: the run ends with its epochs, where the loop stops.
    from minimind.config import build_config, load_yaml
    from minimind.train.loop import Trainer

    main([*command[:-1], "1000000"])
    out = capsys.readouterr().out
    steps = Trainer(build_config(load_yaml(ROOT / "recipes/tiny/pretrain.yaml"))).total_steps
    assert f"run: {steps:,} steps x 2,048 tokens" in out and "before optim.max_steps 1,000,000" in out


COORDINATE_DEPTHS = (2, 4, 8, 16)


def depth_coordinate_sizes(depth_transfer: bool, depth: int, ids: torch.Tensor) -> dict[str, float]:
    """At width 64 under μP (its base width: only the depth varies), base depth 2: after 10 Adam steps
    on ``ids``, the blocks' updates of the residual stream (each block's output minus its input, mean
    |.|, summed over the blocks), the change training made to the final stream (the final norm's input)
    and the logits, mean |.|."""
    from minimind.config import build_config

    torch.manual_seed(0)
    fields = {"preset": "custom", "hidden_size": 64, "num_layers": depth, "num_heads": 4, "num_kv_heads": 2,
              "max_seq_len": 64, "parametrization": "mup", "mup_base_width": 64}  # fmt: skip
    if depth_transfer:
        fields |= {"depth_transfer": "completep", "depth_base_layers": COORDINATE_DEPTHS[0]}
    config = build_config({"model": fields, "optim": {"lr": 3e-3, "weight_decay": 0.0}, "data": {"seq_len": 64}})
    model = MiniMindLM(config.model)
    updates: dict[int, torch.Tensor] = {}
    for index, block in enumerate(model.model.layers):
        block.register_forward_hook(
            lambda module, inputs, out, index=index: updates.__setitem__(index, (out[0] - inputs[0]).abs().mean())
        )
    final_stream = []
    model.model.norm.register_forward_pre_hook(lambda module, inputs: final_stream.append(inputs[0].detach().clone()))
    with torch.no_grad():
        model(ids[:, :-1])
    train_a_few_adam_steps(model, config, ids)
    with torch.no_grad():
        logits = model(ids[:, :-1])[0]
    return {
        "block updates, summed": sum(updates.values()).item(),
        "final stream's change": (final_stream[-1] - final_stream[0]).abs().mean().item(),
        "logits": logits.abs().mean().item(),
    }


def test_completep_keeps_the_residual_stream_the_same_size_across_depths_where_mup_grows_with_depth(tokenizer):
    """The coordinate check over depth (CompleteP, arXiv 2505.01618): depths 2 to 16 at one width and lr.

    μP alone: each block adds its branch (Theta(1) after the pre-norm) to the stream unscaled, and after
    training the blocks' updates are aligned, so their sum and the stream's change grow at least like the
    depth (here ~50x over 8x depth; the logits, behind the final norm, barely move). CompleteP scales
    each branch by 2/L: each block's update shrinks like 1/L and the sums stay Theta(1) (here within
    1.15x, the logits within 1.05x); 1.5x leaves room for kernel and data noise, far from 8x."""
    from conftest import SAMPLE

    text = "".join(json.loads(line)["text"] for line in (SAMPLE / "pretrain.jsonl").read_text().splitlines()[:20])
    ids = torch.tensor(tokenizer.encode(text)[: 8 * 65]).view(8, 65)
    for depth_transfer in (False, True):
        sizes = {depth: depth_coordinate_sizes(depth_transfer, depth, ids) for depth in COORDINATE_DEPTHS}
        for quantity in sizes[COORDINATE_DEPTHS[0]]:
            across = [sizes[depth][quantity] for depth in COORDINATE_DEPTHS]
            if depth_transfer:
                assert max(across) / min(across) < 1.5, (quantity, across)
            elif quantity != "logits":
                assert across[-1] / across[0] > 8.0, (quantity, across)
