"""Service settings: command-line options and REID_* environment variables, one definition."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REID_", extra="ignore")

    checkpoint: Path | None = Field(None, description="serving checkpoint (.safetensors)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    data_dir: Path = Field(Path("./data"), description="gallery store, ONNX cache")
    database_url: str | None = Field(
        None, description="postgresql://user@host:port/db: the gallery in PostgreSQL, shared by several replicas "
        "(password: PGPASSWORD or ~/.pgpass rather than the URL). Unset: SQLite under data_dir",
    )
    database_pool_size: int = Field(8, ge=1, le=256, description="most PostgreSQL connections per process")
    database_timeout_s: float = Field(
        5.0, gt=0, le=600, description="longest a request waits for a PostgreSQL connection before answering 503"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="auto: on CPU the fastest of OpenVINO and ONNX Runtime that passes the accuracy check "
        "(measured at the first start, cached per checkpoint and machine); torch on CUDA",
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: the fastest precision this hardware runs natively that passes the accuracy check "
        "(CPU: bf16 where the CPU has avx512_bf16 or AMX, else fp32; CUDA: fp16 or fp32); bf16 on a CPU without "
        "native bf16 is refused",
    )
    min_cosine: float = Field(
        0.999, gt=0, le=1, description="accuracy check: a backend or precision serves only if its embeddings of a "
        "fixed calibration batch all have at least this cosine to the fp32 torch reference",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="most images per forward pass")
    max_batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="longest a batch waits for images other requests are still decoding"
    )
    max_upload_bytes: int = Field(10 * MiB, ge=1, description="most image bytes in one request (413 beyond)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest width x height decoded")
    inline_decode_pixels: int = Field(
        65_536, ge=0,
        description="requests whose images total at most this many pixels are decoded on the event loop "
        "(cheaper than a thread switch); bigger ones on a worker thread. 0: always a worker thread",
    )
    max_images_per_request: int = Field(64, ge=1, description="most image files in one request")
    embedding_cache_size: int = Field(10_000, ge=1, description="embeddings kept for GET /query")
    embedding_cache_ttl_s: float = Field(600.0, gt=0, description="how long an /embed id stays valid")
    api_key: str | None = Field(None, description="when set, X-API-Key needed on POST/DELETE /gallery")
    store_crops: bool = Field(True, description="keep enrolled crops (for GET /crops and reembed)")
    index: Literal["auto", "flat", "hnsw", "ivf"] = Field(
        "auto", description="auto: exact up to index_exact_max_entries, approximate above; flat: exact; hnsw, ivf: approximate"
    )
    index_exact_max_entries: int = Field(
        0, ge=0, description="auto: largest gallery searched exactly (0: 32M / dim, e.g. 32,768 at 1024-d: "
        "where one exact search passes ~10 ms, docs/gallery.md)",
    )
    index_storage: Literal["flat", "sq8"] = Field(
        "flat", description="approximate kinds: full vectors, or 8-bit codes with an exact re-score of the shortlist"
    )
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW graph degree")
    hnsw_ef_construction: int = Field(80, ge=8, description="HNSW build breadth")
    hnsw_ef_search: int = Field(128, ge=8, description="HNSW search breadth")
    ivf_lists: int = Field(0, ge=0, description="IVF cells (0: about 4 sqrt(entries), a power of two)")
    ivf_nprobe: int = Field(32, ge=1, description="IVF cells searched per query")
    snapshot_every_changes: int = Field(10_000, ge=1, description="snapshot the index after this many changes")
    snapshot_every_s: float = Field(300.0, gt=0, description="... or this long after the last snapshot, if anything changed")
    follow_interval_s: float = Field(0.25, gt=0, le=60, description="longest wait between looks at the gallery log")
    max_k: int = Field(1000, ge=1, description="largest k a query may ask for")
    match_threshold: float | None = Field(
        None, ge=-1, le=1,
        description="cosine score at or above which a match is the same person; overrides the checkpoint's "
        "calibrated threshold (unset: the checkpoint's, if it has one)",
    )
    max_tracklet_crops: int = Field(32, ge=1, description="most crops (images or embedding ids) in one query")
    rerank_shortlist: int = Field(
        100, ge=2, le=2000, description="entries re-ranked by rerank=true (time and memory grow with its square)"
    )
    model_workers: int = Field(
        0, ge=0, le=64, description="forward passes run side by side (0: one per core with ONNX Runtime, else 1)"
    )
    threads: int = Field(0, ge=0, description="CPU threads per forward pass (0: cores / model_workers)")
    search_threads: int = Field(1, ge=1, description="FAISS OpenMP threads per search")
    request_timeout_s: float = Field(
        10.0, gt=0, description="deadline from arrival until a request's images are embedded (504 beyond)"
    )
    max_queue_images: int = Field(
        0, ge=0, description="most images waiting for the model at once, 503 beyond (0: throughput x queue_target_s)"
    )
    queue_target_s: float = Field(
        0.5, gt=0, description="the wait the default queue bound aims at: the model's measured throughput x this"
    )
    shutdown_delay_s: float = Field(
        0.0, ge=0, description="after SIGTERM, readiness is 503 but work is still served this long (load balancers)"
    )
    shutdown_grace_s: float = Field(
        8.0, ge=0, description="then, how long requests in flight may take to finish before the service stops"
    )
    log_level: str = Field("info", description="debug, info, warning, error")
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one JSON object per line")
