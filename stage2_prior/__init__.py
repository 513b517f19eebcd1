"""Stage 2: autoregressive priors over code grids (transformer, gated PixelCNN, WaveNet), their sampler and
their training script."""
from stage2_prior.base import NULL_CLASS, Prior, PriorConfig, check_class_labels, walk_levels
from stage2_prior.pixelcnn import GatedPixelCNNPrior, GatedPixelCNNPriorConfig
from stage2_prior.registry import ARCHS, load_prior, prior_classes, read_prior_run
from stage2_prior.sampling import SamplingOptions, sample
from stage2_prior.transformer import TransformerPrior, TransformerPriorConfig
from stage2_prior.wavenet import WaveNetPrior, WaveNetPriorConfig

__all__ = ["ARCHS", "NULL_CLASS", "GatedPixelCNNPrior", "GatedPixelCNNPriorConfig", "Prior", "PriorConfig",
           "SamplingOptions", "TransformerPrior", "TransformerPriorConfig", "WaveNetPrior", "WaveNetPriorConfig",
           "check_class_labels", "load_prior", "prior_classes", "read_prior_run", "sample", "walk_levels"]
