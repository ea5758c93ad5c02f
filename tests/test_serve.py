"""The OpenAI-compatible server (ray_jobs/serve.py's deployment) on the session's Ray cluster, driven by the
official ``openai`` client: answers equal to the model's own unbatched generation, streaming equal to the
whole reply, a LoRA adapter chosen by model name, 16 requests at once decoded in batches, and bad requests
refused with OpenAI's error body while the server goes on serving."""

import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from local_cluster import free_port

from minimind.config import build_config
from minimind.model.checkpoint import load_model, resolve_checkpoint, save_model
from minimind.model.generate import generate
from minimind.model.hf import load_for_inference
from minimind.model.lora import apply_lora
from minimind.serve.openai_api import (
    ApiError,
    ReasoningSplitter,
    StopScanner,
    parse_request,
    render_chat,
    split_reasoning,
)
from minimind.tokenizer import load_tokenizer

CHAT = [{"role": "user", "content": "你好，请介绍一下你自己。"}]


@pytest.fixture(scope="module")
def server(ray_cluster, pretrained_run, tmp_path_factory):
    """The 100-step pretrained tiny model served as ``minimind``, with a LoRA adapter on it as ``shifted``."""
    from ray import serve

    from minimind.serve.app import ServeOptions, application

    checkpoint = resolve_checkpoint(pretrained_run[0].config.checkpoint.dir)
    adapter = tmp_path_factory.mktemp("adapter")
    lora = build_config({}).lora
    model = load_model(checkpoint)
    apply_lora(model, lora)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_" in name:  # B starts at zero (no change): give the adapter an effect of its own
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3
    save_model(model, adapter, lora=lora, base=str(checkpoint))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    options = ServeOptions(str(checkpoint), "minimind", {"shifted": str(adapter)}, max_batch_size=16)
    serve.run(application(options), name="minimind", route_prefix="/")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        yield client, checkpoint, adapter
    finally:
        serve.shutdown()


@functools.cache
def local_model(checkpoint, adapter=None):
    return load_for_inference(checkpoint, adapter=adapter)


def reference(checkpoint, prompt_ids, max_new_tokens, adapter=None):
    """The reply of the model loaded in this process, decoded greedily one sequence at a time."""
    tokenizer = load_tokenizer()
    ids = generate(local_model(checkpoint, adapter), prompt_ids, max_new_tokens=max_new_tokens, temperature=0,
                   eos_id=tokenizer.eos_id)  # fmt: skip
    ended = bool(ids) and ids[-1] == tokenizer.eos_id
    return tokenizer.decode(ids[:-1] if ended else ids), ("stop" if ended else "length"), len(ids) - ended


