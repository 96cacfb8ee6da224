"""Embedding at scale, vector search and the search service.

    from clipforge.search import SearchIndex, build_index, embed_collection
    embed_collection(["photos/"], "photos.store", model, preprocess, tokenizer, checkpoint="model/")
    build_index("photos.store")
    hits = SearchIndex.open("photos.store").search_text("a dog on the beach", k=10)

Modules: `listing` (what a collection holds, as items to embed), `writer` (embedding it into a resumable store),
`store` (the store's layout and reading it), `index` (the vector index and queries), and the HTTP service:
`server` (the app's routes) over `service` (limits, metrics, request checks, query batching). The service
modules are imported on demand only: they need FastAPI.
"""

from .index import Hit, IndexParams, SearchIndex, build_index, plan_index
from .listing import list_source
from .store import EmbeddingStore, read_manifest
from .writer import EmbedSettings, embed_collection

__all__ = ["EmbedSettings", "EmbeddingStore", "Hit", "IndexParams", "SearchIndex", "build_index",
           "embed_collection", "list_source", "plan_index", "read_manifest"]
