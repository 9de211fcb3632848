"""FastAPI re-identification service: embed crops, keep a durable gallery, rank queries."""
