"""One member of the tokenizer pool: chat templates, tokenization, incremental detokenization."""
