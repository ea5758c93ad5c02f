"""The Ray Serve deployment: a MiniMind checkpoint behind OpenAI's HTTP API.

    GET  /v1/models             the served model and its LoRA adapters, each by name
    POST /v1/chat/completions   rendered with the tokenizer's chat template; streamed as server-sent events
    POST /v1/completions        plain text continuation

Concurrent requests on a replica are decoded together: Ray Serve's ``@serve.batch`` gathers up to
``max_batch_size`` of them, and :class:`~minimind.model.generate.BatchDecoder` runs one forward pass per
token for the whole batch with each request's key/value cache, sampling settings and seed. Requests for
different adapters in one batch decode in one group per adapter. Each decoding step runs in a thread, so
the replica keeps accepting requests meanwhile. Replicas scale with ``num_replicas``; each holds its
models (an adapter is merged into its own copy of the base weights).

``ray_jobs/serve.py`` starts it; ``serve run minimind.serve.app:build checkpoint=...`` does too.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from minimind.model.generate import BatchDecoder, Sampling, context_groups
from minimind.model.hf import checkpoint_tokenizer
from minimind.serve.openai_api import (
    ApiError,
    GenerationRequest,
    ReasoningSplitter,
    StopScanner,
    chat_chunk,
    chat_completion,
    new_id,
    parse_request,
    render_chat,
    text_completion,
    token_budget,
    usage,
)

api = FastAPI(title="MiniMind (OpenAI-compatible)")


@dataclass
class Job:
    """One request's generation, as the batch sees it."""

    model: str
    prompt_ids: list[int]
    sampling: Sampling
    cancelled: bool = False
    """Set by the request's side (a stop string, a client gone): its row stops at the next step."""


@dataclass
class ServeOptions:
    """What ``ray_jobs/serve.py`` configures; plain values, so Serve can ship them to the replicas."""

    checkpoint: str
    name: str = "minimind"
    adapters: dict[str, str] = field(default_factory=dict)
    """Model name -> LoRA adapter checkpoint, applied on the base checkpoint."""
    tokenizer: str | None = None
    device: str = "cpu"
    max_batch_size: int = 16
    threads: int | None = None
    """torch threads per replica (None: as many as the replica's CPUs)."""


def _route(splitter: ReasoningSplitter | None, piece: str) -> list[tuple[str, str]]:
    """(field, text) for a piece of the reply: reasoning or content (chat), content (completions)."""
    if splitter is not None:
        return splitter.feed(piece)
    return [("content", piece)] if piece else []


