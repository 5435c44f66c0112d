"""Inference: generation with the KV cache (`generate`: streaming, batching, stop strings), beam search
(`beam`), MTP self-speculative decoding (`speculative`), sampling functions (`sampling`) and weight-only
int8/int4 quantization with a held-out perplexity check (`quantize`)."""
