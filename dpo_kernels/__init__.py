"""dpo-kernels: DPO log-probs and losses without materialising ``[tokens × vocab]`` logits.

``linear_logprobs`` fuses the LM-head matmul, log-softmax, target gather and masked
per-sequence sum (Triton on CUDA, a C++ backend on the CPU, a pure-torch reference).
``preference_loss`` and the other objectives in ``dpo_kernels.losses`` work on its outputs;
the ``FusedLinear*Loss`` modules put both together as drop-ins for Liger-Kernel's;
``dpo_kernels.integrations`` has transformers models and a drop-in TRL ``DPOTrainer``.
"""

from .logprobs import LogProbStats, linear_logprobs
from .losses import (
    LOSS_TYPES,
    cpo_loss,
    kto_loss,
    orpo_loss,
    preference_loss,
    simpo_loss,
)
from .modules import (
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearKTOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
)

__version__ = "0.1.0"

__all__ = [
    "LogProbStats",
    "linear_logprobs",
    "LOSS_TYPES",
    "preference_loss",
    "simpo_loss",
    "cpo_loss",
    "orpo_loss",
    "kto_loss",
    "FusedLinearDPOLoss",
    "FusedLinearSimPOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearCPOLoss",
    "FusedLinearKTOLoss",
    "__version__",
]
