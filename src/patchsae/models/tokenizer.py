"""A byte-level tokenizer for the embedded model, saved in Hugging Face's `tokenizer.json` format.

Byte-level so that any text (class names the model never saw, digits, other languages) tokenizes; the
end-of-text token has the largest id, because HF's CLIP text tower pools at the end-of-text position and,
for legacy configs, finds it with argmax(input_ids).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def build_byte_tokenizer(max_length: int = 77):
    """Return a `PreTrainedTokenizerFast`: 256 byte tokens, then BOS (256) and EOS (257, the largest id)."""
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: ord(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=max_length
    )
