from minimind.data.corpus import iter_texts
from minimind.tokenizer import SPECIAL_TOKENS, MiniMindTokenizer, train_tokenizer


def test_bundled_tokenizer_ids(tokenizer):
    assert tokenizer.vocab_size == 6400
    assert [tokenizer.backend.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    for token in ("<think>", "</think>", "<answer>", "</answer>", "<|im_end|>"):
        assert len(tokenizer.encode(token)) == 1
        assert len(tokenizer.encode(f"x{token}y")) == 3  # never merged with neighbours


def test_byte_level_round_trip(tokenizer):
    text = "杭州市的美食有 西湖醋鱼 🐟 and café\n\ttabs <think>\n推理\n</think>"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_template_renders_minimind_text(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert tokenizer.apply_chat_template(messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True).endswith(
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_training_is_deterministic_and_keeps_special_ids(sample_dir):
    files = [sample_dir / "sft.jsonl"]
    first = MiniMindTokenizer(train_tokenizer(iter_texts(files, max_bytes=200_000), vocab_size=800))
    second = MiniMindTokenizer(train_tokenizer(iter_texts(files, max_bytes=200_000), vocab_size=800))
    assert first.vocab_size == 800 and first.fingerprint == second.fingerprint
    assert first.reasoning_spellings == ((3,), (4,), (5,), (6,))


def test_bundled_tokenizer_is_reproducible_from_the_bundled_corpus(tmp_path, sample_dir, tokenizer):
    from minimind.data.corpus import train_tokenizer_on_files

    retrained = train_tokenizer_on_files([str(sample_dir / "*.jsonl")], str(tmp_path))
    assert retrained.fingerprint == tokenizer.fingerprint
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()


def test_sampled_training_reads_from_the_whole_corpus(sample_dir):
    texts = list(iter_texts([sample_dir / "pretrain.jsonl"], max_bytes=64_000))
    assert 40_000 < sum(len(t.encode()) for t in texts) < 200_000
    everything = list(iter_texts([sample_dir / "pretrain.jsonl"]))
    last_quarter = set(everything[3 * len(everything) // 4 :])
    assert any(text in last_quarter for text in texts)  # not just the first lines