@serve.deployment
@serve.ingress(api)
class MiniMindServer:
    def __init__(self, options: ServeOptions):
        from minimind.model.hf import load_for_inference
        from minimind.tokenizer import load_tokenizer

        if options.threads:
            torch.set_num_threads(options.threads)
        self.tokenizer = load_tokenizer(options.tokenizer)  # the checkpoint's, chosen by application()
        self.models = {options.name: load_for_inference(options.checkpoint, options.device)}
        for name, adapter in options.adapters.items():
            self.models[name] = load_for_inference(options.checkpoint, options.device, adapter)
        self.context = self.models[options.name].config.max_seq_len
        self.device = options.device  # a request's seeded generator lives where its logits are sampled
        self.created = int(time.time())
        self._generate.set_max_batch_size(options.max_batch_size)

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                            "owned_by": "minimind"} for name in self.models]}  # fmt: skip

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    # -- a request's life -------------------------------------------------------------------------

    async def _handle(self, http_request: Request, chat: bool):
        try:
            try:
                body = json.loads(await http_request.body())
            except (ValueError, UnicodeDecodeError) as error:
                raise ApiError(400, f"the request body is not valid JSON: {error}") from None
            request = parse_request(body, chat, list(self.models))
            # A prompt that opens a <think> block (minimind-3, asked to think) starts the reply in reasoning.
            text, thinking = render_chat(self.tokenizer, request) if chat else (request.prompt, False)
            prompt_ids = self.tokenizer.encode(text)
            budget = token_budget(len(prompt_ids), request.max_tokens, self.context, "messages" if chat else "prompt")
        except ApiError as error:
            return JSONResponse(error.body(), status_code=error.status)
        generator = torch.Generator(device=self.device).manual_seed(
            request.seed if request.seed is not None else time.time_ns()
        )
        sampling = Sampling(budget, request.temperature, request.top_p, 0, request.repetition_penalty, generator)
        job = Job(request.model, prompt_ids, sampling)
        request_id = new_id("chatcmpl" if chat else "cmpl")
        if request.stream:
            events = self._events(job, request, request_id, thinking)
            return StreamingResponse(events, media_type="text/event-stream")
        fields: dict[str, str] = {}
        async for kind, name, value in self._pieces(job, request, thinking):
            if kind == "piece":
                fields[name] = fields.get(name, "") + value
            else:
                finish_reason, completion_tokens = name, value
        if chat:
            return chat_completion(request_id, request.model, fields.get("reasoning_content"),
                                   fields.get("content", ""), finish_reason, len(prompt_ids),
                                   completion_tokens)  # fmt: skip
        return text_completion(request_id, request.model, fields.get("content", ""), finish_reason,
                               usage(len(prompt_ids), completion_tokens))  # fmt: skip

    async def _pieces(self, job: Job, request: GenerationRequest, thinking: bool) -> AsyncIterator[tuple]:
        """("piece", field, text) while the reply grows, then ("end", finish_reason, completion tokens)."""
        scanner = StopScanner(request.stop)
        splitter = ReasoningSplitter(thinking) if request.chat else None
        ids: list[int] = []
        finish_reason = "length"
        try:
            # Read to the end of the row (it ends a step after its end-of-turn token or its cancelling), so the
            # batch never hands a result to a reader that has gone.
            async for token in self._generate(job):
                if job.cancelled or finish_reason == "stop":
                    continue
                if token == self.tokenizer.eos_id:
                    finish_reason = "stop"
                    continue
                ids.append(token)
                piece = scanner.feed(self.tokenizer.decode(ids).rstrip("\ufffd"))
                for name, text in _route(splitter, piece):
                    yield "piece", name, text
                if scanner.stopped:
                    finish_reason = "stop"
                    job.cancelled = True
            if not scanner.stopped:  # a character held back as incomplete, or a stop string's start
                piece = scanner.feed(self.tokenizer.decode(ids)) + scanner.flush()
                for name, text in _route(splitter, piece):
                    yield "piece", name, text
            for name, text in splitter.flush() if splitter else []:
                yield "piece", name, text
        finally:
            job.cancelled = True  # the client may have gone: its row stops decoding
        yield "end", finish_reason, len(ids)

    async def _events(self, job: Job, request: GenerationRequest, request_id: str, thinking: bool):
        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        model, prompt_tokens = request.model, len(job.prompt_ids)
        if request.chat:
            yield event(chat_chunk(request_id, model, {"role": "assistant", "content": ""}))
        async for kind, name, value in self._pieces(job, request, thinking):
            if kind == "piece":
                yield event(chat_chunk(request_id, model, {name: value}) if request.chat
                            else text_completion(request_id, model, value, None))  # fmt: skip
                continue
            finish_reason, completion_tokens = name, value
            yield event(chat_chunk(request_id, model, {}, finish_reason) if request.chat
                        else text_completion(request_id, model, "", finish_reason))  # fmt: skip
            if request.include_usage:
                empty = (
                    chat_chunk(request_id, model, {}) if request.chat else text_completion(request_id, model, "", None)
                )
                yield event({**empty, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    # -- the batch -------------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=2)
    async def _generate(self, jobs: list[Job]):
        """Each job's tokens, one per step, all jobs of the batch decoded together (one group per model)."""
        by_model: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            by_model.setdefault(job.model, []).append(index)
        groups = []  # each model's rows, in batches whose longest prompt leaves every row its whole budget
        for name, indices in by_model.items():
            lengths = [len(jobs[i].prompt_ids) for i in indices]
            budgets = [jobs[i].sampling.max_new_tokens for i in indices]
            groups += [(name, [indices[r] for r in rows]) for rows in context_groups(lengths, budgets, self.context)]
        decoders = [(rows, BatchDecoder(self.models[name], [jobs[i].prompt_ids for i in rows],
                                        [jobs[i].sampling for i in rows], self.tokenizer.eos_id))
                    for name, rows in groups]  # fmt: skip
        ended = [False] * len(jobs)
        while not all(ended):
            results: list = [StopIteration] * len(jobs)
            for rows, decoder in decoders:
                for row, index in enumerate(rows):
                    if jobs[index].cancelled:
                        decoder.finish(row)
                tokens = await asyncio.to_thread(decoder.step)
                for row, index in enumerate(rows):
                    if tokens[row] is None:
                        ended[index] = True
                    else:
                        results[index] = tokens[row]
            yield results


def application(options: ServeOptions, replicas: int = 1, cpus_per_replica: float = 1.0,
                gpus_per_replica: float = 0.0) -> serve.Application:  # fmt: skip
    """The deployment bound to ``options``, with its replicas and each replica's resources (a GPU share puts
    the models on ``cuda``)."""
    if gpus_per_replica > 0:
        options.device = "cuda"
    options.threads = options.threads or max(1, int(cpus_per_replica))  # not every core of a shared node
    options.checkpoint = str(Path(options.checkpoint).resolve())  # replicas run in other directories
    tokenizer = checkpoint_tokenizer(options.checkpoint, options.tokenizer)  # refused here, before any replica
    options.tokenizer = None if tokenizer is None else str(Path(tokenizer).resolve())
    options.adapters = {name: str(Path(path).resolve()) for name, path in options.adapters.items()}
    deployment = MiniMindServer.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=4 * options.max_batch_size,
    )
    return deployment.bind(options)


def build(args: dict) -> serve.Application:
    """An application builder: ``serve run minimind.serve.app:build checkpoint=DIR [name=minimind]
    [lora=NAME=DIR,...] [replicas=N] [gpus_per_replica=F]``."""
    options = ServeOptions(
        checkpoint=args["checkpoint"],
        name=args.get("name", "minimind"),
        adapters=dict(item.split("=", 1) for item in args.get("lora", "").split(",") if item),
        tokenizer=args.get("tokenizer"),
    )
    return application(options, int(args.get("replicas", 1)), gpus_per_replica=float(args.get("gpus_per_replica", 0)))
