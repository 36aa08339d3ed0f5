"""Paper estimate: device memory of one concept-learning training pass on Flux.1 and SD3.5 at 1024 px.

No GPU and no weights here, so this is arithmetic from the published model shapes (the sizes
ComfyUI's model detection reads from real checkpoints), not a measurement. One training pass of
concept learning is one forward and backward of the transformer at batch 1, plus the text
encoders with gradients to the concept vectors (the vectors enter at the encoders' inputs, so the
encoders run forward and backward every step too). Only the vectors take gradients: no weight
gradients and no optimiser state beyond the vectors.

Assumptions, stated where they enter:
- weights at ComfyUI's precisions: bf16 (2 bytes) or fp8 e4m3fn (1 byte, ComfyUI's `weight_dtype`
  option; computation in bf16);
- activations in bf16; attention through a fused kernel (no L x L map kept);
- without recomputation a block keeps about ACT_PER_BLOCK token-width tensors for backward
  (norm, modulation, q, k, v, attention output, MLP input and its 4x-wide hidden twice, residuals);
  with recomputation it keeps only its input, and one block's full set lives during its backward;
- 1024 x 1024 px: a 128 x 128 latent, 2 x 2 patches, 4096 image tokens; text tokens as the
  families' tokenizers pad them (Flux: T5 256; SD3: CLIP 77 + T5 77 at least, 154).

Run: python tests/benchmarks/estimate_flow_memory.py
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
ACT_PER_BLOCK = 14  # token-width (tokens x hidden) tensors a transformer block keeps for backward, MLP ratio 4


@dataclass(frozen=True)
class Family:
    name: str
    params: float          # transformer parameters
    hidden: int
    blocks: int            # blocks whose activations are kept (double + single, or joint)
    text_tokens: int
    encoders: float        # text-encoder parameters run with gradients (T5-XXL encoder, CLIPs)
    encoder_hidden: int    # the widest encoder's width (T5-XXL)
    encoder_layers: int


FAMILIES = (
    # Flux.1 dev/schnell: hidden 3072, 19 double + 38 single blocks; T5-XXL encoder (4.76 B) + CLIP-L (0.12 B).
    Family("Flux.1 (12 B)", 11.9e9, 3072, 19 + 38, 256, 4.76e9 + 0.12e9, 4096, 24),
    # SD3.5 large: depth 38 (hidden 64 x 38 = 2432), 38 joint blocks; T5-XXL + CLIP-L + CLIP-G (0.69 B).
    Family("SD3.5 large (8.1 B)", 8.1e9, 2432, 38, 154, 4.76e9 + 0.12e9 + 0.69e9, 4096, 24),
    # SD3.5 medium: depth 24 (hidden 1536), 24 joint blocks (13 with a second image-only attention).
    Family("SD3.5 medium (2.5 B)", 2.5e9, 1536, 24, 154, 4.76e9 + 0.12e9 + 0.69e9, 4096, 24),
)
IMAGE_TOKENS = (1024 // 8 // 2) ** 2  # 4096


def estimate(f: Family, weight_bytes: int, recompute: bool) -> dict:
    """Return the estimate's parts in GiB for one family, weight precision and recomputation choice."""
    tokens = IMAGE_TOKENS + f.text_tokens
    width = tokens * f.hidden * 2  # one bf16 token-width tensor, batch 1
    kept = f.blocks * width + ACT_PER_BLOCK * width if recompute else f.blocks * ACT_PER_BLOCK * width
    # The encoders' activations for backward (their own tokens only: small next to the image's).
    encoder_acts = f.encoder_layers * ACT_PER_BLOCK * f.text_tokens * f.encoder_hidden * 2
    parts = {
        "transformer weights": f.params * weight_bytes,
        "encoder weights": f.encoders * weight_bytes,
        "activations kept": kept,
        "encoder activations": encoder_acts,
    }
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def main() -> None:
    """Print the estimate table."""
    print("| Model at 1024 px | Weights | Recompute | Transformer weights | Encoders' weights | Activations | "
          "Total GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for f in FAMILIES:
        for weight_bytes, precision in ((2, "bf16"), (1, "fp8")):
            for recompute in (False, True):
                e = estimate(f, weight_bytes, recompute)
                print(f"| {f.name} | {precision} | {'yes' if recompute else 'no'} | {e['transformer weights']:.1f} "
                      f"| {e['encoder weights']:.1f} | "
                      f"{e['activations kept'] + e['encoder activations']:.1f} | {e['total']:.1f} |")


if __name__ == "__main__":
    main()
