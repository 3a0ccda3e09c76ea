"""Tiny model directories as a user has them: a Transformers model saved with ``save_pretrained`` plus a tokenizer.

The tokenizer is a 512-token byte-level BPE trained in a second on the builtin Python docs, with a small chat
template, so the CLI's quantize / eval / generate / chat paths run end to end in seconds.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer():
    """A fast BPE tokenizer (vocab 512; ids 0/1/2 = <unk>/<s>/</s>) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from awqkit.calib.data import builtin_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(builtin_texts("python-docs"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model_dir(path: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of ``family`` (3 layers, vocab 512) and the tiny tokenizer into ``path``."""
    from tests.conftest import tiny_model

    config = dict(vocab_size=512, num_hidden_layers=3, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    config.update(overrides)
    tiny_model(family, seed=seed, **config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
