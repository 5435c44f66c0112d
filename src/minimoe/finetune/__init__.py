"""Fine-tuning: supervised fine-tuning on chat data with loss masking, LoRA / QLoRA through PEFT."""
