"""Multi-LoRA serving: PEFT adapters loaded and checked (`adapter`), LoRA-aware linears holding the GPU slots
(`layers`), the registry of names, versions and slots (`manager`). The per-token math is `kernels.add_lora`."""
