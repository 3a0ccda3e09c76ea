"""Model shapes the GPU benchmarks build with random weights (one declaration, shared by the scripts)."""

# Qwen2-7B's config, as Qwen2Config keyword arguments (untied embeddings: the lm_head is its own 1 GB matrix)
QWEN2_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
