"""Embedding at scale, vector search and the search service.

    from clipforge.search import SearchIndex, build_index, embed_collection
    embed_collection(["photos/"], "photos.store", model, preprocess, tokenizer, checkpoint="model/")
    build_index("photos.store")
    hits = SearchIndex.open("photos.store").search_text("a dog on the beach", k=10)

The HTTP service lives in `clipforge.search.server` (imported on demand: it needs FastAPI).
"""

from .index import Hit, IndexParams, SearchIndex, build_index, plan_index
from .store import EmbeddingStore, EmbedSettings, embed_collection, list_source, read_manifest

__all__ = ["EmbedSettings", "EmbeddingStore", "Hit", "IndexParams", "SearchIndex", "build_index",
           "embed_collection", "list_source", "plan_index", "read_manifest"]
