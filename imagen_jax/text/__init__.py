"""Flax T5 v1.1 encoder, tokenizer, weight import and the embedding cache.

    from imagen_jax import text
    encoder = text.load_text_encoder("builtin:shapes-tiny", max_length=16)
    emb, mask = encoder.encode(["a red circle at the top left corner"])

Modules: `t5` (the Flax encoder), `tokenizer`, `weights` (Hugging Face, t5x, Orbax),
`encoder` (`load_text_encoder`, `TextEncoder`), `builtin` (builtin:shapes-tiny and its
text-pretrained twin), `pretrain` (its text-only pretraining), `cache` (the
embedding cache and its reader), `encode_job` (encode a caption source into a cache: the
library behind `imagen-jax encode`).
"""

from imagen_jax.text.encoder import load_configured
from imagen_jax.text.encoder import load_text_encoder
from imagen_jax.text.encoder import output_layer_of
from imagen_jax.text.encoder import text_difference
from imagen_jax.text.encoder import TextEncoder
