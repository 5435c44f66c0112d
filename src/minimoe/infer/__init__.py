"""Inference: generation with the KV cache (`generate`: streaming, batching, stop strings), beam search
(`beam`), MTP self-speculative decoding (`speculative`), sampling functions (`sampling`), the helpers
they share (`common`), incremental detokenizing (`text`), a preallocated pool of per-sequence cache
slots with a batched decode step for serving (`slots`), and weight-only int8/int4 quantization with a
held-out perplexity check (`quantize`)."""
