import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, choice_files, tiny_config

from minimind.config import model_config
from minimind.data.dataset import build_training_data
from minimind.data.formats.records import in_validation_split, iter_jsonl
from minimind.data.jsonl import load_examples
from minimind.eval.evaluator import Evaluator, token_byte_lengths
from minimind.model import MiniMindLM
from minimind.train.loop import Trainer

EVAL = {"max_examples": 16, "batch_size": 8, "continuation_docs": 8, "prefix_tokens": 16, "continuation_tokens": 8}


def test_uniform_model_has_perplexity_equal_to_vocabulary_size(tokenizer):
    model = MiniMindLM(model_config("tiny"))
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()  # zero hidden states -> zero logits -> uniform
    examples = load_examples([SAMPLE / "sft.jsonl"], "sft", tokenizer, 128).examples[:20]
    metrics = Evaluator(tiny_config().eval, tokenizer, examples, torch.device("cpu"))(model)
    assert metrics["val_perplexity"] == pytest.approx(6400, rel=1e-6)
    assert metrics["val_loss"] == pytest.approx(math.log(6400), rel=1e-7)  # fp32 log-softmax
    # bits per byte = log2(6400) bits for each target token over the bytes those tokens spell
    bytes_per_token = 1 / (metrics["val_bits_per_byte"] / math.log2(6400))
    assert 1.0 < bytes_per_token < 6.0


def test_token_byte_lengths_spell_the_text(tokenizer):
    text = "杭州市的美食有 West Lake fish<|im_end|>"
    lengths = token_byte_lengths(tokenizer)
    assert sum(lengths[t] for t in tokenizer.encode(text)) == len(text.encode("utf-8"))


def test_validation_split_is_stable_when_the_corpus_grows():
    records = [record for _, record in iter_jsonl(SAMPLE / "pretrain.jsonl")]
    held_out = [i for i, r in enumerate(records[:1000]) if in_validation_split(r, 0.1)]
    grown = [i for i, r in enumerate(records) if in_validation_split(r, 0.1)]
    assert held_out == [i for i in grown if i < 1000]
    assert 0.07 < len(grown) / len(records) < 0.13


def test_split_sides_are_disjoint_and_complete(tokenizer):
    files = [SAMPLE / "sft.jsonl"]
    train = load_examples(files, "sft", tokenizer, 256, split="train", val_fraction=0.2).examples
    val = load_examples(files, "sft", tokenizer, 256, split="val", val_fraction=0.2).examples
    everything = load_examples(files, "sft", tokenizer, 256).examples
    assert len(train) + len(val) == len(everything)
    assert not {tuple(e["input_ids"]) for e in train} & {tuple(e["input_ids"]) for e in val}


