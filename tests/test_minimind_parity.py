"""This project's model against MiniMind's own model definitions (vendored in ``tests/reference``),
on the same weights: MiniMind2 (dense and MoE with a shared expert) and minimind-3 (QK-norm; MoE
top-1 with no shared expert and the load balanced over the batch). The presets' parameter counts
equal those of MiniMind's models built at the same sizes."""

import importlib.util
import math

import pytest
import torch
from conftest import ROOT

from minimind.config import model_config
from minimind.model import MiniMindLM

pytest.importorskip("transformers")


def reference(name: str):
    path = ROOT / "tests" / "reference" / f"{name}_model.py"
    spec = importlib.util.spec_from_file_location(f"reference_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
OURS_SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 32768}
MINIMIND3 = {"intermediate_size": math.ceil(64 * math.pi / 64) * 64, "qk_norm": True, "rms_norm_eps": 1e-6}
MINIMIND3_MOE = {"enabled": True, "num_routed_experts": 4, "num_shared_experts": 0, "top_k": 1,
                 "aux_loss_alpha": 5e-4, "balance_over": "batch"}  # fmt: skip
MINIMIND2_MOE = {"enabled": True, "num_routed_experts": 4, "num_shared_experts": 1, "top_k": 2}

CASES = {
    "minimind2": ("minimind2", {}, {}),
    "minimind2-moe": ("minimind2", {"use_moe": True}, {"moe": MINIMIND2_MOE}),
    "minimind-3": ("minimind3", {}, MINIMIND3),
    "minimind-3-moe": ("minimind3", {"use_moe": True}, {**MINIMIND3, "moe": MINIMIND3_MOE}),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_balance_loss_equal_minimind_models_on_the_same_weights(case):
    module, their_fields, our_fields = CASES[case]
    ref = reference(module)
    torch.manual_seed(0)
    theirs = ref.MiniMindForCausalLM(ref.MiniMindConfig(**SMALL, **their_fields))
    ours = MiniMindLM(model_config("custom", **OURS_SMALL, **our_fields))
    ours.load_state_dict(theirs.state_dict())  # strict: the same parameter names, nothing left over
    ids = torch.randint(0, 6400, (2, 40))
    with torch.no_grad():
        # The same operations in the same order in fp32: equal up to kernel rounding (~1e-7).
        theirs.eval(), ours.eval()
        assert (theirs(ids).logits - ours(ids)[0]).abs().max().item() < 1e-5
        if "moe" in our_fields:
            # In training MiniMind2 rounds routed experts' outputs to fp16, so only the balance loss
            # (computed from the router alone) is compared there; routing is the same in both.
            theirs.train(), ours.train()
            assert ours(ids)[1].item() == pytest.approx(float(theirs(ids).aux_loss), rel=1e-5)


@pytest.mark.parametrize(
    "preset, module, fields, count",
    [
        ("minimind-26m", "minimind2", {"hidden_size": 512, "num_hidden_layers": 8}, 25_829_888),
        ("minimind-104m", "minimind2", {"hidden_size": 768, "num_hidden_layers": 16}, 104_030_976),
        ("minimind-moe-145m", "minimind2", {"hidden_size": 640, "num_hidden_layers": 8, "use_moe": True}, 145_029_760),
        ("minimind-3", "minimind3", {}, 63_912_192),
        ("minimind-3-moe", "minimind3", {"use_moe": True}, 198_416_640),
    ],
)
def test_presets_have_minimind_models_parameter_counts(preset, module, fields, count):
    ref = reference(module)
    with torch.device("meta"):
        theirs = ref.MiniMindForCausalLM(ref.MiniMindConfig(**fields))
        ours = MiniMindLM(model_config(preset))
    assert sum(p.numel() for p in theirs.parameters()) == count
    assert ours.num_parameters() == count
