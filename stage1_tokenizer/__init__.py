"""Stage 1: tokenizers that turn images, audio and video into grids of discrete codes."""
from stage1_tokenizer.quantizer import CodebookStats, QuantizerConfig, QuantizerOutput, VectorQuantizer
from stage1_tokenizer.vqvae import VQVAE, VQVAEConfig, VQVAEOutput

__all__ = ["CodebookStats", "QuantizerConfig", "QuantizerOutput", "VectorQuantizer", "VQVAE",
           "VQVAEConfig", "VQVAEOutput"]
