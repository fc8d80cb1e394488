"""OpenAI-compatible LLM simulator used by Roundtable tests, benchmarks and demos."""
