"""Training data: sources, tokenizers, the memory-mapped token cache and batching.

    mm_rec.data.corpus      text file / folder / .bin / the embedded Python-stdlib corpus
    mm_rec.data.tokenizers  ByteTokenizer (default), BPETokenizer (Hugging Face `tokenizers`)
    mm_rec.data.cache       tokenize once into a memory-mapped token file (TokenData)
    mm_rec.data.batching    RandomWindows and ContiguousStreams (state carried across batches)
"""

from mm_rec.data.batching import Batch, ContiguousStreams, RandomWindows
from mm_rec.data.cache import TokenData, prepare_tokens, tokenize_in_memory
from mm_rec.data.corpus import Source, resolve_source, stdlib_files
from mm_rec.data.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = ["BPETokenizer", "Batch", "ByteTokenizer", "ContiguousStreams", "RandomWindows", "Source", "TokenData",
           "load_tokenizer", "prepare_tokens", "resolve_source", "stdlib_files", "tokenize_in_memory"]
