"""Fine-tuning methods: adapting a pretrained model cheaply (LoRA, ...)."""
