"""Write the golden checkpoints in tests/golden/ (run once, with transformer-lens 2.18).

Each golden model is a HookedTransformer built directly with TransformerLens 2.x, saved
with lp.save_checkpoint, together with the activations TL 2.x computes for fixed tokens
(logits, every resid_post and every attention pattern). tests/test_models.py loads the
checkpoint on whichever TransformerLens is installed and compares against those numbers,
so on TL 4.x it checks the cross-version path (bridge conversion, rotary convention).

    .venv-tl2/bin/python scripts/make_golden.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

import lensprobe as lp
from transformer_lens import HookedTransformer, HookedTransformerConfig  # TL 2.x only

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden"
TOKENS = torch.tensor([[0, 3, 7, 1, 1, 9, 4, 2], [5, 5, 5, 11, 6, 8, 10, 0]])

CONFIGS = {
    # learned positions, LayerNorm, GELU MLPs
    "gpt": dict(normalization_type="LN", positional_embedding_type="standard", act_fn="gelu"),
    # rotary in HookedTransformer's default (GPT-NeoX, "halves") convention, RMSNorm, attn-only
    "rotary_halves": dict(
        normalization_type="RMS", positional_embedding_type="rotary", attn_only=True,
        rotary_adjacent_pairs=False,
    ),
    # no normalisation, bidirectional attention, ReLU MLPs
    "bidir": dict(
        normalization_type=None, positional_embedding_type="standard", act_fn="relu",
        attention_dir="bidirectional",
    ),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, extra in CONFIGS.items():
        cfg = HookedTransformerConfig(
            n_layers=2, n_heads=2, d_model=16, d_head=8, d_mlp=32, n_ctx=16, d_vocab=12,
            seed=1234, initializer_range=0.3, **extra,
        )
        model = HookedTransformer(cfg).eval()
        path = lp.save_checkpoint(model, OUT / f"{name}.safetensors")
        names = [f"blocks.{l}.hook_resid_post" for l in range(2)]
        names += [f"blocks.{l}.attn.hook_pattern" for l in range(2)]
        logits, cache = model.run_with_cache(TOKENS, names_filter=lambda n: n in names)
        expected = {"tokens": TOKENS, "logits": logits.detach()}
        expected.update({n: cache[n].detach() for n in names})
        save_file({k: v.contiguous() for k, v in expected.items()},
                  str(OUT / f"{name}.expected.safetensors"),
                  metadata={"written_with": f"transformer-lens {lp.TL_VERSION}"})
        print("wrote", path)


if __name__ == "__main__":
    main()
