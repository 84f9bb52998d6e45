"""A tiny LTX-Video pipeline with random weights, built offline.

The video counterpart of ``tinydiffusion`` (a named fake for what cannot run
here: LTX-Video's weights are gigabytes and want a GPU).  The weights are
random, so the videos are noise; the machinery is the real one: a diffusers
``LTXPipeline`` (a T5 text encoder and its tokenizer, an LTX transformer, an
LTX video VAE and a flow-matching Euler scheduler), saved as safetensors and
loaded back by ``DiffusionPipeline.from_pretrained`` exactly as the real
Lightricks/LTX-Video folder is.  Its VAE compresses 8x in space and in time,
as LTX-Video's frame counts 8k + 1 need; it is under 1 MB and makes nine
64x64 frames on a CPU in about half a second.

The tokenizer is a T5 (unigram) tokenizer over a generated vocabulary: the
printable ASCII characters, one token each, and T5's special tokens.

    python -m modelfleet.workers.tinyvideo PATH
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from modelfleet.workers.tinydiffusion import build_main, save

# The longest prompt the text encoder reads, in tokens (one per character).
MAX_TOKENS = 128


def _tokenizer() -> Any:
    from transformers import T5Tokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(char, -2.0) for char in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_TOKENS)


def build_tiny_video_pipeline(path: Path, seed: int = 0) -> Path:
    """Build the pipeline with weights drawn from ``seed`` and save it to ``path``
    (created if missing).  Needs no network.  Returns ``path``."""
    import torch
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
        attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32)
    # Three of four blocks halve space and time (8x), and the VAE's 4x4 patches
    # make space 32x: LTX-Video's grid (sides in multiples of 32, frames 8k + 1),
    # and a latent small enough that 720x1280 takes about a second on a CPU.
    scaling = (True, True, True, False)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8,
        block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=scaling, decoder_spatio_temporal_scaling=scaling,
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=4, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                       text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    return save(pipe, path)


def main(argv: list[str] | None = None) -> int:
    return build_main(build_tiny_video_pipeline, "modelfleet.workers.tinyvideo", argv)


if __name__ == "__main__":
    raise SystemExit(main())
