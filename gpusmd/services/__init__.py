"""ZeroMQ services: ingest, worker, sink (and the publish simulator), with their metrics and CurveZMQ support."""
