"""Speculative decoding: drafts proposed cheaply (n-gram lookup), verified losslessly by the target model."""
