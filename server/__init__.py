"""The coordinating side: Flower ServerApp, aggregation, checkpoint, records and report."""
