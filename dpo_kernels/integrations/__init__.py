"""Adapters to other libraries. Each submodule imports its library lazily and only when imported:
``dpo_kernels.integrations.transformers`` (Hugging Face models) and
``dpo_kernels.integrations.trl`` (a drop-in ``DPOTrainer``)."""
