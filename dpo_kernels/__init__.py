"""dpo-kernels: DPO log-probs and losses without materialising ``[tokens × vocab]`` logits.

``linear_logprobs`` fuses the LM-head matmul, log-softmax, target gather and masked
per-sequence sum (Triton on CUDA; a pure-torch chunked reference elsewhere).
"""

from .logprobs import LogProbStats, linear_logprobs

__version__ = "0.1.0"

__all__ = ["LogProbStats", "linear_logprobs", "__version__"]