def test_training_beats_the_untrained_model_and_metrics_repeat(pretrained_run):
    trainer, result, untrained = pretrained_run
    trained = result.final_eval
    assert trained == trainer.evaluator(trainer.model)  # deterministic
    validation = build_training_data(trainer.config, trainer.tokenizer).validation  # a second, independent load
    rebuilt = Evaluator(trainer.config.eval, trainer.tokenizer, validation, trainer.device)
    assert rebuilt(trainer.model) == trained
    print(f"untrained {untrained}\ntrained {trained}")
    assert trained["val_perplexity"] < 0.2 * untrained["val_perplexity"]
    assert trained["continuation_accuracy"] > untrained["continuation_accuracy"]
    assert trained["continuation_loglik"] > untrained["continuation_loglik"]
    logged = [
        json.loads(line) for line in (Path(trainer.config.checkpoint.dir) / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in logged if "val_perplexity" in m] == [50, 100]


def test_dpo_evaluation_reports_preference_accuracy(base_checkpoint):
    config = tiny_config(
        stage="dpo",
        data={"train_files": [str(SAMPLE / "dpo.jsonl")], "seq_len": 256},
        checkpoint={"init_from": str(base_checkpoint)},
        eval={"val_fraction": 0.1, **EVAL},
    )
    trainer = Trainer(config)
    metrics = trainer.evaluator(trainer.model)  # policy == reference: no preference yet
    assert metrics == {"reward_accuracy": 0.0, "reward_margin": 0.0}

    # A policy that differs from the reference: each pair's implicit reward margin by hand, from plain forwards.
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    reference = trainer.objective.reference

    @torch.no_grad()
    def log_prob(model, ids, labels):
        logits = model(torch.as_tensor(ids)[None])[0][0, :-1].double()
        targets = torch.as_tensor(labels)[1:]
        scored = targets != -100
        return logits.log_softmax(-1)[scored, targets[scored]].sum().item()

    beta, margins = config.objective.dpo_beta, []
    for pair in list(trainer.data.validation)[: EVAL["max_examples"]]:
        chosen = log_prob(trainer.model, pair["chosen_ids"], pair["chosen_labels"]) - log_prob(
            reference, pair["chosen_ids"], pair["chosen_labels"]
        )
        rejected = log_prob(trainer.model, pair["rejected_ids"], pair["rejected_labels"]) - log_prob(
            reference, pair["rejected_ids"], pair["rejected_labels"]
        )
        margins.append(beta * (chosen - rejected))
    assert len(margins) >= 2 and len({m > 0 for m in margins}) == 2  # some pairs won, some lost
    metrics = trainer.evaluator(trainer.model)
    assert metrics["reward_accuracy"] == sum(m > 0 for m in margins) / len(margins)
    # fp32 batched log-probs against fp64 per-pair ones: ~1e-6 of a sequence's log-prob (hundreds of nats)
    assert metrics["reward_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-3)


def test_chat_command_answers_through_a_pseudo_terminal(base_checkpoint):
    import pexpect  # part of the test extra: missing, the test fails rather than skips

    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "minimind.cli",
            "chat",
            "--checkpoint",
            str(base_checkpoint),
            "--max-new-tokens",
            "6",
            "--system",
            "你是MiniMind",
        ],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=60,
    )
    child.expect("user> ")
    child.sendline("你好")
    child.expect("assistant> (.*)\r\n")
    assert child.match.group(1).strip()  # streamed a reply
    child.expect("user> ")
    child.sendline("/reset")
    child.expect(r"\(history cleared\)")
    child.expect("user> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_multiple_choice_files_load_with_subjects_and_answers_and_bad_rows_are_named(tmp_path):
    from minimind.config import ConfigError
    from minimind.eval.choices import load_questions

    files = choice_files(tmp_path)
    questions = load_questions([str(files[name]) for name in ("history_val.csv", "arithmetic.csv", "mixed.jsonl")])
    assert [(q.subject, q.answer, len(q.choices)) for q in questions] == [
        ("history", 1, 4), ("history", 2, 4), ("history", 2, 4), ("arithmetic", 1, 4), ("arithmetic", 0, 4),
        ("常识", 0, 3), ("mixed", 1, 2),
    ]  # fmt: skip
    assert questions[0].question == "中国的首都是哪座城市？" and questions[0].choices[1] == "北京"
    assert questions[3].source == f"{files['arithmetic.csv']}:2"
    [dev] = load_questions([str(files["history_dev.csv"])])
    assert (dev.subject, dev.answer) == ("history", 0)

    bad = {
        "test.csv": ("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,\n", ":3: answer: missing"),
        "range.csv": ("id,question,A,B,answer\n0,q,a,b,C\n", ":2: answer: 'C' names no option"),
        "header.csv": ("id,stem,A,B,answer\n0,q,a,b,A\n", ":1: the header has no question"),
        "multi.csv": ('id,question,A,B,answer\n0,"two\nlines",a,b,A\n1,,a,b,A\n', ":4: question: empty"),
        "q.jsonl": ('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", "choices": "ab"}\n',
                    ":2: choices: a list of at least two strings"),
        "letter.jsonl": ('{"question": "q", "choices": ["a", "b"], "answer": "AB"}\n',
                         ":1: answer: 'AB' is neither an option's letter nor its index"),
    }  # fmt: skip
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as error:
            load_questions([str(tmp_path / name)])
        assert str(error.value).startswith(f"{tmp_path / name}{message}"), str(error.value)


def test_multiple_choice_scores_are_transformers_log_likelihoods_and_accuracy_is_counted_by_hand(
    pretrained_run, tokenizer, tmp_path
):
    import transformers

    from minimind.eval.choices import load_questions, score_question, shots_by_subject, summarize
    from minimind.model.hf import export_hf

    trainer, _, _ = pretrained_run
    model = trainer.model.eval()
    files = choice_files(tmp_path)
    questions = load_questions([str(files[name]) for name in ("history_val.csv", "arithmetic.csv", "mixed.jsonl")])
    shots = shots_by_subject(load_questions([str(files["history_dev.csv"])]), 1)
    records = [score_question(model, tokenizer, q, shots.get(q.subject, []), seq_len=128) for q in questions]

    # The reference: transformers' Llama on the exported weights, one unpadded sequence per option, the
    # option's tokens' log-probabilities summed by hand.
    hf = transformers.LlamaForCausalLM.from_pretrained(export_hf(model, tokenizer, tmp_path / "hf")).eval()
    expected_correct, expected_per_byte = [], []
    for question, record in zip(questions, records):
        solved = "".join(f"{s.question}\n答案：{s.choices[s.answer]}\n\n" for s in shots.get(question.subject, []))
        context = [tokenizer.eos_id, *tokenizer.encode(f"{solved}{question.question}\n答案：")]
        scores = []
        for option in question.choices:
            option_ids = tokenizer.encode(option)
            with torch.no_grad():
                logits = hf(torch.tensor([context + option_ids])).logits[0].double()
            log_probs = torch.log_softmax(logits, -1)
            scores.append(sum(float(log_probs[len(context) - 1 + i, t]) for i, t in enumerate(option_ids)))
        assert record["scores"] == pytest.approx(scores, abs=2e-4), question.source
        expected_correct.append(max(range(len(scores)), key=scores.__getitem__) == question.answer)
        per_byte = [score / len(option.encode()) for score, option in zip(scores, question.choices)]
        expected_per_byte.append(max(range(len(per_byte)), key=per_byte.__getitem__) == question.answer)
    assert records[0]["shots"] == 1 and records[3]["shots"] == 0  # history has a dev question, arithmetic none

    summary = summarize(records)
    assert summary["choice_accuracy"] == sum(expected_correct) / 7
    assert summary["choice_accuracy_per_byte"] == sum(expected_per_byte) / 7
    assert summary["choice_chance"] == pytest.approx((5 * 0.25 + 1 / 3 + 0.5) / 7)
    assert summary["choice_subjects"]["history"]["accuracy"] == sum(expected_correct[:3]) / 3
    assert summary["choice_subjects"]["mixed"] == {"accuracy": float(expected_correct[6]),
        "accuracy_per_byte": float(expected_per_byte[6]), "chance": 0.5, "questions": 1}  # fmt: skip

    # An option that fills the whole context has no token to be predicted from: refused, naming the question.
    from minimind.config import ConfigError
    from minimind.eval.choices import Question

    long_option = " ".join(str(n) for n in range(200))
    assert len(tokenizer.encode(long_option)) >= 128
    with pytest.raises(ConfigError, match=r"^long\.jsonl:3: choices\[1\]: \d+ tokens"):
        score_question(model, tokenizer, Question("x", "q?", ["a", long_option], 0, "long.jsonl:3"), [], seq_len=128)


def test_a_trained_model_tells_held_out_text_from_its_tokens_scrambled_and_an_untrained_one_does_not(
    pretrained_run, tokenizer, tmp_path
):
    """Questions made from text the 100-step model never trained on (its 5% held out): the prefix of a
    document, and as options its next 8 tokens in their order or in 3 scrambled orders (the same tokens, so
    the same length and unigram odds). Knowing the language picks the order; chance is 1/4."""
    import random

    from minimind.eval.choices import load_questions, score_question, summarize

    trainer, _, _ = pretrained_run
    rng, rows = random.Random(0), []
    for _, record in iter_jsonl(SAMPLE / "pretrain.jsonl"):
        ids = tokenizer.encode(record["text"])
        if not in_validation_split(record, trainer.config.eval.val_fraction) or len(ids) < 32:
            continue
        prefix, continuation = ids[:24], ids[24:32]
        options = {tokenizer.decode(continuation)}
        while len(options) < 4 and len(set(continuation)) > 2:
            options.add(tokenizer.decode(rng.sample(continuation, len(continuation))))
        texts = [tokenizer.decode(prefix), *options]
        if len(options) < 4 or any("\ufffd" in text for text in texts):
            continue  # a character split between prefix and options, or options that cannot differ
        choices = sorted(options, key=lambda _: rng.random())
        rows.append({"question": texts[0], "choices": choices, "answer": choices.index(tokenizer.decode(continuation))})
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    questions = load_questions([str(tmp_path / "held_out.jsonl")])
    assert len(questions) >= 100
    torch.manual_seed(0)
    untrained = MiniMindLM(model_config("tiny")).eval()
    accuracy = {name: summarize([score_question(model, tokenizer, q, [], 128) for q in questions])["choice_accuracy"]
                for name, model in (("trained", trainer.model.eval()), ("untrained", untrained))}  # fmt: skip
    spread = math.sqrt(0.25 * 0.75 / len(questions))  # the standard deviation of chance accuracy
    print(accuracy, len(questions))
    assert accuracy["trained"] > 0.25 + 4 * spread and accuracy["untrained"] < 0.25 + 3 * spread, accuracy


def test_contamination_windows_find_a_copied_question_in_jsonl_and_prepared_text(tokenizer):
    """13-character windows, whitespace ignored; a question shorter than a window counts when found whole. The
    matcher reads jsonl records (every string in them) and a prepared corpus's token rows (decoded)."""
    import numpy as np

    from minimind.eval.choices import Question
    from minimind.eval.contamination import WindowMatcher, question_windows

    long = Question("s", "水在标准大气压下的沸点是多少摄氏度？", ["50", "100"], 1, "a.csv:2")
    short = Question("s", "一年有几个季节？", ["三", "四"], 1, "a.csv:3")
    assert len(question_windows(long)) == 18 - 13 + 1 and question_windows(short) == {"一年有几个季节？"}
    windows = sorted(question_windows(long) | question_windows(short))
    leaked = json.dumps({"conversations": [{"role": "user", "content": "请答：水在标准 大气压下的沸点是多少"}]},
                        ensure_ascii=False)  # fmt: skip
    fresh = json.dumps({"text": "水在标准大气压下会结冰吗？一年有几个月？"}, ensure_ascii=False)
    found = WindowMatcher(windows, 13, None, decode=False)({"text": np.array([leaked, fresh])})
    assert set(json.loads(found["found"][0])) == {"水在标准大气压下的沸点是多", "在标准大气压下的沸点是多少"}
    rows = {"input_ids": np.array([tokenizer.encode("前文。一年有几个季节？后文")], dtype=object)}
    assert json.loads(WindowMatcher(windows, 13, None, decode=True)(rows)["found"][0]) == ["一年有几个季节？"]
