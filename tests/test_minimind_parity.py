"""This project's model against MiniMind's own model definitions (vendored in ``tests/reference``),
on the same weights: MiniMind2 (dense and MoE with a shared expert) and minimind-3 (QK-norm; MoE
top-1 with no shared expert and the load balanced over the batch). The presets' parameter counts
equal those of MiniMind's models built at the same sizes."""

import importlib.util
import math
import re

import pytest
import torch
from conftest import ROOT

from minimind.config import model_config
from minimind.model import MiniMindLM


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


def save_like_minimind(model, path):
    """What MiniMind's ``lm_checkpoint`` writes: the state dict in fp16."""
    torch.save({name: tensor.half().cpu() for name, tensor in model.state_dict().items()}, path)


@pytest.mark.parametrize("case", CASES)
def test_minimind_weights_come_in_with_their_logits_and_go_back_as_they_were(case, tmp_path):
    from minimind.model.minimind_format import export_minimind_pth, import_minimind_hf, import_minimind_pth

    module, their_fields, our_fields = CASES[case]
    ref = reference(module)
    torch.manual_seed(0)
    theirs = ref.MiniMindForCausalLM(ref.MiniMindConfig(**SMALL, **their_fields)).eval()
    save_like_minimind(theirs, tmp_path / "full_sft_64.pth")
    released = torch.load(tmp_path / "full_sft_64.pth", weights_only=True)
    theirs.load_state_dict(released)  # their model on the very weights of the file
    ids = torch.randint(0, 6400, (2, 40))
    with torch.no_grad():
        expected = theirs(ids).logits
        ours = import_minimind_pth(tmp_path / "full_sft_64.pth", model_config("custom", **OURS_SMALL, **our_fields))
        assert (ours.eval()(ids)[0] - expected).abs().max().item() < 1e-5
        # A Transformers-MiniMind directory (MiniMind's convert_model.py: save_pretrained without
        # safetensors) carries its architecture. Written by hand: MiniMind2's model predates
        # transformers 5's tied-weights bookkeeping, which refuses to save it.
        theirs.config.save_pretrained(tmp_path / "hf")
        torch.save(theirs.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
        from_hf = import_minimind_hf(tmp_path / "hf").eval()
        assert from_hf.config.qk_norm == our_fields.get("qk_norm", False)
        assert (from_hf(ids)[0] - expected).abs().max().item() < 1e-5

    # Back: in fp16 the file MiniMind wrote, tensor for tensor; in fp32 an exact round trip.
    back = torch.load(export_minimind_pth(ours, tmp_path / "back.pth"), weights_only=True)
    assert back.keys() == released.keys() and all(torch.equal(back[k], released[k]) for k in released)
    again = import_minimind_pth(export_minimind_pth(ours, tmp_path / "back32.pth", "float32"), ours.config)
    assert all(torch.equal(tensor, again.state_dict()[name]) for name, tensor in ours.state_dict().items())
    fresh = ref.MiniMindForCausalLM(ref.MiniMindConfig(**SMALL, **their_fields)).eval()
    fresh.load_state_dict(back, strict=True)  # MiniMind's own model takes the exported file as is
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_the_commands_import_a_pth_and_export_it_back(tmp_path, capsys):
    from minimind.cli import main

    ref = reference("minimind2")
    torch.manual_seed(0)
    save_like_minimind(ref.MiniMindForCausalLM(ref.MiniMindConfig(**SMALL)), tmp_path / "pretrain_64.pth")

    def run(*args) -> tuple[int, str]:
        """The command's own entry, in this process: its exit status and stderr."""
        try:
            main(list(args))
            code, message = 0, ""
        except SystemExit as exit_:  # a message as the exit code is what the interpreter prints to stderr
            code, message = (1, exit_.code) if isinstance(exit_.code, str) else (exit_.code, "")
        return code, capsys.readouterr().err + message

    pth = str(tmp_path / "pretrain_64.pth")
    assert run("import-minimind", pth, "--preset", "tiny", "--out", str(tmp_path / "ck")) == (0, "")
    assert run("export-minimind", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "out.pth"))[0] == 0
    original, exported = (torch.load(tmp_path / name, weights_only=True) for name in ("pretrain_64.pth", "out.pth"))
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)
    # The wrong architecture is refused, naming the file and what does not fit.
    code, err = run(
        "import-minimind", str(tmp_path / "pretrain_64.pth"), "--preset", "minimind-26m", "--out", str(tmp_path / "x")
    )
    assert code != 0 and "Traceback" not in err
    assert re.search(r"pretrain_64\.pth: does not fit a minimind-26m model: missing \['model\.layers\.2\.", err)
