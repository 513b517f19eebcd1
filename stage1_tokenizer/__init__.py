"""Stage 1: tokenizers that turn images, audio and video into grids of discrete codes, and back."""
from stage1_tokenizer.base import Tokenizer, TokenizerConfig
from stage1_tokenizer.hvqvae import HierarchicalVQVAE, HierarchicalVQVAEConfig, HierarchicalVQVAEOutput
from stage1_tokenizer.fsq import FiniteScalarQuantizer
from stage1_tokenizer.lfq import LookupFreeQuantizer
from stage1_tokenizer.quantizer import CodebookStats, Quantizer, QuantizerConfig, QuantizerOutput, VectorQuantizer
from stage1_tokenizer.quantizer_registry import QUANTIZERS, build_quantizer
from stage1_tokenizer.registry import TOKENIZERS, load_tokenizer
from stage1_tokenizer.residual_quantizer import ResidualVectorQuantizer
from stage1_tokenizer.vqvae import VQVAE, VQVAEConfig, VQVAEOutput

__all__ = ["QUANTIZERS", "TOKENIZERS", "CodebookStats", "FiniteScalarQuantizer", "HierarchicalVQVAE",
           "HierarchicalVQVAEConfig", "HierarchicalVQVAEOutput", "LookupFreeQuantizer", "Quantizer", "QuantizerConfig",
           "QuantizerOutput", "ResidualVectorQuantizer", "Tokenizer", "TokenizerConfig", "VQVAE", "VQVAEConfig",
           "VQVAEOutput", "VectorQuantizer", "build_quantizer", "load_tokenizer"]
