"""MiniMind's own tokenizers (MiniMind2 and minimind-3, vendored in tests/reference) load as they are, render
their chat templates exactly as transformers (and so MiniMind's scripts) render them, and train."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from minimind.data.dataset import collate
from minimind.data.formats import IGNORE_INDEX, RecordError, sft
from minimind.tokenizer import load_tokenizer
from minimind.train.loop import Trainer
from minimind.train.objectives import LanguageModeling

REFERENCE = Path(__file__).parent / "reference"
MINIMIND2 = REFERENCE / "minimind2_tokenizer"
MINIMIND3 = REFERENCE / "minimind3_tokenizer"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# One record of minimind-3's tool-call SFT data as its jsonl stores it: tools and tool calls as JSON strings.
TOOL_RECORD = {
    "conversations": [
        {"role": "system", "content": "你是minimind。", "tools": json.dumps([WEATHER_TOOL], ensure_ascii=False)},
        {"role": "user", "content": "北京今天天气如何？"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "用户问天气，需要调用工具。",
            "tool_calls": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}}], ensure_ascii=False),
        },
        {"role": "tool", "content": '{"city": "北京", "temp": 21}'},
        {"role": "assistant", "content": "<think>\n查到21度。\n</think>\n\n北京今天21度，晴。"},
    ]
}


@pytest.fixture(scope="module", params=[MINIMIND2, MINIMIND3], ids=["minimind2", "minimind3"])
def pair(request):
    """Our tokenizer and transformers' for the same MiniMind directory."""
    import transformers

    return load_tokenizer(request.param), transformers.AutoTokenizer.from_pretrained(str(request.param))


def minimind_messages(conversations):
    """What MiniMind's SFTDataset.create_chat_prompt hands to apply_chat_template: JSON strings parsed."""
    messages, tools = [], None
    for message in conversations:
        message = dict(message)
        if message.get("role") == "system" and message.get("tools"):
            tools = json.loads(message["tools"])
        if isinstance(message.get("tool_calls"), str):
            message["tool_calls"] = json.loads(message["tool_calls"])
        messages.append(message)
    return messages, tools


def minimind_labels(input_ids, bos_ids, eos_ids):
    """MiniMind's SFTDataset.generate_labels (dataset/lm_dataset.py at d65ef2c), without its max_length cut."""
    labels = [-100] * len(input_ids)
    i = 0
    while i < len(input_ids):
        if input_ids[i : i + len(bos_ids)] == bos_ids:
            start = i + len(bos_ids)
            end = start
            while end < len(input_ids):
                if input_ids[end : end + len(eos_ids)] == eos_ids:
                    break
                end += 1
            for j in range(start, min(end + len(eos_ids), len(input_ids))):
                labels[j] = input_ids[j]
            i = end + len(eos_ids) if end < len(input_ids) else len(input_ids)
        else:
            i += 1
    return labels


def test_minimind_tokenizers_load_with_their_special_tokens():
    for directory, specials in ((MINIMIND2, 3), (MINIMIND3, 36)):
        tokenizer = load_tokenizer(directory)
        assert tokenizer.vocab_size == 6400
        assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
        assert len(tokenizer.backend.get_added_tokens_decoder()) == specials
    # minimind-3 has <think> and </think> as tokens 25 and 26 but no <answer>; MiniMind2 has none of them.
    assert load_tokenizer(MINIMIND3).reasoning_spellings[:2] == ((25,), (26,))
    assert all(len(spelling) > 1 for spelling in load_tokenizer(MINIMIND2).reasoning_spellings)
    assert len({load_tokenizer(MINIMIND2).fingerprint, load_tokenizer(MINIMIND3).fingerprint}) == 2


def test_minimind2_template_adds_its_default_system_prompt():
    tokenizer = load_tokenizer(MINIMIND2)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert tokenizer.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|>\n"
    )


def test_minimind3_template_writes_think_blocks_tools_and_tool_calls():
    tokenizer = load_tokenizer(MINIMIND3)
    messages, tools = minimind_messages(TOOL_RECORD["conversations"])
    text = tokenizer.apply_chat_template(messages, tools=tools)
    tool_json = json.dumps(WEATHER_TOOL, ensure_ascii=False)
    assert text.startswith("<|im_start|>system\n你是minimind。\n\n# Tools\n\n")
    assert f"<tools>\n{tool_json}\n</tools>" in text
    assert text.endswith(
        "<|im_start|>user\n北京今天天气如何？<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n用户问天气，需要调用工具。\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"city": "北京", "temp": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n<think>\n查到21度。\n</think>\n\n北京今天21度，晴。<|im_end|>\n"
    )
    prompt = [{"role": "user", "content": "你好"}]
    assert tokenizer.apply_chat_template(prompt, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tokenizer.apply_chat_template(prompt, add_generation_prompt=True, open_thinking=True).endswith(
        "<|im_start|>assistant\n<think>\n"
    )


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_templates_match_transformers_token_by_token(pair, generation_prompt):
    ours, theirs = pair
    conversations = [
        [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}],
        [
            {"role": "system", "content": "You are minimind."},
            {"role": "user", "content": "写一句诗"},
            {"role": "assistant", "content": "<think>\n想一想\n</think>\n\n床前明月光"},
            {"role": "user", "content": "再来一句"},
        ],
    ]
    if "tool_call" in ours.chat_template:
        conversations.append(TOOL_RECORD["conversations"])
    for conversation in conversations:
        messages, tools = minimind_messages(conversation)
        expected = theirs.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
        text = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt)
        assert text == expected
        assert ours.encode(text) == theirs(expected, add_special_tokens=False)["input_ids"]