def chat_ids(messages):
    tokenizer = load_tokenizer()
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_the_server_answers_as_the_model_does_streams_batches_and_refuses_bad_requests(server):
    client, checkpoint, adapter = server
    assert [model.id for model in client.models.list()] == ["minimind", "shifted"]

    # Chat, greedy: the model's own reply, with usage counted by hand.
    reply = client.chat.completions.create(model="minimind", messages=CHAT, max_tokens=24, temperature=0)
    text, finish, completion_tokens = reference(checkpoint, chat_ids(CHAT), 24)
    assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == finish
    assert reply.usage.prompt_tokens == len(chat_ids(CHAT)) and reply.usage.completion_tokens == completion_tokens

    # Sampled at a seed: the same reply again, and streamed in pieces that join to it, ending in [DONE].
    sampled = dict(model="minimind", messages=CHAT, max_tokens=24, temperature=0.9, top_p=0.9, seed=7)
    whole = client.chat.completions.create(**sampled).choices[0].message.content
    assert client.chat.completions.create(**sampled).choices[0].message.content == whole
    chunks = list(client.chat.completions.create(**sampled, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens > 0

    # Text completion, and a stop string: the reply cut before it.
    prompt = "中国的首都是"
    tokenizer = load_tokenizer()
    completion = client.completions.create(model="minimind", prompt=prompt, max_tokens=16, temperature=0)
    text, finish, _ = reference(checkpoint, tokenizer.encode(prompt), 16)
    assert completion.choices[0].text == text and completion.choices[0].finish_reason == finish
    sampled = dict(model="minimind", prompt=prompt, max_tokens=32, temperature=1.0, top_p=1.0, seed=3)
    text = client.completions.create(**sampled).choices[0].text
    stop = next(text[i : i + 2] for i in range(len(text) // 2, len(text) - 1)
                if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2])  # fmt: skip
    cut = client.completions.create(**sampled, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"

    # The adapter by its name: its own model's reply, not the base's.
    shifted = client.chat.completions.create(model="shifted", messages=CHAT, max_tokens=16, temperature=0)
    text, _, _ = reference(checkpoint, chat_ids(CHAT), 16, adapter=adapter)
    assert shifted.choices[0].message.content == text != reference(checkpoint, chat_ids(CHAT), 16)[0]

    # 16 requests at once (both models, prompts of different lengths): all answered, each as alone.
    questions = [[{"role": "user", "content": "问题" * (1 + i % 5) + str(i)}] for i in range(16)]
    models = ["minimind" if i % 4 else "shifted" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: client.chat.completions.create(
            model=models[i], messages=questions[i], max_tokens=12, temperature=0), range(16)))  # fmt: skip
    for i, answer in enumerate(replies):
        expected = reference(checkpoint, chat_ids(questions[i]), 12, adapter if models[i] == "shifted" else None)
        assert answer.choices[0].message.content == expected[0], i

    # Bad requests: OpenAI's error body naming the field, a 4xx, and the server serves on.
    long_prompt = [{"role": "user", "content": "你好" * 2000}]
    cases = [
        (openai.NotFoundError, dict(model="gpt-4", messages=CHAT), "model", "model_not_found"),
        (openai.BadRequestError, dict(model="minimind", messages=long_prompt), "messages", "context_length_exceeded"),
        (openai.BadRequestError, dict(model="minimind", messages=CHAT, max_tokens=0), "max_tokens", None),
        (openai.BadRequestError, dict(model="minimind", messages=CHAT, max_tokens=10**6), "max_tokens",
         "context_length_exceeded"),
        (openai.BadRequestError, dict(model="minimind", messages=CHAT, temperature="hot"), "temperature", None),
        (openai.BadRequestError, dict(model="minimind", messages=CHAT, seed=2**64), "seed", None),  # torch's limit
        (openai.BadRequestError, dict(model="minimind", messages="hello"), "messages", None),
        (openai.BadRequestError, dict(model="minimind", messages=[{"role": "robot", "content": "x"}]),
         "messages[0].role", None),
    ]  # fmt: skip
    for error, request, param, code in cases:
        with pytest.raises(error) as raised:
            client.chat.completions.create(**request)
        assert raised.value.body["type"] == "invalid_request_error", raised.value.body
        assert (raised.value.body["param"], raised.value.body["code"]) == (param, code), raised.value.body
    with pytest.raises(openai.BadRequestError) as raised:  # a completion's prompt is its own field
        client.completions.create(model="minimind", prompt="你好" * 2000)
    assert (raised.value.body["param"], raised.value.body["code"]) == ("prompt", "context_length_exceeded")
    malformed = httpx.post(f"{client.base_url}chat/completions", content=b'{"model": "minimind", "messages": [',
                           headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    after = client.chat.completions.create(model="minimind", messages=CHAT, max_tokens=24, temperature=0)
    assert after.choices[0].message.content == reply.choices[0].message.content


@pytest.mark.parametrize("thinking", [True, False])
def test_reasoning_and_stop_strings_come_out_the_same_streamed_in_any_pieces(thinking):
    """minimind-3's replies: the <think> block (opened by the prompt, or by the reply) is reasoning_content, the
    rest content; split at every character, the streamed fields join to the whole reply's, and a stop string
    never shows its first characters."""
    reply = ("" if thinking else "<think>") + "先想一想：1+1=2。</think>\n答案是2。<|stop"
    whole = split_reasoning(reply, thinking)
    assert whole == ("先想一想：1+1=2。", "答案是2。<|stop")
    splitter, fields = ReasoningSplitter(thinking), {}
    for char in reply:
        for name, text in splitter.feed(char):
            fields[name] = fields.get(name, "") + text
    for name, text in splitter.flush():
        fields[name] = fields.get(name, "") + text
    assert (fields["reasoning_content"], fields["content"]) == whole
    assert split_reasoning("答案是2。", False) == (None, "答案是2。")

    scanner, sent = StopScanner(["<|stop|>", "。<"]), []
    for end in range(1, len(reply) + 1):
        sent.append(scanner.feed(reply[:end]))
        assert "。<" not in "".join(sent)
    assert scanner.stopped and "".join(sent) + scanner.flush() == reply[: reply.index("。<")]
    assert "。" not in "".join(sent)  # held back while it could begin "。<"


def test_a_request_asks_minimind3_to_think_as_minimind_s_server_is_asked():
    """minimind-3's template closes an empty <think> block unless asked to open it: ``open_thinking`` (MiniMind's
    server) or ``chat_template_kwargs`` {open_thinking | enable_thinking} opens it, and the reply then starts in
    reasoning_content. The bundled template has no think block either way."""
    minimind3 = load_tokenizer(Path(__file__).parent / "reference" / "minimind3_tokenizer")
    body = {"model": "m", "messages": CHAT}
    for asked in ({}, {"open_thinking": True}, {"chat_template_kwargs": {"enable_thinking": True}},
                  {"chat_template_kwargs": {"open_thinking": True}}):  # fmt: skip
        text, thinking = render_chat(minimind3, parse_request({**body, **asked}, True, ["m"]))
        assert thinking == bool(asked)
        assert text.endswith("<|im_start|>assistant\n<think>\n" if asked else "<think>\n\n</think>\n\n")
    assert render_chat(load_tokenizer(), parse_request({**body, "open_thinking": True}, True, ["m"]))[1] is False
    refusals = [({"open_thinking": "yes"}, "open_thinking"), ({"chat_template_kwargs": []}, "chat_template_kwargs"),
                ({"chat_template_kwargs": {"enable_thinking": 1}}, "chat_template_kwargs.enable_thinking")]  # fmt: skip
    for bad, field in refusals:
        with pytest.raises(ApiError) as refused:
            parse_request({**body, **bad}, True, ["m"])
        assert refused.value.status == 400 and refused.value.param == field
    # Tools: minimind-3's template writes them into the prompt; the bundled one has no place for them, so a
    # request with tools is refused rather than answered as if the model had seen them.
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with_tools = parse_request({**body, "tools": [weather]}, True, ["m"])
    assert "get_weather" in render_chat(minimind3, with_tools)[0]
    with pytest.raises(ApiError) as refused:
        render_chat(load_tokenizer(), with_tools)
    assert refused.value.status == 400 and refused.value.param == "tools"
