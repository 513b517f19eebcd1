"""Stage 1: tokenizers that turn images, audio and video into grids of discrete codes, and back."""
from stage1_tokenizer.base import Tokenizer, TokenizerConfig
from stage1_tokenizer.hvqvae import HierarchicalVQVAE, HierarchicalVQVAEConfig, HierarchicalVQVAEOutput
from stage1_tokenizer.quantizer import CodebookStats, QuantizerConfig, QuantizerOutput, VectorQuantizer
from stage1_tokenizer.registry import TOKENIZERS, load_tokenizer
from stage1_tokenizer.vqvae import VQVAE, VQVAEConfig, VQVAEOutput

__all__ = ["TOKENIZERS", "CodebookStats", "HierarchicalVQVAE", "HierarchicalVQVAEConfig", "HierarchicalVQVAEOutput",
           "QuantizerConfig", "QuantizerOutput", "Tokenizer", "TokenizerConfig", "VQVAE", "VQVAEConfig", "VQVAEOutput",
           "VectorQuantizer", "load_tokenizer"]