def test_sft_labels_match_minimind_on_its_minimind3_tool_data():
    """The mask covers what MiniMind's dataset labels (think block, tool calls, replies), apart from the newline
    after each <|im_end|>, which generation never produces."""
    tokenizer = load_tokenizer(MINIMIND3)
    example = sft.encode_conversation(sft.parse(TOOL_RECORD), tokenizer, seq_len=1024)
    ids = example["input_ids"]
    messages, tools = minimind_messages(TOOL_RECORD["conversations"])
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(messages, tools=tools))
    reference = minimind_labels(ids, tokenizer.encode("<|im_start|>assistant\n"), tokenizer.encode("<|im_end|>\n"))
    after_end = {i for i in range(1, len(ids)) if ids[i - 1] == tokenizer.eos_id}
    assert example["labels"] == [IGNORE_INDEX if i in after_end else label for i, label in enumerate(reference)]
    replies = tokenizer.decode([token for token in example["labels"] if token != IGNORE_INDEX])
    assert replies == (
        "<think>\n用户问天气，需要调用工具。\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>'
        "<think>\n查到21度。\n</think>\n\n北京今天21度，晴。<|im_end|>"
    )


def test_a_template_that_would_drop_data_rejects_the_record(tokenizer):
    """Tool calls under the bundled ChatML template, or a tool message under MiniMind2's (which renders only
    system, user and assistant), would silently vanish from training: the record is rejected, naming the field."""
    with pytest.raises(RecordError, match="leaves this out") as error:
        sft.encode_conversation(sft.parse(TOOL_RECORD), tokenizer, seq_len=1024)
    assert error.value.reason == "not_rendered" and error.value.field_name == "conversations[0].tools"
    tool_turn = [
        {"role": "user", "content": "现在几点？"},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "中午12点。"},
    ]
    with pytest.raises(RecordError) as error:
        sft.encode_conversation(tool_turn, load_tokenizer(MINIMIND2), seq_len=1024)
    assert error.value.field_name == "conversations[1].content"
    with pytest.raises(RecordError, match="only an assistant message") as error:
        sft.parse({"conversations": [{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}]})
    with pytest.raises(RecordError, match="not valid JSON") as error:
        sft.parse({"conversations": [{"role": "assistant", "content": "", "tool_calls": "[{"}]})
    assert error.value.field_name == "conversations[0].tool_calls"


def test_reasoning_weights_the_multi_token_spelling_of_tags_minimind2_lacks():
    tokenizer = load_tokenizer(MINIMIND2)
    reply = "<think>\nx<y 成立\n</think>\n<answer>\n是\n</answer>"
    example = sft.encode_conversation(
        [{"role": "user", "content": "x<y?"}, {"role": "assistant", "content": reply}], tokenizer, seq_len=1024
    )
    batch = collate([example], tokenizer.pad_id)
    weights = LanguageModeling(tokenizer.reasoning_spellings, 10.0)._weights(batch["labels"])[0]
    targets = batch["labels"][0, 1:]
    weighted = targets[weights == 10.0].tolist()
    assert weighted == [token for spelling in tokenizer.reasoning_spellings for token in spelling]  # 4+4+5+5 tokens
    less_than = tokenizer.encode("<")[0]
    assert less_than in targets[weights == 1.0].tolist()  # the "<" of "x<y" is an ordinary token
    assert torch.all(weights[targets == IGNORE_INDEX] == 0)


def test_sft_trains_with_the_minimind3_tokenizer(tmp_path):
    data = tmp_path / "tool_sft.jsonl"
    data.write_text(json.dumps(TOOL_RECORD, ensure_ascii=False) + "\n", encoding="utf-8")
    config = tiny_config(
        tmp_path,
        stage="sft",
        data={"train_files": [str(data)], "tokenizer": str(MINIMIND3), "seq_len": 256},
        optim={"batch_size": 1, "lr": 1e-2, "warmup_steps": 0, "epochs": 30, "max_steps": 30},
    )
    history = Trainer(config).fit().history
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


def test_a_checkpoint_is_used_with_the_tokenizer_it_trained_with(tmp_path):
    """A run trained with minimind-3's tokenizer: under the bundled one its ids mean other text, so serving,
    chat, generate, eval and export take the run's data.tokenizer, and refuse another."""
    import yaml

    from minimind.config import ConfigError, model_config
    from minimind.model import MiniMindLM
    from minimind.model.checkpoint import save_model
    from minimind.model.hf import checkpoint_tokenizer

    minimind3 = load_tokenizer(MINIMIND3)
    assert minimind3.encode("你好，世界。") != load_tokenizer().encode("你好，世界。")
    run = tmp_path / "run"
    checkpoint = run / "step_00000010"
    checkpoint.mkdir(parents=True)
    save_model(MiniMindLM(model_config("tiny")), checkpoint, extra={"tokenizer": minimind3.fingerprint})
    with pytest.raises(ConfigError, match=rf"trained with tokenizer {minimind3.fingerprint}, but the bundled"):
        checkpoint_tokenizer(checkpoint)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"tokenizer": str(MINIMIND3)}}))
    assert checkpoint_tokenizer(checkpoint) == checkpoint_tokenizer(run) == str(MINIMIND3)
    assert checkpoint_tokenizer(checkpoint, MINIMIND3) == str(MINIMIND3)
    if load_tokenizer(MINIMIND2).fingerprint != minimind3.fingerprint:
        with pytest.raises(ConfigError, match=r"minimind2_tokenizer \(--tokenizer\) is"):
            checkpoint_tokenizer(checkpoint, MINIMIND2)
