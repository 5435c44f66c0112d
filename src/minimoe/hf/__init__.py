"""Hugging Face ecosystem: export to and import from transformers checkpoints, upcycling a dense
Llama-family model into an MoE."""
