"""Shapes of public models the cost model predicts for (from their published config.json)."""

_LLAMA3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
PUBLIC_CONFIGS = {
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "llama-3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
}
